"""Render Hugging Face chat templates (Jinja) without importing transformers.

Chat templates ship with checkpoints and are untrusted code, so they run in an
`ImmutableSandboxedEnvironment` with the same settings, globals and filters that
transformers' `apply_chat_template` uses; a template must render byte-identically
here and there, or the token ids a model was trained on would drift.

`render` also reports the character spans of `{% generation %}...{% endgeneration %}`
blocks, which is how transformers (and TRL's training templates) mark the assistant
tokens that carry the loss. The spans are measured the way transformers measures them:
the length of the output streamed so far when the block finishes rendering.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["RenderedChat", "render", "has_generation_blocks"]

# Older names for a message's reasoning; templates read `reasoning_content` (gpt-oss templates read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class RenderedChat(NamedTuple):
    """The rendered text and the `[start, end)` character spans of its `{% generation %}` blocks."""

    text: str
    generation_spans: list[tuple[int, int]]


class _SpanTracker:
    """Counts characters streamed out of a render and records where generation blocks land."""

    def __init__(self) -> None:
        self.emitted = 0
        self.spans: list[tuple[int, int]] = []


# A context variable rather than state on the (cached, shared) environment: renders in
# different threads or nested renders can't see each other's spans, and templates can't reach it.
_active_tracker: ContextVar[_SpanTracker | None] = ContextVar("_active_tracker", default=None)


class _GenerationExtension(jinja2.ext.Extension):
    """Implements `{% generation %}...{% endgeneration %}`: renders the body unchanged and records its span."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record_span"), [], [], body).set_lineno(lineno)

    def _record_span(self, caller) -> str:
        text = caller()
        tracker = _active_tracker.get()
        if tracker is not None:
            tracker.spans.append((tracker.emitted, tracker.emitted + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Jinja's own `tojson` HTML-escapes `<>&'`; chat templates expect plain JSON (as transformers renders it)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself (no `dict.__subclasses__` tricks)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes, so templates can't store handles to internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]  # Jinja's signature trick, so `namespace(self=...)` still works
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers uses for chat templates (whitespace control matters for the ids)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationExtension, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def has_generation_blocks(template: str) -> bool:
    """Whether `template` marks assistant output with `{% generation %}` (needed for assistant masks)."""
    ast = _environment().parse(template)
    return any(
        isinstance(node.call, jinja2.nodes.Call) and isinstance(node.call.node, jinja2.nodes.ExtensionAttribute)
        for node in ast.find_all(jinja2.nodes.CallBlock)
    )


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types.

    The sandbox only knows which methods of builtin types are dangerous, so rich objects (arrays,
    images, pydantic models) are converted, and anything unknown becomes an inert `"<TypeName>"`
    placeholder, as transformers does.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_message(message: Any) -> dict:
    """Drop `None` fields (templates handle a missing key, not `None`) and alias reasoning field names."""
    message = _plain(message)
    if not isinstance(message, dict):
        raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _check_tools(tools: list | None) -> list | None:
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise TypeError("Tools must be JSON schemas (dicts); convert Python functions to schemas first.")
    return tools


def render(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> RenderedChat:
    """Render one conversation with a chat template, as transformers' `apply_chat_template(tokenize=False)` does.

    Args:
        template: Jinja source of the chat template.
        messages: `{"role": ..., "content": ...}` dicts; `None`-valued fields are dropped.
        add_generation_prompt: Passed to the template; appends the assistant header when the template supports it.
        tools: JSON schemas of tools, passed to the template as `tools`.
        documents: RAG documents, passed to the template as `documents`.
        special_tokens: Named special tokens (`{"bos_token": "<s>", ...}`), visible to the template as variables.
        **kwargs: Extra template variables; they override `special_tokens` of the same name.

    Returns:
        `RenderedChat(text, generation_spans)`; unpacks as a `(text, spans)` tuple. Each span is the
        `[start, end)` character range of one rendered `{% generation %}` block.

    Raises:
        jinja2.TemplateError: The template failed, including a template's own `raise_exception(...)`.
    """
    variables = _plain({**(special_tokens or {}), **kwargs})
    variables.update(
        messages=[_normalize_message(message) for message in messages],
        tools=_plain(_check_tools(tools)),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
    )
    tracker = _SpanTracker()
    reset = _active_tracker.set(tracker)
    try:
        chunks = []
        for chunk in _compile(template).generate(**variables):
            chunks.append(chunk)
            tracker.emitted += len(chunk)
    finally:
        _active_tracker.reset(reset)
    return RenderedChat("".join(chunks), tracker.spans)
