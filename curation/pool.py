"""A generated uncurated pool with planted copies: the test bed of de-duplication (issue 6).

Base images are real: Fashion-MNIST training images (28 px, grey) and non-overlapping
``TILE`` px tiles of the photographs that ship inside the scikit-image wheel. Planted copies
are edited versions of base images (crop, horizontal flip, JPEG re-encoding, resize, colour
change, or a combination) and of evaluation images (Fashion-MNIST test images that are not in
the pool). Every file is at least ``DecodeLimits().min_side`` px on its shorter side, so the
pool passes the data layer's decoder. The ground truth goes to ``truth.json`` beside the
files; the same seed writes the same files.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageEnhance, ImageOps

from dinoforge.data.decode import DecodeLimits, decode_image
from dinoforge.data.sources import FashionMNIST

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
# Photographs whose files are inside the scikit-image wheel (no download). Left out: ``cat``
# (the same picture as ``chelsea``), ``stereo_motorcycle`` (a near-identical pair), ``brick``
# (a periodic wall: tiles a whole number of bricks apart are near-identical; measured aligned
# similarity 0.977 between distinct tiles), and ``retina`` and ``hubble_deep_field``, whose tiles
# are mostly black with one smooth edge or blob (tiles at mirrored places of the round fundus are
# flips of each other: measured similarity 0.998).
PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "immunohistochemistry", "cell", "moon",
    "grass", "gravel", "clock", "page", "text",
)
TILE = 64
# Tiles flatter than this (grey-level standard deviation) are sky, black background or blank
# paper: two of them are pixel-wise near-identical although they are different regions.
MIN_TILE_STD = 12.0
# Fashion-MNIST has genuinely near-identical images. A base or evaluation image whose mean
# absolute pixel difference to an already chosen one, or to its mirror image, is below this (grey
# levels) is left out, so that the only duplicates in the pool are the planted ones. Measured: a
# JPEG quality-30 copy of a Fashion-MNIST image is 7.7 grey levels from it (median of 300), and
# 133 of 5000 random training images have another one (or its mirror) closer than 8.
NEAR_IDENTICAL_MAD = 8.0
MIN_SIDE = DecodeLimits().min_side
EDITS = ("crop", "flip", "colour", "resize", "jpeg")  # the order in which a combination applies them
KINDS = EDITS + ("combo",)
RESAMPLING = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class PoolSpec:
    """A generated pool: ``files[i]`` is pool image i (relative to ``root``), ``copy_of`` maps a
    planted copy to the pool index of its original, ``eval_copy_of`` maps a planted copy of an
    evaluation image to its index in ``eval_files``; ``edits`` lists what made each copy."""

    root: Path
    files: tuple[str, ...]
    eval_files: tuple[str, ...]
    copy_of: dict[int, int]
    eval_copy_of: dict[int, int]
    edits: dict[int, tuple[str, ...]]

    @property
    def truth(self) -> Path:
        return self.root / "truth.json"

    def paths(self) -> list[Path]:
        return [self.root / name for name in self.files]

    def eval_paths(self) -> list[Path]:
        return [self.root / name for name in self.eval_files]

    def groups(self) -> list[list[int]]:
        """Each planted original with its copies, original first, sorted by original."""
        members: dict[int, list[int]] = {}
        for copy, original in sorted(self.copy_of.items()):
            members.setdefault(original, [original]).append(copy)
        return [members[original] for original in sorted(members)]

    @classmethod
    def read(cls, root: str | Path) -> PoolSpec:
        root = Path(root)
        truth = json.loads((root / "truth.json").read_text())
        pool = truth["pool"]
        return cls(
            root=root,
            files=tuple(item["file"] for item in pool),
            eval_files=tuple(item["file"] for item in truth["eval"]),
            copy_of={i: item["copy_of"] for i, item in enumerate(pool) if item["copy_of"] is not None},
            eval_copy_of={i: item["eval_copy_of"] for i, item in enumerate(pool) if item["eval_copy_of"] is not None},
            edits={i: tuple(item["edits"]) for i, item in enumerate(pool) if item["edits"]},
        )


def load_images(paths: Sequence[str | Path]) -> list[torch.Tensor]:
    """The files decoded as the data layer decodes them: uint8 (C, H, W), C in {1, 3}."""
    return [decode_image(Path(path).read_bytes(), DecodeLimits()) for path in paths]


def photo_tiles() -> list[tuple[str, np.ndarray]]:
    """Every non-overlapping ``TILE`` px tile of the ``PHOTOS`` that is not flat, with its
    source ``skimage:<photo>@<row>,<col>``; RGB photos give RGB tiles (H, W, 3), grey ones (H, W)."""
    tiles = []
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        grey = photo if photo.ndim == 2 else photo.mean(axis=2)
        for top in range(0, photo.shape[0] - TILE + 1, TILE):
            for left in range(0, photo.shape[1] - TILE + 1, TILE):
                if grey[top : top + TILE, left : left + TILE].std() >= MIN_TILE_STD:
                    tiles.append((f"skimage:{name}@{top},{left}", np.ascontiguousarray(photo[top : top + TILE, left : left + TILE])))
    return tiles


def distinct_images(images: np.ndarray, order: np.ndarray, count: int, taken: np.ndarray | None = None) -> tuple[list[int], int]:
    """The first ``count`` indices in ``order`` whose image (uint8 (N, H, W)) is not
    near-identical (``NEAR_IDENTICAL_MAD``, also mirrored) to an image chosen before it or to any
    of ``taken``, and how many were skipped as near-identical."""
    chosen: list[int] = []
    skipped = 0
    pixels_per_image = images.shape[1] * images.shape[2]
    kept = np.empty((0, pixels_per_image), np.float32) if taken is None else taken.reshape(-1, pixels_per_image).astype(np.float32)
    flat = images.reshape(len(images), -1)
    for index in order:
        if len(chosen) == count:
            break
        pixels = flat[index].astype(np.float32)
        mirror = images[index, :, ::-1].reshape(-1).astype(np.float32)
        if len(kept) and min(np.abs(kept - pixels).mean(axis=1).min(), np.abs(kept - mirror).mean(axis=1).min()) < NEAR_IDENTICAL_MAD:
            skipped += 1
            continue
        chosen.append(int(index))
        kept = np.concatenate([kept, pixels[None]])
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} distinct images available, {count} asked for")
    return chosen, skipped


def crop(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A random crop keeping 60-90 % of the area, aspect ratio changed by at most 4:3."""
    width, height = image.size
    area = rng.uniform(0.6, 0.9)
    stretch = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    keep_w = min(1.0, np.sqrt(area * stretch))
    keep_h = min(1.0, area / keep_w)
    new_w, new_h = max(MIN_SIDE, round(width * keep_w)), max(MIN_SIDE, round(height * keep_h))
    left, top = int(rng.integers(0, width - new_w + 1)), int(rng.integers(0, height - new_h + 1))
    return image.crop((left, top, left + new_w, top + new_h)), {"crop": [left, top, new_w, new_h]}


