"""``dinoforge ui [RUN_DIR|--tracking-uri URI]``: MLflow's UI on a run's tracking store.

A local store (sqlite, or an older file store, which MLflow 3.17 opens only with
``MLFLOW_ALLOW_FILE_STORE=true``, set here for the server process alone) is served by
``mlflow server`` on 127.0.0.1 until Ctrl-C; a tracking server already is a UI, so its address
is printed.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dinoforge.lineage.locate import LOCAL_OUTPUT, find_store, pipeline_run
from dinoforge.lineage.store import LOCAL_ARTIFACTS

START_TIMEOUT_S = 180.0  # a fresh sqlite store migrates its tables first; 2 busy cores are slow


def _store_path(uri: str) -> Path:
    """The sqlite database file, or the file store's folder."""
    parts = urlsplit(uri)
    return Path(unquote(parts.path[1:] if parts.scheme == "sqlite" and parts.path.startswith("//") else parts.path))


def healthy(host: str, port: int) -> bool:
    """An MLflow server at ``host:port`` answers ``/health`` with 200."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def serve(run_dir: str | None, tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Starts the UI (see the module docstring), prints its address, and waits; returns the exit code."""
    uri = tracking_uri or find_store(run_dir or LOCAL_OUTPUT)
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        print(f"MLflow UI: {uri} (runs are on this tracking server)", flush=True)
        return 0
    if scheme not in ("sqlite", "file"):
        print(f"dinoforge: cannot serve a UI for {uri}: a sqlite:// or file:// store, or a server URL", file=sys.stderr)
        return 2
    if not _store_path(uri).exists():
        print(f"dinoforge: {uri} does not exist", file=sys.stderr)
        return 2
    if not _port_free(host, port):
        print(f"dinoforge: port {port} on {host} is taken (another MLflow UI?): pass --port", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if scheme == "file":
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the child's environment only
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--artifacts-destination",
        str(_store_path(uri).parent / LOCAL_ARTIFACTS),  # beside the store, as lineage keeps them (MLflow: ./)
    ]
    # The server's own log goes to stderr: stdout carries only the addresses printed below.
    server = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), start_new_session=True
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped by a signal: stop the server too
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(host, port):
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"dinoforge: mlflow server did not start (exit {server.poll()})", file=sys.stderr)
                return 1
            time.sleep(0.3)
        address = f"http://{host}:{port}"
        print(f"MLflow UI on {uri}: {address}", flush=True)
        if run_dir is not None:
            try:
                run = pipeline_run(run_dir, uri)
                print(
                    f"pipeline run {run.info.run_name}: {address}/#/experiments/{run.info.experiment_id}/runs/"
                    f"{run.info.run_id}",
                    flush=True,
                )
            except ValueError as error:
                print(f"({error})", flush=True)
        print("Ctrl-C stops it.", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
