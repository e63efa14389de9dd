"""Reading a stream's plain content chunks without a JSON parse each.

Nearly every event of a chat stream is the same bytes but for its text: an
upstream repeats the chunk's id, model, fingerprint and the rest of its
envelope, and only the string in `"delta":{"content":"..."}` changes. A
`ChunkShape` is learned from one such event (parsed in full, as any other) and
then reads a later read that is exactly one event of the same shape: its text
is the bytes between the envelope's two halves, decoded, when they are a JSON
string with no escape, quote or control character in it.

OpenAI also pads every chunk (stream obfuscation, on by default): an
`"obfuscation"` string of random length and characters after the text. A
shape learned from a padded chunk has a second slot there, read only to check
it is a plain ASCII string.

Why it gives what a parse would: the envelope before the string (`head`) and
after it (`tail`) are the learned event's bytes, the string between them is one
JSON string token whose value is its bytes as UTF-8, so the event parses to
the learned structure with that string in the content's place (and the
padding's, in its own). Learning checks, with probe strings in those places,
that the structure says so: the text read from it is exactly the text's probe
(no other text in the envelope or the padding, the string is the one counted)
and it carries no usage. Anything else (another envelope, an escape, two
events in one read, a cut) is left to the decoder and `read_event`, so an odd
event costs a parse, never a miscount.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["ChunkShape"]

_PROBE = "mg-probe-Zq7"
# What a JSON string token holds only escaped (quote, backslash, control
# characters: CR and LF among them, so the event is one SSE line too).
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')

ReadEvent = Callable[[bytes], tuple[str, dict[str, Any] | None]]

# A string an upstream adds to every chunk with a new value each time, to hide the text's
# length on the wire (OpenAI's stream obfuscation, on by default): a second slot of the
# shape, whose value is checked to be a plain ASCII string and never counted.
_PADDING_KEY = b'"obfuscation":"'
_PAD_PROBE = b"mg-pad-probe"


class ChunkShape:
    """The bytes around the text (and the padding, if any) of one stream's plain content events."""

    __slots__ = ("_head", "_tail", "_between", "_min")

    def __init__(self, head: bytes, tail: bytes, between: bytes | None = None):
        self._head = b"data: " + head + b'"'
        # With padding: `between` runs from the text's closing quote to the padding's opening
        # one, `tail` from the padding's closing quote on.
        self._between = b'"' + between if between is not None else None
        self._tail = (b'"' if between is None else b"") + tail + b"\n\n"
        self._min = len(self._head) + len(self._tail) + (len(self._between) if self._between else 0)

    @staticmethod
    def can_learn(text: str) -> bool:
        """Whether a chunk whose text is `text` may teach a shape (the text is a plain string)."""
        return bool(text) and not _NOT_PLAIN.search(quoted := orjson.dumps(text), 1, len(quoted) - 1)

    @classmethod
    def learn(cls, data: bytes, text: str, read_event: ReadEvent) -> ChunkShape | None:
        """The shape of event `data`, whose output `read_event` read as `text`; None when its
        text is not one plain string token in it, or the probe fails."""
        if not cls.can_learn(text) or b"\n" in data or b"\r" in data:
            return None
        quoted = orjson.dumps(text)
        at = data.find(quoted)
        if at < 0:
            return None  # serialized otherwise (say, non-ASCII escaped)
        head, tail = data[:at], data[at + len(quoted):]
        between: bytes | None = None
        pad_at = tail.find(_PADDING_KEY)
        if pad_at >= 0:
            pad_start = pad_at + len(_PADDING_KEY)
            pad_end = tail.find(b'"', pad_start)
            if pad_end < 0:
                return None  # (a quote the padding escapes ends it here wrongly: the probe fails)
            between, tail = tail[:pad_start], tail[pad_end:]
        try:
            probe = head + orjson.dumps(_PROBE) + (tail if between is None else between + _PAD_PROBE + tail)
            probed = read_event(probe)
        except Exception:
            return None
        if probed != (_PROBE, None):
            # The envelope carries text or usage, or the string found is not the one counted
            # (the text is also another field's, found first), or the padding is counted.
            return None
        return cls(head, tail, between)

    def text_of(self, piece: bytes) -> str | None:
        """The text of `piece` when it is exactly one event of this shape (whose data a
        full parse would read as that text, with no usage); else None."""
        if len(piece) < self._min or not piece.startswith(self._head) or not piece.endswith(self._tail):
            return None
        start, end = len(self._head), len(piece) - len(self._tail)
        if self._between is not None:
            close = piece.find(b'"', start, end)  # the text's closing quote, if it is one (no escape before it)
            pad = close + len(self._between)
            if close < 0 or pad > end or not piece.startswith(self._between, close):
                return None
            padding = piece[pad:end]
            if not padding.isascii() or _NOT_PLAIN.search(padding):
                return None
            end = close
        inner = piece[start:end]
        if _NOT_PLAIN.search(inner):
            return None
        try:
            return inner.decode()
        except UnicodeDecodeError:
            return None  # not UTF-8: not JSON either; the decoder and read_event say what it is
