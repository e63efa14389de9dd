"""The SSE decoder: framing per the WHATWG event-stream rules, byte-exact raws, any read split."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.calls.sse import SSEDecoder, SSEEvent

BOM = b"\xef\xbb\xbf"


def decode(*reads: bytes) -> tuple[list[SSEEvent], bytes]:
    decoder = SSEDecoder()
    events = [event for read in reads for event in decoder.feed(read)]
    return events, decoder.pending()


def datas(events: list[SSEEvent]) -> list[bytes | None]:
    return [event.data for event in events]


# ------------------------------------------------------------------ framing


def test_lf_framed_events_end_at_blank_lines() -> None:
    events, pending = decode(b'data: {"a":1}\n\ndata: [DONE]\n\n')
    assert [e.raw for e in events] == [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]
    assert datas(events) == [b'{"a":1}', b"[DONE]"]
    assert pending == b""


def test_crlf_framed_events_end_at_blank_lines() -> None:
    events, pending = decode(b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n')
    assert [e.raw for e in events] == [b'data: {"a":1}\r\n\r\n', b"data: [DONE]\r\n\r\n"]
    assert datas(events) == [b'{"a":1}', b"[DONE]"]
    assert pending == b""


def test_cr_framed_events_end_at_blank_lines() -> None:
    events, pending = decode(b'data: {"a":1}\r\rdata: [DONE]\r\r')
    assert [e.raw for e in events] == [b'data: {"a":1}\r\r', b"data: [DONE]\r\r"]
    assert datas(events) == [b'{"a":1}', b"[DONE]"]
    assert pending == b""


def test_crlf_inside_an_event_split_between_reads_is_one_line_ending() -> None:
    events, pending = decode(b"data: a\r", b"\ndata: b\r\n\r\n")
    assert datas(events) == [b"a\nb"]
    assert pending == b""


def test_crlf_ending_an_event_split_between_reads_makes_no_extra_event() -> None:
    decoder = SSEDecoder()
    first = decoder.feed(b"data: a\r\n\r")
    # Handed out on the CR: a CR-framed stream must not wait for the next read.
    assert datas(first) == [b"a"]
    second = decoder.feed(b"\ndata: b\r\n\r\n")
    assert datas(second) == [b"b"]
    assert b"".join(e.raw for e in first + second) == b"data: a\r\n\r\ndata: b\r\n\r\n"
    assert decoder.pending() == b""


def test_a_second_blank_line_after_a_cr_is_an_empty_event() -> None:
    # "\r" then "\r" are two blank lines, unlike "\r" then "\n" (one CRLF).
    events, _ = decode(b"data: a\r\r", b"\rdata: b\r\r")
    assert [e.raw for e in events] == [b"data: a\r\r", b"\r", b"data: b\r\r"]
    assert datas(events) == [b"a", None, b"b"]


def test_blank_lines_between_events_carry_no_data() -> None:
    events, _ = decode(b"\ndata: a\n\n\n\ndata: b\n\n")
    assert datas(events) == [None, b"a", None, None, b"b"]


def test_unterminated_tail_stays_pending() -> None:
    events, pending = decode(b"data: a\n\ndata: b\n", b"event: x")
    assert datas(events) == [b"a"]
    assert pending == b"data: b\nevent: x"


def test_event_fed_one_byte_at_a_time_comes_out_once_complete() -> None:
    # Ends with the CR of its closing CRLF: the blank line is complete there.
    stream = b"data: " + b"x" * 5000 + b"\r\ndata: y\r\n\r"
    decoder = SSEDecoder()
    outputs = [decoder.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert all(out == [] for out in outputs[:-1])
    assert datas(outputs[-1]) == [b"x" * 5000 + b"\ny"]
    assert outputs[-1][0].raw == stream


# ------------------------------------------------------------------ fields


def test_data_lines_are_joined_with_newlines() -> None:
    events, _ = decode(b"data: one\ndata: two\ndata: three\n\n")
    assert datas(events) == [b"one\ntwo\nthree"]


def test_comment_lines_are_ignored() -> None:
    events, _ = decode(b": keep-alive\n\ndata: a\n: in between\ndata: b\n\n")
    assert datas(events) == [None, b"a\nb"]


def test_data_without_a_space_after_the_colon() -> None:
    events, _ = decode(b"data:[DONE]\n\n")
    assert datas(events) == [b"[DONE]"]


def test_only_one_space_after_the_colon_is_removed() -> None:
    events, _ = decode(b"data:  two spaces \n\n")
    assert datas(events) == [b" two spaces "]


def test_field_without_a_colon_has_an_empty_value() -> None:
    events, _ = decode(b"data\ndata\n\n")
    assert datas(events) == [b"\n"]


def test_event_and_id_are_captured() -> None:
    events, _ = decode(b"event: delta\nid: 42\ndata: {}\n\ndata: {}\n\n")
    assert [(e.event, e.id) for e in events] == [(b"delta", b"42"), (None, None)]


def test_id_containing_nul_is_ignored() -> None:
    events, _ = decode(b"id: 1\nid: 2\x003\ndata: x\n\n")
    assert events[0].id == b"1"


def test_leading_bom_is_ignored() -> None:
    events, _ = decode(BOM + b"data: a\n\n")
    assert datas(events) == [b"a"]
    assert events[0].raw == BOM + b"data: a\n\n"


def test_bom_split_across_reads_is_ignored() -> None:
    events, _ = decode(BOM[:1], BOM[1:2], BOM[2:] + b"\ndata: a\n\n")
    # BOM then a line ending: the first line is blank.
    assert datas(events) == [None, b"a"]


def test_bom_after_the_start_is_content() -> None:
    events, _ = decode(b"data: a\n\n" + BOM + b"data: b\n\n")
    assert datas(events) == [b"a", None]  # the field is named BOM + "data"


# ------------------------------------------------------------------ any stream, any split

FIELD_VALUE = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
ENDINGS = {"lf": [b"\n"], "crlf": [b"\r\n"], "cr": [b"\r"], "mixed": [b"\n", b"\r\n", b"\r"]}


@dataclass(frozen=True)
class Stream:
    """A valid event stream and what a spec-following reader gets from it."""

    wire: bytes
    raws: list[bytes]  # each event's bytes
    fields: list[tuple[bytes | None, bytes | None, bytes | None]]  # (data, event, id) per event
    tail: bytes  # an unterminated event at the end


@st.composite
def lines(draw: st.DrawFn) -> tuple[bytes, str, bytes]:
    """One non-blank line: its bytes, and the field and value a reader must see."""
    kind = draw(st.sampled_from(["data", "event", "id", "comment", "bare", "other"]))
    value = draw(FIELD_VALUE)
    if kind == "comment":
        return b":" + value, "", b""
    if kind == "bare":
        name = draw(st.sampled_from([b"data", b"event", b"id", b"retry"]))
        return name, name.decode(), b""
    if kind == "other":
        name = draw(st.sampled_from([b"retry", b"Data", b"data ", b"foo"]))
        return name + b":" + value, "", b""
    spaced = draw(st.booleans())
    seen = value if spaced or not value.startswith(b" ") else value[1:]
    return kind.encode() + (b": " if spaced else b":") + value, kind, seen


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    framing = draw(st.sampled_from(sorted(ENDINGS)))
    previous = [b""]

    def ending(blank: bool) -> bytes:
        end = draw(st.sampled_from(ENDINGS[framing]))
        if blank and end == b"\n" and previous[0] == b"\r":
            end = b"\r\n"  # a lone LF right after a lone CR would be read as one CRLF
        previous[0] = end
        return end

    raws, fields = [], []
    for _ in range(draw(st.integers(0, 6))):
        data: list[bytes] = []
        event = event_id = None
        raw = b""
        for text, field, value in draw(st.lists(lines(), max_size=5)):
            raw += text + ending(blank=False)
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            elif field == "id" and b"\0" not in value:
                event_id = value
        raws.append(raw + ending(blank=True))
        fields.append((b"\n".join(data) if data else None, event, event_id))
    tail = b""
    for text, _, _ in draw(st.lists(lines(), max_size=3)):
        tail += text + ending(blank=False)
    if tail and draw(st.booleans()):
        tail = tail.rstrip(b"\r\n")  # cut mid-line
    bom = BOM if draw(st.booleans()) else b""
    if bom and raws:
        raws[0] = bom + raws[0]
    elif bom:
        tail = bom + tail
    return Stream(b"".join(raws) + tail, raws, fields, tail)


def feed_split(stream: bytes, cuts: list[int]) -> tuple[list[SSEEvent], bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return decode(*(stream[a:b] for a, b in zip(bounds, bounds[1:])))


def rejoin_split_crlf(raws: list[bytes], pending: bytes) -> tuple[list[bytes], bytes]:
    """Give back to an event the LF of its closing CRLF that arrived in the next read."""
    pieces = [*raws, pending]
    for i in range(1, len(pieces)):
        if pieces[i - 1].endswith(b"\r") and pieces[i].startswith(b"\n"):
            pieces[i - 1], pieces[i] = pieces[i - 1] + b"\n", pieces[i][1:]
    return pieces[:-1], pieces[-1]


@given(streams())
def test_any_valid_stream_decodes_to_what_was_written(stream: Stream) -> None:
    events, pending = decode(stream.wire)
    assert [(e.data, e.event, e.id) for e in events] == stream.fields
    assert [e.raw for e in events] == stream.raws
    assert pending == stream.tail


@settings(max_examples=300)
@given(st.data(), streams())
def test_events_are_the_same_however_the_reads_are_split(data: st.DataObject, stream: Stream) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream.wire)), max_size=12))
    events, pending = feed_split(stream.wire, cuts)
    # Nothing lost, nothing added: what is relayed is what was read.
    assert b"".join(e.raw for e in events) + pending == stream.wire
    assert [(e.data, e.event, e.id) for e in events] == stream.fields
    assert rejoin_split_crlf([e.raw for e in events], pending) == (stream.raws, stream.tail)
