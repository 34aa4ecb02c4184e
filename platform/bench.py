"""Training-step benchmark on synthetic data (``dinoforge bench``).

Times the whole step of any preset at any batch: teacher forward with Sinkhorn-Knopp targets,
packed student forward and backward, DINO + iBOT + KoLeo, per-module gradient clipping,
AdamW and the EMA teacher update. Variants add the implementation levers one at a time on
top of the baseline (our eager step, the same precision), each on a fresh model with the
same initial weights and the same batches, in this process: their ratios cancel the
device's speed. FLOPs are counted once on the baseline step with
``torch.utils.flop_counter`` (model FLOPs: what the fused loss recomputes in backward is not
counted) and MFU is taken against a matrix product timed in the same run.
"""

from __future__ import annotations

import gc
import json
import platform as host
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinoforge.config import Config, load_config
from dinoforge.data.masking import sample_masks
from dinoforge.distributed import PRECISIONS
from dinoforge.model.objective import masked_rows
from dinoforge.train import train_step
from dinoforge.training.build import build_meta_arch
from dinoforge.training.optim import apply_schedules, build_optimizer

# Each variant's overrides on top of the preset; the baseline is our eager step.
LEVERS = {
    "baseline": (),
    "fused_optimizer": ("train.fused_optimizer=true",),
    "fused_loss": ("train.fused_optimizer=true", "train.fused_loss=true"),
    "compile_fused_loss": ("train.fused_optimizer=true", "train.fused_loss=true", "train.compile=true"),
    "compile": ("train.fused_optimizer=true", "train.compile=true"),
}
VARIANTS = tuple(LEVERS)
# Step values held fixed while timing (a mid-training teacher temperature and momentum).
STEP_VALUES = {"teacher_temp": 0.07, "momentum": 0.994}


def variant_overrides(name: str) -> list[str]:
    if name not in LEVERS:
        raise ValueError(f"unknown variant {name!r}: expected one of {VARIANTS}")
    return list(LEVERS[name])


def synthetic_batches(
    cfg: Config, batch: int, device: torch.device, count: int = 3, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of random crops with freshly drawn iBOT masks (the number of masked
    patches changes from batch to batch, as in training)."""
    g = torch.Generator().manual_seed(seed)
    size, local, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    grid = size // cfg.model.patch_size
    batches = []
    for _ in range(count):
        crops = {"global_crops": torch.randn(2 * batch, 3, size, size, generator=g)}
        if n_local:
            crops["local_crops"] = torch.randn(n_local * batch, 3, local, local, generator=g)
        masks = sample_masks(
            2 * batch, (grid, grid), g, cfg.objective.mask_probability, cfg.objective.mask_ratio_min_max
        )
        crops |= {"masks": masks, "mask_rows": masked_rows(masks)}  # the rows found on the host, as the trainer does
        batches.append({k: v.to(device) for k, v in crops.items()})
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 20) -> float:
    """TFLOP/s of a square matrix product on random data (median of ``repeats``)."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


class Step:
    """One variant's model and optimizer, built exactly as the trainer builds them."""

    def __init__(self, cfg: Config, device: torch.device, autocast_dtype: torch.dtype | None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg, self.autocast_dtype = cfg, autocast_dtype
        self.model = build_meta_arch(cfg).to(device).train()
        self.optimizer = build_optimizer(self.model, cfg)
        lr = cfg.optim.base_lr
        apply_schedules(self.optimizer, lr, lr, cfg.optim.weight_decay)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = train_step(
            self.model, self.optimizer, batch, STEP_VALUES, self.cfg.optim.clip_grad, self.autocast_dtype
        )
        return losses["loss"]


def count_flops(step: Step, batch: dict[str, torch.Tensor]) -> int:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step: Step, batches: list[dict[str, torch.Tensor]], steps: int, warmup: int, device: torch.device) -> dict:
    """Warm-up steps (compilation happens there), then ``steps`` timed steps."""
    start = time.perf_counter()
    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % len(batches)])
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} while timing")
    result = {"s_per_step": seconds, "warmup_s": warmup_seconds}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def loss_curve(
    cfg: Config, batches: list[dict[str, torch.Tensor]], steps: int, device: torch.device, autocast_dtype, seed: int
) -> list[float]:
    step = Step(cfg, device, autocast_dtype, seed)
    losses = [step(batches[i % len(batches)]) for i in range(steps)]
    values = [float(v) for v in torch.stack(losses).cpu()]
    del step
    _release(device)
    return values


