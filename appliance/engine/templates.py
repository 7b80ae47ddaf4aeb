"""Render a model's own chat template (GGUF ``tokenizer.chat_template``) safely.

Templates come from downloaded files, so they run in jinja2's immutable sandbox. A GGUF
without a template gets ChatML, which most instruct models of the Qwen/SmolLM lineage use.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import InvalidRequestError

__all__ = ["CHATML_TEMPLATE", "ChatTemplate"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateRaisedError(Exception):
    """A template called ``raise_exception``: the conversation does not fit its rules."""


def _raise_exception(message: str) -> None:
    raise TemplateRaisedError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # Hugging Face's tojson: no HTML escaping (jinja's own turns "<" into "\u003c").
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may reference."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            # A broken embedded template should not make the model unusable.
            self.source = CHATML_TEMPLATE
            self._template = env.from_string(CHATML_TEMPLATE)
            self.compile_error: str | None = str(exc)
        else:
            self.compile_error = None
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Render the prompt; template errors become a 400 naming the template's complaint."""
        context: dict[str, Any] = dict(extra or {})
        context.update(
            messages=messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            return self._template.render(**context)
        except TemplateRaisedError as exc:
            raise InvalidRequestError(
                f"The model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise InvalidRequestError(
                f"The model's chat template could not render these messages: {exc}",
                param="messages",
            ) from exc
