"""Chat templates: Jinja2 sources from ``tokenizer_config.json`` or GGUF metadata, rendered
the way Hugging Face ``apply_chat_template`` does (sandboxed, trim/lstrip blocks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]  # {"role": ..., "content": ...}

# Used for Mistral checkpoints that ship no template: the [INST] format of
# mistral-common, system prompt folded into the first user turn. Example:
#   <s>[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') %}"
    "{%- for message in messages if message['role'] == 'system' %}"
    "{%- set ns.system = ns.system + message['content'] + '\\n\\n' %}"
    "{%- endfor %}"
    "{%- for message in messages if message['role'] != 'system' %}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) %}"
    "{{- raise_exception('conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (ns.system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('unknown role ' + message['role'] + ' (allowed: system, user, assistant)') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


class ChatTemplateError(ValueError):
    """The template refused the conversation (e.g. roles not alternating)."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        self.source = source
        self._template = env.from_string(source)

    def render(
        self, messages: Sequence[Message], *, bos_token: str, eos_token: str, add_generation_prompt: bool = True
    ) -> str:
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None
