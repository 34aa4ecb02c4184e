"""FSDP2 vs a plain single-process training step: speed and memory per rank.

The plain step runs in this process; the FSDP2 step runs under ``torchrun`` with ``--nproc``
ranks (gloo on CPU, NCCL on GPUs), same per-rank batch and synthetic data, and reports back
as JSON. Memory is the bytes each rank holds for parameters + gradients + AdamW state (what
FSDP shards), plus the peak: CUDA's max allocated, or the process's max RSS on CPU. Not a
test: run it by hand, e.g.

    python benchmarks/fsdp.py --preset smoke --nproc 2
    python benchmarks/fsdp.py --preset vits14 --nproc 8 --batch 32        # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dinoforge.bench import synthetic_batches
from dinoforge.config import load_config
from dinoforge.distributed import close_world, init_world, shard_model
from dinoforge.train import train_step
from dinoforge.training.build import build_meta_arch
from dinoforge.training.optim import param_groups


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def measure(preset: str, overrides: list[str], batch_size: int, steps: int, warmup: int) -> dict:
    world = init_world()
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_meta_arch(cfg).to(world.device).train()
    if world.world_size > 1:
        shard_model(model, world, cfg.train.precision)
    optimizer = torch.optim.AdamW(param_groups(model.student, 1.0, 1.0), lr=1e-4)
    batch = synthetic_batches(cfg, batch_size, world.device, count=1, seed=world.rank)[0]
    values = {"teacher_temp": 0.07, "momentum": 0.994}
    for i in range(warmup + steps):
        if i == warmup:
            if world.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if world.distributed:
                dist.barrier()
            start = time.perf_counter()
        train_step(model, optimizer, batch, values, cfg.optim.clip_grad)
    if world.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    state = _local_bytes(model.parameters()) + _local_bytes(p.grad for p in model.parameters())
    state += _local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    peak = torch.cuda.max_memory_allocated() if world.device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"world_size": world.world_size, "images_per_s": batch_size * world.world_size / seconds,
              "s_per_step": seconds, "state_gib_per_rank": state / 2**30, "peak_gib_per_rank": peak / 2**30}
    close_world()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="images per rank (default: the preset's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)  # set for the torchrun ranks
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    batch = args.batch or load_config(args.preset, args.overrides).train.batch_size_per_gpu
    if args.worker_output:
        result = measure(args.preset, args.overrides, batch, args.steps, args.warmup)
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.worker_output).write_text(json.dumps(result))
        return
    plain = measure(args.preset, args.overrides, batch, args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   __file__, "--preset", args.preset, "--batch", str(batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--worker-output", str(out), *args.overrides]
        subprocess.run(command, check=True)
        fsdp = json.loads(out.read_text())
    for name, result in (("plain", plain), (f"fsdp2_x{args.nproc}", fsdp)):
        print(json.dumps({"mode": name, "preset": args.preset, "batch_per_rank": batch,
                          **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}}))
    print(json.dumps({
        "fsdp2_throughput_vs_plain": round(fsdp["images_per_s"] / plain["images_per_s"], 3),
        "fsdp2_state_per_rank_vs_plain": round(fsdp["state_gib_per_rank"] / plain["state_gib_per_rank"], 3),
        "fsdp2_peak_per_rank_vs_plain": round(fsdp["peak_gib_per_rank"] / plain["peak_gib_per_rank"], 3),
    }))


if __name__ == "__main__":
    main()
