"""Prometheus metrics of one process: one rank of one stage (pretrain, distill, curate, ...).

Every sample carries the labels ``job``, ``stage`` and ``rank``. Scrape with
``honor_labels: true`` (``honorLabels`` in a PodMonitor): otherwise Prometheus renames the
exported ``job`` label to ``exported_job`` and writes its own scrape-job name into ``job``.

Serving: ``DINOFORGE_METRICS_PORT`` + ``LOCAL_RANK`` (so the ranks of one node do not collide),
on all interfaces, path ``/metrics``. Unset or ``0``: nothing is served, but the metrics are
still recorded and :meth:`Telemetry.render` returns them.

GPU readings come from NVML at scrape time, for the one GPU this rank drives: NVML index
``LOCAL_RANK`` when ``CUDA_VISIBLE_DEVICES`` is unset, else entry ``LOCAL_RANK`` of that list
(an index or a full ``GPU-...`` UUID). Indices assume CUDA numbers the GPUs in NVML's PCI bus
order: set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` to be sure.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import pynvml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

log = logging.getLogger("dinoforge.telemetry")
M = TypeVar("M", bound=MetricWrapperBase)

BASE_LABELS = ("job", "stage", "rank")
# From fast CPU smoke steps to slow steps of large models on many nodes.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
# train_values() keys that are schedule values -> (metric name, help).
SCHEDULE_GAUGES = {
    "lr": ("dinoforge_learning_rate", "Learning rate of the last logged step."),
    "wd": ("dinoforge_weight_decay", "Weight decay of the last logged step."),
    "momentum": ("dinoforge_teacher_momentum", "EMA momentum of the teacher at the last logged step."),
    "teacher_temp": ("dinoforge_teacher_temperature", "Teacher softmax temperature at the last logged step."),
}
# (metric name, help, reading from an NVML device handle).
GPU_READINGS: tuple[tuple[str, str, Callable[[Any], float]], ...] = (
    ("dinoforge_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran on the GPU.",
     lambda handle: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100),
    ("dinoforge_gpu_memory_used_bytes", "GPU memory in use, by all processes.",
     lambda handle: pynvml.nvmlDeviceGetMemoryInfo(handle).used),
    ("dinoforge_gpu_memory_total_bytes", "GPU memory installed.",
     lambda handle: pynvml.nvmlDeviceGetMemoryInfo(handle).total),
    ("dinoforge_gpu_power_watts", "Power draw of the GPU board.",
     lambda handle: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000),
    ("dinoforge_gpu_temperature_celsius", "GPU die temperature.",
     lambda handle: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _gpu_selector() -> str | None:
    """This rank's GPU as NVML knows it (an index or a UUID), or None if it sees none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(_local_rank())
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    return entries[_local_rank()] if _local_rank() < len(entries) else None


def _open_gpu() -> tuple[Any, str] | None:
    """Initialises NVML and returns (handle, NVML index) of this rank's GPU, or None."""
    selector = _gpu_selector()
    if selector is None:
        log.debug("no GPU metrics: CUDA_VISIBLE_DEVICES lists no GPU for LOCAL_RANK %d", _local_rank())
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        log.debug("no GPU metrics: NVML unavailable (%s)", error)
        return None
    try:
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(selector)) if selector.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(selector))
        return handle, str(pynvml.nvmlDeviceGetIndex(handle))
    except pynvml.NVMLError as error:
        log.debug("no GPU metrics: NVML has no GPU %s (%s)", selector, error)
        pynvml.nvmlShutdown()
        return None


