"""Training checkpoints with ``torch.distributed.checkpoint`` on any fsspec URI.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN/`` holding the DCP shards of the
model and optimizer (saved by every rank, loadable at any world size: DCP reshards), one RNG
file per rank, ``trainer.json`` (the trainer's ``TrainState``: step, world size, data
position, skipped images, config) and, written
last by rank 0 once everything else is complete, the marker ``COMMITTED``. Readers only see
committed directories, so a checkpoint cut short by a crash or preemption is never loaded.
The newest ``keep`` committed checkpoints are retained. Saves can run in the background
(DCP async save: the state is staged in memory, training continues), and transient storage
errors are retried with exponential backoff before failing with the checkpoint's URI.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinoforge.data.storage import join
from dinoforge.distributed import World
from dinoforge.training.state import TrainState

log = logging.getLogger("dinoforge.checkpoint")
# DCP says so on every single-process save/load; we pass no_dist deliberately.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized", category=UserWarning
)

COMMIT_MARKER = "COMMITTED"
TRAINER_STATE = "trainer.json"
_NAME = re.compile(r"step_(\d{8})$")
T = TypeVar("T")
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, backoff_s: float = 1.0) -> T:
    """Runs ``action``; on a transient OSError (storage, network) waits 1, 2, 4... x backoff and
    retries. Errors that no retry can fix (missing path, permissions) fail at once."""
    for attempt in range(attempts):
        try:
            return action()
        except PERMANENT_ERRORS:
            raise
        except OSError as error:
            if attempt == attempts - 1:
                raise OSError(f"{what} failed after {attempts} attempts: {error}") from error
            delay = backoff_s * 2**attempt
            log.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def checkpoint_uri(output: str, step: int) -> str:
    return join(output, "checkpoints", f"step_{step:08d}")


def committed_checkpoints(output: str) -> list[tuple[int, str]]:
    """(step, uri) of every committed checkpoint under ``output``, oldest first."""
    fs, root = fsspec.core.url_to_fs(join(output, "checkpoints"))
    if not fs.exists(root):
        return []
    found = []
    for path in fs.ls(root, detail=False):
        match = _NAME.search(path.rstrip("/"))
        if match and fs.exists(join(path, COMMIT_MARKER)):
            found.append((int(match.group(1)), fs.unstrip_protocol(path.rstrip("/"))))
    return sorted(found)


def latest_checkpoint(output: str) -> str | None:
    found = committed_checkpoints(output)
    return found[-1][1] if found else None


def resolve_checkpoint(uri: str) -> str:
    """A committed checkpoint URI as given, or a run directory's newest committed checkpoint."""
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(join(path, COMMIT_MARKER)):
        return uri.rstrip("/")
    found = latest_checkpoint(uri)
    if found is None:
        raise FileNotFoundError(f"{uri} is neither a committed checkpoint nor a run directory with one")
    return found


def read_train_state(uri: str) -> TrainState:
    """The ``TrainState`` a committed checkpoint was saved with (its config included)."""
    with fsspec.open(join(uri, TRAINER_STATE), "r") as handle:
        return TrainState.from_dict(json.load(handle))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # local paths need it; object stores ignore it
    fs.pipe_file(path, data)


def checkpoint_digest(uri: str) -> str:
    """Identifies a committed checkpoint for lineage without rereading its tensors: SHA-256 of
    DCP's ``.metadata`` (every tensor's shards, their files, offsets and lengths) followed by
    the trainer state (step, data position, config)."""
    fs, path = fsspec.core.url_to_fs(uri)
    digest = hashlib.sha256()
    for name in (".metadata", TRAINER_STATE):
        digest.update(fs.cat_file(join(path, name)))
    return "sha256:" + digest.hexdigest()


