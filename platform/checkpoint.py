"""Single-file training checkpoints on any fsspec URI (``file://``, local paths, ``s3://``...).

A checkpoint is written under a temporary name and renamed when complete, so a reader
never sees a partial file; only the newest ``keep`` are retained.
"""

from __future__ import annotations

import io
import re

import fsspec
import torch

from dinoforge.data.storage import join

_NAME = re.compile(r"step_(\d{8})\.pt$")


def _checkpoints(fs: fsspec.AbstractFileSystem, directory: str) -> list[tuple[int, str]]:
    if not fs.exists(directory):
        return []
    found = []
    for path in fs.ls(directory, detail=False):
        match = _NAME.search(path)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_uri: str) -> str | None:
    fs, directory = fsspec.core.url_to_fs(join(output_uri, "checkpoints"))
    found = _checkpoints(fs, directory)
    return fs.unstrip_protocol(found[-1][1]) if found else None


def save_checkpoint(state: dict, output_uri: str, step: int, keep: int) -> str:
    fs, directory = fsspec.core.url_to_fs(join(output_uri, "checkpoints"))
    fs.makedirs(directory, exist_ok=True)
    final = join(directory, f"step_{step:08d}.pt")
    partial = final + ".partial"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with fs.open(partial, "wb") as handle:
        handle.write(buffer.getvalue())
    fs.mv(partial, final)
    for _, old in _checkpoints(fs, directory)[:-keep]:
        fs.rm(old)
    return fs.unstrip_protocol(final)


def load_checkpoint(uri: str) -> dict:
    with fsspec.open(uri, "rb") as handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
