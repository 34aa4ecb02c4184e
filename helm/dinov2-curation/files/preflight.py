"""``helm test`` of the dinov2-curation chart: can a pod with the release's image, credentials and
environment do what the curation needs of storage?

- every manifest (``--manifest NAME=URI``): readable, a dinoforge manifest (its Parquet footer
  holds the ``dinoforge.manifest`` metadata); reports rows and digest. Only the footer is read.
- the embedder (``--weights``): the .pth exists and is not empty, the .json beside it names an
  architecture (what ``dinoforge curate embed`` loads).
- the output (``--out``): one small object is written, read back and deleted.

Then reports, without judging, how far the curation under ``--out`` has got. Prints one JSON line
per check; exits 1 if any check failed. Needs fsspec and pyarrow (dinoforge's own dependencies).
"""

import argparse
import json
import socket
import sys
import uuid

import fsspec
import pyarrow.parquet as pq

METADATA_KEY = b"dinoforge.manifest"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def check_manifest(uri: str) -> dict:
    with fsspec.open(uri, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        raw = (parquet.schema_arrow.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{uri} has no {METADATA_KEY.decode()} metadata: not a dinoforge manifest "
                             "(write one with `dinoforge data import`)")
        return {"rows": parquet.metadata.num_rows, "digest": json.loads(raw).get("digest")}


def check_weights(uri: str) -> dict:
    fs, path = fsspec.core.url_to_fs(uri)
    size = fs.info(path)["size"]
    if not size:
        raise ValueError(f"{uri} is empty")
    meta_uri = (uri[: -len(".pth")] if uri.endswith(".pth") else uri) + ".json"  # dinoforge.export.meta_uri
    with fsspec.open(meta_uri, "r") as handle:
        meta = json.load(handle)
    if "arch" not in meta:
        raise ValueError(f"{meta_uri} names no architecture ('arch'): not an export of `dinoforge export`")
    return {"bytes": size, "arch": meta["arch"], "embed_dim": meta.get("embed_dim")}


def check_writable(out: str) -> dict:
    probe = join(out, f".helm-test-{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    fs, path = fsspec.core.url_to_fs(probe)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if "file" in protocols:  # object stores have no folders to create (and s3fs would create a bucket)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    payload = b"dinov2-curation helm test\n"
    fs.pipe_file(path, payload)
    try:
        if fs.cat_file(path) != payload:
            raise ValueError(f"{probe} read back different bytes")
    finally:
        fs.rm(path)
    return {"probe": probe}


def progress(out: str) -> dict:
    """Where the curation stands: never an error (before the first pod ran there is nothing)."""
    fs, root = fsspec.core.url_to_fs(join(out, "embeddings"))
    outputs = {}
    for name in ("curated.parquet", "retrieved.parquet"):  # what `curate run` writes (sample, retrieval)
        if fs.exists(fsspec.core.url_to_fs(join(out, name))[1]):
            outputs[name] = check_manifest(join(out, name))["rows"]
    if outputs:
        return {"state": "curated", "rows": outputs}
    if not fs.exists(root + "/meta.json"):
        return {"state": "not started"}
    total = json.loads(fs.cat_file(root + "/meta.json"))["num_chunks"]
    done = sum(1 for name in fs.ls(root, detail=False) if name.rsplit("/", 1)[-1].startswith("chunk_"))
    return {"state": "embedding" if done < total else "embedded", "chunks": done, "num_chunks": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", action="append", default=[], metavar="NAME=URI", help="a manifest to check")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    checks = [(f"manifest {name}", check_manifest, uri)
              for name, _, uri in (item.partition("=") for item in args.manifest)]
    checks += [("weights", check_weights, args.weights), ("out writable", check_writable, args.out)]
    failed = 0
    for name, check, uri in checks:
        try:
            print(json.dumps({"check": name, "uri": uri, "ok": True, **check(uri)}), flush=True)
        except Exception as error:  # report every check, then fail
            failed += 1
            print(json.dumps({"check": name, "uri": uri, "ok": False, "error": f"{type(error).__name__}: {error}"}),
                  flush=True)
    try:
        print(json.dumps({"progress": args.out, **progress(args.out)}), flush=True)
    except Exception as error:
        print(json.dumps({"progress": args.out, "state": "unknown", "error": f"{type(error).__name__}: {error}"}))
    print(f"preflight: {len(checks) - failed} of {len(checks)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
