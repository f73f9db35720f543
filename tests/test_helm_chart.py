"""The Helm chart: Helm v4 lint and render (helm-python-sdk), Kubernetes schemas, structure.

No cluster: every check runs on the manifests Helm renders offline.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor

from server.cli import build_parser
from server.options import RUNTIME_FLAGS, SERVER_FLAGS, env_names
from tests.helm_chart import (
    CHART,
    NAMESPACE,
    SCENARIOS,
    Manifest,
    chart,
    kinds,
    only,
    render,
    render_notes,
    render_scenario,
    scenario,
    scenario_values,
)

SCENARIO_IDS = [path.name for path in SCENARIOS]
# Prometheus Operator custom resources: kubernetes-validate ships only the built-in API
# schemas, so these are checked structurally below (and their PromQL by promtool in
# test_metrics.py) instead of against a JSON schema.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
KUBERNETES_VERSIONS = sorted(
    {major_minor(version) for version in all_versions() if tuple(map(int, major_minor(version).split("."))) >= (1, 29)},
    key=lambda version: tuple(map(int, version.split("."))),
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def server_container(objects: list[Manifest]) -> dict[str, Any]:
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == "server")
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def all_containers(objects: list[Manifest]) -> list[dict[str, Any]]:
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_the_scenarios_are_the_five_the_chart_promises() -> None:
    expected = ["autoscaling", "default", "gpu", "monitoring", "tls"]
    assert [f"{name}-values.yaml" for name in expected] == SCENARIO_IDS


@pytest.mark.parametrize("values_file", [None, *SCENARIOS], ids=["values.yaml", *SCENARIO_IDS])
def test_helm_lint_strict_reports_no_errors_or_warnings(values_file: Path | None) -> None:
    values = scenario_values(values_file) if values_file else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    assert report["errors"] == []
    assert report["total_charts_linted"] == 1
    # Severity 1 is info ("icon is recommended"); 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_file", SCENARIOS, ids=SCENARIO_IDS)
def test_every_rendered_object_passes_kubernetes_validate_strict(values_file: Path) -> None:
    objects = render(scenario_values(values_file))
    assert {"Deployment", "Service"} <= set(kinds(objects))
    checked = 0
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: {exc}")
            checked += 1
    assert KUBERNETES_VERSIONS[0] == "1.29" and len(KUBERNETES_VERSIONS) >= 5
    assert checked >= 3 * len(KUBERNETES_VERSIONS)


def test_the_validator_is_strict_enough_to_catch_a_typo() -> None:
    deployment = only(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 50052}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.29", strict=True)


def test_only_the_prometheus_operator_kinds_lack_a_kubernetes_schema() -> None:
    missing = set()
    for obj in render_scenario("monitoring"):
        try:
            kubernetes_validate.validate(obj, "1.29", strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            missing.add((obj["apiVersion"], obj["kind"]))
    assert missing == CUSTOM_RESOURCES


# -- values.schema.json ------------------------------------------------------------------


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


@pytest.mark.parametrize("values_file", [CHART / "values.yaml", *SCENARIOS], ids=["values.yaml", *SCENARIO_IDS])
def test_values_files_validate_against_the_schema(values_file: Path) -> None:
    values = scenario_values(values_file)
    merged = chart().merge_values(values)
    jsonschema.Draft7Validator(schema()).validate(merged)
    chart().validate_schema(values)  # Helm's own validator


def test_every_default_value_is_described_by_the_schema() -> None:
    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            assert key in node.get("properties", {}), f"{path}{key} is not in values.schema.json"
            child = node["properties"][key]
            if isinstance(value, dict) and child.get("properties"):
                walk(value, child, f"{path}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema(), "")


def test_every_server_choice_in_the_schema_is_the_flags_own() -> None:
    flags = {flag.dest: flag for flag in (*RUNTIME_FLAGS, *SERVER_FLAGS)}
    checked = []
    for key, node in schema()["properties"]["server"]["properties"].items():
        if "enum" in node:
            flag = flags[re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()]
            assert flag.choices is not None and list(node["enum"]) == list(flag.choices), key
            checked.append(key)
    expected = {"dtype", "attentionBackend", "kvCacheDtype", "logLevel", "logFormat", "device", "quantization"}
    assert expected <= set(checked)


def test_every_values_key_is_commented() -> None:
    """Each key has a comment line right above it, or sits in a section whose header has one."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[int] = []  # indents of commented section headers enclosing this line
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9_.]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while documented and documented[-1] >= indent:
            documented.pop()
        commented = lines[number - 1].strip().startswith("#")
        if match.group(3).strip() == "" and commented:
            documented.append(indent)
        assert commented or documented or match.group(3).strip() == "", (
            f"values.yaml line {number + 1}: {match.group(2)} has no comment above it"
        )


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"server": {"port": "fifty"}}, "port"),
        ({"replicaCount": "two"}, "replicaCount"),
        ({"server": {"dtype": "int8"}}, "dtype"),
        ({"server": {"maxNumSeq": 8}}, "maxNumSeq"),  # a typo of maxNumSeqs
        ({"gpu": {"count": -1}}, "count"),
        ({"service": {"headless": "yes"}}, "headless"),
    ],
)
def test_a_wrong_value_is_rejected_by_the_render_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(helm.HelmError) as error:
        render(values)
    assert field in str(error.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
        ({"auth": {"enabled": True}}, "auth.enabled needs auth.existingSecret or auth.token"),
        ({"model": {"path": "mistral-7b"}}, "model.path names a checkpoint"),
        ({"lifecycle": {"terminationGracePeriodSeconds": 20}}, "must exceed"),
        ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}}, "autoscaling.enabled needs"),
    ],
)
def test_inconsistent_values_fail_the_render_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as error:
        render(values)
    assert message in str(error.value)


