"""What the training loop reports, fanned out by one object to every place that shows it:
``metrics.jsonl`` under the run directory (rank 0), Prometheus (``Telemetry``), MLflow (the
stage's ``Lineage``) and the progress bar."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import fsspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dinoforge.checkpoint import checkpoint_bytes
from dinoforge.data.storage import join
from dinoforge.distributed import World
from dinoforge.telemetry import Telemetry
from dinoforge.training.state import TrainState

if TYPE_CHECKING:
    from dinoforge.lineage import Lineage


class MetricsLog:
    """``metrics.jsonl`` under the run directory, written by rank 0. Object stores cannot
    append, so there the whole file is rewritten at each log step."""

    def __init__(self, output: str, enabled: bool) -> None:
        self.fs, self.path = fsspec.core.url_to_fs(join(output, "metrics.jsonl"))
        self.enabled, self.local = enabled, self.fs.protocol in ("file", ("file", "local"))
        self.lines: list[str] = []
        if enabled and not self.local and self.fs.exists(self.path):
            self.lines = self.fs.cat_file(self.path).decode().splitlines(keepends=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self.local:
            with self.fs.open(self.path, "a") as handle:
                handle.write(line)
        else:
            self.lines.append(line)
            self.fs.pipe_file(self.path, "".join(self.lines).encode())


class TrainMetrics:
    """Every step: its time and data wait to Prometheus, the bar one step on. Every log step:
    one record (losses, schedule values, throughput since the last one, skipped images) to
    every sink. Every checkpoint save or load: its seconds and bytes to Prometheus."""

    def __init__(
        self, output: str, world: World, telemetry: Telemetry, lineage: Lineage, progress: bool, images_per_step: int
    ) -> None:
        self.file = MetricsLog(output, world.is_main)
        self.telemetry, self.lineage, self.images_per_step = telemetry, lineage, images_per_step
        columns = [
            TextColumn("pretrain"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        ]
        self.bar = Progress(*columns, disable=not progress)
        self.task, self.window = None, (0.0, 0)

    @contextmanager
    def progress(self, start_step: int, end_step: int) -> Iterator[None]:
        with self.bar:
            self.task = self.bar.add_task("steps", total=end_step, completed=start_step, status="")
            self.window = (time.perf_counter(), start_step)  # throughput is measured from here
            yield

    def step(self, done: int, images: int, seconds: float, data_seconds: float) -> None:
        self.telemetry.train_step(images, seconds, data_seconds)
        self.bar.update(self.task, completed=done)

    def log(self, state: TrainState, losses: dict[str, float], values: dict[str, float]) -> dict:
        started, first_step = self.window
        images_per_s = (state.step - first_step) * self.images_per_step / (time.perf_counter() - started)
        record = {
            "step": state.step,
            **losses,
            **values,
            "images_per_s": images_per_s,
            "skipped_images": state.skipped.by_reason(),
            "skip_events": state.skipped.events,
            "world_size": state.world_size,
        }
        self.file.write(record)
        self.telemetry.train_values(record)
        self.telemetry.skipped(record["skipped_images"])
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.lineage.metrics(numbers, step=state.step)
        self.bar.update(self.task, status=f"loss {losses['loss']:.3f} {images_per_s:.0f} img/s")
        self.window = (time.perf_counter(), state.step)
        return record

    def checkpoint(self, op: str, seconds: float, uri: str) -> None:
        """The checkpointer's observer."""
        self.telemetry.checkpoint(op, seconds, checkpoint_bytes(uri))
