"""A zoo of good and bad image files for decoding and dataset tests (a helper, not a test module).

:func:`write_image_zoo` writes every file in well under a second; the generators of the pixel
content are public so tests can compute what a decoded file must contain.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.ExifTags import Base as ExifBase

SEED = 1234
# (C, H, W) that decode_image must return for every good file of the zoo.
GOOD_SHAPES: dict[str, tuple[int, int, int]] = {
    "rgb.jpg": (3, 48, 64),
    "grey.png": (1, 30, 40),
    "cmyk.jpg": (3, 48, 64),
    "grey16.png": (1, 24, 32),
    "palette_alpha.png": (3, 32, 32),
    "rgba.png": (3, 24, 32),
    "la.png": (1, 32, 24),
    "exif_rot6.jpg": (3, 64, 48),  # stored 64 wide x 48 high, displayed turned a quarter clockwise
    "bilevel.png": (1, 24, 40),
    "min_side.png": (3, 40, 16),  # the shorter side is exactly DecodeLimits().min_side
    "lossless.webp": (3, 32, 48),
    "rgb.bmp": (3, 20, 30),
    "cats/a.jpg": (3, 40, 40),
    "dogs/b.png": (3, 28, 36),
}
# Sides of the two decompression bombs: 20000^2 is over 2x PIL's MAX_IMAGE_PIXELS (PIL refuses to
# open it), 10000^2 lies between 1x and 2x (PIL only warns; our max_pixels check must catch it).
BOMB_SIDES = {"bomb_2x.png": 20_000, "bomb_1x.png": 10_000}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def gradient_rgb(height: int, width: int) -> np.ndarray:
    """Smooth (JPEG-friendly) uint8 (H, W, 3) pattern whose red follows x and green follows y,
    so any flip or quarter turn changes it a lot."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 255 - (red + green) / 2
    return np.rint(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def grey16_pixels() -> np.ndarray:
    """uint16 (24, 32) ramp over the whole 0..65535 range (most values above 255)."""
    return np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)


def alpha_columns(height: int, width: int) -> np.ndarray:
    """uint8 (H, W) alpha: transparent in the left quarter, half in the next, opaque on the right half."""
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, : width // 2] = 128
    alpha[:, : width // 4] = 0
    return alpha


def palette_indices() -> np.ndarray:
    """uint8 (32, 32) indices into :data:`PALETTE`: index 0 (transparent) on the top half."""
    indices = np.repeat(np.arange(32, dtype=np.uint8) % 3 + 1, 32).reshape(32, 32).T.copy()
    indices[:16] = 0
    return indices


# Palette entries (RGB); entry 0 is the transparent one.
PALETTE = np.array([[10, 200, 30], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def mean_abs_diff(decoded: torch.Tensor, expected: np.ndarray) -> float:
    """Mean absolute pixel difference between a decoded (C, H, W) tensor and an (H, W[, C]) array."""
    reference = torch.from_numpy(np.ascontiguousarray(expected))
    reference = reference[None] if reference.ndim == 2 else reference.permute(2, 0, 1)
    return (decoded.float() - reference.float()).abs().mean().item()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def blank_bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built in milliseconds (a decompression bomb when large).

    Each row is a 0 filter byte plus zero bits. After a full flush, deflate output references no
    earlier data, so one compressed block of rows can be repeated instead of compressing every row;
    the zlib header and the Adler-32 of all-zero data (a = 1, b = length) are written by hand.
    """
    row_bytes = 1 + (width + 7) // 8
    block_rows = min(height, 256)
    full_blocks, rest_rows = divmod(height, block_rows)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no header/trailer of its own
    block = deflate.compress(bytes(row_bytes * block_rows)) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(bytes(row_bytes * rest_rows)) + deflate.flush()
    adler = ((row_bytes * height) % 65521) << 16 | 1
    stream = b"\x78\xda" + block * full_blocks + tail + struct.pack(">I", adler)
    return _png(width, height, 1, 0, stream)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _good_files(rng: np.random.Generator) -> dict[str, bytes]:
    exif = Image.Exif()
    exif[ExifBase.Orientation] = 6
    grey = np.add.outer(np.arange(30) * 4, np.arange(40) * 2).astype(np.uint8)
    rgba = np.dstack([gradient_rgb(24, 32), alpha_columns(24, 32)])
    la = np.dstack([gradient_rgb(32, 24)[..., 0], alpha_columns(32, 24)])
    palette_image = Image.fromarray(palette_indices(), "P")
    palette_image.putpalette(PALETTE.tobytes())
    bilevel = Image.fromarray(np.add.outer(np.arange(24), np.arange(40)) % 7 < 3)
    noisy = rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)
    return {
        "rgb.jpg": _encode(Image.fromarray(gradient_rgb(48, 64)), "JPEG", quality=95),
        "grey.png": _encode(Image.fromarray(grey), "PNG"),
        "cmyk.jpg": _encode(Image.fromarray(gradient_rgb(48, 64)).convert("CMYK"), "JPEG", quality=95),
        "grey16.png": _encode(Image.fromarray(grey16_pixels()), "PNG"),
        "palette_alpha.png": _encode(palette_image, "PNG", transparency=0),
        "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "la.png": _encode(Image.fromarray(la, "LA"), "PNG"),
        "exif_rot6.jpg": _encode(Image.fromarray(gradient_rgb(48, 64)), "JPEG", quality=95, exif=exif),
        "bilevel.png": _encode(bilevel, "PNG"),
        "min_side.png": _encode(Image.fromarray(gradient_rgb(40, 16)), "PNG"),
        "lossless.webp": _encode(Image.fromarray(gradient_rgb(32, 48)), "WEBP", lossless=True),
        "rgb.bmp": _encode(Image.fromarray(gradient_rgb(20, 30)), "BMP"),
        "cats/a.jpg": _encode(Image.fromarray(gradient_rgb(40, 40)), "JPEG"),
        "dogs/b.png": _encode(Image.fromarray(noisy), "PNG"),
    }


def _bad_files(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    # Noise makes the entropy-coded scan dominate the JPEG, so half the bytes always ends inside
    # it: the header parses and PIL's load runs out of data ("image file is truncated").
    noise_jpeg = _encode(Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)), "JPEG", quality=90)
    # Valid signature, IHDR and CRCs, but the IDAT payload is not a zlib stream:
    # PIL fails only while loading ("broken data stream when reading image file").
    corrupt_png = _png(32, 32, 8, 2, rng.bytes(256))
    files = {
        "empty.jpg": (b"", "empty"),
        "notes.jpg": (b"shopping list: milk, eggs, a better camera\n" * 4, "not_image"),
        "README.txt": (b"This folder holds test images.\n", "not_image"),
        "truncated.jpg": (noise_jpeg[: len(noise_jpeg) // 2], "truncated"),
        "corrupt.png": (corrupt_png, "corrupt"),
        "tiny.png": (_encode(Image.fromarray(gradient_rgb(4, 4)), "PNG"), "too_small"),
    }
    for name, side in BOMB_SIDES.items():
        files[name] = (blank_bilevel_png(side, side), "too_large")
    return files


def write_image_zoo(root: Path) -> dict[str, str | None]:
    """Writes files under root and returns {relative posix path: expected reason or None for good}."""
    rng = np.random.default_rng(SEED)
    expected: dict[str, str | None] = {}
    contents = {name: (data, None) for name, data in _good_files(rng).items()} | _bad_files(rng)
    for name, (data, reason) in contents.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[name] = reason
    return expected
