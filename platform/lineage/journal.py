"""The lineage journal: each run's events as JSON lines at ``JOURNAL/<run_key>.jsonl`` on any
fsspec URI, written before anything talks to MLflow, and the content digests events carry."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger("dinoforge.lineage")

CHUNK_BYTES = 8 << 20


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def absolute_uri(uri: str) -> str:
    """``uri`` with its protocol and an absolute path: ``runs/x`` -> ``file:///…/runs/x``."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.unstrip_protocol(path)


def _file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def digest_uri(uri: str) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a directory: the SHA-256 of its files' sorted
    relative paths, each with its own SHA-256 (empty directories do not count: object stores
    have none). Files are read in 8 MiB chunks; a big checkpoint directory is read whole."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isdir(path):
        return "sha256:" + _file_sha256(fs, path)
    root = path.rstrip("/")
    listing = hashlib.sha256()
    for file in sorted(fs.find(root)):
        listing.update(f"{file[len(root) + 1 :]}\0{_file_sha256(fs, file)}\n".encode())
    return "sha256:" + listing.hexdigest()


def _parse(text: str) -> list[dict]:
    lines = text.splitlines()
    events = []
    for number, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise
            # A process killed mid-append leaves a torn last line: that event was never recorded.
    return events


def read_journal(journal_dir: str) -> dict[str, list[dict]]:
    """Every run's events in a journal directory, by run key."""
    fs, path = fsspec.core.url_to_fs(journal_dir)
    return {
        posixpath.basename(file)[: -len(".jsonl")]: _parse(fs.cat_file(file).decode())
        for file in sorted(fs.glob(join(path, "*.jsonl")))
    }


def read_journal_run(journal_dir: str, key: str) -> list[dict]:
    """One run's events; FileNotFoundError if the journal has no such run."""
    fs, path = fsspec.core.url_to_fs(join(journal_dir, f"{key}.jsonl"))
    return _parse(fs.cat_file(path).decode())


class Journal:
    """One run's events, in memory and at ``JOURNAL/<key>.jsonl``. Object stores cannot append,
    so there the whole file is rewritten for each event. A failed write warns once and is
    retried with the next event: the events stay in memory meanwhile."""

    def __init__(self, journal_dir: str, key: str) -> None:
        self.fs, self.path = fsspec.core.url_to_fs(join(journal_dir, f"{key}.jsonl"))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.events: list[dict] = []
        self.lines: list[str] = []
        self.written = 0
        self.warned = False

    def append(self, event: dict) -> None:
        self.events.append(event)
        self.lines.append(json.dumps(event) + "\n")
        try:
            if self.local:
                if self.written == 0:
                    self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
                with self.fs.open(self.path, "a") as handle:
                    handle.write("".join(self.lines[self.written :]))
            else:
                self.fs.pipe_file(self.path, "".join(self.lines).encode())
            self.written = len(self.lines)
        except Exception as error:  # a journal outage must not stop training either
            if not self.warned:
                log.warning("lineage journal %s not writable (%s); keeping events in memory", self.path, error)
            self.warned = True
