"""The ``dinoforge`` command line; subcommands mirror the jobs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from dinoforge.checkpoint import resolve_checkpoint
from dinoforge.data.storage import join
from dinoforge.config import ConfigError, DataConfig, load_config, preset_names, to_dict

log = logging.getLogger("dinoforge")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="smoke", help=f"one of {preset_names()} or a YAML file (default: smoke)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.base_lr=1e-3")


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
    from dinoforge.export import export_backbone

    meta = export_backbone(resolve_checkpoint(args.checkpoint), args.out)
    print(json.dumps({"weights": args.out, **meta}))
    return 0


def knn_data(meta: dict, spec: str, data: DataConfig, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled images among the first ``limit`` of ``spec``, prepared as ``meta`` says:
    (N, 3, S, S), (N,). Unusable or unlabelled images are skipped and counted in the log."""
    from collections import Counter

    from dinoforge.data import open_source
    from dinoforge.data.decode import BadImage
    from dinoforge.model.knn import prepare_image

    source = open_source(spec, data)
    count = len(source) if limit is None else min(limit, len(source))
    images, labels, skipped = [], [], Counter()
    for start in range(0, count, 256):
        indices = range(start, min(count, start + 256))
        for index, result in zip(indices, source.get_many(indices)):
            if isinstance(result, BadImage):
                log.warning("k-NN data: skipped %s: %s (%s)", source.uri(index), result.reason, result.detail)
                skipped[result.reason] += 1
            elif result[1] < 0:
                skipped["unlabelled"] += 1
            else:
                images.append(prepare_image(result[0], meta["image_size"], meta["resize_size"], meta["mean"], meta["std"]))
                labels.append(result[1])
    if skipped:
        log.warning("k-NN data %s: used %d of %d images, skipped %s", spec, len(labels), count, dict(skipped))
    if not labels:
        raise ValueError(f"k-NN data {spec!r} has no usable labelled images")
    return torch.stack(images), torch.tensor(labels)


def knn_eval(backbone: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             k: int = 20, temperature: float = 0.07) -> dict:
    """k-NN top-1/top-5 of ``backbone``'s CLS features on prepared (images, labels) sets."""
    from dinoforge.model.knn import extract_features, knn_accuracy

    result = knn_accuracy(extract_features(backbone, train[0]), train[1], extract_features(backbone, test[0]), test[1],
                          k=k, temperature=temperature)
    return {"protocol": "knn", "k": k, "temperature": temperature, **result, "n_train": len(train[1]), "n_test": len(test[1])}


def cmd_evaluate_knn(args: argparse.Namespace) -> int:
    from dinoforge.export import load_backbone

    torch.manual_seed(args.seed)
    backbone, meta = load_backbone(args.weights, random_init=args.random_init)
    data = DataConfig(fashion_mnist_root=args.fashion_mnist_root)
    train = knn_data(meta, args.train, data, args.train_limit)
    test = knn_data(meta, args.test, data, args.test_limit)
    result = knn_eval(backbone, train, test, args.k, args.temperature)
    print(json.dumps({**result, "weights": args.weights, "init": "random" if args.random_init else "trained"}))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Pretrain -> export -> k-NN of the trained teacher and of the same network at random
    init, both as initialised for training (LayerScale 1e-5: the CLS output is nearly
    constant) and with LayerScale 1 (a random ViT whose blocks all contribute)."""
    from dinoforge.export import build_from_meta, export_backbone, load_backbone
    from dinoforge.train import pretrain

    cfg = load_config(args.preset, args.overrides)
    started = time.perf_counter()
    summary = pretrain(cfg, args.output, args.max_steps, progress=not args.no_progress)
    train_seconds = time.perf_counter() - started
    weights = join(args.output, "export", "teacher_backbone.pth")
    export_backbone(resolve_checkpoint(args.output), weights)
    trained, meta = load_backbone(weights)
    torch.manual_seed(cfg.train.seed)
    candidates = {
        "trained": trained,
        "random_init": build_from_meta(meta).eval(),
        "random_init_layerscale1": build_from_meta({**meta, "layerscale_init": 1.0}).eval(),
    }
    train = knn_data(meta, args.train, cfg.data, args.train_limit)  # prepared once for all three
    test = knn_data(meta, args.test, cfg.data, args.test_limit)
    top1 = {}
    for name, backbone in candidates.items():
        result = knn_eval(backbone, train, test)
        print(json.dumps({**result, "init": name}))
        top1[name] = result["top1"]
    print(json.dumps({
        "pipeline": "pretrain+export+knn", "steps": summary["step"], "train_seconds": round(train_seconds, 1),
        **{f"knn_top1_{name}": value for name, value in top1.items()},
        "gain_points_vs_random_init": top1["trained"] - top1["random_init"],
        "gain_points_vs_random_init_layerscale1": top1["trained"] - top1["random_init_layerscale1"],
        "weights": weights,
    }))
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
                                      args.shard_size, progress=not args.no_progress)
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


def _add_knn_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", default="fashion-mnist:train", help="labelled train set (default: fashion-mnist:train)")
    parser.add_argument("--test", default="fashion-mnist:test", help="labelled test set (default: fashion-mnist:test)")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoforge", description="DINOv2 pretraining, export and evaluation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="evaluate frozen features")
    protocols = p.add_subparsers(dest="protocol", required=True)
    knn = protocols.add_parser("knn", help="weighted k-NN on CLS features (cosine, k=20, T=0.07)")
    knn.add_argument("--weights", required=True, help="exported weights (.pth with its .json beside it)")
    _add_knn_data_args(knn)
    knn.add_argument("--fashion-mnist-root", default="/usr/share/datasets/fashion-mnist")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--random-init", action="store_true", help="same architecture with random weights (baseline)")
    knn.add_argument("--seed", type=int, default=0)
    knn.set_defaults(func=cmd_evaluate_knn)

    _add_data_parsers(sub)

    p = sub.add_parser("pipeline", help="pretrain, export and k-NN-evaluate (trained vs random init) in one go")
    _add_config_args(p)
    p.add_argument("--output", required=True, help="run directory URI")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    _add_knn_data_args(p)
    p.set_defaults(func=cmd_pipeline)
    return parser


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
