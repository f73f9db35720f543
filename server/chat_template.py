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
# mistral-common, system prompt folded into the first user turn, tools in the v3 format
# ([AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] / [TOOL_RESULTS]). Example:
#   <s>[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', turn=0, prev='', users=0) %}"
    "{%- for message in messages if message['role'] == 'system' %}"
    "{%- set ns.system = ns.system + message['content'] + '\\n\\n' %}"
    "{%- endfor %}"
    "{%- set convo = messages | rejectattr('role', 'equalto', 'system') | list %}"
    "{%- set last_user = (convo | selectattr('role', 'equalto', 'user') | list | length) - 1 %}"
    "{%- for message in convo %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if ns.prev not in ('calls', 'tool') %}"
    "{{- raise_exception('a tool message must follow an assistant message with tool_calls') }}"
    "{%- endif %}"
    "{{- '[TOOL_RESULTS] ' + {'content': message['content'], 'call_id': message['tool_call_id'] or ''} | tojson"
    " + '[/TOOL_RESULTS]' }}"
    "{%- set ns.prev = 'tool' %}"
    "{%- else %}"
    "{%- if (message['role'] == 'user') != (ns.turn is even) %}"
    "{{- raise_exception('conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- set ns.turn = ns.turn + 1 %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if tools and ns.users == last_user %}"
    "{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif %}"
    "{%- set ns.users = ns.users + 1 %}"
    "{{- '[INST] ' + (ns.system if ns.turn == 1 else '') + message['content'] + ' [/INST]' }}"
    "{%- set ns.prev = 'user' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '[TOOL_CALLS] [' }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- {'name': call['function']['name'], 'arguments': call['function']['arguments'], 'id': call['id']}"
    " | tojson + (', ' if not loop.last else '') }}"
    "{%- endfor %}"
    "{{- ']' + eos_token }}"
    "{%- set ns.prev = 'calls' %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- set ns.prev = 'assistant' %}"
    "{%- else %}"
    "{{- raise_exception('unknown role ' + message['role'] + ' (allowed: system, user, assistant, tool)') }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
)

# For templates that take no ``tools`` (as TGI does): the functions are described at the end of
# the last user turn, with the format a call takes; assistant tool calls become that text.
TOOL_PROMPT = (
    "\n\nYou can call these functions:\n{tools}\n"
    "To call one or more of them, answer with only a JSON list of calls: "
    '[{{"name": <function name>, "arguments": <arguments object>}}]'
)


def tool_calls_text(calls: Sequence[Mapping[str, Any]]) -> str:
    """OpenAI ``tool_calls`` as the JSON list the model writes: ``[{"name": ..., "arguments": {...}}]``."""
    return _tojson([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls])


def _without_tools(messages: Sequence[Message], tools: Sequence[Message] | None) -> list[dict[str, Any]]:
    turns = [dict(m) for m in messages]
    for turn in turns:
        if turn.get("tool_calls"):
            turn["content"] = tool_calls_text(turn.pop("tool_calls"))
    if tools:
        last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
        if last_user is None:
            raise ChatTemplateError("tools need a user message to describe them in")
        described = "\n".join(_tojson(t.get("function", t)) for t in tools)
        turns[last_user]["content"] = turns[last_user]["content"] + TOOL_PROMPT.format(tools=described)
    return turns


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

    @property
    def takes_tools(self) -> bool:
        """The template renders the ``tools`` variable itself (Mistral's, Hermes-style, ...)."""
        return "tools" in self.source

    def render(
        self,
        messages: Sequence[Message],
        *,
        bos_token: str,
        eos_token: str,
        add_generation_prompt: bool = True,
        tools: Sequence[Message] | None = None,
    ) -> str:
        """``tools`` in OpenAI's shape; a template that does not take them gets ``TOOL_PROMPT``."""
        turns = [dict(m) for m in messages] if self.takes_tools else _without_tools(messages, tools)
        try:
            return self._template.render(
                messages=turns,
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools and self.takes_tools else None,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None
