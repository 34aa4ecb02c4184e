"""dinoforge.telemetry: values and labels as rendered, HTTP serving, and a real Prometheus scrape."""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from types import SimpleNamespace

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import free_port, prometheus, query

from dinoforge.telemetry import Telemetry

ENVIRONMENT = ("DINOFORGE_JOB", "RANK", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "DINOFORGE_METRICS_PORT",
               "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def telemetry():
    """Makes Telemetry instances and closes them after the test."""
    made = []

    def make(stage: str = "pretrain", **kwargs) -> Telemetry:
        made.append(Telemetry(stage, **kwargs))
        return made[-1]

    yield make
    for instance in made:
        instance.close()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, metric: str, /, **labels: str) -> float:
    """The one sample called ``metric`` whose labels include ``labels``."""
    [found] = [v for name, have, v in samples(text) if name == metric and labels.items() <= have.items()]
    return found


def test_records_steps_values_checkpoints_skips_and_progress(telemetry, monkeypatch):
    monkeypatch.setenv("DINOFORGE_JOB", "job-a")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    before = time.time()
    t = telemetry("pretrain")
    t.train_step(images=64, step_seconds=0.5, data_seconds=0.1)
    t.train_step(images=32, step_seconds=0.25, data_seconds=0.2)
    t.train_values({"loss": math.nan, "dino_loss": 1.25, "lr": 1e-3, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.07,
                    "grad_norm": 3.0})
    t.checkpoint("save", 1.5, 2048)
    t.checkpoint("save", 2.0, 4096)
    t.checkpoint("load", 0.5, 4096)
    t.skipped({"decode": 2})
    first = value(t.render(), "dinoforge_skipped_images_total", reason="decode")
    t.skipped({"decode": 5, "too_small": 1})
    t.skipped({"decode": 5})
    t.progress(3, 10)
    text = t.render()

    assert value(text, "dinoforge_images_total") == 96
    assert value(text, "dinoforge_steps_total") == 2
    assert value(text, "dinoforge_data_wait_seconds_total") == pytest.approx(0.3)
    assert value(text, "dinoforge_step_seconds_total") == 0.75
    assert value(text, "dinoforge_images_per_second") == 32 / 0.25
    assert value(text, "dinoforge_last_step_seconds") == 0.25
    assert value(text, "dinoforge_data_wait_ratio") == 0.2 / 0.25
    assert value(text, "dinoforge_step_duration_seconds_count") == 2
    assert value(text, "dinoforge_step_duration_seconds_bucket", le="0.25") == 1
    assert value(text, "dinoforge_step_duration_seconds_bucket", le="0.5") == 2

    assert math.isnan(value(text, "dinoforge_loss", name="loss"))
    assert value(text, "dinoforge_loss", name="dino_loss") == 1.25
    assert value(text, "dinoforge_learning_rate") == 1e-3
    assert value(text, "dinoforge_weight_decay") == 0.04
    assert value(text, "dinoforge_teacher_momentum") == 0.996
    assert value(text, "dinoforge_teacher_temperature") == 0.07
    assert "grad_norm" not in text

    assert value(text, "dinoforge_checkpoint_seconds", op="save") == 2.0
    assert value(text, "dinoforge_checkpoint_bytes", op="save") == 4096
    assert value(text, "dinoforge_checkpoints_total", op="save") == 2
    assert value(text, "dinoforge_checkpoints_total", op="load") == 1

    assert first == 2
    assert value(text, "dinoforge_skipped_images_total", reason="decode") == 5
    assert value(text, "dinoforge_skipped_images_total", reason="too_small") == 1
    assert value(text, "dinoforge_progress_done") == 3
    assert value(text, "dinoforge_progress_items") == 10

    assert value(text, "dinoforge_restarts") == 2
    assert value(text, "dinoforge_info", host=socket.gethostname(), torch_version=metadata.version("torch")) == 1
    assert before <= value(text, "dinoforge_up_timestamp_seconds") <= time.time()
    for name, labels, _ in samples(text):
        assert labels.items() >= {"job": "job-a", "stage": "pretrain", "rank": "3"}.items(), name


def test_gauges_appear_once_set(telemetry):
    t = telemetry("curate", job="j", rank=1)
    text = t.render()
    names = {name for name, _, _ in samples(text)}
    assert "dinoforge_learning_rate" not in names and "dinoforge_images_per_second" not in names
    assert value(text, "dinoforge_images_total", job="j", stage="curate", rank="1") == 0
    assert value(text, "dinoforge_restarts") == 0
    t.progress(0, 7)
    assert value(t.render(), "dinoforge_progress_items") == 7


def test_without_a_gpu_driver_gpu_available_is_0(telemetry, caplog):
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML finds a driver here; test_gpu_readings_of_this_ranks_gpu covers the GPU path")
    with caplog.at_level(logging.DEBUG, logger="dinoforge.telemetry"):
        text = telemetry().render()
    assert value(text, "dinoforge_gpu_available") == 0
    assert [name for name, _, _ in samples(text) if name.startswith("dinoforge_gpu_")] == ["dinoforge_gpu_available"]
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


