"""Distillation vs the same student trained alone, same steps (issue 4, paper §5 at small scale).

Trains, in this process, ViT-pico/4 twice for the same 160 steps of 128 Fashion-MNIST images:
alone (``smoke`` preset, self-supervised) and distilled from a frozen teacher
(``smoke_distill``), exports each run's model (the EMA teacher; the spare EMA of the student),
and prints the k-NN top-1 (cosine, k = 20, T = 0.07, 60k train / 10k test CLS features) of
the teacher, the student alone and the distilled student. The teacher is exported backbone
weights, e.g. the README main job's ``runs/local/pretrain/export/teacher_backbone.pth`` (ViT-nano/4).
Not a test: run it by hand (about 20 minutes on 2 cores), e.g.

    python benchmarks/distillation.py --teacher runs/local/pretrain/export/teacher_backbone.pth --out /tmp/distill --check

Prints one JSON line; ``--check`` exits with status 1 unless the distilled student beats the
student trained alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dinoforge.checkpoint import latest_checkpoint
from dinoforge.eval.knn import knn_eval
from dinoforge.config import DataConfig, load_config
from dinoforge.eval.features import labelled_images
from dinoforge.export import export_backbone, load_backbone
from dinoforge.train import pretrain

STUDENT = "vit_pico"
STEPS_EPOCHS = 4  # of 40 steps: 160 steps, as smoke_distill


def knn_top1(weights: str, data: DataConfig) -> float:
    backbone, meta = load_backbone(weights)
    train = labelled_images(meta, "fashion-mnist:train", data)
    test = labelled_images(meta, "fashion-mnist:test", data)
    return knn_eval(backbone, train, test)["top1"]


def train_and_export(preset: str, overrides: list[str], out: Path) -> tuple[str, float]:
    """Trains ``preset`` with ``overrides`` into ``out`` and exports its model; (weights, seconds)."""
    started = time.perf_counter()
    pretrain(load_config(preset, overrides), str(out), progress=False)
    weights = str(out / "model.pth")
    export_backbone(latest_checkpoint(str(out)), weights)
    return weights, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="exported teacher backbone (.pth with its .json)")
    parser.add_argument("--out", required=True, help="local folder for the two runs")
    parser.add_argument("--check", action="store_true", help="exit 1 unless distilled > alone")
    args = parser.parse_args()
    out = Path(args.out)
    alone, alone_s = train_and_export("smoke", [f"model.arch={STUDENT}", f"optim.epochs={STEPS_EPOCHS}"], out / "alone")
    distilled, distilled_s = train_and_export("smoke_distill", [f"distill.teacher={args.teacher}"], out / "distilled")
    data = DataConfig()
    result = {"teacher": knn_top1(args.teacher, data), "alone": knn_top1(alone, data), "distilled": knn_top1(distilled, data),
              "student": STUDENT, "steps": STEPS_EPOCHS * load_config("smoke").optim.epoch_length,
              "train_seconds": {"alone": round(alone_s), "distilled": round(distilled_s)}}
    result["gain"] = round(result["distilled"] - result["alone"], 2)
    print(json.dumps(result))
    return 1 if args.check and result["gain"] <= 0 else 0


if __name__ == "__main__":
    sys.exit(main())
