"""Server-sent events framing for the stream relay.

Owns cutting an upstream's `text/event-stream` bytes into events the way a
browser's EventSource does (WHATWG HTML, "Interpreting an event stream"): lines
end with CRLF, LF or CR, a blank line ends an event, one leading BOM is ignored.
Each event keeps the upstream's exact bytes (`raw`) so the relay can pass it on
unchanged, and its parsed `data`/`event`/`id` so the meter can read it.

Every blank line ends an "event", so every byte fed lands in exactly one `raw`
or in `pending()`: a stray blank line or a comment-only block comes out as an
event whose `data` is None (the spec dispatches nothing for those).

The one place where `raw` depends on how the reads were cut: a CRLF that ends
an event and is split between two reads. The event is handed out on the CR (a
CR-framed stream would otherwise wait for the next event before relaying this
one), and the LF that arrives next is kept as a leading byte of the *next*
event's `raw`, skipped when parsing. The relayed byte stream is unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_LF = 0x0A
_CR = 0x0D
_BOM = b"\xef\xbb\xbf"

# Two line endings in a row: a blank line, the end of an event. `\r(?!\n)`
# stops the engine from reading the one ending "\r\n" as "\r" then "\n".
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n?|\n)")
# One line ending; at an event's start it is a blank line by itself.
_LINE_END = re.compile(rb"\r\n?|\n")

# An incomplete blank line at the end of the buffer starts in its last two
# bytes ("\r\n" awaiting its second ending); the next search resumes there,
# so an event arriving slowly is scanned once, not once per read.
_TAIL = 2

_FRESH = 1
_AFTER_CR = 2


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs four times as much, once per event
class SSEEvent:
    """One event as the upstream framed it: a block of lines and the blank line ending it (read, never changed)."""

    raw: bytes
    """The upstream's exact bytes of this event, terminating blank line included."""
    data: bytes | None
    """The event's data lines joined by b"\\n"; None when it had no data line."""
    event: bytes | None = None
    """The last `event:` value in this event, if any."""
    id: bytes | None = None
    """The last valid `id:` value in this event (not inherited from earlier events)."""


