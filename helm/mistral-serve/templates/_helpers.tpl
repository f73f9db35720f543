{{/* Chart name, truncated to 63 characters (the DNS label limit). */}}
{{- define "mistral-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name; 63 characters at most. */}}
{{- define "mistral-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A derived name: the full name shortened so that "<fullname>-<suffix>" fits 63 characters. */}}
{{- define "mistral-serve.suffixed" -}}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "mistral-serve.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "mistral-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (app.kubernetes.io/*). */}}
{{- define "mistral-serve.labels" -}}
helm.sh/chart: {{ include "mistral-serve.chart" . }}
{{ include "mistral-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mistral-serve
{{- end }}

{{/* Labels the Service, PDB, NetworkPolicy and ServiceMonitor select pods and Services by. */}}
{{- define "mistral-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mistral-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mistral-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mistral-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mistral-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mistral-serve.tlsSecretName" -}}
{{- default (include "mistral-serve.suffixed" (list . "tls")) .Values.tls.existingSecret }}
{{- end }}

{{- define "mistral-serve.authSecretName" -}}
{{- default (include "mistral-serve.suffixed" (list . "auth")) .Values.auth.existingSecret }}
{{- end }}

{{/* Seconds between SIGTERM-after-preStop and SIGKILL: preStop sleep + drain grace + 15 s for engine shutdown. */}}
{{- define "mistral-serve.terminationGracePeriodSeconds" -}}
{{- $minimum := add (int .Values.lifecycle.preStopSleepSeconds) (int (ceil .Values.server.shutdownGrace)) }}
{{- $explicit := int .Values.lifecycle.terminationGracePeriodSeconds }}
{{- if eq $explicit 0 }}
{{- add $minimum 15 }}
{{- else if le $explicit $minimum }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + server.shutdownGrace (%d), or be 0 to derive it" $explicit $minimum) }}
{{- else }}
{{- $explicit }}
{{- end }}
{{- end }}

{{/*
Environment of the server container. Each server.* key becomes the environment twin of the
flag of the same name: maxNumSeqs -> MISTRALSERVE_MAX_NUM_SEQS (--max-num-seqs). Empty
strings are left out (the server's default applies).
*/}}
{{- define "mistral-serve.env" -}}
{{- range $key, $value := .Values.server }}
{{- if not (and (kindIs "string" $value) (eq $value "")) }}
- name: {{ printf "MISTRALSERVE_%s" (snakecase $key | upper) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
- name: MISTRALSERVE_HOST
  value: "0.0.0.0"
{{- if .Values.model.path }}
- name: MISTRALSERVE_MODEL
  value: {{ printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.path | quote }}
{{- else }}
- name: MISTRALSERVE_CACHE_DIR
  value: {{ .Values.model.mountPath | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: MISTRALSERVE_TLS_CERT
  value: /etc/mistral-serve/tls/tls.crt
- name: MISTRALSERVE_TLS_KEY
  value: /etc/mistral-serve/tls/tls.key
{{- if .Values.tls.mutual }}
- name: MISTRALSERVE_TLS_CLIENT_CA
  value: /etc/mistral-serve/tls/ca.crt
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: MISTRALSERVE_AUTH_TOKEN_FILE
  value: /etc/mistral-serve/auth/token
{{- end }}
{{- end }}
