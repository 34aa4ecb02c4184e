import colorsys
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dinoforge.data.augment import (
    CROP_BOX_UNIFORMS,
    CropParams,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_UNIFORMS,
    MultiCropAugmentation,
    MultiCropSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    crop_box,
    gaussian_blur,
    grayscale,
    hsv_to_rgb,
    jitter_ops,
    random_resized_crop,
    render_crops,
    resized_crop,
    rgb_to_hsv,
    solarize,
    to_grayscale,
)

SMALL = MultiCropSpec(global_crops_size=32, local_crops_size=16, local_crops_number=8)
PLAIN = dataclasses.replace(SMALL, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniforms(n: int, seed: int) -> list[float]:
    return torch.rand(n, generator=gen(seed), dtype=torch.float64).tolist()


def image(channels: int = 3, height: int = 28, width: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=gen(seed))


def all_crops(out: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    return out["global_crops"] + out["local_crops"]


def ramp(height: int = 28, width: int = 28) -> torch.Tensor:
    """(3, H, W) float image increasing left to right."""
    return torch.linspace(0.0, 1.0, width).expand(3, height, width).contiguous()


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("channels, height, width", [(3, 28, 28), (1, 28, 28), (3, 40, 23), (1, 1, 1), (3, 1, 5)])
def test_output_shapes_and_dtypes(channels, height, width):
    out = MultiCropAugmentation(SMALL)(image(channels, height, width), gen(0))
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8
    for crop in out["global_crops"]:
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32
    assert all(torch.isfinite(c).all() for c in all_crops(out))


def test_constant_image_gives_constant_crops():
    # A 1x1 image: every crop is one colour per channel, whatever the augmentation does.
    out = MultiCropAugmentation(PLAIN)(torch.tensor([[[200]], [[30]], [[90]]], dtype=torch.uint8), gen(1))
    for crop in all_crops(out):
        assert float(crop.amax(dim=(1, 2)).sub(crop.amin(dim=(1, 2))).max()) < 1e-5
        assert 0.0 <= float(crop.min()) and float(crop.max()) <= 1.0


def test_zero_local_crops():
    out = MultiCropAugmentation(dataclasses.replace(SMALL, local_crops_number=0))(image(), gen(0))
    assert out["local_crops"] == [] and len(out["global_crops"]) == 2


def test_deterministic_per_seed_and_independent_of_global_rng():
    aug, img = MultiCropAugmentation(SMALL), image()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = aug(img, gen(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    torch.manual_seed(999)
    b = aug(img, gen(7))
    c = aug(img, gen(8))
    for x, y, z in zip(all_crops(a), all_crops(b), all_crops(c)):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_grayscale_input_matches_replicated_rgb():
    aug, gray = MultiCropAugmentation(SMALL), image(1)
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    for seed in range(5):
        a, b = aug(gray, gen(seed)), aug(gray.expand(3, -1, -1).contiguous(), gen(seed))
        for kind in ("global_crops", "local_crops"):
            x, y = torch.stack(a[kind]), torch.stack(b[kind])
            torch.testing.assert_close(x, y, atol=2e-5, rtol=0)
            raw = x * std + mean
            torch.testing.assert_close(raw[:, 1:], raw[:, :1].expand(-1, 2, -1, -1), atol=1e-5, rtol=0)


def test_normalisation_uses_mean_and_std():
    assert MultiCropSpec().mean == (0.485, 0.456, 0.406) and MultiCropSpec().std == (0.229, 0.224, 0.225)
    mean, std = (0.5, 0.25, 0.125), (0.5, 2.0, 0.25)
    custom = MultiCropAugmentation(dataclasses.replace(SMALL, mean=mean, std=std))(image(), gen(3))
    plain = MultiCropAugmentation(PLAIN)(image(), gen(3))
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for x, y in zip(all_crops(custom), all_crops(plain)):
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        torch.testing.assert_close(x, (y - m) / s, atol=1e-5, rtol=0)


def decision_rates(spec: MultiCropSpec, seeds: int = 400) -> dict[str, list[float]]:
    aug = MultiCropAugmentation(spec)
    rates = {k: [0.0] * 3 for k in ("blur", "solarize", "flip", "jitter", "grayscale")}
    for seed in range(seeds):
        params = aug.sample_params(28, 28, gen(seed))
        groups = ([params["global_crops"][0]], [params["global_crops"][1]], params["local_crops"])
        for g, crops in enumerate(groups):
            for p in crops:
                rates["blur"][g] += (p.blur_sigma is not None) / (seeds * len(crops))
                rates["solarize"][g] += p.solarize / (seeds * len(crops))
                rates["flip"][g] += p.flip / (seeds * len(crops))
                rates["jitter"][g] += bool(p.jitter) / (seeds * len(crops))
                rates["grayscale"][g] += p.grayscale / (seeds * len(crops))
                assert p.blur_sigma is None or 0.1 <= p.blur_sigma <= 2.0
    return rates


def test_decision_probabilities_intended():
    rates = decision_rates(SMALL)
    blur_g1, blur_g2, blur_local = rates["blur"]
    assert blur_g1 == pytest.approx(1.0, abs=1e-9)  # paper: global crop 1 always blurred
    assert 0.05 <= blur_g2 <= 0.16
    assert 0.46 <= blur_local <= 0.54
    solar_g1, solar_g2, solar_local = rates["solarize"]
    assert solar_g1 == 0 and solar_local == 0 and 0.14 <= solar_g2 <= 0.26
    for g in range(3):
        low = 0.40 if g < 2 else 0.46  # 400 draws for each global crop, 3200 for locals
        assert low <= rates["flip"][g] <= 1 - low
    assert all(0.73 <= r <= 0.87 for r in rates["jitter"])
    assert all(0.13 <= r <= 0.27 for r in rates["grayscale"])


def test_decision_probabilities_official():
    blur_g1, blur_g2, blur_local = decision_rates(dataclasses.replace(SMALL, blur="official"))["blur"]
    assert blur_g1 == 0.0  # the official code passes 1 - p to RandomApply
    assert 0.84 <= blur_g2 <= 0.95
    assert 0.46 <= blur_local <= 0.54


def test_crop_scales_follow_spec():
    aug = MultiCropAugmentation(MultiCropSpec())
    for seed in range(100):
        params = aug.sample_params(200, 300, gen(seed))
        for kind, (lo, hi) in (("global_crops", (0.32, 1.0)), ("local_crops", (0.05, 0.32))):
            for p in params[kind]:
                top, left, h, w = p.box
                assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
                assert lo - 0.01 <= h * w / (200 * 300) <= hi + 0.01


def test_render_applies_blur_and_solarize_params():
    img = image().float() / 255
    params = MultiCropAugmentation(SMALL).sample_params(28, 28, gen(0))["local_crops"][:3]
    params = [dataclasses.replace(p, blur_sigma=s, solarize=False) for p, s in zip(params, (None, 1.5, 0.7))]
    plain = render_crops(img, [dataclasses.replace(p, blur_sigma=None) for p in params], 16)
    blurred = render_crops(img, params, 16)
    assert torch.equal(blurred[0], plain[0])
    torch.testing.assert_close(blurred[1], gaussian_blur(plain[1], 1.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(blurred[2], gaussian_blur(plain[2], 0.7), atol=1e-6, rtol=0)
    solarized = render_crops(img, [dataclasses.replace(p, solarize=True) for p in params], 16)
    torch.testing.assert_close(solarized, solarize(blurred), atol=0, rtol=0)


def test_render_applies_flip_jitter_and_grayscale_params():
    img = image().float() / 255
    base = CropParams(box=(2, 3, 20, 18), flip=False, jitter=(), grayscale=False, blur_sigma=None, solarize=False)

    def render(**changes) -> torch.Tensor:
        return render_crops(img, [dataclasses.replace(base, **changes)], 16)[0]

    plain = render()
    torch.testing.assert_close(plain, resized_crop(img, base.box, 16), atol=0, rtol=0)
    torch.testing.assert_close(render(flip=True), plain.flip(-1), atol=1e-6, rtol=0)
    ops = (("hue", 0.05), ("brightness", 1.3), ("saturation", 0.8), ("contrast", 0.7))
    jittered = render(jitter=ops)
    torch.testing.assert_close(jittered, color_jitter(plain, ops), atol=1e-6, rtol=0)
    assert (jittered - plain).abs().max() > 0.05
    gray = render(grayscale=True)
    torch.testing.assert_close(gray, to_grayscale(plain), atol=1e-6, rtol=0)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])


def test_apply_rejects_bad_images():
    aug = MultiCropAugmentation(SMALL)
    for bad in (torch.rand(3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            aug(bad, gen(0))


@pytest.mark.parametrize(
    "field, value",
    [
        ("global_crops_size", 4),
        ("local_crops_size", 0),
        ("local_crops_number", -1),
        ("global_crops_scale", (0.5, 0.4)),
        ("local_crops_scale", (0.0, 0.3)),
        ("mean", (0.5, 0.5)),
        ("std", (0.2, 0.0, 0.2)),
        ("blur", "sometimes"),
        ("blur_sigma", (0.5, 0.1)),
    ],
)
def test_spec_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MultiCropSpec(**{field: value})


def test_blur_sigma_range_follows_the_spec():
    aug = MultiCropAugmentation(MultiCropSpec(global_crops_size=16, local_crops_size=8, blur_sigma=(0.2, 0.3)))
    sigmas = [
        p.blur_sigma
        for seed in range(50)
        for crops in aug.sample_params(28, 28, torch.Generator().manual_seed(seed)).values()
        for p in crops
        if p.blur_sigma is not None
    ]
    assert len(sigmas) > 100 and min(sigmas) >= 0.2 and max(sigmas) <= 0.3 and max(sigmas) - min(sigmas) > 0.09


# --------------------------------------------------------------------------- geometry


def test_crop_box_full_scale_square_is_whole_image():
    for seed in range(20):
        assert crop_box(28, 28, (1.0, 1.0), uniforms(CROP_BOX_UNIFORMS, seed)) == (0, 0, 28, 28)


def test_crop_box_falls_back_to_centre_crop_with_clamped_ratio():
    # Area 800 with ratio <= 4/3 needs height >= 24.5 > 20: every try fails.
    for seed in range(5):
        u = uniforms(CROP_BOX_UNIFORMS, seed)
        assert crop_box(20, 40, (1.0, 1.0), u) == (0, 6, 20, 27)  # width round(20 * 4/3)
        assert crop_box(40, 20, (1.0, 1.0), u) == (6, 0, 27, 20)  # height round(20 / (3/4))


def test_crop_box_area_and_ratio_distribution():
    fractions, ratios = [], []
    for seed in range(500):
        top, left, h, w = crop_box(200, 200, (0.05, 0.32), uniforms(CROP_BOX_UNIFORMS, seed))
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 200
        fractions.append(h * w / 40000)
        ratios.append(w / h)
    assert 0.049 <= min(fractions) and max(fractions) <= 0.325
    assert sum(fractions) / 500 == pytest.approx(0.185, abs=0.015)  # area uniform in the scale range
    assert 0.74 <= min(ratios) and max(ratios) <= 1.36
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # the whole ratio range is used
    assert sum(math.log(r) for r in ratios) / 500 == pytest.approx(0.0, abs=0.03)  # log-uniform


def test_crop_box_positions_reach_both_edges():
    tops, bottoms, lefts, rights = set(), set(), set(), set()
    for seed in range(300):
        top, left, h, w = crop_box(8, 8, (0.25, 0.25), uniforms(CROP_BOX_UNIFORMS, seed))
        tops.add(top)
        bottoms.add(top + h)
        lefts.add(left)
        rights.add(left + w)
    assert min(tops) == 0 and max(bottoms) == 8 and min(lefts) == 0 and max(rights) == 8


def test_resized_crop_matches_interpolate():
    img = torch.rand(3, 40, 30, generator=gen(0))
    for box, size in (((3, 5, 20, 17), 32), ((0, 0, 40, 30), 16), ((10, 2, 7, 9), 16), ((0, 4, 40, 2), 8)):
        top, left, h, w = box
        crop = img[None, :, top : top + h, left : left + w]
        ref = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
        torch.testing.assert_close(resized_crop(img, box, size), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(resized_crop(img, box, size, flip=True), ref.flip(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(resized_crop(img.double(), box, size).float(), ref, atol=1e-5, rtol=0)


def test_resized_crop_of_one_pixel_is_constant():
    # (F.interpolate's antialiased bicubic returns wrong values for width-1 inputs in this torch.)
    img = torch.rand(3, 10, 10, generator=gen(0))
    torch.testing.assert_close(resized_crop(img, (4, 6, 1, 1), 8), img[:, 4:5, 6:7].expand(3, 8, 8), atol=1e-6, rtol=0)


def test_resized_crop_clamps_overshoot():
    step = torch.zeros(1, 8, 8)
    step[..., 4:] = 1.0
    out = resized_crop(step, (0, 0, 8, 8), 32)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_full_scale_crop_of_ramp_is_resize_and_flip_mirrors():
    img = ramp()
    expected = F.interpolate(img[None], size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    expected = expected[0].clamp(0, 1)
    for seed in range(10):
        torch.testing.assert_close(random_resized_crop(img, 16, (1.0, 1.0), gen(seed)), expected, atol=1e-5, rtol=0)
    # Same-size resize is the identity; the flip mirrors the ramp.
    torch.testing.assert_close(resized_crop(img, (0, 0, 28, 28), 28), img, atol=1e-6, rtol=0)
    torch.testing.assert_close(resized_crop(img, (0, 0, 28, 28), 28, flip=True), img.flip(-1), atol=1e-6, rtol=0)
    assert float(resized_crop(img, (0, 0, 28, 28), 28, flip=True)[0, 0, 0]) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- colour


def test_hsv_known_colours_and_round_trip():
    # red, green, blue, grey, black, yellow
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 0]])
    expected = torch.tensor([[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0.5], [0, 0, 0], [1 / 6, 1, 1]])
    colours, expected = colours.T.reshape(3, 1, 6), expected.T.reshape(3, 1, 6)
    torch.testing.assert_close(rgb_to_hsv(colours), expected, atol=1e-6, rtol=0)
    img = torch.rand(2, 3, 17, 19, generator=gen(0))
    img[0, :, 0, 0] = 0.25  # a grey pixel
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(img)), img, atol=1e-5, rtol=0)
    hsv = rgb_to_hsv(img)
    for i, j in ((3, 4), (10, 2), (16, 18)):
        ref = colorsys.rgb_to_hsv(*img[1, :, i, j].tolist())
        torch.testing.assert_close(hsv[1, :, i, j], torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=0)


def test_adjust_hue():
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    torch.testing.assert_close(adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_hue(red, -1 / 3), torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), atol=1e-6, rtol=0)
    img = torch.rand(3, 9, 11, generator=gen(1))
    torch.testing.assert_close(adjust_hue(img, 0.0), img, atol=1e-6, rtol=0)
    hsv = rgb_to_hsv(img)
    shifted = torch.cat(((hsv[:1] + 0.07) % 1.0, hsv[1:]))
    torch.testing.assert_close(adjust_hue(img, 0.07), hsv_to_rgb(shifted), atol=1e-5, rtol=0)
    grey = torch.rand(1, 5, 5, generator=gen(2))
    assert torch.equal(adjust_hue(grey, 0.1), grey)


def test_brightness_contrast_saturation_grayscale_values():
    img = torch.tensor([0.5, 0.9, 0.1]).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(adjust_brightness(img, 1.4)[:, 0, 0], torch.tensor([0.7, 1.0, 0.14]))  # clamped
    luma = 0.299 * 0.5 + 0.587 * 0.9 + 0.114 * 0.1
    torch.testing.assert_close(grayscale(img), torch.full((1, 2, 2), luma))
    torch.testing.assert_close(to_grayscale(img), torch.full((3, 2, 2), luma))
    torch.testing.assert_close(adjust_saturation(img, 0.0), torch.full((3, 2, 2), luma))
    torch.testing.assert_close(adjust_saturation(img, 0.5)[:, 0, 0], (img[:, 0, 0] + luma) / 2)
    torch.testing.assert_close(adjust_contrast(img, 0.0), torch.full((3, 2, 2), luma))  # the mean grey level
    torch.testing.assert_close(adjust_contrast(img, 0.5)[:, 0, 0], (img[:, 0, 0] + luma) / 2)
    torch.testing.assert_close(adjust_contrast(img, 1.0), img)


def test_color_jitter_applies_ops_in_order():
    img = torch.rand(3, 8, 8, generator=gen(0))
    forward = color_jitter(img, (("brightness", 1.4), ("contrast", 0.6)))
    torch.testing.assert_close(forward, adjust_contrast(adjust_brightness(img, 1.4), 0.6))
    backward = color_jitter(img, (("contrast", 0.6), ("brightness", 1.4)))
    assert (forward - backward).abs().max() > 0.01  # clamping makes the order matter
    assert torch.equal(color_jitter(img, ()), img)


def test_jitter_ops_ranges_and_uniform_order():
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    first = {name: 0 for name in ranges}
    orders = set()
    for seed in range(800):
        ops = jitter_ops(uniforms(JITTER_UNIFORMS, seed))
        assert sorted(name for name, _ in ops) == sorted(ranges)
        for name, factor in ops:
            assert ranges[name][0] <= factor <= ranges[name][1]
        first[ops[0][0]] += 1
        orders.add(tuple(name for name, _ in ops))
    assert len(orders) == 24
    assert all(150 <= n <= 250 for n in first.values())  # each adjustment first ~1/4 of the time


# --------------------------------------------------------------------------- blur, solarize


def reference_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Independent check: reflect pad + separable conv2d with a 9-tap Gaussian."""
    x = torch.arange(9, dtype=torch.float64) - 4
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).float()
    c = img.shape[0]
    padded = F.pad(img[None], (4, 4, 4, 4), mode="reflect")
    out = F.conv2d(padded, k.view(1, 1, 1, 9).expand(c, 1, 1, 9), groups=c)
    return F.conv2d(out, k.view(1, 1, 9, 1).expand(c, 1, 9, 1), groups=c)[0]


def test_gaussian_blur_matches_reference_and_batches():
    img = torch.rand(3, 20, 13, generator=gen(0))
    for sigma in (0.3, 1.0, 2.0):
        torch.testing.assert_close(gaussian_blur(img, sigma), reference_blur(img, sigma), atol=1e-5, rtol=0)
        as_double = gaussian_blur(img.double(), sigma).float()
        torch.testing.assert_close(as_double, reference_blur(img, sigma), atol=1e-5, rtol=0)
    batch = torch.rand(4, 1, 16, 16, generator=gen(1))
    sigmas = [0.5, 1.0, 1.5, 2.0]
    out = gaussian_blur(batch, sigmas)
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(out[i], gaussian_blur(batch[i], s), atol=1e-6, rtol=0)
    assert torch.equal(gaussian_blur(img, 0.1), img)  # neighbour taps ~exp(-50): flushed to 0


def test_gaussian_blur_statistics():
    torch.testing.assert_close(gaussian_blur(torch.full((3, 16, 16), 0.3), 1.7), torch.full((3, 16, 16), 0.3))
    noise = torch.rand(1, 64, 64, generator=gen(3))
    blurred = gaussian_blur(noise, 2.0)
    assert abs(float(blurred.mean() - noise.mean())) < 2e-3
    assert float(blurred.var()) < 0.1 * float(noise.var())
    assert float(gaussian_blur(noise, 0.5).var()) > float(blurred.var())  # more sigma, more smoothing
    with pytest.raises(ValueError, match="reflect"):
        gaussian_blur(torch.rand(3, 4, 4), 1.0)


def test_solarize_values():
    # PIL's threshold 128 on uint8: 128/255 = 0.50196 is inverted, 0.501 is not.
    x = torch.tensor([0.0, 0.25, 127 / 255, 0.501, 128 / 255, 0.75, 1.0])
    expected = torch.tensor([0.0, 0.25, 127 / 255, 0.501, 127 / 255, 0.25, 0.0])
    torch.testing.assert_close(solarize(x), expected, atol=1e-7, rtol=0)
