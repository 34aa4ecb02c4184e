"""Training-step throughput: packed multi-crop student forward vs one forward per crop.

Both modes run in this process on the same model, data and device, so the printed ratios
compare like with like. Not a test: run it by hand, e.g.

    python benchmarks/train_step.py --preset smoke
    python benchmarks/train_step.py --preset vits14 --batch 128 --steps 20   # on a GPU

Memory: on CUDA the peak allocated bytes of the step; everywhere the bytes of tensors saved
for backward (activation memory), counted with autograd's saved-tensor hooks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from dinoforge.bench import synthetic_batches
from dinoforge.config import load_config
from dinoforge.train import train_step
from dinoforge.training.build import build_meta_arch


@contextlib.contextmanager
def count_saved_bytes(total: list[int]):
    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def measure(model, cfg, batch, steps: int, warmup: int, device, autocast_dtype) -> dict:
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-4)
    values = {"teacher_temp": 0.07, "momentum": 0.994}
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    saved = [0]
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        with autocast, (count_saved_bytes(saved) if i == warmup else contextlib.nullcontext()):
            train_step(model, optimizer, batch, values, cfg.optim.clip_grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    n_images = batch["global_crops"].shape[0] // 2
    result = {"images_per_s": n_images / seconds, "s_per_step": seconds, "saved_activations_gib": saved[0] / 2**30}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's batch_size_per_gpu)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default="none")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    cfg = load_config(args.preset, args.overrides)
    device = torch.device(args.device)
    batch_size = args.batch or cfg.train.batch_size_per_gpu
    batch = synthetic_batches(cfg, batch_size, device, count=1)[0]
    autocast_dtype = None if args.autocast == "none" else getattr(torch, args.autocast)
    torch.manual_seed(0)
    model = build_meta_arch(cfg).to(device).train()
    results = {}
    for mode in ("per_crop", "packed"):
        model.packed = mode == "packed"
        results[mode] = measure(model, cfg, batch, args.steps, args.warmup, device, autocast_dtype)
        print(json.dumps({"mode": mode, "preset": args.preset, "batch": batch_size, "device": str(device),
                          "threads": torch.get_num_threads(), **{k: round(v, 4) for k, v in results[mode].items()}}))
    ratio = {
        "speedup_packed_vs_per_crop": results["packed"]["images_per_s"] / results["per_crop"]["images_per_s"],
        "saved_activation_ratio": results["packed"]["saved_activations_gib"] / results["per_crop"]["saved_activations_gib"],
    }
    if "peak_gib" in results["packed"]:
        ratio["peak_memory_ratio"] = results["packed"]["peak_gib"] / results["per_crop"]["peak_gib"]
    print(json.dumps({k: round(v, 3) for k, v in ratio.items()}))


if __name__ == "__main__":
    main()
