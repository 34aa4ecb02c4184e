"""Fashion-MNIST on one GPU within a wall-clock budget: size, train, export, evaluate, record.

The record that issue 23 asks for: the ``fmnist_gpu`` preset trained by ``dinoforge pretrain``
semantics (this process calls the same ``pretrain``) for at most ``--budget-s`` seconds of wall
time, its EMA teacher exported, and cosine 20-NN (T = 0.07) on all 60,000 training / 10,000 test
images. One call does everything, in this order:

1. calibration: the preset for ``--calibration-steps`` steps in a scratch folder, to measure the
   start-up (model build, data, compilation) and the steady images/s on this machine;
2. sizing: the number of epochs (of ``optim.epoch_length`` steps) that fits the budget at that
   speed, less a safety margin (``--safety``), never under ``--min-epochs``;
3. the run itself, in a fresh folder, timed from its start to its last checkpoint;
4. export of the EMA teacher and k-NN on the GPU (CPU if there is none).

``--out DIR`` receives the record, flat (at most 8 files): ``config.yaml``, ``metrics.jsonl``,
``knn.json``, ``timings.json``, ``gpu.txt`` and ``record.json`` (everything in one line, also
printed). The checkpoints stay in ``--work`` (not in the record). ``benchmarks/fmnist_gpu.sh``
runs this on the device machine; on CPU it runs the same path at any size, e.g. (a few minutes):

    python benchmarks/fmnist_gpu.py --out /tmp/rec --work /tmp/work --budget-s 120 --calibration-steps 4 \
        --min-epochs 1 train.compile=false train.precision=fp32 train.batch_size_per_gpu=16 optim.epoch_length=4 \
        optim.warmup_epochs=0 teacher.warmup_teacher_temp_epochs=0 optim.freeze_last_layer_epochs=0 data.num_workers=1
"""

from __future__ import annotations

import argparse
import json
import math
import platform as host
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from dinoforge.checkpoint import latest_checkpoint
from dinoforge.config import Config, load_config
from dinoforge.eval.features import cls_features, labelled_images
from dinoforge.eval.knn import knn_protocol
from dinoforge.export import export_backbone, load_backbone
from dinoforge.train import pretrain

RAW_PIXELS_TOP1 = 84.6  # cosine 20-NN, T = 0.07 on raw Fashion-MNIST pixels (tests/test_knn.py)


