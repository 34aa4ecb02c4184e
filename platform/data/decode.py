"""Robust decoding of untrusted image bytes into uint8 ``(C, H, W)`` tensors.

Every way an input can be unusable surfaces as one :class:`BadImage` with a machine-readable
``reason``, so importers and training streams can count and skip bad files instead of crashing.
Global PIL state is never touched: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays as it is (False by
default), ``Image.MAX_IMAGE_PIXELS`` is left alone and our own :class:`DecodeLimits` decide.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from PIL.ExifTags import Base as ExifBase
from PIL.JpegImagePlugin import JpegImageFile

REASONS = ("empty", "not_image", "too_large", "too_small", "truncated", "corrupt", "read_error", "hash_mismatch")

# EXIF orientations 5-8 include a 90-degree turn, so the displayed width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
# Alpha modes that PIL cannot composite directly, mapped to the straight-alpha mode to use first
# (TIFF can hold premultiplied RGBa/La and palette+alpha PA).
_ALPHA_NORMALISE = {"PA": "RGBA", "RGBa": "RGBA", "La": "LA"}
# Modes whose alpha channel is composited onto white, and the mode that remains afterwards.
_ALPHA_BASE = {"RGBA": "RGB", "LA": "L"}
# Modes whose "transparency" info (a PNG tRNS colour or palette alphas) becomes a real alpha channel.
_TRANSPARENCY_TARGET = {"1": "LA", "L": "LA", "RGB": "RGBA", "P": "RGBA"}


class BadImage(Exception):
    """An input that cannot be used: .reason is one of REASONS, .detail a human-readable message."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown BadImage reason {reason!r}; expected one of {REASONS}")
        # Both go into args so the exception pickles (it crosses DataLoader worker processes).
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class DecodeLimits:
    """What an acceptable image looks like, and how much decoding work may be skipped."""

    max_pixels: int = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS default; above it -> too_large
    min_side: int = 16  # shorter side below this -> too_small
    # JPEG only: let libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as the shorter
    # side stays >= this (PIL Image.draft); None decodes at full size.
    draft_short_side: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None and field.name == "draft_short_side":
                continue
            # bool is an int subclass, but True/False as a pixel count is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecodeLimits.{field.name} must be a positive int, got {value!r}")


def _load_error(error: Exception) -> BadImage:
    """Classify an exception raised while parsing a header or reading pixels: PIL reports missing bytes as
    'image file is truncated ...' / 'Truncated File Read', and EOFError means the same."""
    detail = f"{type(error).__name__}: {error}"
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return BadImage("truncated", detail)
    return BadImage("corrupt", detail)