def flip(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    return ImageOps.mirror(image), {"flip": True}


def colour(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Brightness and contrast x [0.7, 1.3]; RGB images either turn grey (one in four) or also
    get saturation x [0.5, 1.5] and a hue rotation of at most a tenth of a turn."""
    brightness, contrast = rng.uniform(0.7, 1.3, size=2)
    params: dict = {"brightness": round(float(brightness), 3), "contrast": round(float(contrast), 3)}
    image = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(brightness)).enhance(contrast)
    if image.mode != "RGB":
        return image, params
    if rng.random() < 0.25:
        return image.convert("L"), params | {"grey": True}
    saturation, hue = rng.uniform(0.5, 1.5), rng.uniform(-0.1, 0.1)
    image = ImageEnhance.Color(image).enhance(saturation)
    h, s, v = image.convert("HSV").split()
    h = h.point(lambda value: int(value + round(hue * 256)) % 256)
    image = Image.merge("HSV", (h, s, v)).convert("RGB")
    return image, params | {"saturation": round(float(saturation), 3), "hue": round(float(hue), 3)}


def resize(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Scaled by 0.5-2x (no lower than ``MIN_SIDE`` on the shorter side) with a random filter."""
    width, height = image.size
    factor = rng.uniform(max(0.5, MIN_SIDE / min(width, height)), 2.0)
    method = RESAMPLING[int(rng.integers(len(RESAMPLING)))]
    size = (max(MIN_SIDE, round(width * factor)), max(MIN_SIDE, round(height * factor)))
    return image.resize(size, method), {"resize": round(float(factor), 3), "filter": method.name}


def edit(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, list[str], dict, int | None]:
    """Applies one edit kind (``combo``: two or three different edits in ``EDITS`` order);
    returns the image, the edits, their parameters and the JPEG quality (None: lossless PNG)."""
    if kind == "combo":
        picks = rng.choice(len(EDITS), size=int(rng.integers(2, 4)), replace=False)
        edits = [EDITS[i] for i in sorted(picks.tolist())]
    else:
        edits = [kind]
    params: dict = {}
    quality = None
    for name in edits:
        if name == "jpeg":
            quality = int(rng.integers(30, 71))
            params["jpeg"] = quality
        else:
            image, step = {"crop": crop, "flip": flip, "colour": colour, "resize": resize}[name](image, rng)
            params |= step
    return image, edits, params, quality


def encode(image: Image.Image, quality: int | None) -> bytes:
    buffer = io.BytesIO()
    if quality is None:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def planted(image: Image.Image, source: str, rng: np.random.Generator) -> dict:
    """A pool entry: ``image`` edited by a kind drawn uniformly from ``KINDS``."""
    copy, edits, params, quality = edit(image, KINDS[int(rng.integers(len(KINDS)))], rng)
    return {"source": source, "image": copy, "quality": quality, "edits": edits, "params": params}


def make_pool(out_dir: str | Path, *, n_base: int, n_copies: int, n_eval_copies: int, seed: int,
              n_eval: int = 200, photo_fraction: float = 0.5) -> PoolSpec:
    """Writes ``n_base`` distinct real images (``photo_fraction`` of them photo tiles, the rest
    Fashion-MNIST), ``n_copies`` edited copies of randomly chosen base images (an original may
    get several) and ``n_eval_copies`` edited copies of distinct evaluation images, shuffled, to
    ``out_dir/pool``; the ``n_eval`` evaluation images to ``out_dir/eval``; ground truth to
    ``out_dir/truth.json``. Edit kinds are drawn uniformly from ``KINDS``."""
    if n_eval_copies > n_eval:
        raise ValueError(f"n_eval_copies={n_eval_copies} > n_eval={n_eval}: each planted evaluation copy has its own original")
    rng = np.random.default_rng(seed)
    tiles = photo_tiles()
    n_photos = min(len(tiles), round(n_base * photo_fraction))
    base = [(tiles[i][0], tiles[i][1]) for i in sorted(rng.choice(len(tiles), size=n_photos, replace=False).tolist())]
    train, test = FashionMNIST(FASHION_ROOT, "train").images.numpy(), FashionMNIST(FASHION_ROOT, "test").images.numpy()
    fashion, skipped_base = distinct_images(train, rng.permutation(len(train)), n_base - n_photos)
    base += [(f"fashion-mnist:train/{i}", train[i]) for i in fashion]
    evaluation, skipped_eval = distinct_images(test, rng.permutation(len(test)), n_eval, taken=train[fashion])

    entries = [{"source": source, "image": Image.fromarray(pixels), "quality": None, "edits": [], "params": {}} for source, pixels in base]
    for original in rng.integers(0, len(base), size=n_copies).tolist():
        entries.append(planted(entries[original]["image"], entries[original]["source"], rng) | {"copy_of": original})
    for e in rng.choice(n_eval, size=n_eval_copies, replace=False).tolist():
        entries.append(planted(Image.fromarray(test[evaluation[e]]), f"fashion-mnist:test/{evaluation[e]}", rng) | {"eval_copy_of": e})
    return write_pool(Path(out_dir), entries, [test[i] for i in evaluation], evaluation, rng.permutation(len(entries)),
                      {"seed": seed, "n_base": n_base, "n_copies": n_copies, "n_eval_copies": n_eval_copies,
                       "n_eval": n_eval, "photo_fraction": photo_fraction, "tile": TILE,
                       "near_identical_mad": NEAR_IDENTICAL_MAD, "min_tile_std": MIN_TILE_STD,
                       "near_identical_skipped": {"base": skipped_base, "eval": skipped_eval}})


def write_pool(root: Path, entries: list[dict], eval_images: list[np.ndarray], eval_indices: list[int],
               order: np.ndarray, params: dict) -> PoolSpec:
    """Writes ``entries`` in ``order`` (file i is ``entries[order[i]]``, base-image references
    renumbered to file positions), the evaluation images and ``truth.json``."""
    (root / "pool").mkdir(parents=True, exist_ok=True)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    pool = []
    for i, entry_index in enumerate(order.tolist()):
        entry = entries[entry_index]
        name = f"pool/{i:05d}.{'png' if entry['quality'] is None else 'jpg'}"
        (root / name).write_bytes(encode(entry["image"], entry["quality"]))
        copy_of = int(position[entry["copy_of"]]) if "copy_of" in entry else None
        pool.append({"file": name, "source": entry["source"], "copy_of": copy_of, "eval_copy_of": entry.get("eval_copy_of"),
                     "edits": entry["edits"], "params": entry["params"]})
    evaluation = []
    for e, (pixels, index) in enumerate(zip(eval_images, eval_indices)):
        name = f"eval/{e:04d}.png"
        (root / name).write_bytes(encode(Image.fromarray(pixels), None))
        evaluation.append({"file": name, "source": f"fashion-mnist:test/{index}"})
    (root / "truth.json").write_text(json.dumps({"params": params, "pool": pool, "eval": evaluation}, indent=1))
    return PoolSpec.read(root)
