import io
import math
import pickle
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from PIL.ExifTags import Base as ExifBase

from dinoforge.data.decode import REASONS, BadImage, DecodeLimits, decode_image, probe_image
from image_zoo import (
    BOMB_SIDES,
    GOOD_SHAPES,
    PALETTE,
    alpha_columns,
    blank_bilevel_png,
    gradient_rgb,
    grey16_pixels,
    mean_abs_diff,
    palette_indices,
    write_image_zoo,
)

LIMITS = DecodeLimits()
# Reasons the header-only probe can give; the rest need the pixel data.
PROBE_REASONS = {"empty", "not_image", "too_large", "too_small"}
FORMAT_OF_SUFFIX = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}

# The zoo's {name: reason}, known at collection time so each file gets its own test id.
with tempfile.TemporaryDirectory() as _scratch:
    ZOO = write_image_zoo(Path(_scratch))


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    assert write_image_zoo(root) == ZOO
    return root


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _reason(data: bytes, limits: DecodeLimits = LIMITS, probe: bool = False) -> str:
    with pytest.raises(BadImage) as info:
        (probe_image if probe else decode_image)(data, limits)
    return info.value.reason


# ---------------------------------------------------------------- the zoo itself


def test_zoo_covers_every_decode_reason_and_is_small_and_deterministic(zoo_root: Path, tmp_path: Path) -> None:
    assert {name for name, reason in ZOO.items() if reason is None} == set(GOOD_SHAPES)
    assert set(ZOO.values()) - {None} == {"empty", "not_image", "too_large", "too_small", "truncated", "corrupt"}
    assert {"cats/a.jpg", "dogs/b.png", "README.txt", "empty.jpg", "notes.jpg"} <= set(ZOO)
    files = [path for path in zoo_root.rglob("*") if path.is_file()]
    assert sorted(path.relative_to(zoo_root).as_posix() for path in files) == sorted(ZOO)
    assert sum(path.stat().st_size for path in files) < 200_000
    write_image_zoo(tmp_path)
    assert all((tmp_path / name).read_bytes() == (zoo_root / name).read_bytes() for name in ZOO)


