"""Shared pytest fixtures."""

import json
import subprocess
import sys
import time

import pytest

# Local S3/GCS emulator fixtures (tests/object_store.py). Importing it first also sets
# GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before any test imports gcsfs.
from object_store import gcs_bucket, gcs_prefix, s3_bucket, s3_prefix  # noqa: F401


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The README's main job: `dinoforge pipeline --preset smoke` (about 15 minutes)."""
    output = tmp_path_factory.mktemp("smoke")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dinoforge.cli", "pipeline", "--preset", "smoke", "--output", str(output),
                             "--no-progress"], capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print("\n" + json.dumps(summary) + f"\nwall time incl. evaluation: {time.perf_counter() - started:.0f} s")
    return output, summary
