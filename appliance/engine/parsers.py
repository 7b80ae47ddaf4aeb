"""Splits streamed model output into visible content, reasoning and tool calls.

Text arrives in detokenized pieces whose boundaries fall anywhere, even inside a tag
(``"<tool_"`` + ``"call>"``). :class:`OutputParser` is a small state machine over a buffer of
not-yet-classified text. It only holds back text that could still be the start of a tag (or
layout whose fate depends on what follows) and releases it as soon as it cannot be, so the
concatenated content, the concatenated reasoning and the list of tool calls are the same for
every way of splitting the same output.

Malformed output never raises and is never lost: a tool-call region that does not parse is
returned verbatim as content. One exception to "release early": Hermes-format output that
opens with an untagged ``{"name":`` (weak models drop the ``<tool_call>`` tags, and
llama.cpp accepts that too) is held to the end, then read as calls only if all of it is.
"""

from __future__ import annotations

import enum
import secrets
import string
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec

from appliance.engine._parsers_toolcalls import (
    ParsedCall,
    RegionParser,
    Schemas,
    bare_call_start,
    parse_bare_hermes,
    parse_hermes,
    parse_qwen_xml,
)

__all__ = [
    "OutputParser",
    "ParsedDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolFormat",
    "ToolSpec",
    "detect_tool_format",
    "new_tool_call_id",
]

ToolFormat = Literal["qwen_xml", "hermes"]

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_CALL_OPEN = "<tool_call>"
_CALL_CLOSE = "</tool_call>"
_NEWLINES = "\r\n"
_ID_ALPHABET = string.ascii_letters + string.digits


class ToolSpec(msgspec.Struct, frozen=True):
    """A tool the request offered: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any]


class ToolCallDelta(msgspec.Struct):
    """A piece of one tool call, shaped like OpenAI's streaming ``tool_calls[]`` entries."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ParsedDelta(msgspec.Struct):
    """What one :meth:`OutputParser.feed` (or ``finish``) call released."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = msgspec.field(default_factory=list)

    def is_empty(self) -> bool:
        """True when there is nothing to send to the client."""
        return not (self.content or self.reasoning or self.tool_calls)


class ToolCall(msgspec.Struct):
    """A complete tool call; ``arguments`` is the text of a JSON object."""

    id: str
    name: str
    arguments: str


def new_tool_call_id() -> str:
    """An OpenAI-style call id: ``call_`` and 24 random base62 characters."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def detect_tool_format(chat_template: str) -> ToolFormat | None:
    """Which tool-call syntax a chat template teaches the model, from its markers."""
    if "<function=" in chat_template:
        return "qwen_xml"
    if "<tool_call>" in chat_template:
        return "hermes"
    return None


class _State(enum.Enum):
    REASONING_START = enum.auto()  # prompt opened <think>; the model may still repeat it
    REASONING_LEAD = enum.auto()  # first character of reasoning: one "\n" there is layout
    REASONING = enum.auto()
    SKIP_NEWLINES = enum.auto()  # after </think> or a dropped tag: newlines are layout
    CONTENT = enum.auto()
    TOOL_CALL = enum.auto()  # inside <tool_call>: buffered until the region closes
    AFTER_CALL = enum.auto()  # between calls: whitespace is dropped
    DONE = enum.auto()  # one call made and parallel calls are off: the rest is ignored
    BARE_CALL = enum.auto()  # Hermes output opened with an untagged '{"name":': held to the end


_REASONING_STATES = frozenset({_State.REASONING_START, _State.REASONING_LEAD, _State.REASONING})


def _partial_tag_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    for size in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        tail = text[-size:]
        if any(tag.startswith(tail) for tag in tags):
            return size
    return 0


def _trailing_space_len(text: str) -> int:
    return len(text) - len(text.rstrip())


def _find_first(text: str, tags: Sequence[str]) -> tuple[int, str] | None:
    """The earliest complete occurrence of any of ``tags`` in ``text``."""
    best: tuple[int, str] | None = None
    for tag in tags:
        at = text.find(tag)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, tag)
    return best


