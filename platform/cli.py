"""The ``dinoforge`` command line; subcommands mirror the jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys

import torch

from dinoforge import build_info
from dinoforge.curation import DEDUP_METHODS
from dinoforge.config import ConfigError, DataConfig, load_config, preset_names, to_dict
from dinoforge.distributed import PRECISIONS
from dinoforge.eval.features import labelled_images

log = logging.getLogger("dinoforge")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="smoke", help=f"one of {preset_names()} or a YAML file (default: smoke)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.base_lr=1e-3")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from dinoforge import bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = list(bench.VARIANTS) if args.variants == "all" else args.variants.split(",")
    for name in variants:
        bench.variant_overrides(name)  # unknown names fail before any work
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    record = bench.run(args.preset, args.overrides, args.batch, args.steps, args.warmup, device, precision, variants,
                       args.curve, args.anchor, args.profile)
    bench.print_table(record)
    if args.record:
        with open(args.record, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(to_dict(load_config(args.preset, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dinoforge.train import pretrain

    summary = pretrain(load_config(args.preset, args.overrides), args.output, args.max_steps, progress=not args.no_progress)
    if summary["rank"] == 0:
        print(json.dumps(summary["last_metrics"] | {"step": summary["step"], "resumed_from": summary["resumed_from"]}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dinoforge.lineage import stage_lineage
    from dinoforge.pipeline import export_stage

    with stage_lineage("export", posixpath.dirname(args.out) or ".") as lineage:
        print(json.dumps(export_stage(args.checkpoint, args.out, lineage, args.model_name)))
    return 0


def knn_eval(backbone: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             k: int = 20, temperature: float = 0.07) -> dict:
    """k-NN top-1/top-5 of ``backbone``'s CLS features on prepared (images, labels) sets."""
    from dinoforge.eval.features import cls_features
    from dinoforge.eval.knn import knn_accuracy

    result = knn_accuracy(cls_features(backbone, train[0]), train[1], cls_features(backbone, test[0]), test[1],
                          k=k, temperature=temperature)
    return {"protocol": "knn", "k": k, "temperature": temperature, **result, "n_train": len(train[1]), "n_test": len(test[1])}


