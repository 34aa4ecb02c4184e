"""``dinoforge pipeline``: curate -> pretrain -> export -> evaluate on one output prefix, each
stage an MLflow run under one pipeline run, and a short summary at the end.

The stages are the functions the single-stage commands (and so the TorchX components in
``jobs/``) run; here they run one after the other in this process. Every stage finds its
lineage parent and journal through ``pipeline_scope``, as a stage launched by TorchX does
through ``DINOFORGE_LINEAGE_PARENT`` / ``DINOFORGE_LINEAGE_DIR``. Layout under ``output``::

    data/pool.parquet, data/eval.parquet (+ -shards/)   Fashion-MNIST imported as manifests (eval: when de-duplicating)
    curate/                                             embeddings, dedup.json, clusters, curated.parquet, report/
    pretrain/                                           config.yaml, metrics.jsonl, checkpoints/, export/teacher_backbone.pth
    evaluate/                                           results.jsonl, summary.json, pictures
    lineage/                                            the lineage journal (synced to MLflow)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import fsspec
import torch

from dinoforge.config import DEFAULT_PRESET, DataConfig, load_config, to_dict
from dinoforge.data.manifest import Manifest
from dinoforge.data.storage import join
from dinoforge.lineage import Lineage, digest_uri, pipeline_scope, stage_lineage


@dataclass(frozen=True)
class PipelineSettings:
    """One pipeline run. The pool is the first ``pool_size`` Fashion-MNIST training images;
    with de-duplication (``dedup_method`` other than none) the evaluation set whose copies are
    removed is the test split's first ``eval_size``; k-NN evaluates on the full splits unless
    ``train_limit``/``test_limit``.
    ``curation_weights`` None: curate with a freshly initialised backbone of the preset's
    architecture (``export_random``), since no model exists before the first run."""

    output: str
    preset: str = DEFAULT_PRESET
    overrides: tuple[str, ...] = ()
    pool_size: int = 20_000
    eval_size: int | None = None
    curated_size: int = 12_000
    curation_weights: str | None = None
    # None by default: on 28-px Fashion-MNIST the fast methods remove look-alikes, not copies
    # (README, "The pipeline"); the copy matcher is precise but too slow for a local run.
    dedup_method: str = "none"
    max_steps: int | None = None
    eval_protocols: tuple[str, ...] = ("knn",)
    # Off by default: a second backbone doubles the evaluation (85 s each on 2 cores for the
    # 70,000 k-NN images), which the 15-minute budget of the README main job cannot spare.
    compare_random_init: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    progress: bool = True
    # MLflow: None -> MLFLOW_TRACKING_URI, else a sqlite store beside the journal (OUT/mlflow.db).
    tracking_uri: str | None = None
    run_name: str | None = None  # the pipeline run's name (default: preset and start time)

    def __post_init__(self) -> None:
        if not 0 < self.curated_size <= self.pool_size:
            raise ValueError(f"curated_size must be in (0, pool_size={self.pool_size}], got {self.curated_size}")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def import_split(split: str, uri: str, settings: PipelineSettings, limit: int | None) -> None:
    """Fashion-MNIST ``split`` as a manifest at ``uri`` (kept when already there: curation
    reads and verifies it next)."""
    from dinoforge.data.importers import import_fashion_mnist

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        report = import_fashion_mnist(settings.data.fashion_mnist_root, split, uri.removesuffix(".parquet") + "-shards",
                                      progress=settings.progress, limit=limit)
        report.manifest.write(uri)


def curate_stage(curate, lineage: Lineage) -> dict[str, Any]:
    """``run_curation`` with its lineage: pool, evaluation set and embedder in; the curated
    (and/or retrieved) manifests out; de-duplication counts as metrics; the report as artifacts."""
    from dinoforge.curation.pipeline import run_curation
    from dinoforge.curation.steps import read_dedup

    lineage.params(asdict(curate))
    lineage.input(curate.manifest, Manifest.read(curate.manifest).digest, name="pool", kind="manifest")
    if curate.eval_manifest:
        lineage.input(curate.eval_manifest, Manifest.read(curate.eval_manifest).digest, name="eval", kind="manifest")
    if curate.seeds:
        lineage.input(curate.seeds, Manifest.read(curate.seeds).digest, name="seeds", kind="manifest")
    lineage.input(curate.weights, digest_uri(curate.weights), name="embedder", kind="weights")
    summaries = run_curation(curate)
    dedup = read_dedup(curate.out)
    if dedup is not None:
        lineage.metrics({f"dedup_{k}": v for k, v in dedup["counts"].items()})
    images = {}
    for uri in summaries[-1]["outputs"]:
        name = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        manifest = Manifest.read(uri)
        images[uri] = len(manifest)
        lineage.output(uri, manifest.digest, name=name, kind="manifest")
        lineage.metrics({f"{name}_images": images[uri]})
    lineage.artifact(join(curate.out, "report"), "report")
    return {"summaries": summaries, "outputs": summaries[-1]["outputs"], "images": images}


def export_stage(checkpoint: str, weights: str, lineage: Lineage, model_name: str | None = None) -> dict[str, Any]:
    """The released backbone of a run, registered in the model registry as a new version of
    ``model_name`` (default ``dinoforge-<arch>``)."""
    from dinoforge.checkpoint import checkpoint_digest, resolve_checkpoint
    from dinoforge.export import export_backbone

    checkpoint = resolve_checkpoint(checkpoint)
    lineage.input(checkpoint, checkpoint_digest(checkpoint), name="checkpoint", kind="checkpoint")
    meta = export_backbone(checkpoint, weights)
    digest = digest_uri(weights)
    lineage.params({k: v for k, v in meta.items() if not isinstance(v, (list, dict))})
    lineage.output(weights, digest, name="weights", kind="weights")
    lineage.register_model(weights, model_name or f"dinoforge-{meta['arch']}", digest=digest, alias="current")
    return {"weights": weights, "digest": digest, **meta}


def backbones_to_evaluate(weights: str, seed: int, compare_random_init: bool) -> tuple[dict[str, torch.nn.Module], dict]:
    """The exported backbone and, ``compare_random_init``, the same architecture at random init
    with LayerScale 1: a random ViT whose blocks all shape the features, the stronger of the two
    random baselines (at the training init, LayerScale 1e-5, the CLS output is nearly constant)."""
    from dinoforge.export import build_from_meta, load_backbone

    trained, meta = load_backbone(weights)
    backbones = {"trained": trained}
    if compare_random_init:
        torch.manual_seed(seed)
        backbones["random_init_layerscale1"] = build_from_meta({**meta, "layerscale_init": 1.0}).eval()
    return backbones, meta


# The MLflow name of each protocol's headline number (eval.suite.HEADLINE): the same on the
# evaluate run and the pipeline run, so runs compare on one name per number.
HEADLINE_NAMES = {"knn": "knn_top1", "linear": "linear_top1", "logreg": "logreg_top1", "retrieval": "retrieval_map_medium",
                  "seg": "seg_miou", "depth": "depth_rmse", "pca": "pca_iou"}


def headline_metrics(headline: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{backbone: {protocol: value}}`` -> MLflow metrics: ``knn_top1`` for the trained backbone,
    ``<backbone>/knn_top1`` for a baseline (a section of its own in MLflow's charts)."""
    return {(HEADLINE_NAMES[protocol] if backbone == "trained" else f"{backbone}/{HEADLINE_NAMES[protocol]}"): value
            for backbone, values in headline.items() for protocol, value in values.items()}