class SSEDecoder:
    """Incremental decoder: feed it reads as they arrive, get back the events they complete."""

    __slots__ = ("_buf", "_lead", "_scan", "_edge")

    def __init__(self) -> None:
        # The unterminated event's bytes; _lead of them are not content (a BOM,
        # or the LF finishing the previous event's CRLF), and no blank line
        # starts before _scan.
        self._buf = bytearray()
        self._lead = 0
        self._scan = 0
        # _FRESH: nothing but (a prefix of) a BOM read yet. _AFTER_CR: the last
        # event ended on a CR that was the last byte read, so an LF read next
        # is the rest of that line ending, not a blank line. One field, so the
        # common case pays for one check.
        self._edge = _FRESH

    def at_boundary(self) -> bool:
        """Nothing pending and no framing state carried over: a read that is exactly one
        LF-framed one-line event would come out whole, as one event, and leave the decoder as
        it is (so a reader that recognises such a read may pass it by, see ChunkShape)."""
        return not self._buf and not self._edge and not self._lead

    def pending(self) -> bytes:
        """The bytes of an event not yet terminated (what a cut stream leaves behind)."""
        return bytes(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add one read; return the events it completes, in order."""
        if not chunk:
            return []
        buf = self._buf
        data: bytes | bytearray
        whole: bytes | None = None  # the read itself, when nothing was buffered before it
        if buf:
            buf += chunk
            data = buf
        else:
            # Common case: the read starts at an event boundary; work on it
            # without copying it into the buffer.
            data = whole = chunk if type(chunk) is bytes else bytes(chunk)
        lead = self._lead
        scan = self._scan
        if self._edge:
            if self._edge == _AFTER_CR:  # only ever set with an empty buffer
                if data[0] == _LF:
                    lead = scan = 1
            elif len(data) < len(_BOM) and _BOM.startswith(data):
                if data is not buf:
                    buf += data
                return []
            elif data.startswith(_BOM):
                lead = scan = len(_BOM)
            self._edge = 0

        n = len(data)
        events: list[SSEEvent] = []
        pos = 0
        # Most streams keep one framing; for LF or CRLF a blank line is one
        # fixed byte string that bytes.find locates without a loop over lines.
        # The check covers only what is left to search, once per read.
        blank: bytes | None = None
        if data.find(b"\r", scan) < 0:
            blank, eol = b"\n\n", b"\n"
        elif data.count(b"\r", scan) == data.count(b"\n", scan) == data.count(b"\r\n", scan):
            blank, eol = b"\r\n\r\n", b"\r\n"
        if blank == b"\n\n" and whole is not None:
            # LF framing from an event boundary, nothing buffered: the first LF
            # after an event's start (one memchr) tells a one-line event, the
            # shape of nearly every chunk, without searching for the blank line
            # or splitting lines. Here no CR follows `scan`, and start == scan.
            while True:
                start = pos + lead
                nl = whole.find(b"\n", start)
                if nl == start:
                    end = nl + 1  # a stray blank line
                    event = _parse(whole[pos:end], lead)
                elif nl < 0 or nl + 1 == n:
                    break  # the event's first line, or its blank line, is still to come
                elif whole[nl + 1] == _LF:
                    end = nl + 2
                    event = (SSEEvent(whole[pos:end], whole[start + 6:nl]) if whole.startswith(b"data: ", start)
                             else _parse(whole[pos:end], lead))
                else:
                    end = whole.find(b"\n\n", nl)
                    if end < 0:
                        break
                    end += 2
                    event = _parse(whole[pos:end], lead)
                events.append(event)
                pos = scan = end
                lead = 0
        elif blank is not None:
            while True:
                start = pos + lead
                if scan == start and data.startswith(eol, start):
                    end = start + len(eol)  # a blank line right at the start (a stray one)
                else:
                    end = data.find(blank, scan)
                    if end < 0:
                        break
                    end += len(blank)
                raw = data[pos:end]
                events.append(_parse(raw if type(raw) is bytes else bytes(raw), lead))
                pos = scan = end
                lead = 0
        else:
            while True:
                start = pos + lead
                found = _LINE_END.match(data, start) if scan == start else None
                if found is None:
                    found = _BLANK_LINE.search(data, scan)
                    if found is None:
                        break
                end = found.end()
                raw = data[pos:end]
                events.append(_parse(raw if type(raw) is bytes else bytes(raw), lead))
                pos = scan = end
                lead = 0

        rest = n - pos
        if rest == 0:
            if data[n - 1] == _CR:
                self._edge = _AFTER_CR
            buf.clear()
        elif data is buf:
            if pos:
                del buf[:pos]
        else:
            buf += memoryview(data)[pos:]
        self._lead = lead
        self._scan = max(lead, rest - _TAIL)
        return events


def _parse(raw: bytes, lead: int) -> SSEEvent:
    """Read the fields of one complete event (`lead` bytes at its start are not content)."""
    lines = (raw[lead:] if lead else raw).splitlines()  # bytes split on CRLF, LF, CR only
    if len(lines) == 2 and lines[0][:6] == b"data: ":
        # Nearly every event: one data line, then the blank line.
        return SSEEvent(raw, lines[0][6:])
    data: list[bytes] = []
    event: bytes | None = None
    event_id: bytes | None = None
    for line in lines:
        if not line:
            continue  # the blank line ending the event
        name, colon, value = line.partition(b":")
        # A comment (":" first, how keep-alives are sent) has an empty name
        # and so matches no field; a line without a colon is a field name
        # with an empty value.
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value
        elif name == b"id":
            if b"\0" not in value:  # the spec ignores an id containing NUL
                event_id = value
        # `retry` and unknown fields change nothing a relay needs.
    return SSEEvent(raw, b"\n".join(data) if data else None, event, event_id)