def test_bombs_are_real_valid_pngs_that_inflate_far_beyond_their_size(zoo_root: Path) -> None:
    small = decode_image(blank_bilevel_png(300, 700), LIMITS)  # 2 repeated row blocks + a remainder
    assert small.shape == (1, 700, 300) and int(small.max()) == 0

    data = (zoo_root / "bomb_1x.png").read_bytes()
    idat_at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat_at - 4 : idat_at])
    pixels = zlib.decompress(data[idat_at + 4 : idat_at + 4 + length])  # checks the Adler-32 too
    side = BOMB_SIDES["bomb_1x.png"]
    assert len(pixels) == side * (1 + side // 8) and not any(pixels)
    assert len(data) * 500 < len(pixels)


# ---------------------------------------------------------------- every zoo file


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_file_decodes_or_fails_with_its_reason(zoo_root: Path, name: str) -> None:
    data = (zoo_root / name).read_bytes()
    reason = ZOO[name]
    if reason is None:
        image = decode_image(data, LIMITS)
        assert image.dtype == torch.uint8 and image.is_contiguous()
        assert tuple(image.shape) == GOOD_SHAPES[name]
        _, height, width = GOOD_SHAPES[name]
        assert probe_image(data, LIMITS) == (width, height, FORMAT_OF_SUFFIX[Path(name).suffix])
        return
    assert _reason(data) == reason
    if reason in PROBE_REASONS:
        assert _reason(data, probe=True) == reason
    else:  # the header is intact: only the pixel data is broken
        width, height, _ = probe_image(data, LIMITS)
        assert min(width, height) >= LIMITS.min_side


# ---------------------------------------------------------------- pixel content


def test_exif_orientation_6_is_applied_to_size_and_pixels(zoo_root: Path) -> None:
    image = decode_image((zoo_root / "exif_rot6.jpg").read_bytes(), LIMITS)
    stored = gradient_rgb(48, 64)
    assert image.shape == (3, 64, 48)
    assert mean_abs_diff(image, np.rot90(stored, k=-1)) < 3  # a quarter turn clockwise
    assert mean_abs_diff(image, np.rot90(stored, k=1)) > 50
    assert mean_abs_diff(image, np.rot90(stored, k=-1)[::-1]) > 50


def test_grey_and_bilevel_pngs_are_exact_single_channel(zoo_root: Path) -> None:
    grey = decode_image((zoo_root / "grey.png").read_bytes(), LIMITS)
    assert torch.equal(grey[0], torch.from_numpy(np.add.outer(np.arange(30) * 4, np.arange(40) * 2).astype(np.uint8)))
    bilevel = decode_image((zoo_root / "bilevel.png").read_bytes(), LIMITS)
    expected = np.where(np.add.outer(np.arange(24), np.arange(40)) % 7 < 3, 255, 0).astype(np.uint8)
    assert torch.equal(bilevel[0], torch.from_numpy(expected))


def test_16_bit_grey_is_scaled_with_rounding_not_clipped(zoo_root: Path) -> None:
    values = grey16_pixels()
    image = decode_image((zoo_root / "grey16.png").read_bytes(), LIMITS)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert torch.equal(image[0], torch.from_numpy(expected))
    # Spot values: convert('L') would give 255 for all of them but 0.
    assert [int(v) for v in np.round(np.array([0, 1000, 32768, 65535]) * 255 / 65535)] == [0, 4, 128, 255]
    position = np.argmin(np.abs(values.astype(np.int64) - 1000))
    assert int(image[0].flatten()[position]) == round(int(values.flat[position]) * 255 / 65535) < 10


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_wide_integer_modes_scale_and_clip_to_0_65535(mode: str) -> None:
    row = [0, 128, 129, 1000, 32768, 65535, 65535, 0]
    if mode == "I":  # 32-bit: values outside 0..65535 must clip, not wrap
        row[6:] = [70_000, -5]
    values = np.tile(np.array(row, ">u2" if mode == "I;16B" else "<i4"), (16, 2))  # 16x16: min_side
    data = _encode(Image.frombytes(mode, (16, 16), values.tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    decoded = decode_image(data, LIMITS)
    assert decoded.shape == (1, 16, 16)
    assert decoded[0, 0].tolist() == [0, 0, 1, 4, 128, 255, 255, 0] * 2


def test_float_mode_is_clipped_and_rounded() -> None:
    row = [-10.0, 0.4, 0.6, 100.4, 254.6, 300.0, float("inf"), float("nan")]
    data = _encode(Image.fromarray(np.array([row * 2] * 16, np.float32), "F"), "TIFF")
    decoded = decode_image(data, LIMITS)
    assert decoded.shape == (1, 16, 16)
    assert decoded[0, 0].tolist() == [0, 0, 1, 100, 255, 255, 255, 0] * 2


def test_rgba_is_composited_onto_white(zoo_root: Path) -> None:
    image = decode_image((zoo_root / "rgba.png").read_bytes(), LIMITS).permute(1, 2, 0).numpy().astype(int)
    rgb, alpha = gradient_rgb(24, 32).astype(int), alpha_columns(24, 32)
    assert (image[alpha == 0] == 255).all()
    assert (image[alpha == 255] == rgb[alpha == 255]).all()
    blended = (rgb[alpha == 128] * 128 + 255 * 127) / 255
    assert np.abs(image[alpha == 128] - blended).max() <= 1


def test_la_is_composited_onto_white_and_stays_grey(zoo_root: Path) -> None:
    image = decode_image((zoo_root / "la.png").read_bytes(), LIMITS)[0].numpy()
    grey, alpha = gradient_rgb(32, 24)[..., 0], alpha_columns(32, 24)
    assert (image[alpha == 0] == 255).all()
    assert (image[alpha == 255] == grey[alpha == 255]).all()


def test_palette_transparency_becomes_white(zoo_root: Path) -> None:
    image = decode_image((zoo_root / "palette_alpha.png").read_bytes(), LIMITS).permute(1, 2, 0).numpy()
    indices = palette_indices()
    assert (image[indices == 0] == 255).all()
    assert (image[indices != 0] == PALETTE[indices[indices != 0]]).all()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_trns_colour_key_becomes_white(mode: str) -> None:
    key = 7 if mode == "L" else (7, 8, 9)
    image = Image.new(mode, (20, 20), 200 if mode == "L" else (200, 100, 50))
    image.paste(key, (0, 0, 10, 20))
    decoded = decode_image(_encode(image, "PNG", transparency=key), LIMITS)
    assert decoded.shape == (1 if mode == "L" else 3, 20, 20)
    assert (decoded[:, :, :10] == 255).all()
    assert decoded[:, 0, 15].tolist() == ([200] if mode == "L" else [200, 100, 50])


def test_palette_alpha_tiff_is_composited_onto_white() -> None:
    palette = Image.fromarray(palette_indices(), "P")
    palette.putpalette(PALETTE.tobytes())
    image = palette.convert("PA")
    image.putalpha(Image.fromarray(alpha_columns(32, 32)))
    data = _encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    decoded = decode_image(data, LIMITS).permute(1, 2, 0).numpy()
    alpha, indices = alpha_columns(32, 32), palette_indices()
    assert (decoded[alpha == 0] == 255).all()
    opaque = alpha == 255
    assert (decoded[opaque] == PALETTE[indices[opaque]]).all()


def test_cmyk_jpeg_decodes_to_rgb_close_to_the_original(zoo_root: Path) -> None:
    data = (zoo_root / "cmyk.jpg").read_bytes()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data, LIMITS)
    assert image.shape == (3, 48, 64)
    assert mean_abs_diff(image, gradient_rgb(48, 64)) < 3


@pytest.mark.parametrize("mode", ["LAB", "YCbCr"])
def test_other_colour_spaces_decode_to_rgb(mode: str) -> None:
    rgb = gradient_rgb(24, 32)
    data = _encode(Image.fromarray(rgb).convert(mode), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    image = decode_image(data, LIMITS)
    assert image.shape == (3, 24, 32)
    assert mean_abs_diff(image, rgb) < 6


# ---------------------------------------------------------------- draft


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return _encode(Image.fromarray(gradient_rgb(1200, 1600)), "JPEG", quality=90)


def test_draft_reduces_a_large_jpeg_but_keeps_the_short_side(big_jpeg: bytes) -> None:
    full = decode_image(big_jpeg, LIMITS)
    assert full.shape == (3, 1200, 1600)
    drafted = decode_image(big_jpeg, DecodeLimits(draft_short_side=300))
    assert drafted.shape == (3, 300, 400)  # 1/4 scale: 1200 // 300 = 4
    assert 300 <= min(drafted.shape[1:]) < 600
    pooled = torch.nn.functional.avg_pool2d(full[None].float(), 4)[0].round().to(torch.uint8)
    assert mean_abs_diff(drafted, pooled.permute(1, 2, 0).numpy()) < 2
    assert decode_image(big_jpeg, DecodeLimits(draft_short_side=301)).shape == (3, 600, 800)  # only 1/2 keeps >= 301
    assert decode_image(big_jpeg, DecodeLimits(draft_short_side=2000)).shape == (3, 1200, 1600)


@pytest.mark.parametrize(
    ("width", "height", "mode", "short_side"),
    [(1000, 750, "RGB", 100), (640, 480, "RGB", 60), (333, 517, "L", 41), (400, 300, "RGB", 151), (500, 420, "CMYK", 16)],
)
def test_draft_picks_the_largest_reduction_that_keeps_the_short_side(
    width: int, height: int, mode: str, short_side: int
) -> None:
    data = _encode(Image.fromarray(gradient_rgb(height, width)).convert(mode), "JPEG")
    decoded = decode_image(data, DecodeLimits(draft_short_side=short_side))
    scale = max(s for s in (8, 4, 2, 1) if s * short_side <= min(width, height))
    assert decoded.shape == (1 if mode == "L" else 3, math.ceil(height / scale), math.ceil(width / scale))
    assert min(decoded.shape[1:]) >= short_side


def test_draft_applies_before_exif_orientation_and_ignores_other_formats() -> None:
    exif = Image.Exif()
    exif[ExifBase.Orientation] = 6
    stored = gradient_rgb(480, 640)
    rotated = decode_image(_encode(Image.fromarray(stored), "JPEG", exif=exif), DecodeLimits(draft_short_side=100))
    assert rotated.shape == (3, 160, 120)  # 1/4 scale of 640x480, then turned
    small_reference = stored[::4, ::4]
    assert mean_abs_diff(rotated, np.rot90(small_reference, k=-1)) < 4
    png = decode_image(_encode(Image.fromarray(stored), "PNG"), DecodeLimits(draft_short_side=100))
    assert png.shape == (3, 480, 640)


# ---------------------------------------------------------------- limits and errors


def test_limits_are_ours_except_pils_hard_bomb_refusal(zoo_root: Path) -> None:
    generous = DecodeLimits(max_pixels=200_000_000)
    assert probe_image((zoo_root / "bomb_1x.png").read_bytes(), generous) == (10_000, 10_000, "PNG")
    assert _reason((zoo_root / "bomb_2x.png").read_bytes(), generous, probe=True) == "too_large"
    rgb = (zoo_root / "rgb.jpg").read_bytes()  # 64x48
    assert _reason(rgb, DecodeLimits(max_pixels=64 * 48 - 1)) == "too_large"
    assert decode_image(rgb, DecodeLimits(max_pixels=64 * 48)).shape == (3, 48, 64)
    assert _reason(rgb, DecodeLimits(min_side=49)) == "too_small"
    assert decode_image(rgb, DecodeLimits(min_side=48)).shape == (3, 48, 64)


def test_jpeg_cut_inside_its_header_is_truncated_at_probe_time(zoo_root: Path) -> None:
    data = (zoo_root / "rgb.jpg").read_bytes()
    cut = data[: data.index(b"\xff\xdb") + 10]  # in the middle of the first quantisation table
    assert _reason(cut, probe=True) == "truncated"
    assert _reason(cut) == "truncated"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's own note on a damaged EXIF block
def test_damaged_files_only_ever_raise_bad_image(zoo_root: Path) -> None:
    """Every prefix and many random byte flips of real files: a tensor or a BadImage, nothing else."""
    rng = np.random.default_rng(0)
    for name in ("rgb.jpg", "dogs/b.png", "lossless.webp", "exif_rot6.jpg"):
        data = (zoo_root / name).read_bytes()
        variants = [data[:cut] for cut in range(0, len(data), 5)]
        for _ in range(60):
            flipped = bytearray(data)
            for position in rng.integers(0, len(data), 3):
                flipped[position] = int(rng.integers(0, 256))
            variants.append(bytes(flipped))
        for variant in variants:
            try:
                image = decode_image(variant, LIMITS)
            except BadImage as bad:
                assert bad.reason in REASONS
            else:
                assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] in (1, 3)


def test_global_pil_state_is_untouched_and_no_bomb_warning_escapes(zoo_root: Path) -> None:
    max_pixels, load_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ZOO:
            data = (zoo_root / name).read_bytes()
            for function in (probe_image, decode_image):
                try:
                    function(data, LIMITS)
                except BadImage:
                    pass
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == max_pixels == 89_478_485
    assert ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_pixels", 0),
        ("max_pixels", -1),
        ("max_pixels", 1.5),
        ("min_side", 0),
        ("min_side", True),
        ("draft_short_side", 0),
        ("draft_short_side", "300"),
    ],
)
def test_limits_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"DecodeLimits.{field} "):
        DecodeLimits(**{field: value})


def test_bad_image_carries_reason_and_detail_and_pickles() -> None:
    bad = BadImage("truncated", "ran out of bytes")
    assert (bad.reason, bad.detail, str(bad)) == ("truncated", "ran out of bytes", "truncated: ran out of bytes")
    copy = pickle.loads(pickle.dumps(bad))
    assert (copy.reason, copy.detail) == (bad.reason, bad.detail)
    with pytest.raises(ValueError, match="unknown BadImage reason"):
        BadImage("broken", "not a known reason")