def device_info() -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": host.python_version(),
        "cpus": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,memory.total,driver_version,clocks.max.sm,power.limit"
        info["nvidia_smi"] = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv"], check=False, capture_output=True, text=True
        ).stdout.strip()
    return info


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def calibrate(cfg: Config, work: Path, steps: int) -> dict:
    """Start-up seconds and steady images/s of ``cfg`` on this machine, from ``steps`` steps
    logged in two halves: the second half's rate is the steady one."""
    half = max(1, steps // 2)
    cfg = replace(cfg, train=replace(cfg.train, log_period=half, checkpoint_period=10**9))
    run = work / "calibration"
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    pretrain(cfg, str(run), max_steps=2 * half, progress=False)
    wall = time.perf_counter() - started
    rate = metrics(run)[-1]["images_per_s"]
    batch = cfg.train.batch_size_per_gpu
    startup = max(0.0, wall - 2 * half * batch / rate)
    return {
        "steps": 2 * half,
        "seconds": round(wall, 1),
        "images_per_s": round(rate, 1),
        "startup_s": round(startup, 1),
    }


def plan_epochs(
    cfg: Config, calibration: dict, budget_s: float, safety: float, min_epochs: int, max_epochs: int | None = None
) -> int:
    """Epochs that fit ``budget_s`` at the calibrated speed, with the start-up paid again; at
    least the schedules' warm-ups and ``min_epochs``, at most ``max_epochs``."""
    seconds_per_epoch = cfg.optim.epoch_length * cfg.train.batch_size_per_gpu / calibration["images_per_s"]
    affordable = (budget_s - calibration["startup_s"]) * safety / seconds_per_epoch
    floor = max(
        min_epochs, cfg.optim.warmup_epochs, cfg.teacher.warmup_teacher_temp_epochs, cfg.optim.freeze_last_layer_epochs
    )
    return max(floor, min(math.floor(affordable), max_epochs or math.inf))


@torch.no_grad()
def knn_full(
    weights: str, cfg: Config, device: torch.device, limits: tuple[int | None, int | None] = (None, None)
) -> dict:
    """Cosine 20-NN (T = 0.07) of the exported teacher's CLS, 60k train / 10k test (or the
    first ``limits`` images of each, for a quick try on CPU)."""
    backbone, meta = load_backbone(weights)
    backbone.to(device)
    train_x, train_y = labelled_images(meta, "fashion-mnist:train", cfg.data, limits[0])
    test_x, test_y = labelled_images(meta, "fashion-mnist:test", cfg.data, limits[1])
    train_f, test_f = cls_features(backbone, train_x.to(device), 1024), cls_features(backbone, test_x.to(device), 1024)
    result = knn_protocol(
        train_f, train_y.to(device), test_f, test_y.to(device), ks=(10, 20, 100, 200), temperature=0.07
    )
    return {"top1_k20": round(result["k"]["20"]["top1"], 2), **result, "n_train": len(train_y), "n_test": len(test_y)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="record folder (flat, at most 8 files)")
    parser.add_argument("--work", default="/tmp/fmnist_gpu", help="scratch folder for the runs' checkpoints")
    parser.add_argument("--preset", default="fmnist_gpu")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the training run")
    parser.add_argument("--calibration-steps", type=int, default=60)
    parser.add_argument("--safety", type=float, default=0.85, help="fraction of the budget the plan may fill")
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on the planned epochs (quick tries)")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="k-NN on the first N train images only (quick tries)"
    )
    parser.add_argument(
        "--test-limit", type=int, default=None, help="k-NN on the first N test images only (quick tries)"
    )
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    info = device_info()
    (out / "gpu.txt").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({"device": info}), flush=True)

    base = load_config(args.preset, args.overrides)
    calibration = calibrate(base, work, args.calibration_steps)
    epochs = plan_epochs(base, calibration, args.budget_s, args.safety, args.min_epochs, args.max_epochs)
    cfg = replace(base, optim=replace(base.optim, epochs=epochs))
    print(json.dumps({"calibration": calibration, "epochs": epochs, "steps": cfg.total_steps}), flush=True)

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    pretrain(cfg, str(run), progress=False)
    train_s = time.perf_counter() - started
    weights = str(work / "teacher_backbone.pth")
    export_backbone(latest_checkpoint(str(run)), weights)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    knn = knn_full(weights, cfg, device, (args.train_limit, args.test_limit))
    eval_s = time.perf_counter() - started

    shutil.copy(run / "config.yaml", out / "config.yaml")
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    (out / "knn.json").write_text(json.dumps(knn, indent=2) + "\n")
    last = metrics(run)[-1]
    timings = {
        "budget_s": args.budget_s,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "within_budget": train_s <= args.budget_s,
        "calibration": calibration,
        "epochs": epochs,
        "steps": cfg.total_steps,
        "images_seen": cfg.total_steps * cfg.train.batch_size_per_gpu,
        "images_per_s_overall": round(cfg.total_steps * cfg.train.batch_size_per_gpu / train_s, 1),
    }
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    record = {
        "preset": args.preset,
        "overrides": args.overrides,
        "gpu": info.get("gpu", "none (CPU)"),
        "knn_top1": knn["top1_k20"],
        "raw_pixels_top1": RAW_PIXELS_TOP1,
        "over_raw_pixels": round(knn["top1_k20"] - RAW_PIXELS_TOP1, 2),
        "dino_loss_last": round(last["dino_loss"], 3),
        "log_k": round(math.log(cfg.objective.dino_head.n_prototypes), 3),
        **timings,
    }
    (out / "record.json").write_text(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return 0 if record["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
