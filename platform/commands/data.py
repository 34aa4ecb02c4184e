"""``dinoforge data``: build and inspect dataset manifests (``dinoforge.data``)."""

from __future__ import annotations

import argparse
import json

from dinoforge.arguments import add_flags, parse_bytes
from dinoforge.config import DataConfig


def _default_shards(out: str) -> str:
    return out.removesuffix(".parquet") + "-shards"


def cmd_data_import(args: argparse.Namespace) -> int:
    from dinoforge.data import decode_limits
    from dinoforge.data.importers import import_fashion_mnist, import_images

    if args.uri.startswith("fashion-mnist"):
        split, shards = args.uri.partition(":")[2] or "train", args.shards or _default_shards(args.out)
        report = import_fashion_mnist(
            args.fashion_mnist_root, split, shards, args.shard_bytes, args.progress, args.limit
        )
    else:
        limits = decode_limits(DataConfig())
        report = import_images(args.uri, args.source, args.labels_from_folders, limits, args.threads, args.progress)
    print(json.dumps(report.write(args.out)))
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from dinoforge.data.importers import pack
    from dinoforge.data.manifest import Manifest

    shards = args.shards or _default_shards(args.out)
    report = pack(Manifest.read(args.manifest), shards, args.manifest, args.shard_bytes, args.threads, args.progress)
    print(json.dumps(report.write(args.out)))
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from dinoforge.data.manifest import Manifest

    manifest = Manifest.read(args.manifest, verify=not args.no_verify)
    sizes = manifest.table.column("size").to_numpy()
    packed = manifest.table.column("shard").null_count == 0
    info = {"manifest": args.manifest, "digest": manifest.digest, "images": len(manifest), "bytes": int(sizes.sum())}
    print(json.dumps(info | {"packed": packed, **manifest.metadata}))
    return 0


SHARD_SIZE = {"shard_bytes": "target shard size in bytes, or e.g. 256M"}


def _data_import_flags(parser: argparse.ArgumentParser) -> None:
    from dinoforge.data.importers import import_fashion_mnist, import_images

    where = "folder or bucket prefix (local path, file://, s3://, gs://), or fashion-mnist[:split]"
    parser.add_argument("uri", help=where)
    parser.add_argument("--out", required=True, help="manifest URI to write (.parquet)")
    helps = {
        "source": "source name recorded per row (default: the URI)",
        "labels_from_folders": "do not label images by their first-level folder",
        "threads": "concurrent reads",
    }
    add_flags(parser, import_images, helps, {"labels_from_folders": "--labels"})
    shards = "fashion-mnist: shard prefix (default: OUT without .parquet + '-shards')"
    parser.add_argument("--shards", default=None, help=shards)
    add_flags(parser, DataConfig, {"fashion_mnist_root": "the Fashion-MNIST folder"})
    helps = {"limit": "fashion-mnist: only the first N images", **SHARD_SIZE}
    add_flags(parser, import_fashion_mnist, helps, {"shard_bytes": "--shard-size"}, shard_bytes={"type": parse_bytes})
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _data_pack_flags(parser: argparse.ArgumentParser) -> None:
    from dinoforge.data.importers import pack

    parser.add_argument("manifest", help="input manifest URI")
    parser.add_argument("--out", required=True, help="packed manifest URI to write")
    parser.add_argument("--shards", default=None, help="shard prefix (default: OUT without .parquet + '-shards')")
    helps = {**SHARD_SIZE, "threads": "concurrent reads"}
    add_flags(parser, pack, helps, {"shard_bytes": "--shard-size"}, shard_bytes={"type": parse_bytes})
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_parsers(sub) -> None:
    p = sub.add_parser("data", help="build and inspect dataset manifests")
    commands = p.add_subparsers(dest="data_command", required=True)
    what = "manifest of a folder/bucket prefix of images, or of fashion-mnist[:train|test]"
    commands.add_parser("import", help=what, populate=_data_import_flags).set_defaults(func=cmd_data_import)
    what = "copy a manifest's images into tar shards (ranged reads keep random access)"
    commands.add_parser("pack", help=what, populate=_data_pack_flags).set_defaults(func=cmd_data_pack)
    info = commands.add_parser("info", help="print a manifest's digest, size and metadata (lineage)")
    info.add_argument("manifest")
    info.add_argument(
        "--no-verify", action="store_true", help="trust the recorded digest instead of rehashing the rows"
    )
    info.set_defaults(func=cmd_data_info)