def evaluate_stage(weights: str, backbones: dict[str, torch.nn.Module], meta: dict, protocols: tuple[str, ...],
                   suite_settings, out_dir: str | None, lineage: Lineage) -> dict[str, Any]:
    """``run_suite`` with its lineage: the weights in, the headline numbers as metrics, the
    summary out, the pictures as artifacts."""
    from dinoforge.eval.suite import run_suite

    lineage.input(weights, digest_uri(weights), name="weights", kind="weights")
    lineage.params({"protocols": ",".join(protocols), **{k: v for k, v in asdict(suite_settings).items() if k != "data"}})
    summary = run_suite(backbones, meta, protocols, suite_settings, out_dir)
    lineage.metrics(headline_metrics(summary["headline"]))
    if out_dir is not None:
        results = join(out_dir, "summary.json")
        lineage.output(results, digest_uri(results), name="results", kind="evaluation")
        lineage.artifact(out_dir, "evaluation")
    return summary


def run_pipeline(settings: PipelineSettings) -> dict[str, Any]:
    """Runs every stage (each resumes what an earlier, interrupted run left) and returns the summary."""
    from dinoforge.curation.pipeline import CurateSettings
    from dinoforge.eval.suite import SuiteSettings
    from dinoforge.export import export_random
    from dinoforge.train import pretrain

    s, out = settings, settings.output
    overrides = list(s.overrides)
    base_cfg = load_config(s.preset, overrides)  # fail fast on a bad preset/override
    journal = join(out, "lineage")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    parent = Lineage(journal, "pipeline", run_name=s.run_name or f"{s.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                     tracking_uri=s.tracking_uri, tags={"dinoforge.preset": s.preset})
    with parent, pipeline_scope(parent):
        parent.params(_settings_params(s))
        dedup = s.dedup_method != "none"
        eval_manifest = join(out, "data", "eval.parquet") if dedup else None
        _, seconds["import"] = _timed(lambda: (
            import_split("train", join(out, "data", "pool.parquet"), s, s.pool_size),
            dedup and import_split("test", eval_manifest, s, s.eval_size)))
        weights = s.curation_weights
        if weights is None:
            weights = join(out, "curate", "embedder", "random_init.pth")
            export_random(base_cfg, weights, seed=s.seed)
        curate = CurateSettings(manifest=join(out, "data", "pool.parquet"), weights=weights, out=join(out, "curate"),
                                eval_manifest=eval_manifest, dedup_method=s.dedup_method,
                                n=s.curated_size, seed=s.seed)
        with stage_lineage("curate", curate.out) as lineage:
            curated, seconds["curate"] = _timed(lambda: curate_stage(curate, lineage))
        curated_uri = curated["outputs"][0]

        run_dir = join(out, "pretrain")
        cfg = load_config(s.preset, overrides + [f"data.dataset=manifest:{curated_uri}"])
        summary, seconds["pretrain"] = _timed(lambda: pretrain(cfg, run_dir, s.max_steps, progress=s.progress))
        parent.params(to_dict(cfg))  # the resolved training config: what two runs differ in
        parent.artifact(join(run_dir, "config.yaml"))
        _record_training(parent, run_dir, summary["step"])

        weights_uri = join(run_dir, "export", "teacher_backbone.pth")
        with stage_lineage("export", run_dir) as lineage:
            exported, seconds["export"] = _timed(lambda: export_stage(
                run_dir, weights_uri, lineage, model_name=f"dinoforge-{cfg.model.arch}-{s.preset}"))

        eval_dir = join(out, "evaluate")
        suite = SuiteSettings(train_limit=s.train_limit, test_limit=s.test_limit, data=s.data, seed=s.seed,
                              pictures=True)
        with stage_lineage("evaluate", eval_dir) as lineage:
            evaluation, seconds["evaluate"] = _timed(lambda: evaluate_stage(
                weights_uri, *backbones_to_evaluate(weights_uri, s.seed, s.compare_random_init), s.eval_protocols, suite, eval_dir, lineage))
        headline = evaluation["headline"]
        parent.metrics(headline_metrics(headline) | {"wall_seconds": time.perf_counter() - started})
    return {
        "pipeline": "curate+pretrain+export+evaluate",
        "steps": summary["step"],
        "curated_images": curated["images"][curated_uri],
        "train_seconds": round(seconds["pretrain"], 1),
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        **{f"knn_top1_{name}": values["knn"] for name, values in headline.items() if "knn" in values},
        "weights": weights_uri,
        "weights_digest": exported["digest"],
        "checkpoints": join(run_dir, "checkpoints"),
        "curated_manifest": curated_uri,
        "report": join(out, "curate", "report"),
        "evaluation": eval_dir,
        "pictures": sorted(p for p in _listing(eval_dir) if p.endswith(".png")),
        "mlflow": {"tracking_uri": parent.tracking_uri, "experiment": parent.experiment, "pipeline_run_id": parent.run_id,
                   "pipeline_run_key": parent.key, "run_name": parent.run_name, "journal": journal,
                   "ui": f"{cli_command()} ui {out}"},
    }


def _settings_params(settings: PipelineSettings) -> dict[str, Any]:
    """The pipeline's own settings as MLflow params (output as an absolute URI; not the data
    location, the tracking store or the terminal's progress bars)."""
    from dinoforge.lineage.journal import absolute_uri

    params = {k: v for k, v in asdict(settings).items() if k not in ("data", "tracking_uri", "run_name", "progress")}
    return params | {"output": absolute_uri(settings.output)}


def _record_training(parent: Lineage, run_dir: str, last_step: int) -> None:
    """The training run's loss curve and mean throughput on the pipeline run too, so that two
    pipeline runs overlay their curves on MLflow's compare page. A resumed run's log repeats the
    steps after its last checkpoint (and an interrupted attempt may have gone past ``last_step``):
    the latest record of each step up to ``last_step`` counts."""
    with fsspec.open(join(run_dir, "metrics.jsonl"), "r") as handle:
        by_step = {record["step"]: record for line in handle if line.strip() and (record := json.loads(line))}
    records = [by_step[step] for step in sorted(by_step) if step <= last_step]
    for record in records:
        parent.metrics({"loss": record["loss"]}, step=record["step"])
    if records:
        parent.metrics({"images_per_s": sum(r["images_per_s"] for r in records) / len(records)})


def cli_command() -> str:
    """How this process's ``dinoforge`` was invoked (``.venv/bin/dinoforge``, ``dinoforge``,
    ``python -m dinoforge.cli``), so that printed commands work as printed."""
    program = sys.argv[0] if sys.argv else ""
    if os.path.basename(program) == "dinoforge":
        return program
    return f"{sys.executable} -m dinoforge.cli"


def _listing(uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return [fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p for p in fs.find(path)]


def print_summary(summary: dict[str, Any]) -> None:
    """The human summary (rich), then the summary as one JSON line (what scripts parse)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dinoforge pipeline", show_header=False)
    for name in ("trained", "random_init_layerscale1"):
        if f"knn_top1_{name}" in summary:
            table.add_row(f"k-NN top-1 (k=20), {name.replace('_', ' ')}", f"{summary[f'knn_top1_{name}']:.2f}")
    table.add_row("steps / curated images", f"{summary['steps']} / {summary['curated_images']}")
    table.add_row("stage seconds", ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))
    table.add_row("exported weights", summary["weights"])
    table.add_row("checkpoints", summary["checkpoints"])
    table.add_row("curation report", summary["report"])
    table.add_row("evaluation + pictures", summary["evaluation"])
    tracking = summary["mlflow"]["tracking_uri"]
    table.add_row("MLflow runs", f"{tracking} (experiment {summary['mlflow']['experiment']}, "
                  f"pipeline run {summary['mlflow']['run_name']}: {summary['mlflow']['pipeline_run_id']})")
    if summary["mlflow"]["pipeline_run_id"] is None:
        table.add_row("MLflow unreachable", f"lineage kept; push it later: dinoforge lineage sync {summary['mlflow']['journal']}")
    elif not tracking.startswith("http"):
        table.add_row("open the MLflow UI", summary["mlflow"]["ui"])
    Console(stderr=True).print(table)
    print(json.dumps(summary), flush=True)
