"""Recipe ablations in miniature (issue 23; DINOv2 paper Tables 1 and 3, direction only).

Trains each variant of a preset in this process (``dinoforge pretrain`` semantics, resumable: a
rerun with the same ``--out`` continues unfinished runs and reuses finished ones), exports its
EMA teacher and prints one table: the DINO loss at the chosen steps (log K is the value of
uniform targets), two diagnostics of the teacher on a fixed batch at the last step, the
evaluation numbers and the training wall time.

- ``t.H/logK``: mean entropy of the teacher's DINO targets (Sinkhorn-Knopp or softmax
  centering, the run's teacher temperature at that step) over log K; 1.0 = uniform targets.
- ``cls cos``: mean cosine similarity between the teacher's CLS tokens of different images;
  1.0 = the same CLS for every image.

Without ``--variant`` it runs the paper-direction table on the preset: the full recipe, KoLeo
off (retrieval mAP; paper: KoLeo +8 % mAP) and iBOT off (masking and masked loss off; the dense
probes; paper: about -3 % on dense tasks). Examples (2 cores):

    python benchmarks/ablations.py --preset smoke_learn --out /tmp/ablate \
        --protocols knn,retrieval,seg,depth --split test
    python benchmarks/ablations.py --preset smoke --out /tmp/screen --split val \
        --variant "ls1 model.layerscale_init=1.0" --variant "K256 objective.dino_head.n_prototypes=256"

``--split val`` evaluates k-NN on a split carved from the *training* set (bank: train images
0-9,999; queries: 50,000-51,999), for choosing a recipe; ``--split test`` uses the test set
(60k bank / 10k queries, or ``--train-limit``/``--test-limit``), for reporting.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from dinoforge.checkpoint import committed_checkpoints, load_model_weights
from dinoforge.config import Config, DataConfig, load_config
from dinoforge.data.sources import FashionMNIST
from dinoforge.eval.features import cls_features, prepare_image
from dinoforge.eval.knn import knn_accuracy
from dinoforge.eval.suite import HEADLINE, SuiteSettings, run_suite
from dinoforge.export import backbone_meta, export_backbone, load_backbone
from dinoforge.model.losses import sinkhorn_knopp
from dinoforge.model.ssl import SSLMetaArch
from dinoforge.train import build_meta_arch, pretrain

# Paper-direction table: (name, overrides). iBOT off also turns masking off (no masked loss to train).
PAPER_TABLE = (
    ("full recipe", []),
    ("KoLeo off", ["objective.koleo_loss_weight=0"]),
    ("iBOT off", ["objective.ibot_loss_weight=0", "objective.mask_probability=0"]),
)
METRIC_NAMES = {
    "knn": "k-NN top-1",
    "retrieval": "retrieval mAP (M)",
    "seg": "seg mIoU",
    "depth": "depth RMSE (m)",
    "linear": "linear top-1",
    "logreg": "logreg top-1",
    "pca": "PCA IoU",
}
VAL_BANK, VAL_QUERIES = range(10_000), range(50_000, 52_000)
PROBE = range(52_000, 52_128)  # the diagnostics' fixed batch (training images, never evaluated)


def fashion_images(meta: dict, split: str, indices: range, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images ``indices`` of ``split`` prepared as ``meta`` says, and their labels."""
    source = FashionMNIST(data.fashion_mnist_root, split)
    images = [
        prepare_image(source.images[i][None], meta["image_size"], meta["resize_size"], meta["mean"], meta["std"])
        for i in indices
    ]
    return torch.stack(images), source.labels[list(indices)]


def _mean_cosine(features: torch.Tensor) -> float:
    unit = F.normalize(features, dim=-1)
    n = len(unit)
    return float(((unit @ unit.t()).sum() - n) / (n * (n - 1)))