def checkpoint_bytes(uri: str) -> int:
    """Bytes under a checkpoint directory (all ranks' shards, trainer state, RNG files)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return int(fs.du(path))


class Checkpointer:
    """Saves/loads DCP checkpoints; ``observe(op, seconds, uri)`` (e.g. Prometheus telemetry)
    hears about each committed save (seconds from the call to the commit, so an async save
    counts its background write too) and each load."""

    def __init__(
        self,
        output: str,
        world: World,
        keep: int,
        async_save: bool = False,
        observe: Callable[[str, float, str], None] | None = None,
    ) -> None:
        self.output, self.world, self.keep, self.async_save = output, world, keep, async_save
        self.observe = observe or (lambda op, seconds, uri: None)
        self._pending: tuple[Future, str, dict[str, Any], float] | None = None

    def _state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> str:
        """Saves (or starts saving, when async) the checkpoint of ``state.step``; all ranks call it."""
        self.wait()
        started = time.perf_counter()
        uri = checkpoint_uri(self.output, state.step)
        trainer = state.to_dict()  # as of now: training goes on while an async save runs
        buffer = io.BytesIO()
        torch.save(_rng_state(self.world.device), buffer)
        with_retries(
            lambda: _write_bytes(join(uri, "rng", f"rank_{self.world.rank:05d}.pt"), buffer.getvalue()),
            f"writing the RNG state of {uri}",
        )
        tensors = self._state(model, optimizer)
        if self.async_save:
            future = dcp.async_save(tensors, checkpoint_id=uri, no_dist=not self.world.distributed)
            self._pending = (future, uri, trainer, started)
        else:
            with_retries(
                lambda: dcp.save(tensors, checkpoint_id=uri, no_dist=not self.world.distributed), f"saving {uri}"
            )
            self._commit(uri, trainer, started)
        return uri

    def wait(self) -> None:
        """Blocks until a background save has finished, then commits it."""
        if self._pending is None:
            return
        future, uri, trainer, started = self._pending
        self._pending = None
        future.result()
        self._commit(uri, trainer, started)

    def _commit(self, uri: str, trainer: dict[str, Any], started: float) -> None:
        # DCP's save returns on every rank after the coordinator has written the metadata, i.e.
        # after all ranks' shards are complete; the barrier also covers the per-rank RNG files.
        if self.world.distributed:
            dist.barrier()
        if self.world.is_main:
            with_retries(
                lambda: _write_bytes(join(uri, TRAINER_STATE), json.dumps(trainer).encode()),
                f"writing {TRAINER_STATE} of {uri}",
            )
            with_retries(lambda: _write_bytes(join(uri, COMMIT_MARKER), b""), f"committing {uri}")
            for _, old in committed_checkpoints(self.output)[: -self.keep]:
                fs, path = fsspec.core.url_to_fs(old)
                # The marker goes first, so a half-deleted checkpoint is never taken for a whole one.
                fs.rm(join(path, COMMIT_MARKER))
                fs.rm(path, recursive=True)
        if self.world.distributed:
            dist.barrier()
        log.info("checkpoint committed: %s", uri)
        self.observe("save", time.perf_counter() - started, uri)

    def load(self, uri: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """Loads model and optimizer (resharded to this world size) and, when this rank saved
        one, its RNG state; returns the state the checkpoint was saved with."""
        started = time.perf_counter()
        state = self._state(model, optimizer)
        with_retries(lambda: dcp.load(state, checkpoint_id=uri, no_dist=not self.world.distributed), f"loading {uri}")
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        saved = read_train_state(uri)
        rng_uri = join(uri, "rng", f"rank_{self.world.rank:05d}.pt")
        fs, path = fsspec.core.url_to_fs(rng_uri)
        if saved.world_size == self.world.world_size and fs.exists(path):
            rng = torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.world.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.world.device)
        self.observe("load", time.perf_counter() - started, uri)
        return saved


def load_model_weights(uri: str, model: torch.nn.Module) -> None:
    """Only the model part of a checkpoint (e.g. to start a high-resolution stage or to load a
    distillation teacher), into ``model`` at any world size."""
    state = {"model": get_model_state_dict(model)}
    no_dist = not (dist.is_available() and dist.is_initialized())
    with_retries(lambda: dcp.load(state, checkpoint_id=uri, no_dist=no_dist), f"loading {uri}")
    set_model_state_dict(model, state["model"])


def load_modules(uri: str, modules: dict[str, torch.nn.Module]) -> None:
    """Fills each module from the tensors under its prefix (``"teacher.backbone"``) in a
    committed checkpoint, reading only those tensors, in one process."""
    model = {f"{prefix}.{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()}
    with_retries(lambda: dcp.load({"model": model}, checkpoint_id=uri, no_dist=True), f"loading {uri}")
    for prefix, module in modules.items():
        start = len(prefix) + 1
        module.load_state_dict({k[start:]: v for k, v in model.items() if k.startswith(prefix + ".")})