class GpuCollector(Collector):
    """Reads this rank's GPU through NVML whenever the registry is collected (a scrape)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self._values = [labels[name] for name in BASE_LABELS]
        self._gpu = _open_gpu()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = []
        if self._gpu is not None:
            handle, index = self._gpu
            for name, doc, read in GPU_READINGS:
                try:
                    value = float(read(handle))
                except pynvml.NVMLError:
                    continue  # not supported by this GPU, or NVML shut down by a concurrent close()
                family = GaugeMetricFamily(name, doc, labels=(*BASE_LABELS, "gpu"))
                family.add_metric([*self._values, index], value)
                families.append(family)
        available = GaugeMetricFamily("dinoforge_gpu_available", "1 if this rank's GPU answered NVML at this scrape.",
                                      labels=BASE_LABELS)
        available.add_metric(self._values, 1.0 if families else 0.0)
        yield available
        yield from families

    def close(self) -> None:
        if self._gpu is not None:
            self._gpu = None
            pynvml.nvmlShutdown()


class Telemetry:
    """Records one process's metrics in its own registry and serves them over HTTP.

    ``job`` defaults to env ``DINOFORGE_JOB`` (else ``"local"``), ``rank`` to env ``RANK``
    (else 0). ``port=None`` takes ``DINOFORGE_METRICS_PORT`` + ``LOCAL_RANK`` (unset or 0: not
    served); an explicit port is used as is (0: any free port). A port already taken logs a
    warning and the process goes on without serving. ``port`` is the port served, or None.
    """

    def __init__(self, stage: str, *, job: str | None = None, rank: int | None = None, port: int | None = None) -> None:
        self._labels = {
            "job": job if job is not None else os.environ.get("DINOFORGE_JOB", "local"),
            "stage": stage,
            "rank": str(rank if rank is not None else int(os.environ.get("RANK", "0"))),
        }
        self._registry = CollectorRegistry()
        # Counters and the histogram are exported from 0 on, so rate() sees their first increase;
        # gauges appear once first set, so no stage exports a made-up 0 (a learning rate of 0).
        self._images = self._own(self._metric(Counter, "dinoforge_images_total", "Images this rank trained on."))
        self._steps = self._own(self._metric(Counter, "dinoforge_steps_total", "Optimisation steps of this rank."))
        self._data_wait = self._own(self._metric(Counter, "dinoforge_data_wait_seconds_total",
                                                 "Seconds this rank waited for batches."))
        self._step_total = self._own(self._metric(Counter, "dinoforge_step_seconds_total",
                                                  "Seconds this rank spent in steps, data wait included."))
        self._step_hist = self._own(self._metric(Histogram, "dinoforge_step_duration_seconds",
                                                 "Step durations of this rank, data wait included.", buckets=STEP_BUCKETS))
        self._rate = self._metric(Gauge, "dinoforge_images_per_second", "This rank's images per second in its last step.")
        # Not "dinoforge_step_seconds": prometheus_client reserves that name for the counter above.
        self._last_step = self._metric(Gauge, "dinoforge_last_step_seconds",
                                       "Duration of this rank's last step, data wait included.")
        self._wait_ratio = self._metric(Gauge, "dinoforge_data_wait_ratio", "Fraction of the last step spent waiting for data.")

        self._loss = self._metric(Gauge, "dinoforge_loss", "Last logged loss (NaN when it diverged).", "name")
        self._schedule = {key: self._metric(Gauge, name, doc) for key, (name, doc) in SCHEDULE_GAUGES.items()}

        self._ckpt_seconds = self._metric(Gauge, "dinoforge_checkpoint_seconds", "Duration of the last checkpoint op.", "op")
        self._ckpt_bytes = self._metric(Gauge, "dinoforge_checkpoint_bytes", "Size of the last checkpoint op.", "op")
        self._ckpts = self._metric(Counter, "dinoforge_checkpoints_total", "Checkpoint ops completed.", "op")

        self._skipped = self._metric(Counter, "dinoforge_skipped_images_total", "Bad images skipped, by reason.", "reason")
        self._skipped_seen: dict[str, int] = {}

        self._done = self._metric(Gauge, "dinoforge_progress_done", "Work items done.")
        self._total = self._metric(Gauge, "dinoforge_progress_items", "Work items in all (done counts up to it).")

        self._own(self._metric(Gauge, "dinoforge_restarts", "Elastic restarts of this job before this process started.")).set(
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
        self._own(self._metric(Info, "dinoforge", "Where and with what this process runs.")).info(
            {"host": socket.gethostname(), "torch_version": _version("torch")})
        self._own(self._metric(Gauge, "dinoforge_up_timestamp_seconds", "Unix time this process started recording.")).set(
            time.time())

        self._gpu = GpuCollector(self._labels)
        self._registry.register(self._gpu)

        self.port: int | None = None
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self._serve(port)

    def _metric(self, kind: type[M], name: str, doc: str, *extra: str, **kwargs: Any) -> M:
        return kind(name, doc, (*BASE_LABELS, *extra), registry=self._registry, **kwargs)

    def _own(self, metric: M, **extra: str) -> M:
        """The series of ``metric`` with this process's labels (and ``extra`` ones)."""
        return metric.labels(**self._labels, **extra)

    def _serve(self, port: int | None) -> None:
        if port is None:
            base = int(os.environ.get("DINOFORGE_METRICS_PORT") or "0")
            if base == 0:
                return
            port = base + _local_rank()
        try:
            self._server = start_http_server(port, addr="0.0.0.0", registry=self._registry)
        except OSError as error:
            log.warning("not serving metrics: port %d unavailable (%s)", port, error)
            return
        self.port = self._server[0].server_port

    def train_step(self, images: int, step_seconds: float, data_seconds: float) -> None:
        """One optimisation step of this rank: ``images`` trained on, ``step_seconds`` in all,
        of which ``data_seconds`` waiting for the batch."""
        self._images.inc(images)
        self._steps.inc()
        self._data_wait.inc(data_seconds)
        self._step_total.inc(step_seconds)
        self._step_hist.observe(step_seconds)
        self._own(self._last_step).set(step_seconds)
        if step_seconds > 0:  # a zero-length step has no rate; keep the last one
            self._own(self._rate).set(images / step_seconds)
            self._own(self._wait_ratio).set(data_seconds / step_seconds)

    def train_values(self, values: dict[str, float]) -> None:
        """Losses (keys ending in ``loss``) and schedule values (``lr``, ``wd``, ``momentum``,
        ``teacher_temp``); other keys are ignored. Non-finite values are exported as they are."""
        for key, value in values.items():
            if key.endswith("loss"):
                self._own(self._loss, name=key).set(float(value))
            elif key in self._schedule:
                self._own(self._schedule[key]).set(float(value))

    def checkpoint(self, op: str, seconds: float, nbytes: int) -> None:
        """A completed checkpoint ``op`` ("save" or "load") of ``nbytes`` that took ``seconds``."""
        self._own(self._ckpt_seconds, op=op).set(seconds)
        self._own(self._ckpt_bytes, op=op).set(nbytes)
        self._own(self._ckpts, op=op).inc()

    def skipped(self, by_reason: dict[str, int]) -> None:
        """Skipped images so far by reason (running totals): the counters grow by the increase."""
        for reason, total in by_reason.items():
            counter = self._own(self._skipped, reason=reason)  # exported from 0 on, like the other counters
            seen = self._skipped_seen.get(reason, 0)
            if total > seen:
                counter.inc(total - seen)
                self._skipped_seen[reason] = total

    def progress(self, done: int, total: int) -> None:
        """Work items (shards, images, evaluations) done so far out of ``total``."""
        self._own(self._done).set(done)
        self._own(self._total).set(total)

    def render(self) -> str:
        """The metrics in Prometheus' text format, as a scrape would see them now."""
        return generate_latest(self._registry).decode()

    def close(self) -> None:
        """Stops serving and releases NVML; calling it again does nothing."""
        if self._server is not None:
            server, thread = self._server
            self._server = None
            server.shutdown()
            server.server_close()
            thread.join()
        self.port = None
        self._gpu.close()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"
