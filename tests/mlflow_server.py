"""A real MLflow tracking server for the tests (sqlite backend, proxied artifacts).

Use it from a test module with ``from mlflow_server import mlflow_server  # noqa: F401``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from object_store import free_port

# A fresh sqlite database takes 6-11 s to migrate before /health answers; 2 cores shared with other
# jobs have needed over 90 s.
START_TIMEOUT_S = 240.0


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """``mlflow server`` on a free port for the whole session; yields its ``http://`` URI."""
    from dinoforge.lineage.ui import healthy  # imports mlflow: only sessions that start a server need it

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        # Own session: the server's workers form one process group, stopped together below.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not become healthy (exit {proc.poll()}):\n"
                            f"{log_path.read_text(errors='replace')[-4000:]}", pytrace=False)
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue
