"""What non-text content parts are held for, in prompt tokens: an inline
image's size read from its header bytes only (PNG, GIF, JPEG, WebP), OpenAI's
tile formula with the model card's numbers, and byte bounds for files and audio.
Pure functions; `pricing.tokens` applies them to a request's parts.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

from pricing.schema import AudioInputSpec, FileInputSpec, ImageInputSpec


def inline_payload(value: Any) -> str | None:
    """The base64 payload of a `data:...;base64,` URI or of bare base64; None if not inline."""
    if not isinstance(value, str):
        return None
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        return payload if comma and header.endswith(";base64") else None
    return value


def decoded_size(payload: str) -> int:
    # Without decoding: 4 base64 characters carry 3 bytes, less one per "=" of padding.
    return len(payload) * 3 // 4 - (2 if payload.endswith("==") else 1 if payload.endswith("=") else 0)


def _b64_bytes(payload: str, start: int, length: int) -> bytes | None:
    """Bytes [start, start+length) of a base64 payload, decoding only the characters that hold them."""
    first = start // 3 * 4
    chunk = payload[first : -(-(start + length) // 3) * 4]
    try:
        data = base64.b64decode(chunk + "=" * (-len(chunk) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    offset = start - start // 3 * 3
    return data[offset : offset + length]


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))
_JPEG_MAX_SEGMENTS = 512


def _jpeg_size(payload: str) -> tuple[int, int] | None:
    # Walk the marker segments to the frame header; EXIF thumbnails etc. are skipped by length.
    pos = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        head = _b64_bytes(payload, pos, 4)
        if head is None or len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xDA or len(head) < 4:  # scan data before any frame header
            return None
        if marker in _JPEG_SOF:
            frame = _b64_bytes(payload, pos + 5, 4)
            if frame is None or len(frame) < 4:
                return None
            height, width = struct.unpack(">HH", frame)
            return width, height
        length = struct.unpack(">H", head[2:4])[0]
        if length < 2:
            return None
        pos += 2 + length
    return None


def image_size(url: Any) -> tuple[int, int] | None:
    """(width, height) read from the header of an inline PNG, JPEG, GIF or WebP; None if unknown.

    Only the header bytes are base64-decoded; the image itself never is. The
    format comes from the bytes, not the declared media type.
    """
    payload = inline_payload(url) if isinstance(url, str) and url.startswith("data:") else None
    if not payload:
        return None
    head = _b64_bytes(payload, 0, 30)
    if head is None:
        return None
    size: tuple[int, int] | None = None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        size = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        size = struct.unpack("<HH", head[6:10])
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            size = (struct.unpack("<H", head[26:28])[0] & 0x3FFF, struct.unpack("<H", head[28:30])[0] & 0x3FFF)
        elif chunk == b"VP8L" and head[20] == 0x2F:
            bits = struct.unpack("<I", head[21:25])[0]
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif chunk == b"VP8X":
            size = (int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
    elif head[:2] == b"\xff\xd8":
        size = _jpeg_size(payload)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def image_tokens(spec: ImageInputSpec, size: tuple[int, int] | None, detail: Any = None) -> int:
    """Prompt tokens for one image by the card's tile formula; an unknown size is the formula's worst case.

    Sizes are only scaled down (a small image is not enlarged), and scaled
    sides are rounded up to whole pixels, so a boundary case never counts a
    tile fewer than the provider would.
    """
    if detail == "low":
        return spec.low_detail_tokens
    if size is None:
        width, height = spec.short_side_px, spec.fit_px
    else:
        width, height = size
        longest = max(width, height)
        if longest > spec.fit_px:
            width, height = -(-width * spec.fit_px // longest), -(-height * spec.fit_px // longest)
        shortest = min(width, height)
        if shortest > spec.short_side_px:
            width, height = (
                -(-width * spec.short_side_px // shortest), -(-height * spec.short_side_px // shortest)
            )
    tiles = -(-width // spec.tile_px) * -(-height // spec.tile_px)
    return spec.base_tokens + spec.tile_tokens * tiles


def file_tokens(spec: FileInputSpec, size: int | None) -> int | None:
    """Prompt tokens to hold for one file of `size` bytes (None: not inline); None if it cannot be bounded."""
    if size is None:
        return spec.max_tokens
    tokens = max(spec.min_tokens, -(-size * spec.tokens_per_kib // 1024))
    return tokens if spec.max_tokens is None else min(tokens, spec.max_tokens)


def audio_tokens(spec: AudioInputSpec, size: int, min_bytes_per_second: int) -> int:
    """Prompt tokens to hold for `size` bytes of audio, at the format's least bytes per second."""
    return max(spec.min_tokens, -(-size * spec.tokens_per_second // min_bytes_per_second))
