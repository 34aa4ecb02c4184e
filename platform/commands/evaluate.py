"""``dinoforge evaluate``: one protocol, or a chosen set of them (``suite``), on exported
weights (``dinoforge.eval``)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from dinoforge.arguments import add_flags, build_from

PROTOCOL_HELP = {
    "knn": "weighted k-NN on CLS features (cosine, k in --k, T=0.07); shards the train set under torchrun",
    "linear": "linear probe grid {last 1, 4 blocks' CLS} x {with, without avgpool} x lr, best on held-out data",
    "logreg": "L-BFGS logistic regression on the last CLS, C picked on held-out data",
    "retrieval": "instance retrieval mAP (Medium/Hard, revisited Oxford/Paris style) on edited Fashion-MNIST copies",
    "seg": "linear semantic segmentation (mIoU) on patch tokens of synthetic Fashion-MNIST scenes",
    "depth": "linear depth on 256 bins (RMSE) on patch tokens of synthetic Fashion-MNIST scenes",
    "pca": "PCA of patch features (paper Fig. 1): foreground IoU on scikit-image photographs",
    "suite": "a chosen set of protocols (--protocols), results.jsonl, summary.json and pictures in --out",
}


def _evaluate_flags(parser: argparse.ArgumentParser, suite: bool) -> None:
    from dinoforge.eval.suite import SuiteSettings

    parser.add_argument("--weights", required=True, help="exported weights (.pth with its .json beside it)")
    if suite:
        parser.add_argument("--protocols", default="all", help="comma-separated protocols, or 'all' (default)")
    parser.add_argument("--out", default=None, help="directory for results.jsonl, summary.json and pictures")
    random = "evaluate the same architecture with random weights instead"
    parser.add_argument("--random-init", action="store_true", help=random)
    compare = "also evaluate the random init and say which wins"
    parser.add_argument("--compare-random-init", action="store_true", help=compare)
    helps = {
        "train": "labelled train set",
        "test": "labelled test set",
        "train_limit": "use only the first N train images",
        "test_limit": "use only the first N test images",
        "data.fashion_mnist_root": "the Fashion-MNIST folder",
        "seed": "seed for random init, data splits, probes and built benchmarks",
        "ks": "k-NN neighbour counts",
        "temperature": "k-NN vote temperature",
        "linear_epochs": "default: 2,000 steps of 256 (the probe's budget)",
        "logreg_max_iter": "L-BFGS iterations per fit",
        "retrieval_queries": "queries of the built retrieval benchmark",
        "retrieval_distractors": "distractors of the built retrieval benchmark",
        "dense_train": "synthetic training scenes for seg/depth",
        "dense_test": "synthetic test scenes for seg/depth",
        "dense_epochs": "epochs of the seg/depth linear heads",
    }
    add_flags(parser, SuiteSettings, helps, {"ks": "--k"})


def cmd_evaluate(args: argparse.Namespace) -> int:
    """One protocol (or the suite's chosen set) on exported weights, optionally next to the same
    architecture at random init; under torchrun, k-NN shards the train set across ranks."""
    import torch

    from dinoforge.eval.suite import SuiteSettings, parse_protocols
    from dinoforge.export import build_from_meta, load_backbone
    from dinoforge.lineage import stage_lineage
    from dinoforge.pipeline import evaluate_stage

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
    settings = build_from(SuiteSettings, args, pictures=args.out is not None)
    if protocols == ("knn",) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _evaluate_knn_sharded(backbones, meta, settings)
    with stage_lineage("evaluate", args.out) as lineage:
        summary = evaluate_stage(args.weights, backbones, meta, protocols, settings, args.out, lineage)
    print(json.dumps({**summary, "weights": args.weights}))
    return 0


def _evaluate_knn_sharded(backbones: dict, meta: dict, settings) -> int:
    """k-NN with the train set sharded across torchrun's ranks (``knn_sharded``); rank 0 prints."""
    from dinoforge.distributed import close_world, init_world
    from dinoforge.eval.knn import knn_sharded

    world = init_world()
    try:
        for result in knn_sharded(backbones, meta, settings, world):
            if world.is_main:
                print(json.dumps(result), flush=True)
    finally:
        close_world()
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate frozen features (one JSON line per result)")
    protocols = p.add_subparsers(dest="protocol", required=True)
    for name, text in PROTOCOL_HELP.items():
        populate = functools.partial(_evaluate_flags, suite=name == "suite")
        protocols.add_parser(name, help=text, populate=populate).set_defaults(func=cmd_evaluate)
