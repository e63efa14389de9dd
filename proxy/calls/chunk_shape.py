"""Reading a stream's plain content chunks without a JSON parse each.

Nearly every event of a chat stream is the same bytes but for its text: an
upstream repeats the chunk's id, model, fingerprint and the rest of its
envelope, and only the string in `"delta":{"content":"..."}` changes. A
`ChunkShape` is learned from one such event (parsed in full, as any other) and
then reads a later read that is exactly one event of the same shape: its text
is the bytes between the envelope's two halves, decoded, when they are a JSON
string with no escape, quote or control character in it.

Why it gives what a parse would: the envelope before the string (`head`) and
after it (`tail`) are the learned event's bytes, the string between them is one
JSON string token whose value is its bytes as UTF-8, so the event parses to
the learned structure with that string in the content's place. Learning
checks, with a probe string in that place, that the structure says so: the
text read from it is exactly the probe (no other text in the envelope, the
string is the one counted) and it carries no usage. Anything else (another
envelope, an escape, two events in one read, a cut) is left to the decoder and
`read_event`, so an odd event costs a parse, never a miscount.
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


class ChunkShape:
    """The bytes around the text of one stream's plain content events."""

    __slots__ = ("_head", "_tail", "_min")

    def __init__(self, head: bytes, tail: bytes):
        self._head = b"data: " + head + b'"'
        self._tail = b'"' + tail + b"\n\n"
        self._min = len(self._head) + len(self._tail)

    @classmethod
    def learn(cls, data: bytes, text: str, read_event: ReadEvent) -> ChunkShape | None:
        """The shape of event `data`, whose output `read_event` read as `text`; None when its
        text is not one plain string token found once in it, or the probe fails."""
        if not text or _NOT_PLAIN.search(token := orjson.dumps(text)[1:-1]) or b"\n" in data or b"\r" in data:
            return None
        quoted = b'"' + token + b'"'
        at = data.find(quoted)
        if at < 0:
            return None  # serialized otherwise (say, non-ASCII escaped)
        head, tail = data[:at], data[at + len(quoted):]
        try:
            probed = read_event(head + orjson.dumps(_PROBE) + tail)
        except Exception:
            return None
        if probed != (_PROBE, None):
            # The envelope carries text or usage, or the string found is not the one counted
            # (the text is also another field's, found first).
            return None
        return cls(head, tail)

    def text_of(self, piece: bytes) -> str | None:
        """The text of `piece` when it is exactly one event of this shape (whose data a
        full parse would read as that text, with no usage); else None."""
        if len(piece) < self._min or not piece.startswith(self._head) or not piece.endswith(self._tail):
            return None
        inner = piece[len(self._head):len(piece) - len(self._tail)]
        if _NOT_PLAIN.search(inner):
            return None
        try:
            return inner.decode()
        except UnicodeDecodeError:
            return None  # not UTF-8: not JSON either; the decoder and read_event say what it is
