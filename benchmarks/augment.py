"""Multi-crop augmentation throughput per CPU core, from JPEG bytes to normalised crops.

Runs, in this process on one thread and on the same JPEGs:

- ``pil_torchvision_v1``: the straightforward pipeline, PIL decode and the operations that
  torchvision's v1 transforms run on PIL images in the official ``DataAugmentationDINO``
  (crop + BICUBIC resize, transpose, ImageEnhance brightness/contrast/colour, HSV hue shift,
  ``convert("L")`` grayscale, the 9x9 Gaussian kernel as one conv2d on a tensor and back to
  PIL, ImageOps.solarize, ToTensor, Normalize). torchvision itself cannot be imported beside
  the pinned torch 2.13 CPU wheel (see ENVIRONMENT.md), so the calls are written out here.
- ``dinoforge``: our robust decoder at full size + ``MultiCropAugmentation`` (uint8 resize
  kernel, batched blur, float colour maths).
- ``dinoforge_draft``: the same with ``data.decode_short_side=448`` (the default): JPEGs
  decode at a reduced DCT scale when they are at least twice that size.

Not a test: run it by hand, e.g. ``python benchmarks/augment.py`` or ``--images DIR`` for
your own JPEGs. Prints one JSON line per image set and pipeline, plus ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from dinoforge.data.decode import DecodeLimits, decode_image
from dinoforge.data.augment import BLUR_PROBABILITIES, CROP_RATIO, MultiCropAugmentation, MultiCropSpec


def natural_jpegs(count: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    """JPEGs (quality 90) of 1/f-spectrum noise: photo-like statistics, so the entropy
    decoder does realistic work."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.sqrt(fy**2 + fx**2), 1.0 / max(height, width))
    out = []
    for _ in range(count):
        spectrum = (rng.normal(size=(3, height, width)) + 1j * rng.normal(size=(3, height, width))) * amplitude
        pixels = np.real(np.fft.ifft2(spectrum))
        pixels = (pixels - pixels.min()) / (np.ptp(pixels) + 1e-12) * 255
        buffer = io.BytesIO()
        Image.fromarray(pixels.transpose(1, 2, 0).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class PilTorchvisionV1:
    """The official recipe's transforms as torchvision v1 runs them on PIL images."""

    def __init__(self, spec: MultiCropSpec, seed: int = 0) -> None:
        self.spec, self.rng = spec, random.Random(seed)
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)

    def _box(self, width: int, height: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * self.rng.uniform(*scale)
            aspect = math.exp(self.rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = self.rng.randint(0, height - h), self.rng.randint(0, width - w)
                return left, top, left + w, top + h
        return 0, 0, width, height

    def _hue(self, img: Image.Image, factor: float) -> Image.Image:
        h, s, v = img.convert("HSV").split()
        shifted = np.array(h, dtype=np.uint8)
        shifted += np.uint8(int(factor * 255) % 256)  # uint8 wrap-around, as torchvision does
        return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")

    def _blur(self, img: Image.Image, sigma: float) -> Image.Image:
        tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()
        taps = torch.exp(-0.5 * (torch.arange(-4, 5, dtype=torch.float32) / sigma) ** 2)
        taps = taps / taps.sum()
        kernel = (taps[:, None] @ taps[None, :]).expand(3, 1, 9, 9)
        out = F.conv2d(F.pad(tensor, (4, 4, 4, 4), mode="reflect"), kernel, groups=3)
        return Image.fromarray(out[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())

    def _crop(self, img: Image.Image, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> torch.Tensor:
        r = self.rng
        img = img.crop(self._box(*img.size, scale)).resize((size, size), Image.BICUBIC)
        if r.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if r.random() < 0.8:
            ops = [
                lambda i: ImageEnhance.Brightness(i).enhance(r.uniform(0.6, 1.4)),
                lambda i: ImageEnhance.Contrast(i).enhance(r.uniform(0.6, 1.4)),
                lambda i: ImageEnhance.Color(i).enhance(r.uniform(0.8, 1.2)),
                lambda i: self._hue(i, r.uniform(-0.1, 0.1)),
            ]
            r.shuffle(ops)
            for op in ops:
                img = op(img)
        if r.random() < 0.2:
            img = img.convert("L").convert("RGB")
        if r.random() < blur_p:
            img = self._blur(img, r.uniform(*self.spec.blur_sigma))
        if r.random() < solarize_p:
            img = ImageOps.solarize(img, 128)
        tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
        return (tensor - self.mean) / self.std

    def __call__(self, data: bytes) -> list[torch.Tensor]:
        spec, (g1, g2, local) = self.spec, BLUR_PROBABILITIES[self.spec.blur]
        img = Image.open(io.BytesIO(data)).convert("RGB")
        crops = [
            self._crop(img, spec.global_crops_size, spec.global_crops_scale, g1, 0.0),
            self._crop(img, spec.global_crops_size, spec.global_crops_scale, g2, 0.2),
        ]
        return crops + [self._crop(img, spec.local_crops_size, spec.local_crops_scale, local, 0.0) for _ in range(spec.local_crops_number)]


class Dinoforge:
    def __init__(self, spec: MultiCropSpec, draft_short_side: int | None) -> None:
        self.augmentation, self.limits = MultiCropAugmentation(spec), DecodeLimits(draft_short_side=draft_short_side)
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, data: bytes) -> dict:
        return self.augmentation(decode_image(data, self.limits), self.generator)


def images_per_second(pipeline, jpegs: list[bytes], seconds: float) -> float:
    for data in jpegs[:2]:  # warm caches (resize weights, allocator)
        pipeline(data)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pipeline(jpegs[done % len(jpegs)])
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=None, help="a folder of JPEGs instead of the synthetic sets")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per pipeline and image set")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core: a loader worker runs one thread
    if args.images:
        sets = {args.images.name: [p.read_bytes() for p in sorted(args.images.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")]}
    else:
        sets = {"500x375 (ImageNet-like)": natural_jpegs(8, 375, 500), "1600x1200 (photo)": natural_jpegs(4, 1200, 1600)}
    spec = MultiCropSpec()  # 2 x 224 + 8 x 98, the official recipe
    for name, jpegs in sets.items():
        pipelines = {
            "pil_torchvision_v1": PilTorchvisionV1(spec),
            "dinoforge": Dinoforge(spec, None),
            "dinoforge_draft": Dinoforge(spec, 448),
        }
        rates = {key: images_per_second(p, jpegs, args.seconds) for key, p in pipelines.items()}
        for key, rate in rates.items():
            print(json.dumps({"images": name, "pipeline": key, "images_per_s_per_core": round(rate, 2),
                              "ms_per_image": round(1000 / rate, 2)}))
        base = rates["pil_torchvision_v1"]
        print(json.dumps({"images": name, **{f"{k}_vs_pil_torchvision_v1": round(v / base, 2) for k, v in rates.items() if k != "pil_torchvision_v1"}}))


if __name__ == "__main__":
    main()