# -- structure ---------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", SCENARIOS, ids=SCENARIO_IDS)
def test_probes_are_native_grpc_on_numeric_container_ports(values_file: Path) -> None:
    container = server_container(render(scenario_values(values_file)))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    env = env_of(container)
    assert ports == {
        "grpc": int(env["MISTRALSERVE_PORT"]),
        "http": int(env["MISTRALSERVE_HTTP_PORT"]),
        "health": int(env["MISTRALSERVE_HEALTH_PORT"]),
        "metrics": int(env["MISTRALSERVE_METRICS_PORT"]),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = container[probe]["grpc"]["port"]
        assert type(port) is int and port == ports["health"], probe
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert "service" not in container["readinessProbe"]["grpc"]  # "" = overall serving status
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load + warm-up


@pytest.mark.parametrize("values_file", SCENARIOS, ids=SCENARIO_IDS)
def test_grace_period_exceeds_prestop_sleep_plus_drain_grace(values_file: Path) -> None:
    objects = render(scenario_values(values_file))
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(env_of(container)["MISTRALSERVE_SHUTDOWN_GRACE"])
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_an_explicit_grace_period_is_kept_when_long_enough() -> None:
    pod = only(render({"lifecycle": {"terminationGracePeriodSeconds": 120}}), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120


@pytest.mark.parametrize("values_file", SCENARIOS, ids=SCENARIO_IDS)
def test_security_context_is_locked_down(values_file: Path) -> None:
    objects = render(scenario_values(values_file))
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in all_containers(objects):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert "/tmp" in mounts, container["name"]  # writable scratch on a read-only root
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    server_mounts = {mount["mountPath"]: mount["name"] for mount in server_container(objects)["volumeMounts"]}
    assert server_mounts["/dev/shm"] == "dshm"


def test_gpu_limit_only_in_the_gpu_scenario() -> None:
    objects = render_scenario("gpu")
    gpu = server_container(objects)
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(gpu)["MISTRALSERVE_DEVICE"] == "cuda"
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    for values_file in SCENARIOS:
        if values_file.name != "gpu-values.yaml":
            limits = server_container(render(scenario_values(values_file)))["resources"].get("limits", {})
            assert "nvidia.com/gpu" not in limits, values_file.name


@pytest.mark.parametrize("values_file", SCENARIOS, ids=SCENARIO_IDS)
def test_every_environment_variable_is_one_the_server_reads(values_file: Path) -> None:
    known = env_names()  # from the server's own flag definitions
    for container in all_containers(render(scenario_values(values_file))):
        env = env_of(container)
        assert env, container["name"]
        assert set(env) <= known, set(env) - known
        # ... and the server's parser accepts every value the chart sets.
        command = container["args"][0]
        try:
            parsed = build_parser(env).parse_args([command])
        except SystemExit as exc:  # argparse reports a bad environment value this way
            pytest.fail(f"{container['name']}: the server rejects the chart's environment ({exc})")
        assert isinstance(parsed, argparse.Namespace)


def test_every_server_setting_reaches_the_server_with_its_value() -> None:
    values = {"server": {"maxNumSeqs": 7, "kvCacheMemory": "3GiB", "enablePrefixCaching": False, "logLevel": "debug"}}
    env = env_of(server_container(render(values)))
    args = build_parser(env).parse_args(["serve"])
    assert (args.max_num_seqs, args.kv_cache_memory, args.enable_prefix_caching) == (7, 3 << 30, False)
    assert (args.log_level, args.port, args.health_port, args.metrics_port) == ("debug", 50051, 50052, 9400)
    assert args.http_port == 8000 and args.served_model_name == ()
    assert args.cache_dir == Path("/models") and args.model is None  # the default model, fetched at start


def test_a_model_from_a_claim_is_mounted_read_only_without_the_fetch_step() -> None:
    objects = render_scenario("gpu")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models"}
    container = server_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True
    assert env_of(container)["MISTRALSERVE_MODEL"] == "/models/Mistral-7B-Instruct-v0.3"


def test_the_default_model_is_fetched_into_the_volume_by_an_init_container() -> None:
    objects = render()
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["fetch-model"]
    assert env_of(init)["MISTRALSERVE_CACHE_DIR"] == env_of(server_container(objects))["MISTRALSERVE_CACHE_DIR"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["model"] == "/models"
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["model"]
    assert build_parser(env_of(init)).parse_args(["fetch-model"]).cache_dir == Path("/models")


def test_service_exposes_grpc_http_and_metrics_by_port_name() -> None:
    objects = render()
    service = only(objects, "Service")
    container = server_container(objects)
    container_ports = {port["name"] for port in container["ports"]}
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "grpc": "grpc",
        "http": "http",
        "metrics": "metrics",
    }
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["http"] == 8000
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert "clusterIP" not in service["spec"]


def test_http_port_0_turns_the_http_front_end_off_everywhere() -> None:
    values = {"server": {"httpPort": 0}, "networkPolicy": {"enabled": True}}
    objects = render(values)
    container = server_container(objects)
    assert "http" not in {port["name"] for port in container["ports"]}
    assert "http" not in {port["name"] for port in only(objects, "Service")["spec"]["ports"]}
    rules = only(objects, "NetworkPolicy")["spec"]["ingress"]
    assert "http" not in {port["port"] for rule in rules for port in rule["ports"]}
    assert build_parser(env_of(container)).parse_args(["serve"]).http_port == 0


def test_served_model_name_aliases_reach_the_server() -> None:
    values = {"server": {"servedModelName": "mistral-7b-instruct,@cf/mistral/mistral-7b-instruct-v0.1"}}
    args = build_parser(env_of(server_container(render(values)))).parse_args(["serve"])
    assert args.served_model_name == ("mistral-7b-instruct", "@cf/mistral/mistral-7b-instruct-v0.1")
    given = build_parser(env_of(server_container(render(values)))).parse_args(["serve", "--served-model-name", "x"])
    assert given.served_model_name == ("x",)  # the command line replaces the environment's list


def test_headless_service_for_client_side_balancing() -> None:
    service = only(render_scenario("autoscaling"), "Service")
    assert service["spec"]["clusterIP"] == "None"


def test_service_monitor_selects_the_services_metrics_port() -> None:
    objects = render_scenario("monitoring")
    monitor = only(objects, "ServiceMonitor")
    service = only(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    service_port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    container = server_container(objects)
    container_port = next(p for p in container["ports"] if p["name"] == service_port["targetPort"])
    assert container_port["containerPort"] == int(env_of(container)["MISTRALSERVE_METRICS_PORT"])
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_autoscaler_scales_the_deployment_on_cpu_and_queue_depth() -> None:
    objects = render_scenario("autoscaling")
    hpa = only(objects, "HorizontalPodAutoscaler")
    deployment = only(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}  # fmt: skip
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    metrics = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 85
    assert metrics["Pods"]["pods"]["metric"]["name"] == "mistralserve_num_requests_waiting"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
    pdb = only(objects, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_optional_objects_are_off_by_default() -> None:
    assert kinds(render()) == ["Deployment", "Service", "ServiceAccount"]
    assert set(kinds(render_scenario("monitoring"))) == {
        "ConfigMap", "Deployment", "NetworkPolicy", "PrometheusRule", "Service", "ServiceAccount", "ServiceMonitor",
    }  # fmt: skip


def test_dashboard_configmap_ships_the_repository_dashboard() -> None:
    configmap = only(render_scenario("monitoring"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(configmap["data"]["mistral-serve.json"])
    assert shipped == json.loads((CHART / "dashboards" / "mistral-serve.json").read_text())


def test_network_policy_opens_exactly_the_four_ports() -> None:
    policy = only(render_scenario("monitoring"), "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    assert [rule["ports"][0]["port"] for rule in rules] == ["grpc", "http", "metrics", "health"]
    assert rules[0]["from"] == [{"podSelector": {"matchLabels": {"mistral-serve-client": "true"}}}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_tls_and_auth_files_come_from_mounted_secrets() -> None:
    objects = render_scenario("tls")
    container = server_container(objects)
    env = env_of(container)
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "mistral-serve-tls"
    for variable, file in (("MISTRALSERVE_TLS_CERT", "tls.crt"), ("MISTRALSERVE_TLS_KEY", "tls.key"),
                           ("MISTRALSERVE_TLS_CLIENT_CA", "ca.crt")):  # fmt: skip
        assert env[variable] == f"{mounts['tls']}/{file}"
    assert env["MISTRALSERVE_AUTH_TOKEN_FILE"] == f"{mounts['auth']}/token"
    secret = only(objects, "Secret")  # the token's; the TLS one already exists
    auth = volumes["auth"]["secret"]
    assert auth["secretName"] == secret["metadata"]["name"]
    assert auth["items"] == [{"key": "token", "path": "token"}]
    assert secret["data"]["token"] == "Y2hhbmdlLW1lLXRvLWEtbG9uZy1yYW5kb20tc3RyaW5n"  # base64 of the token


def test_inline_tls_material_becomes_a_tls_secret() -> None:
    values = {"tls": {"enabled": True, "certificate": "CERT", "privateKey": "KEY", "mutual": True, "clientCA": "CA"}}
    objects = render(values)
    secret = only(objects, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["data"] == {"tls.crt": "Q0VSVA==", "tls.key": "S0VZ", "ca.crt": "Q0E="}
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]["secretName"] == secret["metadata"]["name"]


LONGEST_RELEASE = "a-release-name-as-long-as-helm-allows-fifty-three-chr"  # 53 characters


def test_helm_caps_release_names_at_53_characters() -> None:
    assert len(LONGEST_RELEASE) == 53
    helm.validate_release_name(LONGEST_RELEASE)
    with pytest.raises(helm.HelmError):
        helm.validate_release_name(LONGEST_RELEASE + "x")


@pytest.mark.parametrize("release", ["r", LONGEST_RELEASE])
def test_names_fit_63_characters_and_are_dns_labels(release: str) -> None:
    values = scenario("monitoring")
    values["tls"] = {"enabled": True, "certificate": "C", "privateKey": "K"}
    objects = render(values, release=release)
    names = [obj["metadata"]["name"] for obj in objects]
    assert len(set(names)) >= 3
    for name in names:
        assert len(name) <= 63 and DNS_LABEL.match(name), name
    for obj in objects:
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63, value


def test_notes_show_a_grpcurl_call() -> None:
    notes = render_notes()
    assert "grpcurl -plaintext" in notes
    assert "mistralserve.v1.GenerationService/GenerateStream" in notes
    assert '"maxTokens": 16' in notes
    tls_notes = render_notes(scenario("tls"))
    assert "-cacert" in tls_notes and "authorization: Bearer" in tls_notes and "-plaintext" not in tls_notes


def test_readme_values_table_lists_every_key() -> None:
    readme = (CHART.parents[1] / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Za-z0-9.]+)` \|", readme, re.MULTILINE))

    def leaves(values: dict[str, Any], node: dict[str, Any], prefix: str) -> list[str]:
        paths = []
        for key, value in values.items():
            child = node["properties"][key]
            if isinstance(value, dict) and child.get("properties") and f"{prefix}{key}" not in table:
                paths += leaves(value, child, f"{prefix}{key}.")
            else:
                paths.append(f"{prefix}{key}")
        return paths

    documented = leaves(yaml.safe_load((CHART / "values.yaml").read_text()), schema(), "")
    assert len(documented) > 80
    assert [path for path in documented if path not in table] == []
