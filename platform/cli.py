"""The ``dinoforge`` command line: one subcommand per job, each a thin parser and handler over
the function of its own module that does the work. Flags that fill a settings dataclass or a
function's parameters take their defaults and types from it, and a subcommand's flags are
added only when it runs, so a command imports only what it needs (``dinoforge.arguments``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys

from dinoforge import build_info
from dinoforge.arguments import LazyParser, add_flags, build_from
from dinoforge.commands import curate, data, evaluate
from dinoforge.config import DEFAULT_PRESET, ConfigError, load_config, preset_names, to_dict
from dinoforge.curation import DEDUP_METHODS

log = logging.getLogger("dinoforge")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    presets = f"one of {preset_names()} or a YAML file (default: %(default)s)"
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=presets)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.base_lr=1e-3")


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(to_dict(load_config(args.preset, args.overrides)), sort_keys=False), end="")
    return 0


def _pretrain_flags(parser: argparse.ArgumentParser) -> None:
    from dinoforge.train import pretrain

    _add_config_args(parser)
    helps = {
        "output": "run directory URI (local path, file://, s3://, gs://)",
        "max_steps": "stop after this global step (schedules keep the preset's length)",
        "progress": "no progress bar",
    }
    add_flags(parser, pretrain, helps)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dinoforge.train import pretrain

    summary = build_from(pretrain, args, cfg=load_config(args.preset, args.overrides))
    if summary["rank"] == 0:
        print(json.dumps(summary["last_metrics"] | {"step": summary["step"], "resumed_from": summary["resumed_from"]}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dinoforge.lineage import stage_lineage
    from dinoforge.pipeline import export_stage

    with stage_lineage("export", posixpath.dirname(args.out) or ".") as lineage:
        print(json.dumps(export_stage(args.checkpoint, args.out, lineage, args.model_name)))
    return 0


def _pipeline_flags(parser: argparse.ArgumentParser) -> None:
    from dinoforge.pipeline import PipelineSettings

    _add_config_args(parser)
    local = "run here with local defaults: outputs in runs/local, local MLflow store"
    parser.add_argument("--local", action="store_true", help=local)
    parser.add_argument("--output", default=None, help="output prefix URI (local path, file://, s3://, gs://)")
    helps = {
        "pool_size": "uncurated pool: the first N Fashion-MNIST training images",
        "dedup_method": "curation de-duplication (see README)",
        "eval_size": "with --dedup: evaluation images whose copies are removed, the first N test images (default: all)",
        "curated_size": "images in the balanced curated sample",
        "curation_weights": "embedder for curation (default: the preset's architecture at random init)",
        "max_steps": "stop pretraining after this global step",
        "progress": "no progress bars",
        "data.fashion_mnist_root": "the Fashion-MNIST folder",
        "train_limit": "k-NN: only the first N Fashion-MNIST training images",
        "test_limit": "k-NN: only the first N Fashion-MNIST test images",
        "compare_random_init": "also evaluate the same network at random init (LayerScale 1)",
        "tracking_uri": "MLflow store (default: MLFLOW_TRACKING_URI; --local: runs/mlflow.db; else OUT/mlflow.db)",
        "run_name": "the pipeline's MLflow run name (default: preset and start time)",
    }
    dedup = {"choices": DEDUP_METHODS + ("none",)}
    add_flags(parser, PipelineSettings, helps, {"dedup_method": "--dedup"}, dedup_method=dedup)


def cmd_pipeline(args: argparse.Namespace) -> int:
    """curate -> pretrain -> export -> evaluate (``dinoforge.pipeline``); ``--local``: outputs
    under ``runs/local`` unless ``--output`` says otherwise, MLflow in a local store there
    unless ``MLFLOW_TRACKING_URI`` is set."""
    from dinoforge.pipeline import PipelineSettings, print_summary, run_pipeline

    output = args.output or ("runs/local" if args.local else None)  # dinoforge.lineage.locate.LOCAL_OUTPUT
    if output is None:
        print("dinoforge: pipeline needs --output URI (or --local for runs/local)", file=sys.stderr)
        return 2
    tracking_uri = args.tracking_uri
    if args.local and not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        from dinoforge.lineage.locate import LOCAL_ROOT
        from dinoforge.lineage.store import local_store

        tracking_uri = local_store(LOCAL_ROOT)  # one store for all local runs: they compare side by side
    print_summary(run_pipeline(build_from(PipelineSettings, args, output=output, tracking_uri=tracking_uri)))
    return 0


def cmd_lineage_sync(args: argparse.Namespace) -> int:
    from dinoforge.lineage import sync_journal

    counts = sync_journal(args.journal, args.tracking_uri)
    print(json.dumps({"journal": args.journal, **counts}))
    return 0 if counts["pending"] == 0 else 1


def cmd_ui(args: argparse.Namespace) -> int:
    from dinoforge.lineage.ui import serve

    try:
        return serve(args.run_dir, args.tracking_uri, args.host, args.port)
    except ValueError as error:  # no store found for the run directory
        print(f"dinoforge: {error}", file=sys.stderr)
        return 2


def cmd_compare(args: argparse.Namespace) -> int:
    from dinoforge.lineage.compare import print_compare

    try:
        print_compare(args.run_a, args.run_b, args.tracking_uri)
    except ValueError as error:  # not a run directory with a synced pipeline run
        print(f"dinoforge: {error}", file=sys.stderr)
        return 2
    return 0


def _bench_flags(parser: argparse.ArgumentParser) -> None:
    from dinoforge.bench import VARIANTS
    from dinoforge.distributed import PRECISIONS

    _add_config_args(parser)
    batch = "images per step (default: the preset's batch_size_per_gpu)"
    parser.add_argument("--batch", type=int, default=None, help=batch)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens there)")
    variants = "comma-separated, the first is the baseline: " + ",".join(VARIANTS) + " (default: all)"
    parser.add_argument("--variants", default="all", help=variants)
    precision = "default: bf16 on a GPU, fp32 on CPU"
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None, help=precision)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    curve = "also compare the last variant's loss curve with the first's"
    parser.add_argument("--curve", type=int, default=0, metavar="STEPS", help=curve)
    anchor = "reference images/s to print the last variant's ratio against"
    parser.add_argument("--anchor", type=float, default=None, help=anchor)
    parser.add_argument("--record", default=None, help="write the record (JSON) to this file")
    parser.add_argument("--profile", default=None, help="write the last variant's operator profile to this file")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from dinoforge import bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = list(bench.VARIANTS) if args.variants == "all" else args.variants.split(",")
    for name in variants:
        bench.variant_overrides(name)  # unknown names fail before any work
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    record = bench.run(
        args.preset,
        args.overrides,
        args.batch,
        args.steps,
        args.warmup,
        device,
        precision,
        variants,
        args.curve,
        args.anchor,
        args.profile,
    )
    bench.print_table(record)
    if args.record:
        with open(args.record, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = LazyParser(prog="dinoforge", description="DINOv2 pretraining, export and evaluation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    version = build_info.describe()
    parser.add_argument("--version", action="version", version=version, help="print the version and source commit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    what = "self-supervised pretraining (resumes from the newest checkpoint)"
    sub.add_parser("pretrain", help=what, populate=_pretrain_flags).set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="write the teacher backbone in the official DINOv2 key format (+ OUT.json)")
    p.add_argument("checkpoint", help="checkpoint directory or run directory (its newest committed checkpoint)")
    p.add_argument("out", help="output weights URI, e.g. teacher.pth")
    p.add_argument("--model-name", default=None, help="model registry name (default: dinoforge-<arch>)")
    p.set_defaults(func=cmd_export)

    evaluate.add_parsers(sub)
    data.add_parsers(sub)
    curate.add_parsers(sub)

    what = "curate -> pretrain -> export -> evaluate, with MLflow lineage and a summary"
    sub.add_parser("pipeline", help=what, populate=_pipeline_flags).set_defaults(func=cmd_pipeline)

    p = sub.add_parser("ui", help="open the MLflow UI on a run's tracking store (prints its address)")
    p.add_argument("run_dir", nargs="?", default=None, help="a pipeline's output (default: runs/local)")
    p.add_argument("--tracking-uri", default=None, help="a store instead: sqlite:///..., file:///..., or a server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("compare", help="two pipeline runs side by side: headline metrics and the params that differ")
    p.add_argument("run_a", help="a pipeline's output directory, or an MLflow run id")
    p.add_argument("run_b")
    where = "where run ids are (default: MLFLOW_TRACKING_URI, else runs/local's store)"
    p.add_argument("--tracking-uri", default=None, help=where)
    p.set_defaults(func=cmd_compare)

    what = "time the training step on synthetic data: images/s, memory, TFLOP/s, MFU per lever"
    sub.add_parser("bench", help=what, populate=_bench_flags).set_defaults(func=cmd_bench)

    p = sub.add_parser("lineage", help="MLflow lineage journals")
    commands = p.add_subparsers(dest="lineage_command", required=True)
    sync = commands.add_parser(
        "sync", help="push a journal's pending events to MLflow (idempotent); exit 1 while some stay pending"
    )
    sync.add_argument("journal", help="journal directory URI, e.g. runs/local/lineage")
    store = "default: MLFLOW_TRACKING_URI, else the store the journal recorded, else OUT/mlflow.db"
    sync.add_argument("--tracking-uri", default=None, help=store)
    sync.set_defaults(func=cmd_lineage_sync)

    p = sub.add_parser("operator", help="run the DinoPipeline operator (kopf; needs the [operator] extra)")
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    p.add_argument("--liveness", default=None, help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--debug", action="store_true", help="kopf's debug logging")
    p.set_defaults(func=cmd_operator)
    return parser


def cmd_operator(args: argparse.Namespace) -> int:
    """``kopf run --standalone -m dinoforge.operators.handlers`` with these options (kopf's CLI
    parses them; it exits the process when the operator stops)."""
    from kopf.cli import main as kopf_main

    kopf_args = ["run", "--standalone", "-m", "dinoforge.operators.handlers"]
    kopf_args += [f"--namespace={ns}" for ns in args.namespace] or ["--all-namespaces"]
    if args.liveness:
        kopf_args.append(f"--liveness={args.liveness}")
    if args.debug:
        kopf_args.append("--debug")
    return kopf_main(args=kopf_args, prog_name="dinoforge operator")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "message": "%(message)s"}',
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"dinoforge: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
