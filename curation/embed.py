"""Embed a manifest with a frozen backbone, sharded over workers and resumable per chunk
(paper §3 / App. A: the curation pipeline starts from one embedding per pool image).

Layout under ``out_uri``::

    embeddings/meta.json            lineage: manifest digest, weights, chunk_rows, dim, dtype
    embeddings/chunk_000000.npz     rows [0, chunk_rows) of the manifest
    embeddings/chunk_000001.npz     rows [chunk_rows, 2 * chunk_rows) ...

Chunk ``c`` belongs to worker ``c % world``, so any number of workers produces the same
chunks. Each chunk is one ``.npz`` (a zip of ``.npy`` arrays, readable with ``np.load``):
``ids`` (int64 manifest rows that were embedded), ``embeddings`` (float16, (n_ok, D),
L2-normalised CLS), ``skipped_rows`` (int64) with ``skipped_reasons`` (the ``BadImage``
reason), the de-duplication signatures of the embedded rows (``phash`` uint64, ``canon``
float16 (n_ok, 32, 32) grey thumbnails, ``pixels`` int64: see ``dedup.Signatures``; computed
here so that de-duplication never decodes the pool again), ``rows`` ([start, stop) of the chunk) and ``lineage`` (a hash of the settings the
chunk was computed with). A chunk is uploaded in one ``pipe_file`` call, which object stores
publish atomically; a local file cut short by a crash fails to open and is recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import fsspec
import numpy as np
import torch
from torch import Tensor, nn

from dinoforge.curation.dedup import CANON, Signatures
from dinoforge.data.decode import BadImage
from dinoforge.data.manifest import Manifest, creator_info
from dinoforge.data.sources import ManifestSource
from dinoforge.data.storage import join
from dinoforge.eval.features import cls_features, prepare_image
from dinoforge.export import load_backbone
from dinoforge.telemetry import Telemetry

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: chunks carry de-duplication signatures
DTYPE = "float16"
# Settings whose change makes existing chunks wrong for the current call (checked, not mixed).
CHECKED_KEYS = ("format_version", "manifest_digest", "weights_uri", "weights_meta", "chunk_rows", "dim", "dtype")
# Batches read, decoded and prepared in background threads while the model runs the current
# one; the bound caps memory at a few float32 (batch_size, 3, S, S) batches.
PREFETCH_BATCHES = 2

Skipped = list[tuple[int, str]]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Batch:
    """A fixed slice of one chunk's rows: the unit that is read, decoded and embedded."""

    chunk: int
    rows: range
    last: bool  # the chunk's final batch: once embedded, the chunk is complete


def _canonical_uri(uri: str) -> str:
    """The URI with its protocol and an absolute path, so ``x.pth`` and ``file:///…/x.pth`` match."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.unstrip_protocol(path)


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """Explicit values, else torchrun's ``RANK``/``WORLD_SIZE``, else one worker."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return rank, world


