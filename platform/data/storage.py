"""Reading image bytes through fsspec (``file://``, plain paths, ``gs://``, ``s3://``, ...).

Endpoints and credentials come from the environment, as the cloud clients read them
(``AWS_ENDPOINT_URL``/``AWS_*`` for s3fs, ``STORAGE_EMULATOR_HOST``/application default
credentials for gcsfs), so the same URI works on a laptop, in CI and on a cluster.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import fsspec


@dataclass(frozen=True)
class BlobRef:
    """``length`` bytes at ``offset`` of ``uri``; a whole object when offset is None."""

    uri: str
    offset: int | None = None
    length: int | None = None


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def read_blob(ref: BlobRef) -> bytes:
    fs, path = fsspec.core.url_to_fs(ref.uri)
    if ref.offset is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=ref.offset, end=ref.offset + ref.length)


class BytesCache:
    """LRU cache of blobs bounded by their total size in bytes (0 disables it)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity, self.used = capacity_bytes, 0
        self.hits = self.misses = 0
        self._items: OrderedDict[BlobRef, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: BlobRef) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return value

    def put(self, key: BlobRef, value: bytes) -> None:
        if len(value) > self.capacity:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.used += len(value)
            while self.used > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self.used -= len(evicted)


class BlobReader:
    """Reads blobs concurrently (object-store latency overlaps across a batch) through a
    bounded cache. Errors are returned, not raised, so one bad object never fails a batch."""

    def __init__(self, cache_bytes: int = 0, threads: int = 8) -> None:
        self.cache = BytesCache(cache_bytes)
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def _executor(self) -> ThreadPoolExecutor:
        import os

        # A pool inherited through fork has no threads in the child: make a new one there.
        if self._pool is None or self._pid != os.getpid():
            self._pool, self._pid = ThreadPoolExecutor(self.threads, thread_name_prefix="blob-read"), os.getpid()
        return self._pool

    def read(self, ref: BlobRef) -> bytes:
        cached = self.cache.get(ref)
        if cached is not None:
            return cached
        value = read_blob(ref)
        self.cache.put(ref, value)
        return value

    def read_many(self, refs: Sequence[BlobRef]) -> list[bytes | Exception]:
        def attempt(ref: BlobRef) -> bytes | Exception:
            try:
                return self.read(ref)
            except Exception as error:  # noqa: BLE001 - reported per blob to the caller
                return error

        if len(refs) <= 1 or self.threads <= 1:
            return [attempt(ref) for ref in refs]
        return list(self._executor().map(attempt, refs))

    def __getstate__(self) -> dict:
        # Sent to spawned workers: the pool and cached bytes stay behind.
        return {"cache_bytes": self.cache.capacity, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache_bytes"], state["threads"])