def _open_checked(data: bytes, limits: DecodeLimits) -> ImageFile.ImageFile:
    """Open the header and enforce the size limits; no pixel data is decoded yet.

    The checks use the stored size: an EXIF turn swaps the sides but changes neither the pixel
    count nor the shorter side, so they hold for the displayed image as well.
    """
    if not data:
        raise BadImage("empty", "zero bytes")
    try:
        # We check max_pixels ourselves; PIL's warning between 1x and 2x its limit is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # Above 2x its own limit PIL refuses to open at all, whatever max_pixels says.
        raise BadImage("too_large", str(error)) from error
    except UnidentifiedImageError as error:
        raise BadImage("not_image", f"no image format recognised in {len(data)} bytes") from error
    except MemoryError:
        # Running out of memory says nothing about the file; don't hide it as a bad image.
        raise
    except Exception as error:  # a recognised header that breaks while being parsed
        raise _load_error(error) from error
    width, height = image.size
    if width * height > limits.max_pixels:
        image.close()
        raise BadImage("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        image.close()
        raise BadImage("too_small", f"{width}x{height} has a side < min_side {limits.min_side}")
    return image


def probe_image(data: bytes, limits: DecodeLimits) -> tuple[int, int, str]:
    """Header-only check (Image.open without load): returns (width, height, format) AFTER
    applying the EXIF orientation (orientations 5-8 swap width/height).

    Raises BadImage: empty (zero bytes), not_image (PIL cannot identify), too_large
    (width*height > max_pixels, including PIL's DecompressionBombError), too_small; a header that
    breaks while being parsed gives truncated or corrupt. Pixel data is not read, so a file can pass
    the probe and still fail :func:`decode_image` (truncated or corrupt pixel data), and an EXIF
    orientation that a PNG stores after its pixel data is seen by decode_image only.
    """
    with _open_checked(data, limits) as image:
        try:
            # The base-class getexif reads only what open() parsed; PngImageFile.getexif would
            # decode every pixel to look for an eXIf chunk stored after the image data.
            orientation = Image.Image.getexif(image).get(ExifBase.Orientation, 1)
        except MemoryError:
            raise
        except Exception as error:
            raise _load_error(error) from error
        width, height = image.size
        if orientation in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        assert image.format is not None  # every PIL file plugin names its format
        return width, height, image.format


def _request_draft(image: ImageFile.ImageFile, short_side: int) -> None:
    """Let libjpeg skip DCT detail: PIL picks the largest scale s in (8, 4, 2, 1) with
    s <= min(W // w, H // h) for a requested (w, h), so asking for (short_side, short_side) gives
    s <= min(W, H) // short_side, hence ceil(min(W, H) / s) >= short_side."""
    image.draft(image.mode, (short_side, short_side))


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an RGBA/LA image onto white (paste with the alpha as mask blends in C)."""
    base = Image.new(_ALPHA_BASE[image.mode], image.size, "white")
    base.paste(image, mask=image.getchannel("A"))
    return base


def _pixels(image: Image.Image) -> np.ndarray:
    """A loaded image as uint8 (H, W) for grey content or (H, W, 3) otherwise."""
    mode = image.mode
    if mode in _TRANSPARENCY_TARGET and "transparency" in image.info:
        image = image.convert(_TRANSPARENCY_TARGET[mode])
    elif mode in _ALPHA_NORMALISE:
        image = image.convert(_ALPHA_NORMALISE[mode])
    if image.mode in _ALPHA_BASE:
        image = _composite_on_white(image)

    mode = image.mode
    if mode.startswith("I"):
        # convert('L') would clip at 255; scale 0..65535 instead. 65535 = 255 * 257, so
        # round(v * 255 / 65535) = round(v / 257), and with 257 odd there are no ties.
        values = np.asarray(image).astype(np.int64)  # signed: mode I may hold negatives
        np.clip(values, 0, 65535, out=values)
        values += 128
        values //= 257
        return values.astype(np.uint8)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image), nan=0.0, posinf=255.0, neginf=0.0)
        return np.rint(np.clip(values, 0.0, 255.0, out=values), out=values).astype(np.uint8)
    if mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "RGB"):  # CMYK, YCbCr, LAB, HSV, P without transparency, RGBX, ...
        image = image.convert("RGB")
    return np.asarray(image)


def decode_image(data: bytes, limits: DecodeLimits) -> torch.Tensor:
    """Full decode to a contiguous uint8 (C, H, W) tensor, C == 1 for grey images and C == 3 otherwise.

    Runs the probe's checks first (same reasons), then: EXIF orientation applied; CMYK/YCbCr/LAB/HSV
    -> RGB; palette -> RGB (or RGBA if it has transparency); any alpha composited onto white; 1-bit
    and L -> 1 channel; 16/32-bit integer modes scaled from 0..65535 to 0..255 with rounding; F mode
    clipped to 0..255. Pixel decoding failures raise BadImage('truncated') when PIL reports missing
    bytes, and BadImage('corrupt') for any other error.
    """
    with _open_checked(data, limits) as image:
        try:
            if limits.draft_short_side is not None and isinstance(image, JpegImageFile):
                _request_draft(image, limits.draft_short_side)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            pixels = _pixels(image)
        except MemoryError:
            raise
        except Exception as error:
            raise _load_error(error) from error
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    # np.asarray(PIL image) is a read-only view, and torch needs writable memory; CHW from HWC
    # needs a copy anyway, so copy exactly once (arrays computed above are already fresh).
    if not (chw.flags.writeable and chw.flags.c_contiguous):
        chw = np.array(chw, order="C")
    return torch.from_numpy(chw)