def run(
    preset: str,
    overrides: list[str],
    batch: int | None,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    variants: list[str],
    curve_steps: int = 0,
    anchor: float | None = None,
    profile: str | None = None,
    report=print,
) -> dict:
    """Times ``variants`` and returns the record; ``report`` gets one JSON line per result. With
    ``curve_steps`` the last variant's loss curve is compared with the first's; the last
    variant (the most levers) is profiled into the file ``profile`` on the model just timed, so
    nothing is compiled again."""
    base = load_config(preset, overrides)
    batch = batch or base.train.batch_size_per_gpu
    autocast_dtype = PRECISIONS[precision]
    batches = synthetic_batches(base, batch, device)
    peak = matmul_peak(device, autocast_dtype or torch.float32)
    record = {
        "preset": preset,
        "overrides": overrides,
        "batch": batch,
        "precision": precision,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_peak_tflops": peak,
        "variants": {},
    }
    if device.type == "cuda":
        record["matmul_peak_tflops_fp16"] = matmul_peak(device, torch.float16)
    report(json.dumps({"matmul_peak_tflops": round(peak, 1), "device": record["device"], "torch": torch.__version__}))
    flops = None
    for name in variants:
        cfg = load_config(preset, overrides + variant_overrides(name))
        step = Step(cfg, device, autocast_dtype)
        if flops is None:
            flops = count_flops(step, batches[0])
            record["gflop_per_image"] = flops / batch / 1e9
        result = measure(step, batches, steps, warmup, device)
        result["images_per_s"] = batch / result["s_per_step"]
        result["tflops"] = flops / result["s_per_step"] / 1e12
        result["mfu"] = result["tflops"] / peak
        record["variants"][name] = result
        report(json.dumps({"variant": name, **{k: round(v, 4) for k, v in result.items()}}))
        if profile and name == variants[-1]:
            with open(profile, "w") as handle:
                handle.write(profile_table(step, batches, device))
        del step
        _release(device)
    first = variants[0]
    best = max(variants, key=lambda name: record["variants"][name]["images_per_s"])
    record["best"] = best
    record["speedup"] = record["variants"][best]["images_per_s"] / record["variants"][first]["images_per_s"]
    if anchor:
        record["anchor_images_per_s"] = anchor
        record["speedup_vs_anchor"] = record["variants"][best]["images_per_s"] / anchor
    if curve_steps:
        record["curve"] = compare_curves(
            preset, overrides, batches, curve_steps, device, autocast_dtype, first, variants[-1]
        )
        report(json.dumps({"curve": record["curve"]}))
    return record


def profile_table(step: Step, batches: list[dict[str, torch.Tensor]], device: torch.device, steps: int = 3) -> str:
    """The most expensive operators over ``steps`` steps of a warmed-up step, by device time."""
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)


def compare_curves(
    preset: str,
    overrides: list[str],
    batches: list[dict[str, torch.Tensor]],
    steps: int,
    device: torch.device,
    autocast_dtype,
    first: str,
    last: str,
) -> dict:
    """Loss curves of two variants from the same weights on the same batches,
    and of the first variant with another stochastic-depth seed: the noise to compare with."""
    curves = {}
    for label, name, seed in ((first, first, 0), (f"{first}_seed1", first, 1), (last, last, 0)):
        cfg = load_config(preset, overrides + variant_overrides(name))
        curves[label] = loss_curve(cfg, batches, steps, device, autocast_dtype, seed)
    base = curves[first]

    def gap(other: list[float]) -> float:
        return max(abs(a - b) for a, b in zip(base, other))

    return {"losses": curves, "max_gap_seed": gap(curves[f"{first}_seed1"]), "max_gap_variant": gap(curves[last])}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{host.processor() or host.machine()} CPU, {torch.get_num_threads()} threads"


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{record['preset']} batch {record['batch']} {record['precision']} on {record['device']} "
        f"(matmul {record['matmul_peak_tflops']:.1f} TFLOP/s)"
    )
    for column in ("variant", "images/s", "s/step", "peak GiB", "TFLOP/s", "MFU", "vs baseline"):
        table.add_column(column, justify="right")
    first = next(iter(record["variants"].values()))
    for name, r in record["variants"].items():
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "n/a (CPU)"
        table.add_row(
            name,
            f"{r['images_per_s']:.1f}",
            f"{r['s_per_step']:.4f}",
            peak,
            f"{r['tflops']:.2f}",
            f"{100 * r['mfu']:.1f}%",
            f"{r['images_per_s'] / first['images_per_s']:.2f}x",
        )
    Console().print(table)
    if "speedup_vs_anchor" in record:
        anchor = f"the anchor's {record['anchor_images_per_s']} images/s"
        print(f"{record['best']} vs {anchor}: {record['speedup_vs_anchor']:.2f}x")