def val_knn(backbone: torch.nn.Module, meta: dict, data: DataConfig) -> float:
    """k-NN top-1 on the screening split carved from the training set (VAL_BANK / VAL_QUERIES)."""
    bank, bank_y = fashion_images(meta, "train", VAL_BANK, data)
    queries, queries_y = fashion_images(meta, "train", VAL_QUERIES, data)
    result = knn_accuracy(
        cls_features(backbone, bank), bank_y, cls_features(backbone, queries), queries_y, k=20, temperature=0.07
    )
    return round(result["top1"], 2)


@torch.no_grad()
def probe_statistics(model: SSLMetaArch, cfg: Config, temperature: float) -> dict:
    """On the PROBE batch: the mean entropy of the teacher's DINO targets over log K (1.0:
    uniform) at teacher ``temperature``, and the mean cosine between different images' CLS
    tokens of the teacher and of the student (1.0: the same CLS for every image)."""
    model.eval()
    images, _ = fashion_images(backbone_meta(cfg), "train", PROBE, cfg.data)
    cls = model.teacher["backbone"](images)
    logits = model.teacher["dino_head"](cls)
    if cfg.objective.centering == "sinkhorn_knopp":
        targets = sinkhorn_knopp(logits, temperature, cfg.objective.sinkhorn_iterations)
    else:
        targets = model.dino_center.targets(logits, temperature)
    entropy = -(targets * targets.clamp_min(1e-30).log()).sum(-1).mean()
    return {
        "target_entropy": round(float(entropy / math.log(logits.shape[-1])), 4),
        "cls_cos": round(_mean_cosine(cls), 4),
        "student_cls_cos": round(_mean_cosine(model.student["backbone"](images)), 4),
    }


def diagnostics(cfg: Config, checkpoint: str, temperature: float, student_knn: bool) -> dict:
    """``probe_statistics`` of ``checkpoint`` at teacher ``temperature`` (its last step's) and,
    with ``student_knn``, the student backbone's k-NN on the screening split (next to the
    exported teacher's, it shows how far the EMA teacher lags the student)."""
    model = build_meta_arch(cfg)
    load_model_weights(checkpoint, model)
    result = probe_statistics(model, cfg, temperature)
    if student_knn:
        result["student_knn"] = val_knn(model.student["backbone"], backbone_meta(cfg), cfg.data)
    return result


def evaluate(weights: str, protocols: tuple[str, ...], split: str, settings: SuiteSettings) -> dict:
    """Headline numbers per protocol (k-NN top-1 on the chosen split)."""
    numbers = {}
    rest = tuple(p for p in protocols if p != "knn" or split == "test")
    if "knn" in protocols and split == "val":
        numbers["knn"] = val_knn(*load_backbone(weights), settings.data)
    if rest:
        backbone, meta = load_backbone(weights)
        summary = run_suite({"trained": backbone}, meta, rest, settings, None, emit=lambda result: None)
        numbers.update({p: round(v, 3) for p, v in summary["headline"]["trained"].items()})
    return numbers


def train_variant(name: str, preset: str, overrides: list[str], out: Path, steps_at: tuple[int, ...]) -> dict:
    """Trains (or resumes) one variant and exports its teacher; the losses, the diagnostics of
    its last checkpoint and the wall time, cached in out/train.json."""
    cached = out / "train.json"
    if cached.exists():
        return json.loads(cached.read_text())
    cfg = load_config(preset, overrides)
    cfg = replace(cfg, train=replace(cfg.train, log_period=math.gcd(*steps_at, cfg.total_steps)))
    started = time.perf_counter()
    pretrain(cfg, str(out), progress=False)
    train_seconds = time.perf_counter() - started
    metrics = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    step, checkpoint = committed_checkpoints(str(out))[-1]
    export_backbone(checkpoint, str(out / "teacher_backbone.pth"))
    result = {
        "name": name,
        "preset": preset,
        "overrides": overrides,
        "steps": cfg.total_steps,
        "log_k": round(math.log(cfg.objective.dino_head.n_prototypes), 3),
        "dino_loss": {str(s): round(r["dino_loss"], 3) for s, r in metrics.items()},
        "ibot_loss": round(metrics[step]["ibot_loss"], 3),
        "koleo_loss": round(metrics[step]["koleo_loss"], 3),
        **diagnostics(cfg, checkpoint, metrics[step]["teacher_temp"], student_knn=True),
        "train_seconds": round(train_seconds),
    }
    cached.write_text(json.dumps(result) + "\n")
    return result


