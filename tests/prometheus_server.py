"""A real Prometheus server (Debian's ``/usr/bin/prometheus``) scraping given targets, for tests.

    port = free_port()
    ...start something that serves /metrics on port...
    with prometheus([f"127.0.0.1:{port}"], tmp_path) as url:
        [(labels, value)] = query(url, 'dinoforge_images_per_second{job="t"}')

It scrapes every second with ``honor_labels: true``, so the targets' own ``job`` label is
kept. The first sample lands about 6 s after start: poll with :func:`query`, never sleep.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path("/usr/bin/prometheus")


def free_port(span: int = 1) -> int:
    """A port P such that P .. P+span-1 can be bound on all interfaces right now."""
    while True:
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket())
            first.bind(("", 0))
            port = first.getsockname()[1]
            try:
                for offset in range(1, span):
                    held.enter_context(socket.socket()).bind(("", port + offset))
            except OSError:
                continue
            return port


@contextlib.contextmanager
def prometheus(targets: list[str], tmp_path: Path, timeout: float = 30.0) -> Iterator[str]:
    """Runs Prometheus scraping ``targets`` (``host:port``, path ``/metrics``) every second;
    yields its base URL once ``/-/ready`` answers, and stops it on exit. Its log is
    ``tmp_path/prometheus.log``."""
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS} is missing (apt-get install --no-install-recommends prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "dinoforge", "honor_labels": True, "static_configs": [{"targets": targets}]}],
    }))
    url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, server, log_path, timeout)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_ready(url: str, server: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prometheus exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):  # not listening yet, or 503 while starting
            time.sleep(0.1)
    raise TimeoutError(f"prometheus not ready after {timeout} s:\n{log_path.read_text()[-4000:]}")


def query(url: str, promql: str, timeout: float = 30.0) -> list[tuple[dict[str, str], float]]:
    """Evaluates the instant-vector ``promql`` until it has samples; returns (labels, value)
    per series. Raises TimeoutError, with the last answer, if none arrive within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=5) as reply:
            answer = json.load(reply)
        if answer["data"]["resultType"] != "vector":
            raise ValueError(f"{promql!r} is not an instant vector: {answer}")
        if answer["data"]["result"]:
            return [(series["metric"], float(series["value"][1])) for series in answer["data"]["result"]]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no sample of {promql!r} within {timeout} s; last answer: {answer}")
        time.sleep(0.25)
