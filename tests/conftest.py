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

# CI runs the slow lane against a deadline (.ci/run sets DINOFORGE_SLOW_DEADLINE, Unix seconds):
# a slow test whose estimated cost no longer fits is skipped with the reason printed, rather
# than the whole lane being killed mid-test. Estimates are CI-machine seconds (read off the
# lane's `--durations` report): the test's own in `@pytest.mark.slow(seconds=N)`, plus the
# expensive shared fixtures below the first time a test needs one.
FIXTURE_SECONDS = {"smoke_run": 750, "full_smoke_teacher": 820,
                   # building the container image (tests/test_container.py), unless .ci/run built it first
                   "image": 0 if os.environ.get("DINOFORGE_TEST_IMAGE") else 1200}
_fixtures_built: set[str] = set()
# Figures tests report (fuzz case counts, the operator's load figures...): printed in pytest's
# terminal summary, so they show in CI's log without -s.
_figures: list[tuple[str, object]] = []


def report_figures(title: str, figures: object) -> None:
    """Shows ``figures`` (JSON-able) under ``title`` in the terminal summary of this pytest run."""
    _figures.append((title, figures))


def pytest_terminal_summary(terminalreporter):
    if _figures:
        terminalreporter.section("dinoforge figures")
        for title, figures in _figures:
            terminalreporter.write_line(f"{title}: {json.dumps(figures)}")


def pytest_fixture_setup(fixturedef):
    _fixtures_built.add(fixturedef.argname)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects the slow tests
def pytest_collection_modifyitems(items):
    unsized = [item.nodeid for item in items
               if (mark := item.get_closest_marker("slow")) is not None and "seconds" not in mark.kwargs]
    if unsized:
        raise pytest.UsageError(f"slow tests need @pytest.mark.slow(seconds=N): {', '.join(unsized)}")


def pytest_runtest_setup(item):
    deadline, mark = os.environ.get("DINOFORGE_SLOW_DEADLINE"), item.get_closest_marker("slow")
    if deadline is None or mark is None:
        return
    cost = mark.kwargs["seconds"] + sum(seconds for name, seconds in FIXTURE_SECONDS.items()
                                        if name in item.fixturenames and name not in _fixtures_built)
    left = float(deadline) - time.time()
    if cost > left:
        pytest.skip(f"CI time budget: {left:.0f} s left, {item.name} needs about {cost} s")


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