def run_variant(
    name: str,
    preset: str,
    overrides: list[str],
    out: Path,
    steps_at: tuple[int, ...],
    protocols: tuple[str, ...],
    split: str,
    settings: SuiteSettings,
) -> dict:
    """``train_variant`` plus the evaluations on ``split`` (cached per split, protocol and
    limits in out/eval.json, so another table reuses them)."""
    result = train_variant(name, preset, overrides, out, steps_at)
    cache = out / "eval.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{split}:{settings.train_limit}:{settings.test_limit}:" if split == "test" else "val::"
    missing = tuple(p for p in protocols if key + p not in done)
    if missing:
        numbers = evaluate(str(out / "teacher_backbone.pth"), missing, split, settings)
        done.update({key + p: v for p, v in numbers.items()})
        cache.write_text(json.dumps(done, indent=1) + "\n")
    return {**result, **{p: done[key + p] for p in protocols}, "split": split}


def table(results: list[dict], steps_at: tuple[int, ...], protocols: tuple[str, ...]) -> str:
    """One markdown table; a column only where some result has it."""
    columns = (
        [("variant", lambda r: r["name"]), ("log K", lambda r: f"{r['log_k']:.3f}")]
        + [
            (f"DINO @{s}", lambda r, s=s: f"{r['dino_loss'][str(s)]:.3f}" if str(s) in r["dino_loss"] else "-")
            for s in steps_at
        ]
        + [
            ("t.H/logK", lambda r: f"{r['target_entropy']:.3f}"),
            ("teacher cls cos", lambda r: f"{r['cls_cos']:.3f}"),
            ("student cls cos", lambda r: f"{r['student_cls_cos']:.3f}" if "student_cls_cos" in r else "-"),
        ]
        + [(METRIC_NAMES[p], lambda r, p=p: str(r.get(p, "-"))) for p in protocols]
    )
    if any("student_knn" in r for r in results):
        columns.append(("student k-NN", lambda r: str(r.get("student_knn", "-"))))
    columns.append(("train s", lambda r: str(r["train_seconds"])))
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke_learn")
    parser.add_argument("--out", required=True, help="local folder: one run per variant (reused when rerun)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="'NAME KEY=VALUE [KEY=VALUE ...]' (repeatable); default: the paper-direction table",
    )
    parser.add_argument("--base-override", action="append", default=[], help="KEY=VALUE applied to every variant")
    parser.add_argument("--steps-at", default="60,120,240", help="steps whose DINO loss is printed")
    parser.add_argument("--protocols", default="knn", help="comma-separated: knn, retrieval, seg, depth, linear, ...")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps_at = tuple(int(s) for s in args.steps_at.split(","))
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    unknown = [p for p in protocols if p not in HEADLINE]
    if unknown:
        parser.error(f"unknown protocol(s) {unknown}")
    variants = [(v.split()[0], v.split()[1:]) for v in args.variant] or PAPER_TABLE
    settings = SuiteSettings(train_limit=args.train_limit, test_limit=args.test_limit, ks=(20,), pictures=False)
    out = Path(args.out)
    results = []
    for name, overrides in variants:
        result = run_variant(
            name,
            args.preset,
            args.base_override + list(overrides),
            out / name,
            steps_at,
            protocols,
            args.split,
            settings,
        )
        print(json.dumps(result), flush=True)
        results.append(result)
    print(table(results, steps_at, protocols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
