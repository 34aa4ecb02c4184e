"""The Fashion-MNIST GPU record's script (issue 23): its sizing rule, and the whole device call
(lay out, calibrate, size, train, export, k-NN, record) run on CPU at a tiny size."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dinoforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _fmnist_gpu():
    spec = importlib.util.spec_from_file_location("fmnist_gpu", ROOT / "benchmarks" / "fmnist_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_preset_is_the_optimised_single_gpu_step_on_28px_fashion_mnist():
    cfg = load_config("fmnist_gpu")
    assert (cfg.train.precision, cfg.train.compile, cfg.train.fused_optimizer) == ("bf16", True, True)
    assert (cfg.crops.global_crops_size, cfg.model.patch_size, cfg.data.dataset) == (28, 4, "fashion-mnist")
    # One optim "epoch" is one pass over the 60,000 training images.
    assert abs(cfg.optim.epoch_length * cfg.train.batch_size_per_gpu - 60_000) < cfg.train.batch_size_per_gpu


def test_planned_epochs_fill_the_budget_at_the_calibrated_speed():
    plan_epochs = _fmnist_gpu().plan_epochs
    cfg = load_config("fmnist_gpu")
    seconds_per_epoch = cfg.optim.epoch_length * cfg.train.batch_size_per_gpu / 5000.0
    epochs = plan_epochs(cfg, {"images_per_s": 5000.0, "startup_s": 60.0}, 480.0, 0.85, 1)
    # The run pays its start-up again; the steps fill 85 % of what is left, and one more epoch would not fit.
    assert epochs * seconds_per_epoch <= (480 - 60) * 0.85 < (epochs + 1) * seconds_per_epoch
    # Never shorter than the warm-ups of the schedules (a slow machine still gets a valid run).
    floor = max(cfg.optim.warmup_epochs, cfg.teacher.warmup_teacher_temp_epochs, cfg.optim.freeze_last_layer_epochs, 1)
    assert plan_epochs(cfg, {"images_per_s": 1.0, "startup_s": 60.0}, 480.0, 0.85, 1) == floor
    assert (
        plan_epochs(cfg, {"images_per_s": 5000.0, "startup_s": 60.0}, 480.0, 0.85, 1, max_epochs=floor + 1) == floor + 1
    )


@pytest.mark.slow(seconds=490)
def test_the_device_script_runs_end_to_end_on_cpu_at_a_tiny_size(tmp_path):
    """benchmarks/fmnist_gpu.sh as the device runs it (package laid out under /tmp, python3 on
    PATH), with a ViT-pico, batch 16, 4 calibration steps, 2 epochs of 4 steps and k-NN on 2k/500."""
    out = tmp_path / "record"
    env = {
        **os.environ,
        "OUT": str(out),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [
        "bash",
        str(ROOT / "benchmarks" / "fmnist_gpu.sh"),
        "--work",
        str(tmp_path / "work"),
        "--calibration-steps",
        "4",
        "--budget-s",
        "900",
        "--max-epochs",
        "2",
        "--train-limit",
        "2000",
        "--test-limit",
        "500",
        "train.compile=false",
        "model.arch=vit_pico",
        "train.batch_size_per_gpu=16",
        "optim.epoch_length=4",
        "data.num_workers=1",
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "gpu.txt",
        "knn.json",
        "log.txt",
        "metrics.jsonl",
        "record.json",
        "timings.json",
    ]
    record = json.loads((out / "record.json").read_text())
    print("\n" + json.dumps(record))
    assert record["gpu"] == "none (CPU)" and record["epochs"] == 2 and record["train_s"] > 0
    # The run has the planned length, logged in metrics.jsonl, and the k-NN ran on the limited sets.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == record["steps"] == record["epochs"] * 4
    knn = json.loads((out / "knn.json").read_text())
    assert (knn["n_train"], knn["n_test"]) == (2000, 500) and knn["top1_k20"] == record["knn_top1"]
    assert 10 < record["knn_top1"] <= 100 and record["over_raw_pixels"] == pytest.approx(record["knn_top1"] - 84.6)