def _suite_settings(args: argparse.Namespace):
    from dinoforge.eval.suite import SuiteSettings

    return SuiteSettings(
        train=args.train, test=args.test, train_limit=args.train_limit, test_limit=args.test_limit,
        data=DataConfig(fashion_mnist_root=args.fashion_mnist_root), seed=args.seed,
        ks=tuple(args.k), temperature=args.temperature, linear_epochs=args.linear_epochs, logreg_max_iter=args.logreg_max_iter,
        retrieval_queries=args.retrieval_queries, retrieval_distractors=args.retrieval_distractors,
        dense_train=args.dense_train, dense_test=args.dense_test, dense_epochs=args.dense_epochs,
        pictures=args.out is not None,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """One protocol (or the suite's chosen set) on exported weights, optionally next to the same
    architecture at random init; under torchrun, k-NN shards the train set across ranks."""
    from dinoforge.eval.suite import parse_protocols
    from dinoforge.lineage import stage_lineage
    from dinoforge.pipeline import evaluate_stage
    from dinoforge.export import build_from_meta, load_backbone

    try:
        protocols = parse_protocols(args.protocols if args.protocol == "suite" else args.protocol)
    except ValueError as err:
        print(f"dinoforge: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    backbone, meta = load_backbone(args.weights, random_init=args.random_init)
    backbones = {"random_init" if args.random_init else "trained": backbone}
    if args.compare_random_init and not args.random_init:
        backbones["random_init"] = build_from_meta(meta).eval()
    settings = _suite_settings(args)
    if protocols == ("knn",) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _evaluate_knn_sharded(backbones, meta, settings)
    with stage_lineage("evaluate", args.out) as lineage:
        summary = evaluate_stage(args.weights, backbones, meta, protocols, settings, args.out, lineage)
    print(json.dumps({**summary, "weights": args.weights}))
    return 0


def _evaluate_knn_sharded(backbones: dict, meta: dict, settings) -> int:
    """k-NN with the train set sharded across torchrun's ranks: each rank extracts features for
    its share only; neighbours are merged across ranks (``knn_protocol``); rank 0 prints."""
    from dinoforge.distributed import close_world, init_world
    from dinoforge.eval.features import cls_features
    from dinoforge.eval.knn import knn_protocol

    world = init_world()
    try:
        train_x, train_y = labelled_images(meta, settings.train, settings.data, settings.train_limit, (world.rank, world.world_size))
        test_x, test_y = labelled_images(meta, settings.test, settings.data, settings.test_limit)
        for name, backbone in backbones.items():
            backbone.to(world.device)
            train_f = cls_features(backbone, train_x.to(world.device))
            test_f = cls_features(backbone, test_x.to(world.device))
            result = knn_protocol(train_f, train_y.to(world.device), test_f, test_y.to(world.device),
                                  ks=settings.ks, temperature=settings.temperature)
            if world.rank == 0:
                print(json.dumps({**result, "init": name, "world_size": world.world_size}), flush=True)
    finally:
        close_world()
    return 0


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
    settings = PipelineSettings(
        tracking_uri=tracking_uri, run_name=args.run_name, output=output, preset=args.preset, overrides=tuple(args.overrides), pool_size=args.pool_size, eval_size=args.eval_size,
        curated_size=args.curated_size, curation_weights=args.curation_weights, dedup_method=args.dedup, max_steps=args.max_steps,
        train_limit=args.train_limit, test_limit=args.test_limit, compare_random_init=args.compare_random_init,
        data=DataConfig(fashion_mnist_root=args.fashion_mnist_root), progress=not args.no_progress,
    )
    print_summary(run_pipeline(settings))
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


def parse_bytes(text: str) -> int:
    """``268435456``, ``256M``, ``256MiB``, ``1G`` -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _default_shards(out: str) -> str:
    return out.removesuffix(".parquet") + "-shards"


def _write_report(report, out: str) -> int:
    """Writes the manifest (and ``OUT.skipped.jsonl`` listing skipped uris) and prints a summary."""
    import fsspec

    digest = report.manifest.write(out)
    if report.skipped:
        with fsspec.open(out + ".skipped.jsonl", "w") as handle:
            handle.writelines(json.dumps(item) + "\n" for item in report.skipped)
    print(json.dumps({"manifest": out, "digest": digest, "images": len(report.manifest),
                      "skipped": report.skipped_by_reason, "classes": len(report.manifest.classes)}))
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from dinoforge.data import decode_limits
    from dinoforge.data.importers import import_fashion_mnist, import_images

    if args.uri.startswith("fashion-mnist"):
        split = args.uri.partition(":")[2] or "train"
        report = import_fashion_mnist(args.fashion_mnist_root, split, args.shards or _default_shards(args.out),
                                      args.shard_size, progress=not args.no_progress, limit=args.limit)
    else:
        report = import_images(args.uri, source=args.source, labels_from_folders=not args.no_labels,
                               limits=decode_limits(DataConfig()), threads=args.threads, progress=not args.no_progress)
    return _write_report(report, args.out)


def cmd_data_pack(args: argparse.Namespace) -> int:
    from dinoforge.data.importers import pack
    from dinoforge.data.manifest import Manifest

    report = pack(Manifest.read(args.manifest), args.shards or _default_shards(args.out), args.manifest,
                  args.shard_size, args.threads, progress=not args.no_progress)
    return _write_report(report, args.out)


def cmd_data_info(args: argparse.Namespace) -> int:
    from dinoforge.data.manifest import Manifest

    manifest = Manifest.read(args.manifest, verify=not args.no_verify)
    sizes = manifest.table.column("size").to_numpy()
    print(json.dumps({"manifest": args.manifest, "digest": manifest.digest, "images": len(manifest),
                      "bytes": int(sizes.sum()), "packed": manifest.table.column("shard").null_count == 0,
                      **manifest.metadata}))
    return 0


def _add_data_parsers(sub) -> None:
    p = sub.add_parser("data", help="build and inspect dataset manifests")
    commands = p.add_subparsers(dest="data_command", required=True)
    imp = commands.add_parser("import", help="manifest of a folder/bucket prefix of images, or of fashion-mnist[:train|test]")
    imp.add_argument("uri", help="folder or bucket prefix (local path, file://, s3://, gs://), or fashion-mnist[:split]")
    imp.add_argument("--out", required=True, help="manifest URI to write (.parquet)")
    imp.add_argument("--source", default=None, help="source name recorded per row (default: the URI)")
    imp.add_argument("--no-labels", action="store_true", help="do not label images by their first-level folder")
    imp.add_argument("--shards", default=None, help="fashion-mnist: shard prefix (default: OUT without .parquet + '-shards')")
    imp.add_argument("--fashion-mnist-root", default=DataConfig.fashion_mnist_root)
    imp.add_argument("--limit", type=int, default=None, help="fashion-mnist: only the first N images")
    pack = commands.add_parser("pack", help="copy a manifest's images into tar shards (ranged reads keep random access)")
    pack.add_argument("manifest", help="input manifest URI")
    pack.add_argument("--out", required=True, help="packed manifest URI to write")
    pack.add_argument("--shards", default=None, help="shard prefix (default: OUT without .parquet + '-shards')")
    for q in (imp, pack):
        q.add_argument("--shard-size", type=parse_bytes, default="256M", help="target shard size (default 256M)")
        q.add_argument("--threads", type=int, default=16, help="concurrent reads (default 16)")
        q.add_argument("--no-progress", action="store_true")
    imp.set_defaults(func=cmd_data_import)
    pack.set_defaults(func=cmd_data_pack)
    info = commands.add_parser("info", help="print a manifest's digest, size and metadata (lineage)")
    info.add_argument("manifest")
    info.add_argument("--no-verify", action="store_true", help="trust the recorded digest instead of rehashing the rows")
    info.set_defaults(func=cmd_data_info)


def cmd_curate_embed(args: argparse.Namespace) -> int:
    from dinoforge.curation.embed import embed_manifest

    summary = embed_manifest(args.manifest, args.weights, args.out, rank=args.rank, world=args.world,
                             chunk_rows=args.chunk_rows, batch_size=args.batch_size, device=args.device)
    print(json.dumps(summary))
    return 0


def cmd_curate_cluster(args: argparse.Namespace) -> int:
    from dinoforge.curation.steps import cluster_step

    print(json.dumps(cluster_step(args.out, args.levels, resampling_steps=args.resampling_steps, niter=args.niter, seed=args.seed)))
    return 0


def cmd_curate_sample(args: argparse.Namespace) -> int:
    from dinoforge.curation.steps import sample_step

    print(json.dumps(sample_step(args.out, args.n, args.manifest_out, strategy=args.strategy, seed=args.seed)))
    return 0


def cmd_curate_dedup(args: argparse.Namespace) -> int:
    from dinoforge.curation.steps import dedup_step

    print(json.dumps(dedup_step(args.out, eval_uri=args.eval, method=args.method, max_hamming=args.max_hamming, k=args.k,
                                threshold=args.threshold, eval_threshold=args.eval_threshold, index=args.index)))
    return 0


def cmd_curate_retrieve(args: argparse.Namespace) -> int:
    from dinoforge.curation.steps import retrieve_step

    print(json.dumps(retrieve_step(args.out, args.seeds, args.manifest_out, method=args.method, k=args.k,
                                   per_cluster=args.per_cluster, nprobe=args.nprobe, seed=args.seed)))
    return 0


def cmd_curate_report(args: argparse.Namespace) -> int:
    from dinoforge.curation.report import write_report

    print(json.dumps(write_report(args.out, curated=args.curated, seed=args.seed)))
    return 0


def cmd_curate_make_pool(args: argparse.Namespace) -> int:
    from dinoforge.curation.pool import make_pool
    from dinoforge.data.importers import import_images

    spec = make_pool(args.out, n_base=args.n_base, n_copies=args.n_copies, n_eval_copies=args.n_eval_copies,
                     n_eval=args.n_eval, seed=args.seed)
    for name in ("pool", "eval"):
        import_images(str(spec.root / name), labels_from_folders=False).manifest.write(str(spec.root / f"{name}.parquet"))
    print(json.dumps({"pool": str(spec.root / "pool.parquet"), "eval": str(spec.root / "eval.parquet"),
                      "truth": str(spec.truth), "pool_images": len(spec.files), "planted_copies": len(spec.copy_of),
                      "planted_eval_copies": len(spec.eval_copy_of), "eval_images": len(spec.eval_files)}))
    return 0


def cmd_curate_run(args: argparse.Namespace) -> int:
    from dinoforge.curation.pipeline import CurateSettings
    from dinoforge.lineage import stage_lineage
    from dinoforge.pipeline import curate_stage

    settings = CurateSettings(args.manifest, args.weights, args.out, eval_manifest=args.eval_manifest, seeds=args.seeds,
                              dedup_method=args.dedup, levels=tuple(args.levels) if args.levels else None,
                              resampling_steps=args.resampling_steps, n=args.n, retrieve_method=args.method,
                              k=args.k, per_cluster=args.per_cluster, chunk_rows=args.chunk_rows,
                              batch_size=args.batch_size, device=args.device, seed=args.seed)
    with stage_lineage("curate", args.out) as lineage:
        result = curate_stage(settings, lineage)
    for summary in result["summaries"]:
        print(json.dumps(summary))
    return 0


def _add_curate_parsers(sub) -> None:
    curate = sub.add_parser("curate", help="data curation steps (LVD-142M style)")
    steps = curate.add_subparsers(dest="step", required=True)
    embed = steps.add_parser("embed", help="embed a manifest's images into float16 chunks (sharded by worker, resumable)")
    embed.add_argument("manifest", help="manifest URI (Parquet)")
    embed.add_argument("--weights", required=True, help="exported weights (.pth with its .json beside it)")
    embed.add_argument("--out", required=True, help="output URI; chunks go to OUT/embeddings/")
    embed.add_argument("--rank", type=int, default=None, help="this worker (default: $RANK, else 0)")
    embed.add_argument("--world", type=int, default=None, help="number of workers (default: $WORLD_SIZE, else 1)")
    embed.add_argument("--chunk-rows", type=int, default=4096, help="manifest rows per resumable chunk")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    embed.set_defaults(func=cmd_curate_embed)
    cluster = steps.add_parser("cluster", help="hierarchical k-means with resampling over OUT's embeddings -> OUT/clusters.npz")
    cluster.add_argument("out", help="the curation URI given to `curate embed --out`")
    cluster.add_argument("--levels", type=int, nargs="+", required=True, help="clusters per level, bottom first (e.g. 1000 100 10)")
    cluster.add_argument("--resampling-steps", type=int, default=10)
    cluster.add_argument("--niter", type=int, default=20, help="k-means iterations")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.set_defaults(func=cmd_curate_cluster)
    sample = steps.add_parser("sample", help="balanced top-down sample of N images -> curated manifest")
    sample.add_argument("out", help="the curation URI (with clusters.npz)")
    sample.add_argument("--n", type=int, required=True, help="images to keep")
    sample.add_argument("--manifest-out", required=True, help="curated manifest URI (Parquet)")
    sample.add_argument("--strategy", choices=("random", "closest"), default="random", help="pick within the smallest clusters")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_curate_sample)
    dedup = steps.add_parser("dedup", help="remove copies (pHash, near-duplicates, evaluation copies) -> OUT/dedup.json")
    dedup.add_argument("out", help="the curation URI given to `curate embed --out`")
    dedup.add_argument("--eval", default=None, help="`curate embed --out` URI of the evaluation images to protect")
    dedup.add_argument("--method", choices=DEDUP_METHODS, default="copy",
                       help="copy: the hand-built copy matcher (default); embedding: the paper's k-NN graph on the embeddings")
    dedup.add_argument("--max-hamming", type=int, default=2, help="pHash bits within which images are copies")
    dedup.add_argument("--k", type=int, default=None, help="neighbours per image (default: 4 copy, 64 embedding)")
    dedup.add_argument("--threshold", type=float, default=None, help="near-duplicate similarity (default: 0.955 copy, 0.6 embedding)")
    dedup.add_argument("--eval-threshold", type=float, default=None, help="evaluation-copy similarity (default: 0.88 copy, 0.45 embedding)")
    dedup.add_argument("--index", choices=("flat", "ivf"), default="flat", help="k-NN search: exact, or faiss IVF for large pools")
    dedup.set_defaults(func=cmd_curate_dedup)
    retrieve = steps.add_parser("retrieve", help="pool images near a seed set -> curated manifest")
    retrieve.add_argument("out", help="the curation URI (pool embeddings, dedup.json, clusters.npz)")
    retrieve.add_argument("--seeds", required=True, help="`curate embed --out` URI of the seed images (same weights)")
    retrieve.add_argument("--manifest-out", required=True, help="curated manifest URI (Parquet)")
    _add_retrieve_args(retrieve)
    retrieve.add_argument("--nprobe", type=int, default=32, help="IVF lists searched (ivfpq)")
    retrieve.set_defaults(func=cmd_curate_retrieve)
    report = steps.add_parser("report", help="counts, cluster-size histogram, cluster montage, near-duplicate examples -> OUT/report/")
    report.add_argument("out", help="the curation URI")
    report.add_argument("--curated", nargs="*", default=[], help="curated manifests to compare with the pool")
    report.add_argument("--seed", type=int, default=0)
    report.set_defaults(func=cmd_curate_report)
    pool = steps.add_parser("make-pool", help="a test pool: real images plus planted edited copies, with ground truth")
    pool.add_argument("out", help="local folder: pool/, eval/, pool.parquet, eval.parquet, truth.json")
    pool.add_argument("--n-base", type=int, default=280)
    pool.add_argument("--n-copies", type=int, default=100)
    pool.add_argument("--n-eval-copies", type=int, default=20)
    pool.add_argument("--n-eval", type=int, default=100)
    pool.add_argument("--seed", type=int, default=0)
    pool.set_defaults(func=cmd_curate_make_pool)
    run = steps.add_parser("run", help="embed -> dedup -> cluster -> sample / retrieve -> report, in one process")
    run.add_argument("manifest", help="pool manifest URI (Parquet)")
    run.add_argument("--weights", required=True, help="exported weights of the embedder")
    run.add_argument("--out", required=True, help="curation URI (any fsspec URI)")
    run.add_argument("--eval-manifest", default=None, help="evaluation images whose copies are removed from the pool")
    run.add_argument("--seeds", default=None, help="seed manifest: retrieve its neighbours -> OUT/retrieved.parquet")
    run.add_argument("--dedup", choices=DEDUP_METHODS + ("none",), default="copy")
    run.add_argument("--levels", type=int, nargs="+", default=None, help="clusters per level, bottom first (default: N/20, sqrt)")
    run.add_argument("--resampling-steps", type=int, default=10)
    run.add_argument("--n", type=int, default=None, help="balanced sample size -> OUT/curated.parquet")
    _add_retrieve_args(run, flag="--retrieve")
    run.add_argument("--chunk-rows", type=int, default=4096)
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--device", default=None)
    run.set_defaults(func=cmd_curate_run)


def _add_retrieve_args(parser: argparse.ArgumentParser, flag: str = "--method") -> None:
    parser.add_argument(flag, dest="method", choices=("exact", "ivfpq", "clusters"), default="exact",
                        help="retrieval: k-NN per seed (exact or faiss IVF-PQ), or the seeds' clusters (small seed sets)")
    parser.add_argument("--k", type=int, default=4, help="pool images per seed (paper: 4)")
    parser.add_argument("--per-cluster", type=int, default=10_000, help="images per seed cluster (clusters; paper: 10,000)")
    parser.add_argument("--seed", type=int, default=0)


def _add_knn_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", default="fashion-mnist:train", help="labelled train set (default: fashion-mnist:train)")
    parser.add_argument("--test", default="fashion-mnist:test", help="labelled test set (default: fashion-mnist:test)")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")


def _add_evaluate_args(parser: argparse.ArgumentParser, suite: bool) -> None:
    parser.add_argument("--weights", required=True, help="exported weights (.pth with its .json beside it)")
    if suite:
        parser.add_argument("--protocols", default="all", help="comma-separated protocols, or 'all' (default)")
    parser.add_argument("--out", default=None, help="directory for results.jsonl, summary.json and pictures")
    _add_knn_data_args(parser)
    parser.add_argument("--fashion-mnist-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--random-init", action="store_true", help="evaluate the same architecture with random weights instead")
    parser.add_argument("--compare-random-init", action="store_true", help="also evaluate the random init and say which wins")
    parser.add_argument("--seed", type=int, default=0, help="seed for random init, data splits, probes and built benchmarks")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="k-NN neighbour counts")
    parser.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    parser.add_argument("--linear-epochs", type=int, default=None, help="default: 2,000 steps of 256 (the probe's budget)")
    parser.add_argument("--logreg-max-iter", type=int, default=300, help="L-BFGS iterations per fit")
    parser.add_argument("--retrieval-queries", type=int, default=200)
    parser.add_argument("--retrieval-distractors", type=int, default=2000)
    parser.add_argument("--dense-train", type=int, default=2000, help="synthetic training scenes for seg/depth")
    parser.add_argument("--dense-test", type=int, default=500)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoforge", description="DINOv2 pretraining, export and evaluation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=build_info.describe(), help="print the version and source commit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("pretrain", help="self-supervised pretraining (resumes from the newest checkpoint)")
    _add_config_args(p)
    p.add_argument("--output", required=True, help="run directory URI (local path, file://, s3://, gs://)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this global step (schedules keep the preset's length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="write the teacher backbone in the official DINOv2 key format (+ OUT.json)")
    p.add_argument("checkpoint", help="checkpoint directory or run directory (its newest committed checkpoint)")
    p.add_argument("out", help="output weights URI, e.g. teacher.pth")
    p.add_argument("--model-name", default=None, help="model registry name (default: dinoforge-<arch>)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="evaluate frozen features (one JSON line per result)")
    protocols = p.add_subparsers(dest="protocol", required=True)
    helps = {
        "knn": "weighted k-NN on CLS features (cosine, k in --k, T=0.07); shards the train set under torchrun",
        "linear": "linear probe grid {last 1, 4 blocks' CLS} x {with, without avgpool} x lr, best on held-out data",
        "logreg": "L-BFGS logistic regression on the last CLS, C picked on held-out data",
        "retrieval": "instance retrieval mAP (Medium/Hard, revisited Oxford/Paris style) on edited Fashion-MNIST copies",
        "seg": "linear semantic segmentation (mIoU) on patch tokens of synthetic Fashion-MNIST scenes",
        "depth": "linear depth on 256 bins (RMSE) on patch tokens of synthetic Fashion-MNIST scenes",
        "pca": "PCA of patch features (paper Fig. 1): foreground IoU on scikit-image photographs",
        "suite": "a chosen set of protocols (--protocols), results.jsonl, summary.json and pictures in --out",
    }
    for name, text in helps.items():
        _add_evaluate_args(protocols.add_parser(name, help=text), suite=name == "suite")

    _add_data_parsers(sub)
    _add_curate_parsers(sub)

    p = sub.add_parser("pipeline", help="curate -> pretrain -> export -> evaluate, with MLflow lineage and a summary")
    _add_config_args(p)
    p.add_argument("--local", action="store_true", help="run here with local defaults: outputs in runs/local, local MLflow store")
    p.add_argument("--output", default=None, help="output prefix URI (local path, file://, s3://, gs://)")
    p.add_argument("--pool-size", type=int, default=20_000, help="uncurated pool: the first N Fashion-MNIST training images")
    p.add_argument("--dedup", choices=DEDUP_METHODS + ("none",), default="none", help="curation de-duplication (default: none, see README)")
    p.add_argument("--eval-size", type=int, default=None, help="with --dedup: evaluation images whose copies are removed, the first N test images (default: all)")
    p.add_argument("--curated-size", type=int, default=12_000, help="images in the balanced curated sample")
    p.add_argument("--curation-weights", default=None, help="embedder for curation (default: the preset's architecture at random init)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fashion-mnist-root", default=DataConfig.fashion_mnist_root)
    p.add_argument("--train-limit", type=int, default=None, help="k-NN: only the first N Fashion-MNIST training images")
    p.add_argument("--test-limit", type=int, default=None, help="k-NN: only the first N Fashion-MNIST test images")
    p.add_argument("--compare-random-init", action="store_true", help="also evaluate the same network at random init (LayerScale 1)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI; --local: runs/mlflow.db; else OUT/mlflow.db)")
    p.add_argument("--run-name", default=None, help="the pipeline's MLflow run name (default: preset and start time)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("ui", help="open the MLflow UI on a run's tracking store (prints its address)")
    p.add_argument("run_dir", nargs="?", default=None, help="a pipeline's output (default: runs/local)")
    p.add_argument("--tracking-uri", default=None, help="a store instead: sqlite:///..., file:///..., or a server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("compare", help="two pipeline runs side by side: headline metrics and the params that differ")
    p.add_argument("run_a", help="a pipeline's output directory, or an MLflow run id")
    p.add_argument("run_b")
    p.add_argument("--tracking-uri", default=None, help="where run ids are (default: MLFLOW_TRACKING_URI, else runs/local's store)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="time the training step on synthetic data: images/s, memory, TFLOP/s, MFU per lever")
    _add_config_args(p)
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's batch_size_per_gpu)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens there)")
    p.add_argument("--variants", default="all", help="comma-separated, the first is the baseline: "
                   "baseline,fused_optimizer,fused_loss,compile_fused_loss,compile (default: all)")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--curve", type=int, default=0, metavar="STEPS", help="also compare the last variant's loss curve with the first's")
    p.add_argument("--anchor", type=float, default=None, help="reference images/s to print the last variant's ratio against")
    p.add_argument("--record", default=None, help="write the record (JSON) to this file")
    p.add_argument("--profile", default=None, help="write the last variant's operator profile to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("lineage", help="MLflow lineage journals")
    commands = p.add_subparsers(dest="lineage_command", required=True)
    sync = commands.add_parser("sync", help="push a journal's pending events to MLflow (idempotent); exit 1 while some stay pending")
    sync.add_argument("journal", help="journal directory URI, e.g. runs/local/lineage")
    sync.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else the store the journal recorded, else OUT/mlflow.db")
    sync.set_defaults(func=cmd_lineage_sync)

    p = sub.add_parser("operator", help="run the DinoPipeline operator (kopf; needs the [operator] extra)")
    p.add_argument("--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable; default: all namespaces)")
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