def _lineage(info: dict[str, Any]) -> str:
    """A hash of the checked settings; every chunk carries it, so chunks of different runs never mix."""
    canonical = json.dumps({key: info[key] for key in CHECKED_KEYS}, sort_keys=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _describe(manifest_uri: str, manifest: Manifest, weights_uri: str, weights_meta: dict, chunk_rows: int,
              dim: int) -> dict[str, Any]:
    """The meta.json contents for this call."""
    info = {
        "format_version": FORMAT_VERSION,
        "manifest_uri": _canonical_uri(manifest_uri),
        "manifest_digest": manifest.digest,
        "num_rows": len(manifest),
        "weights_uri": _canonical_uri(weights_uri),
        "weights_meta": weights_meta,
        "chunk_rows": chunk_rows,
        "num_chunks": -(-len(manifest) // chunk_rows),
        "dim": dim,
        "dtype": DTYPE,
    }
    return {**info, "lineage": _lineage(info), "creator": creator_info(f"curate embed {manifest_uri}")}


def _check_meta(existing: dict[str, Any], current: dict[str, Any], where: str) -> None:
    differing = [key for key in CHECKED_KEYS if existing.get(key) != current[key]]
    if differing:
        details = "; ".join(f"{key}: {existing.get(key)!r} there, {current[key]!r} now" for key in differing)
        raise ValueError(f"{where} was written with other settings ({details}): "
                         "rerun with the same manifest, weights and chunk_rows, or use another out_uri")


def _sync_meta(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any], rank: int) -> None:
    """Checks an existing meta.json against this call; rank 0 writes it when absent."""
    if fs.exists(path):
        _check_meta(json.loads(fs.cat_file(path)), info, fs.unstrip_protocol(path))
    elif rank == 0:
        fs.pipe_file(path, json.dumps(info, indent=2).encode())


def chunk_path(root: str, chunk: int) -> str:
    return join(root, f"chunk_{chunk:06d}.npz")


def chunk_rows_range(chunk: int, chunk_rows: int, num_rows: int) -> range:
    return range(chunk * chunk_rows, min(num_rows, (chunk + 1) * chunk_rows))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The arrays as an uncompressed ``.npz``. Equal arrays give equal bytes: ``np.savez``
    writes each member through ``ZipFile.open(name, "w")``, which stamps zipfile's fixed default
    date (1980-01-01), not the current time."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def _chunk_header(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, list[int]] | None:
    """(lineage, [start, stop]) of a chunk file, or None when it is not a complete chunk.
    Reads only the zip directory and the two small members, not the embeddings."""
    try:
        with fs.open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            return str(data["lineage"]), data["rows"].tolist()
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        log.warning("chunk %s is incomplete or unreadable (%s: %s): recomputing it", path, type(error).__name__, error)
        return None


def _check_chunk(path: str, lineage: str, rows: list[int], expected_lineage: str, expected_rows: range) -> None:
    if lineage != expected_lineage:
        raise ValueError(f"{path} was computed with other settings (lineage {lineage}, expected {expected_lineage}): "
                         "rerun with the same manifest, weights and chunk_rows, or use another out_uri")
    if rows != [expected_rows.start, expected_rows.stop]:
        raise ValueError(f"{path} holds rows {rows}, expected [{expected_rows.start}, {expected_rows.stop}]")


def _present(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Names of the files under ``root`` (listed afresh: another worker may have written some)."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return set()
    return {path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)}


def _pending_chunks(fs: fsspec.AbstractFileSystem, root: str, mine: Iterable[int], info: dict[str, Any]) -> list[int]:
    """This worker's chunks that are not yet complete; a complete chunk of other settings is an error."""
    present = _present(fs, root)
    pending = []
    for chunk in mine:
        path = chunk_path(root, chunk)
        header = _chunk_header(fs, path) if path.rsplit("/", 1)[-1] in present else None
        if header is None:
            pending.append(chunk)
        else:
            _check_chunk(fs.unstrip_protocol(path), *header, info["lineage"],
                         chunk_rows_range(chunk, info["chunk_rows"], info["num_rows"]))
    return pending


def _load_batch(source: ManifestSource, meta: dict, batch: Batch) -> tuple[Batch, list[int], Tensor | None, Signatures, Skipped]:
    """Reads, decodes and prepares one batch: (batch, embedded rows, images or None, their
    de-duplication signatures, skipped rows)."""
    rows, images, decoded, skipped = [], [], [], []
    for row, result in zip(batch.rows, source.get_many(batch.rows)):
        if isinstance(result, BadImage):
            log.debug("skipped row %d (%s): %s", row, source.uri(row), result)
            skipped.append((row, result.reason))
        else:
            rows.append(row)
            decoded.append(result[0])
            images.append(prepare_image(result[0], meta["image_size"], meta["resize_size"], meta["mean"], meta["std"]))
    return batch, rows, torch.stack(images) if images else None, Signatures.of(decoded), skipped


def _prefetched(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[R]:
    """``fn`` over ``items`` in order, with up to ``depth`` calls running ahead in ``pool``."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(chunks: Iterable[int], chunk_rows: int, num_rows: int, batch_size: int) -> Iterator[Batch]:
    """Batch boundaries at fixed offsets from each chunk's start, so a chunk's batches (and
    hence its float rounding) do not depend on which worker computes it."""
    for chunk in chunks:
        rows = chunk_rows_range(chunk, chunk_rows, num_rows)
        starts = range(rows.start, rows.stop, batch_size)
        for start in starts:
            yield Batch(chunk, range(start, min(rows.stop, start + batch_size)), start == starts[-1])


def _chunk_arrays(rows: list[int], embeddings: list[np.ndarray], signatures: list[Signatures], skipped: Skipped,
                  dim: int, row_range: range, lineage: str) -> dict[str, np.ndarray]:
    return {
        "ids": np.asarray(rows, dtype=np.int64),
        "embeddings": np.concatenate(embeddings) if embeddings else np.zeros((0, dim), dtype=DTYPE),
        "phash": np.concatenate([np.zeros(0, np.uint64)] + [s.hashes for s in signatures]),
        "canon": np.concatenate([np.zeros((0, CANON, CANON), np.float16)] + [s.canon.half().numpy() for s in signatures]),
        "pixels": np.concatenate([np.zeros(0, np.int64)] + [s.pixels for s in signatures]),
        "skipped_rows": np.asarray([row for row, _ in skipped], dtype=np.int64),
        "skipped_reasons": np.asarray([reason for _, reason in skipped], dtype=str),
        "rows": np.asarray([row_range.start, row_range.stop], dtype=np.int64),
        "lineage": np.asarray(lineage),
    }


def _write_chunk(fs: fsspec.AbstractFileSystem, root: str, info: dict[str, Any], chunk: int, rows: list[int],
                 embeddings: list[np.ndarray], signatures: list[Signatures], skipped: Skipped, seconds: float) -> None:
    """Uploads one finished chunk in a single PUT (an object store never shows a partial one) and logs it."""
    row_range = chunk_rows_range(chunk, info["chunk_rows"], info["num_rows"])
    arrays = _chunk_arrays(rows, embeddings, signatures, skipped, info["dim"], row_range, info["lineage"])
    fs.pipe_file(chunk_path(root, chunk), npz_bytes(arrays))
    reasons = dict(sorted(Counter(reason for _, reason in skipped).items()))
    log.info("embed chunk %d/%d rows [%d, %d): %d embedded, %d skipped %s, %.2f s", chunk + 1, info["num_chunks"],
             row_range.start, row_range.stop, len(rows), len(skipped), reasons, seconds,
             extra={"chunk": chunk, "row_start": row_range.start, "row_stop": row_range.stop, "embedded": len(rows),
                    "skipped": reasons, "seconds": seconds})


def _embed_chunks(backbone: nn.Module, source: ManifestSource, meta: dict, info: dict[str, Any],
                  fs: fsspec.AbstractFileSystem, root: str, chunks: list[int], batch_size: int, device: torch.device,
                  telemetry: Telemetry) -> tuple[int, int]:
    """Embeds and writes ``chunks``, reading ahead across chunk ends; returns (rows embedded,
    rows skipped) and reports the rows done to ``telemetry`` after each chunk."""
    rows: list[int] = []
    embeddings: list[np.ndarray] = []
    signatures: list[Signatures] = []
    skipped: Skipped = []
    embedded = dropped = 0
    reasons: Counter[str] = Counter()
    total = sum(len(chunk_rows_range(chunk, info["chunk_rows"], info["num_rows"])) for chunk in chunks)
    started = time.perf_counter()
    batches = _batches(chunks, info["chunk_rows"], info["num_rows"], batch_size)
    with ThreadPoolExecutor(PREFETCH_BATCHES, thread_name_prefix="embed-load") as pool:
        for batch, batch_rows, images, batch_signatures, batch_skipped in _prefetched(pool, lambda b: _load_batch(source, meta, b), batches,
                                                                    PREFETCH_BATCHES):
            if images is not None:
                features = cls_features(backbone, images.to(device), batch_size=batch_size)
                embeddings.append(features.cpu().numpy().astype(DTYPE))
            rows += batch_rows
            signatures.append(batch_signatures)
            skipped += batch_skipped
            if batch.last:
                _write_chunk(fs, root, info, batch.chunk, rows, embeddings, signatures, skipped, time.perf_counter() - started)
                embedded, dropped = embedded + len(rows), dropped + len(skipped)
                reasons.update(reason for _, reason in skipped)
                telemetry.progress(embedded + dropped, total)
                telemetry.skipped(dict(reasons))
                rows, embeddings, signatures, skipped = [], [], [], []
                started = time.perf_counter()
    return embedded, dropped


def embed_manifest(
    manifest_uri: str,
    weights_uri: str,
    out_uri: str,
    *,
    rank: int | None = None,
    world: int | None = None,
    chunk_rows: int = 4096,
    batch_size: int = 256,
    device: str | None = None,
) -> dict[str, Any]:
    """Embeds this worker's chunks of the manifest (chunk ``c`` is worker ``c % world``'s)
    into ``out_uri/embeddings/`` and returns a summary. ``rank``/``world`` None: read from
    ``RANK``/``WORLD_SIZE`` (as torchrun sets them), else 0 and 1. ``device`` None: GPU ``LOCAL_RANK`` when
    available, else CPU. Chunks already complete are skipped, so rerunning resumes; existing
    results computed with another manifest, weights or chunk_rows are an error. A chunk's bytes
    are the same whichever worker computes it, for the same batch_size, device type and software."""
    rank, world = _rank_world(rank, world)
    if chunk_rows < 1 or batch_size < 1:
        raise ValueError(f"chunk_rows and batch_size must be positive, got {chunk_rows}, {batch_size}")
    # Under torchrun each local rank drives its own GPU.
    target = torch.device(device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    manifest = Manifest.read(manifest_uri)
    backbone, meta = load_backbone(weights_uri)
    backbone = backbone.to(target)
    info = _describe(manifest_uri, manifest, weights_uri, meta, chunk_rows, backbone.embed_dim)
    fs, root = fsspec.core.url_to_fs(join(out_uri, "embeddings"))
    fs.makedirs(root, exist_ok=True)
    _sync_meta(fs, join(root, "meta.json"), info, rank)
    mine = range(rank, info["num_chunks"], world)
    pending = _pending_chunks(fs, root, mine, info)
    log.info("embed rank %d/%d on %s: %d of its %d chunks to compute (%d chunks in all)", rank, world, target,
             len(pending), len(mine), info["num_chunks"])
    telemetry = Telemetry("curate", rank=rank)
    try:
        embedded, skipped = _embed_chunks(backbone, ManifestSource(manifest), meta, info, fs, root, pending, batch_size,
                                          target, telemetry)
    finally:
        telemetry.close()
    return {
        "out_uri": out_uri,
        "rank": rank,
        "world": world,
        "device": str(target),
        "num_chunks": info["num_chunks"],
        "computed": pending,
        "already_done": sorted(set(mine) - set(pending)),
        "rows_embedded": embedded,
        "rows_skipped": skipped,
        "seconds": round(time.perf_counter() - started, 3),
    }


def embedding_info(out_uri: str) -> dict[str, Any]:
    """The run's ``meta.json``: manifest digest, weights URI and meta, chunk_rows, num_chunks,
    dim, dtype, lineage and creator."""
    path = join(out_uri, "embeddings", "meta.json")
    with fsspec.open(path, "rb") as handle:
        return json.loads(handle.read())


def iter_chunks(out_uri: str, keys: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    """The arrays ``keys`` of every chunk in row order, one chunk in memory at a time. Raises
    if any chunk is missing or from other settings."""
    info = embedding_info(out_uri)
    fs, root = fsspec.core.url_to_fs(join(out_uri, "embeddings"))
    present = _present(fs, root)
    missing = [chunk for chunk in range(info["num_chunks"]) if chunk_path(root, chunk).rsplit("/", 1)[-1] not in present]
    if missing:
        raise FileNotFoundError(f"{out_uri}: {len(missing)} of {info['num_chunks']} embedding chunks are missing "
                                f"(first: {missing[:10]}); run embed_manifest for every rank first")
    for chunk in range(info["num_chunks"]):
        path = chunk_path(root, chunk)
        with fs.open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            _check_chunk(fs.unstrip_protocol(path), str(data["lineage"]), data["rows"].tolist(), info["lineage"],
                         chunk_rows_range(chunk, info["chunk_rows"], info["num_rows"]))
            yield {key: data[key] for key in keys}


def iter_embedding_chunks(out_uri: str) -> Iterator[tuple[np.ndarray, np.ndarray, Skipped]]:
    """(ids int64, embeddings float16 (n, D), skipped [(row, reason)]) per chunk in row order."""
    for data in iter_chunks(out_uri, ("ids", "embeddings", "skipped_rows", "skipped_reasons")):
        yield data["ids"], data["embeddings"], list(zip(data["skipped_rows"].tolist(), data["skipped_reasons"].tolist()))


def load_embeddings(out_uri: str) -> tuple[np.ndarray, np.ndarray, Skipped]:
    """All chunks concatenated in row order: ids int64 (N_ok,), embeddings float16 (N_ok, D)
    and the skipped rows [(row, reason)]."""
    dim = embedding_info(out_uri)["dim"]
    ids, embeddings, skipped = [np.zeros(0, dtype=np.int64)], [np.zeros((0, dim), dtype=DTYPE)], []
    for chunk_ids, chunk_embeddings, chunk_skipped in iter_embedding_chunks(out_uri):
        ids.append(chunk_ids)
        embeddings.append(chunk_embeddings)
        skipped += chunk_skipped
    return np.concatenate(ids), np.concatenate(embeddings), skipped


def load_signatures(out_uri: str) -> tuple[np.ndarray, Signatures]:
    """The embedded rows (int64, row order) and their de-duplication signatures."""
    chunks = list(iter_chunks(out_uri, ("ids", "phash", "canon", "pixels")))
    ids = np.concatenate([np.zeros(0, np.int64)] + [c["ids"] for c in chunks])
    hashes = np.concatenate([np.zeros(0, np.uint64)] + [c["phash"] for c in chunks])
    canon = np.concatenate([np.zeros((0, CANON, CANON), np.float16)] + [c["canon"] for c in chunks])
    pixels = np.concatenate([np.zeros(0, np.int64)] + [c["pixels"] for c in chunks])
    return ids, Signatures(hashes, torch.from_numpy(canon).float(), pixels)
