"""Shared pytest fixtures."""

import json
import os
import subprocess
import sys
import time

import pytest

# Local S3/GCS emulator fixtures (tests/object_store.py). Importing it first also sets
# GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before any test imports gcsfs.
from object_store import gcs_bucket, gcs_prefix, s3_bucket, s3_prefix  # noqa: F401
# A real MLflow tracking server (tests/mlflow_server.py), started once per session.
from mlflow_server import mlflow_server  # noqa: F401


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The README's main job, `dinoforge pipeline --local` (curate -> pretrain `smoke` ->
    export -> evaluate, at most 15 minutes with set-up): its output prefix and summary."""
    output = tmp_path_factory.mktemp("local")
    started = time.perf_counter()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "dinoforge.cli", "pipeline", "--local", "--output", str(output),
                             "--no-progress"], capture_output=True, text=True, timeout=3000, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1]) | {"wall_seconds": round(time.perf_counter() - started, 1)}
    print("\n" + json.dumps(summary))
    return output, summary
