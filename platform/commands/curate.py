"""``dinoforge curate``: each curation step as a command over the function that runs it (its
flags derived from that function's parameters), and all of them in one process (``run``, from
``CurateSettings``); ``dinoforge.curation`` does the work."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable

from dinoforge.arguments import add_flags, build_from
from dinoforge.curation import DEDUP_METHODS

RETRIEVE_METHODS = ("exact", "ivfpq", "clusters")
OUT = "the curation URI given to `curate embed --out`"


def _target(path: str) -> Callable:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _step(steps, name: str, what: str, target: str, helps: dict[str, str], flags: dict[str, str], **options) -> None:
    """``curate NAME``: calls ``target`` (imported when the command runs) with its flags and
    prints what it returns as one JSON line."""

    def populate(parser: argparse.ArgumentParser) -> None:
        add_flags(parser, _target(target), helps, flags, **options)

    def handler(args: argparse.Namespace) -> int:
        print(json.dumps(build_from(_target(target), args)))
        return 0

    steps.add_parser(name, help=what, populate=populate).set_defaults(func=handler)


def cmd_make_pool(args: argparse.Namespace) -> int:
    from dinoforge.curation.pool import make_pool
    from dinoforge.data.importers import import_images

    counts = {"n_base": args.n_base, "n_copies": args.n_copies, "n_eval_copies": args.n_eval_copies}
    spec = make_pool(args.out, **counts, n_eval=args.n_eval, seed=args.seed)
    for name in ("pool", "eval"):
        manifest = import_images(str(spec.root / name), labels_from_folders=False).manifest
        manifest.write(str(spec.root / f"{name}.parquet"))
    files = {"pool": str(spec.root / "pool.parquet"), "eval": str(spec.root / "eval.parquet"), "truth": str(spec.truth)}
    sizes = {"pool_images": len(spec.files), "planted_copies": len(spec.copy_of)}
    sizes |= {"planted_eval_copies": len(spec.eval_copy_of), "eval_images": len(spec.eval_files)}
    print(json.dumps(files | sizes))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dinoforge.curation.pipeline import CurateSettings
    from dinoforge.lineage import stage_lineage
    from dinoforge.pipeline import curate_stage

    settings = build_from(CurateSettings, args)
    with stage_lineage("curate", args.out) as lineage:
        result = curate_stage(settings, lineage)
    for summary in result["summaries"]:
        print(json.dumps(summary))
    return 0


def _run_flags(run: argparse.ArgumentParser) -> None:
    from dinoforge.curation.pipeline import CurateSettings

    helps = {
        "manifest": "pool manifest URI (Parquet)",
        "weights": "exported weights of the embedder",
        "out": "curation URI (any fsspec URI)",
        "eval_manifest": "evaluation images whose copies are removed from the pool",
        "seeds": "seed manifest: retrieve its neighbours -> OUT/retrieved.parquet",
        "dedup_method": "de-duplication",
        "levels": "clusters per level, bottom first (default: N/20, sqrt)",
        "resampling_steps": "k-means resampling steps per level",
        "n": "balanced sample size -> OUT/curated.parquet",
        "retrieve_method": "retrieval: k-NN per seed (exact or faiss IVF-PQ), or the seeds' clusters (small seed sets)",
        "k": "pool images per seed (paper: 4)",
        "per_cluster": "images per seed cluster (clusters; paper: 10,000)",
        "seed": "seed of clustering, sampling and retrieval",
        "chunk_rows": "manifest rows per resumable embedding chunk",
        "batch_size": "embedding batch size",
        "device": "default: cuda when available, else cpu",
    }
    flags = {"manifest": "manifest", "dedup_method": "--dedup", "retrieve_method": "--retrieve"}
    add_flags(
        run,
        CurateSettings,
        helps,
        flags,
        dedup_method={"choices": DEDUP_METHODS + ("none",)},
        retrieve_method={"choices": RETRIEVE_METHODS},
    )


def add_parsers(sub) -> None:
    steps = sub.add_parser("curate", help="data curation steps (LVD-142M style)").add_subparsers(
        dest="step", required=True
    )
    what = "embed a manifest's images into float16 chunks (sharded by worker, resumable)"
    helps = {
        "manifest_uri": "manifest URI (Parquet)",
        "weights_uri": "exported weights (.pth with its .json beside it)",
        "out_uri": "output URI; chunks go to OUT/embeddings/",
        "rank": "this worker (default: $RANK, else 0)",
        "world": "number of workers (default: $WORLD_SIZE, else 1)",
        "chunk_rows": "manifest rows per resumable chunk",
        "batch_size": "images per forward",
        "device": "default: cuda when available, else cpu",
    }
    flags = {"manifest_uri": "manifest", "weights_uri": "--weights", "out_uri": "--out"}
    _step(steps, "embed", what, "dinoforge.curation.embed.embed_manifest", helps, flags)

    what = "hierarchical k-means with resampling over OUT's embeddings -> OUT/clusters.npz"
    helps = {
        "out_uri": OUT,
        "levels": "clusters per level, bottom first (e.g. 1000 100 10)",
        "resampling_steps": "resampling steps per level",
        "niter": "k-means iterations",
        "seed": "k-means seed",
    }
    _step(steps, "cluster", what, "dinoforge.curation.steps.cluster_step", helps, {"out_uri": "out"})

    what = "balanced top-down sample of N images -> curated manifest"
    helps = {
        "out_uri": "the curation URI (with clusters.npz)",
        "n": "images to keep",
        "manifest_out": "curated manifest URI (Parquet)",
        "strategy": "pick within the smallest clusters",
        "seed": "sampling seed",
    }
    flags = {"out_uri": "out", "n": "--n"}
    _step(
        steps,
        "sample",
        what,
        "dinoforge.curation.steps.sample_step",
        helps,
        flags,
        strategy={"choices": ("random", "closest")},
    )

    what = "remove copies (pHash, near-duplicates, evaluation copies) -> OUT/dedup.json"
    helps = {
        "out_uri": OUT,
        "eval_uri": "`curate embed --out` URI of the evaluation images to protect",
        "method": "copy: the hand-built copy matcher (default); embedding: the paper's k-NN graph on the embeddings",
        "max_hamming": "pHash bits within which images are copies",
        "k": "neighbours per image (default: 4 copy, 64 embedding)",
        "threshold": "near-duplicate similarity (default: 0.955 copy, 0.6 embedding)",
        "eval_threshold": "evaluation-copy similarity (default: 0.88 copy, 0.45 embedding)",
        "index": "k-NN search: exact, or faiss IVF for large pools",
    }
    flags = {"out_uri": "out", "eval_uri": "--eval"}
    _step(
        steps,
        "dedup",
        what,
        "dinoforge.curation.steps.dedup_step",
        helps,
        flags,
        method={"choices": DEDUP_METHODS},
        index={"choices": ("flat", "ivf")},
    )

    what = "pool images near a seed set -> curated manifest"
    helps = {
        "out_uri": "the curation URI (pool embeddings, dedup.json, clusters.npz)",
        "seeds_uri": "`curate embed --out` URI of the seed images (same weights)",
        "manifest_out": "curated manifest URI (Parquet)",
        "method": "retrieval: k-NN per seed (exact or faiss IVF-PQ), or the seeds' clusters (small seed sets)",
        "k": "pool images per seed (paper: 4)",
        "per_cluster": "images per seed cluster (clusters; paper: 10,000)",
        "nprobe": "IVF lists searched (ivfpq)",
        "seed": "seed of the IVF-PQ training sample",
    }
    flags = {"out_uri": "out", "seeds_uri": "--seeds"}
    _step(
        steps,
        "retrieve",
        what,
        "dinoforge.curation.steps.retrieve_step",
        helps,
        flags,
        method={"choices": RETRIEVE_METHODS},
    )

    what = "counts, cluster-size histogram, cluster montage, near-duplicate examples -> OUT/report/"
    helps = {
        "out_uri": "the curation URI",
        "curated": "curated manifests to compare with the pool",
        "seed": "montage seed",
    }
    _step(
        steps,
        "report",
        what,
        "dinoforge.curation.report.write_report",
        helps,
        {"out_uri": "out"},
        curated={"nargs": "*"},
    )

    pool = steps.add_parser("make-pool", help="a test pool: real images plus planted edited copies, with ground truth")
    pool.add_argument("out", help="local folder: pool/, eval/, pool.parquet, eval.parquet, truth.json")
    pool.add_argument("--n-base", type=int, default=280, help="distinct real images")
    pool.add_argument("--n-copies", type=int, default=100, help="planted edited copies of pool images")
    pool.add_argument("--n-eval-copies", type=int, default=20, help="planted edited copies of evaluation images")
    pool.add_argument("--n-eval", type=int, default=100, help="evaluation images")
    pool.add_argument("--seed", type=int, default=0)
    pool.set_defaults(func=cmd_make_pool)

    run = "embed -> dedup -> cluster -> sample / retrieve -> report, in one process"
    steps.add_parser("run", help=run, populate=_run_flags).set_defaults(func=cmd_run)
