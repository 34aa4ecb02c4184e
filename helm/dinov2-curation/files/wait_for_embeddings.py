"""Pod 0 of the dinov2-curation Job: wait until every embedding chunk of the given curation sets
is on storage, so that ``dinoforge curate run`` (which comes next) finds them all done.

Each argument is a ``dinoforge curate embed --out`` URI. Its ``embeddings/meta.json`` gives
``num_chunks``; chunk c is the object ``embeddings/chunk_<c:06d>.npz``, written in one PUT by
shard c mod WORLD. Presence is enough to stop waiting: ``curate run`` re-checks every chunk and
recomputes an incomplete or missing one itself.

Exits 0 when every chunk is present, or when no new chunk appeared for ``--stall-seconds`` (a
shard that failed for good, or whose pod never got scheduled): it then lists the missing chunks
and their shards, and ``curate run`` embeds them in this pod. Any other error exits non-zero.
Needs only fsspec (and the storage driver of the URIs): no torch import, no Kubernetes API.
"""

import argparse
import json
import re
import sys
import time

import fsspec

CHUNK = re.compile(r"chunk_(\d+)\.npz$")


def log(message: str) -> None:
    print(f"wait_for_embeddings: {message}", flush=True)


def missing_chunks(uri: str) -> list[int] | None:
    """The chunk numbers of ``uri`` not yet on storage; None while its meta.json is absent."""
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/") + "/embeddings")
    fs.invalidate_cache(root)  # other pods write here: list afresh on every poll
    try:
        meta = json.loads(fs.cat_file(root + "/meta.json"))
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return None
    present = {int(match.group(1)) for match in map(CHUNK.search, names) if match}
    return [chunk for chunk in range(int(meta["num_chunks"])) if chunk not in present]


def describe(missing: list[int], world: int) -> str:
    shards = sorted({chunk % world for chunk in missing})
    return f"{len(missing)} chunks missing (first: {missing[:10]}), of shards {shards[:20]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uris", nargs="+", help="curation set URIs (curate embed --out)")
    parser.add_argument("--world", type=int, required=True, help="number of shards (curate embed --world)")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("--stall-seconds", type=float, default=1800.0, help="0: wait forever")
    args = parser.parse_args(argv)
    last_state, last_change = None, time.monotonic()
    while True:
        state = {uri: missing_chunks(uri) for uri in args.uris}
        if all(missing == [] for missing in state.values()):
            log(f"all chunks present in {', '.join(args.uris)}")
            return 0
        now = time.monotonic()
        signature = {uri: None if missing is None else len(missing) for uri, missing in state.items()}
        if signature != last_state:  # a chunk (or a meta.json) appeared: progress
            last_state, last_change = signature, now
            log("; ".join(f"{uri}: " + ("no meta.json yet" if missing is None else f"{len(missing)} chunks to go")
                          for uri, missing in state.items()))
        elif args.stall_seconds and now - last_change >= args.stall_seconds:
            for uri, missing in state.items():
                if missing:
                    log(f"{uri}: {describe(missing, args.world)}")
            log(f"no new chunk for {args.stall_seconds:.0f} s: curate run embeds the missing chunks in this pod")
            return 0
        time.sleep(args.poll_seconds)


if __name__ == "__main__":
    sys.exit(main())
