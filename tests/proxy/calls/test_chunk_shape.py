"""ChunkShape: a stream's plain content chunks read by their shape give exactly what the decoder
and read_event give, and anything else is left to them."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.calls.chunk_shape import ChunkShape
from proxy.calls.sse import SSEDecoder
from proxy.calls.stream import read_event

ENVELOPE = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1764880000, "model": "gpt-4o-mini",
            "system_fingerprint": "fp_x"}


def chunk(text: str | None = None, *, delta: dict | None = None, usage: object = None, padding: str | None = None,
          **more: object) -> bytes:
    choice = {"index": 0, "delta": delta if delta is not None else {"content": text}, "logprobs": None,
              "finish_reason": None}
    # OpenAI's stream obfuscation: a random string at the end of every chunk.
    padded = {"obfuscation": padding} if padding is not None else {}
    return orjson.dumps({**ENVELOPE, **more, "choices": [choice], "usage": usage, **padded})


def event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def learned(text: str = " word1", **kw: object) -> ChunkShape:
    data = chunk(text, **kw)  # type: ignore[arg-type]
    shape = ChunkShape.learn(data, read_event(data)[0], read_event)
    assert shape is not None
    return shape


def what_the_decoder_reads(piece: bytes) -> tuple[bytes, str, dict | None] | None:
    """(raw, text, usage chunk) when `piece` decodes as one event with data, else None."""
    decoder = SSEDecoder()
    decoder.feed(event(b"{}"))  # past the start-of-stream state, as in a stream
    events = decoder.feed(piece)
    if len(events) != 1 or events[0].data is None or decoder.pending():
        return None
    return (events[0].raw, *read_event(events[0].data))


def test_a_chunk_of_the_learned_shape_is_read_without_a_parse() -> None:
    shape = learned()
    assert shape.text_of(event(chunk(" word2"))) == " word2"
    assert shape.text_of(event(chunk("é, ü — 漢字 🙂"))) == "é, ü — 漢字 🙂"
    assert shape.text_of(event(chunk(""))) == ""


def test_a_chunk_with_an_escape_is_left_to_the_parse() -> None:
    shape = learned()
    for text in ('say "hi"', "a\\b", "line\nnext", "tab\there", "\x01"):
        assert shape.text_of(event(chunk(text))) is None


def test_another_envelope_is_left_to_the_parse() -> None:
    shape = learned()
    assert shape.text_of(event(chunk(" word2", id="chatcmpl-other"))) is None
    assert shape.text_of(event(chunk(None, delta={}))) is None  # the finish chunk
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert shape.text_of(event(chunk(" word2", usage=usage))) is None


def test_a_read_that_is_not_exactly_one_event_is_left_to_the_decoder() -> None:
    shape = learned()
    one = event(chunk(" word2"))
    assert shape.text_of(one + one) is None
    assert shape.text_of(one[:-1]) is None
    assert shape.text_of(b"\r\n".join(one.split(b"\n"))) is None


def test_only_a_plain_text_may_teach_a_shape() -> None:
    assert ChunkShape.can_learn(" word1") and ChunkShape.can_learn("é 漢字")
    for text in ("", 'say "hi"', "a\\b", "line\nnext", "\x01"):
        assert not ChunkShape.can_learn(text)


def test_nothing_is_learned_from_a_chunk_whose_text_is_not_one_plain_string() -> None:
    for text in ('say "hi"', "line\nnext", ""):
        data = chunk(text)
        assert ChunkShape.learn(data, read_event(data)[0], read_event) is None
    # The text is also the model's name, found first: the probe shows it is not the counted one.
    data = chunk("gpt-4o-mini")
    assert ChunkShape.learn(data, read_event(data)[0], read_event) is None


def test_nothing_is_learned_when_the_envelope_carries_text_too() -> None:
    # Two choices: the second one's text lies in the envelope around the first's.
    data = orjson.dumps({**ENVELOPE, "choices": [{"index": 0, "delta": {"content": "ab"}},
                                                 {"index": 1, "delta": {"content": "cd"}}]})
    text, _ = read_event(data)
    assert text == "abcd"
    assert ChunkShape.learn(data, text, read_event) is None
    # A refusal beside the content.
    data = chunk(delta={"content": "ab", "refusal": "no"})
    assert ChunkShape.learn(data, read_event(data)[0], read_event) is None


def test_nothing_is_learned_from_a_string_that_is_not_the_counted_one() -> None:
    # "hello" is counted from an escaped form; the plain "hello" is another field's.
    data = chunk(delta={"content": "PLACEHOLDER"}, note="hello").replace(b'"PLACEHOLDER"', b'"h\\u0065llo"')
    text, _ = read_event(data)
    assert text == "hello"
    assert ChunkShape.learn(data, text, read_event) is None


def test_the_first_chunk_naming_the_role_has_a_shape_of_its_own() -> None:
    first = learned("word0", delta={"role": "assistant", "content": "word0", "refusal": None})
    assert first.text_of(event(chunk(" word1"))) is None
    assert first.text_of(event(chunk("word9", delta={"role": "assistant", "content": "word9", "refusal": None}))) \
        == "word9"


@settings(max_examples=400)
@given(st.text())
def test_any_text_reads_as_the_parse_reads_it_or_is_left_to_it(text: str) -> None:
    piece = event(chunk(text))
    got = learned().text_of(piece)
    assert got is None or (piece, got, None) == what_the_decoder_reads(piece)


@settings(max_examples=1000)
@given(st.binary(max_size=40))
def test_any_bytes_between_the_envelopes_read_as_the_parse_reads_them_or_are_left_to_it(inner: bytes) -> None:
    # Whatever an upstream puts where the text goes: never a text the decoder and the parse
    # would not give, never a second event or a usage slipped past them.
    head, tail = chunk("PLACEHOLDER").split(b"PLACEHOLDER")
    piece = event(head + inner + tail)
    got = learned().text_of(piece)
    assert got is None or (piece, got, None) == what_the_decoder_reads(piece)


def test_a_chunks_padding_changes_and_its_text_is_still_read() -> None:
    shape = learned(padding="q7")
    assert shape.text_of(event(chunk(" word2", padding="Zx81kP"))) == " word2"
    assert shape.text_of(event(chunk(" word2", padding=""))) == " word2"
    assert shape.text_of(event(chunk("", padding="abc"))) == ""
    assert shape.text_of(event(chunk(" word2"))) is None  # no padding: another shape


def test_a_padded_chunk_whose_envelope_differs_between_text_and_padding_is_left_to_the_parse() -> None:
    shape = learned(padding="q7")
    piece = event(chunk(" word2", padding="x"))
    assert shape.text_of(piece) == " word2"
    with_usage = piece.replace(b'"usage":null', b'"usage":{  }')  # as long, but a usage chunk now
    assert what_the_decoder_reads(with_usage) == (with_usage, " word2", orjson.loads(with_usage[6:-2]))
    assert shape.text_of(with_usage) is None


def test_a_padding_that_is_not_a_plain_ascii_string_is_left_to_the_parse() -> None:
    shape = learned(padding="q7")
    for padding in ('a"b', "a\\b", "é", "\n"):
        assert shape.text_of(event(chunk(" word2", padding=padding))) is None


@settings(max_examples=400)
@given(st.text(max_size=20), st.text(max_size=20))
def test_any_text_and_padding_read_as_the_parse_reads_them_or_are_left_to_it(text: str, padding: str) -> None:
    piece = event(chunk(text, padding=padding))
    got = learned(padding="q7").text_of(piece)
    assert got is None or (piece, got, None) == what_the_decoder_reads(piece)


@settings(max_examples=1000)
@given(st.binary(max_size=30), st.binary(max_size=30))
def test_any_bytes_in_the_text_and_padding_slots_read_as_the_parse_reads_them_or_are_left_to_it(
        inner: bytes, pad: bytes) -> None:
    head, middle, tail = chunk("PLACEHOLDER", padding="PADDING").replace(b"PLACEHOLDER", b"\0").replace(
        b"PADDING", b"\0").split(b"\0")
    piece = event(head + inner + middle + pad + tail)
    got = learned(padding="q7").text_of(piece)
    assert got is None or (piece, got, None) == what_the_decoder_reads(piece)