@pytest.mark.parametrize("visible, local_rank, gpu", [
    (None, "1", "1"),              # no CUDA_VISIBLE_DEVICES: the GPU of index LOCAL_RANK
    ("4,6", "1", "6"),             # else entry LOCAL_RANK of the list
    ("GPU-5f0c", "0", "2"),        # a UUID entry, labelled with its NVML index
    ("3", "1", None),              # no entry for this rank: no GPU
])
def test_gpu_readings_of_this_ranks_gpu(telemetry, monkeypatch, visible, local_rank, gpu):
    """A fake NVML shows which GPU a rank reads and what it exports (no GPU on this machine)."""
    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", {"GPU-5f0c": 2}.__getitem__)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetIndex", lambda handle: handle)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda handle: SimpleNamespace(gpu=87))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(used=3 << 30, total=80 << 30))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda handle: 312_500)  # milliwatts

    def unsupported(handle, sensor):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", unsupported)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    t = telemetry(rank=5)
    text = t.render()
    gpu_series = {name: labels for name, labels, _ in samples(text) if name.startswith("dinoforge_gpu_")}
    if gpu is None:
        assert value(text, "dinoforge_gpu_available") == 0
        assert list(gpu_series) == ["dinoforge_gpu_available"] and calls == []
        return
    assert value(text, "dinoforge_gpu_available", rank="5") == 1
    assert value(text, "dinoforge_gpu_utilization_ratio", gpu=gpu, rank="5") == 0.87
    assert value(text, "dinoforge_gpu_memory_used_bytes", gpu=gpu) == 3 << 30
    assert value(text, "dinoforge_gpu_memory_total_bytes", gpu=gpu) == 80 << 30
    assert value(text, "dinoforge_gpu_power_watts", gpu=gpu) == 312.5
    assert "dinoforge_gpu_temperature_celsius" not in gpu_series  # unsupported readings are left out
    t.close()
    t.close()
    assert calls == ["init", "shutdown"]
    assert value(t.render(), "dinoforge_gpu_available") == 0


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def test_serves_metrics_over_http_until_closed(telemetry):
    port = free_port()
    t = telemetry("evaluate", job="t", port=port)
    assert t.port == port
    t.progress(1, 4)
    t.train_values({"loss": math.nan})
    text = get(port)
    assert value(text, "dinoforge_progress_done", job="t", stage="evaluate", rank="0") == 1
    assert math.isnan(value(text, "dinoforge_loss", name="loss"))
    t.close()
    assert t.port is None
    with pytest.raises(urllib.error.URLError):
        get(port)


def test_ranks_of_a_node_serve_on_consecutive_ports(telemetry, monkeypatch):
    base = free_port(span=2)
    monkeypatch.setenv("DINOFORGE_METRICS_PORT", str(base))
    for local_rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        t = telemetry(rank=4 + local_rank)
        assert t.port == base + local_rank
        assert value(get(t.port), "dinoforge_restarts", rank=str(4 + local_rank)) == 0


@pytest.mark.parametrize("setting", [None, "0"])
def test_no_metrics_port_serves_nothing(telemetry, monkeypatch, setting):
    if setting is not None:
        monkeypatch.setenv("DINOFORGE_METRICS_PORT", setting)
    t = telemetry()
    assert t.port is None
    t.train_step(images=8, step_seconds=0.5, data_seconds=0.0)
    assert value(t.render(), "dinoforge_images_per_second") == 16


def test_a_taken_port_warns_and_keeps_recording(telemetry, caplog):
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="dinoforge.telemetry"):
            t = telemetry(port=port)
    assert t.port is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and str(port) in caplog.text
    t.train_step(images=8, step_seconds=0.5, data_seconds=0.25)
    assert value(t.render(), "dinoforge_data_wait_ratio") == 0.5


# 48 images in 0.375 s steps: 128 images per second, exactly representable.
TRAINER = """
import time
from dinoforge.telemetry import Telemetry
t = Telemetry("pretrain", job="t", port={port})
for _ in range(200):
    t.train_step(images=48, step_seconds=0.375, data_seconds=0.05)
    time.sleep(0.2)
"""


def test_prometheus_scrapes_a_training_process(tmp_path):
    port = free_port()
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER.format(port=port)], cwd=tmp_path)
    try:
        with prometheus([f"127.0.0.1:{port}"], tmp_path) as url:
            [(labels, images_per_second)] = query(url, 'dinoforge_images_per_second{stage="pretrain",job="t"}')
            assert images_per_second == 128 and labels["rank"] == "0"
            [(_, images_rate)] = query(url, 'rate(dinoforge_images_total{job="t"}[5s])', timeout=15)
            assert images_rate > 0
        assert trainer.poll() is None, "the training process died"
    finally:
        trainer.terminate()
        trainer.wait()


def test_exposition_passes_promtool_check_metrics(telemetry):
    """Every family a training or curation process exports, as served, passes Prometheus's own
    metrics lint (naming conventions such as no ``_total`` suffix on gauges)."""
    t = telemetry("pretrain")
    t.train_step(images=64, step_seconds=0.5, data_seconds=0.1)
    t.train_values({"loss": 1.0, "dino_loss": 1.25, "lr": 1e-3, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.07})
    t.checkpoint("save", 1.5, 2048)
    t.skipped({"decode": 2})
    t.progress(3, 10)
    text = t.render()
    assert {"dinoforge_progress_items", "dinoforge_checkpoints_total", "dinoforge_skipped_images_total"} <= \
        {name for name, _, _ in samples(text)}
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