class OutputParser:
    """Incremental splitter of one generation's text; see the module docstring.

    ``reasoning`` enables ``<think>`` blocks (without it the tags are dropped and the text
    between them is content). ``starts_in_reasoning`` means the prompt already opened the
    block; it only matters together with ``reasoning``. ``tool_format`` enables tool calls;
    with ``tools`` given, a call naming another function is treated as text.
    ``id_factory`` makes call ids (tests pass a deterministic one).
    """

    def __init__(
        self,
        *,
        reasoning: bool = False,
        starts_in_reasoning: bool = False,
        tool_format: ToolFormat | None = None,
        tools: Sequence[ToolSpec] = (),
        parallel_tool_calls: bool = True,
        id_factory: Callable[[], str] = new_tool_call_id,
    ) -> None:
        self._reasoning = reasoning
        self._tool_format = tool_format
        self._parallel = parallel_tool_calls
        self._new_id = id_factory
        self._schemas: Schemas = {t.name: t.parameters for t in tools} if tools else None
        # Try the advertised syntax first; models fine-tuned on the other one still slip into it.
        self._region_parsers: tuple[RegionParser, ...] = (
            (parse_hermes, parse_qwen_xml)
            if tool_format == "hermes"
            else (parse_qwen_xml, parse_hermes)
        )
        self._content_tags: tuple[str, ...] = (_THINK_OPEN, _THINK_CLOSE) + (
            (_CALL_OPEN,) if tool_format else ()
        )
        self._state = (
            _State.REASONING_START if reasoning and starts_in_reasoning else _State.CONTENT
        )
        self._buf = ""
        # Text of the current <tool_call> region that can no longer contain its close tag,
        # moved out of _buf so long calls are not rescanned on every piece.
        self._region: list[str] = []
        # Whitespace that preceded the current region: dropped if it is a call, else content.
        self._region_lead = ""
        self._calls: list[ToolCall] = []
        # Hermes models may answer with an untagged call object, but only as the whole answer.
        self._bare_allowed = tool_format == "hermes"
        self._content_emitted = False
        self._finished = False
        self._out = ParsedDelta()

    @property
    def in_reasoning(self) -> bool:
        """True while inside a think block (the caller counts reasoning tokens with it)."""
        return self._state in _REASONING_STATES

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The complete tool calls so far, in order."""
        return list(self._calls)

    def feed(self, text: str) -> ParsedDelta:
        """Adds generated text; returns what can be released now."""
        if self._finished:
            raise RuntimeError("OutputParser.feed() called after finish()")
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ParsedDelta:
        """Ends the generation: classifies and releases everything still held back."""
        if self._finished:
            return ParsedDelta()
        self._finished = True
        return self._run(final=True)

    def _run(self, *, final: bool) -> ParsedDelta:
        while self._step(final):
            pass
        out, self._out = self._out, ParsedDelta()
        return out

    def _step(self, final: bool) -> bool:
        """Advances the state machine once; False when it needs more text (or is done)."""
        state = self._state
        if state is _State.REASONING_START:
            return self._step_reasoning_start(final)
        if state is _State.REASONING_LEAD:
            if not self._buf and not final:
                return False
            if self._buf.startswith("\n"):
                self._buf = self._buf[1:]
            self._state = _State.REASONING
            return True
        if state is _State.REASONING:
            return self._step_reasoning(final)
        if state is _State.SKIP_NEWLINES:
            self._buf = self._buf.lstrip(_NEWLINES)
            if not self._buf:
                return False
            self._state = _State.CONTENT
            return True
        if state is _State.CONTENT:
            return self._step_content(final)
        if state is _State.TOOL_CALL:
            return self._step_tool_call(final)
        if state is _State.AFTER_CALL:
            return self._step_after_call(final)
        if state is _State.BARE_CALL:
            return self._step_bare_call(final)
        self._buf = ""  # DONE
        return False

    def _step_reasoning_start(self, final: bool) -> bool:
        # The prompt already opened the block, so a <think> the model writes anyway (perhaps
        # after some whitespace) is a duplicate, not reasoning text.
        rest = self._buf.lstrip()
        if rest.startswith(_THINK_OPEN):
            self._buf = rest[len(_THINK_OPEN) :]
        elif not final and _THINK_OPEN.startswith(rest):
            return False
        self._state = _State.REASONING_LEAD
        return True

    def _step_reasoning(self, final: bool) -> bool:
        buf = self._buf
        end = buf.find(_THINK_CLOSE)
        if end >= 0:
            text = buf[:end]
            self._emit_reasoning(text[:-1] if text.endswith("\n") else text)
            self._buf = buf[end + len(_THINK_CLOSE) :]
            self._state = _State.SKIP_NEWLINES
            return True
        # Hold a trailing "\n" too: it is dropped if </think> follows it.
        keep = 0 if final else _partial_tag_len(buf, (_THINK_CLOSE, "\n" + _THINK_CLOSE))
        self._emit_reasoning(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _step_content(self, final: bool) -> bool:
        buf = self._buf
        if self._bare_allowed and not self._content_emitted and not self._calls:
            opens = bare_call_start(buf.lstrip())
            if opens is None and not final:
                return False  # too short to tell: hold it all
            if opens:
                self._state = _State.BARE_CALL
                return True
        # Every tag starts with "<": plain text (most pieces) skips the tag scans.
        tagged = "<" in buf
        found = _find_first(buf, self._content_tags) if tagged else None
        if found is None:
            keep = 0
            if not final:
                keep = _partial_tag_len(buf, self._content_tags) if tagged else 0
                if self._tool_format:
                    # Whitespace right before a tool call is dropped, so it waits to see.
                    keep += _trailing_space_len(buf[: len(buf) - keep])
            self._emit_content(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        at, tag = found
        before, self._buf = buf[:at], buf[at + len(tag) :]
        if tag == _CALL_OPEN:
            lead = _trailing_space_len(before)
            self._emit_content(before[: len(before) - lead])
            self._region_lead = before[len(before) - lead :]
            self._region = []
            self._state = _State.TOOL_CALL
        elif tag == _THINK_OPEN and self._reasoning:
            self._emit_content(before)
            self._state = _State.REASONING_LEAD
        else:
            # A stray think tag (or one with reasoning off): the tag itself never shows.
            self._emit_content(before)
            self._state = _State.SKIP_NEWLINES
        return True

    def _step_tool_call(self, final: bool) -> bool:
        buf = self._buf
        end = buf.find(_CALL_CLOSE)
        if end >= 0:
            inner = "".join(self._region) + buf[:end]
            self._buf = buf[end + len(_CALL_CLOSE) :]
            self._close_region(inner, inner + _CALL_CLOSE, closed=True)
            return True
        if final:
            inner = "".join(self._region) + buf
            self._buf = ""
            self._close_region(inner, inner, closed=False)
            return True
        # Keep only a tail that might be the start of </tool_call> for the next search.
        cut = max(0, len(buf) - (len(_CALL_CLOSE) - 1))
        self._region.append(buf[:cut])
        self._buf = buf[cut:]
        return False

    def _step_after_call(self, final: bool) -> bool:
        rest = self._buf.lstrip()
        self._buf = rest
        if not rest:
            return False
        if rest.startswith(_CALL_OPEN):
            self._buf = rest[len(_CALL_OPEN) :]
            self._region_lead = ""
            self._region = []
            self._state = _State.TOOL_CALL
            return True
        if not final and _CALL_OPEN.startswith(rest):
            return False
        self._state = _State.CONTENT
        return True

    def _step_bare_call(self, final: bool) -> bool:
        if not final:
            return False
        calls = parse_bare_hermes(self._buf, self._schemas)
        self._bare_allowed = False
        if calls is None:
            self._state = _State.CONTENT  # just text that looked like a call: read it as such
            return True
        self._buf = ""
        for name, arguments in calls if self._parallel else calls[:1]:
            self._emit_call(name, arguments)
        self._state = _State.DONE
        return False

    def _close_region(self, inner: str, raw_tail: str, *, closed: bool) -> None:
        """Emits the calls in a finished region, or gives its raw text back as content."""
        self._region = []
        calls = self._parse_region(inner, closed)
        if calls is None:
            self._emit_content(self._region_lead + _CALL_OPEN + raw_tail)
            self._state = _State.CONTENT
        else:
            for name, arguments in calls if self._parallel else calls[:1]:
                self._emit_call(name, arguments)
            self._state = _State.AFTER_CALL if self._parallel else _State.DONE
        self._region_lead = ""

    def _parse_region(self, inner: str, closed: bool) -> list[ParsedCall] | None:
        for parse in self._region_parsers:
            try:
                calls = parse(inner, self._schemas, closed)
            except (ValueError, TypeError, RecursionError):
                # Defence in depth: a parser bug must cost one call, never the response.
                calls = None
            if calls:
                return calls
        return None

    def _emit_content(self, text: str) -> None:
        if text.strip():
            self._content_emitted = True
        self._out.content += text

    def _emit_reasoning(self, text: str) -> None:
        # Reasoning states are only entered with reasoning=True, so this never hides text.
        self._out.reasoning += text

    def _emit_call(self, name: str, arguments: str) -> None:
        index = len(self._calls)
        call_id = self._new_id()
        self._calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
        self._out.tool_calls.append(ToolCallDelta(index=index, id=call_id, name=name))
        self._out.tool_calls.append(ToolCallDelta(index=index, arguments=arguments))
