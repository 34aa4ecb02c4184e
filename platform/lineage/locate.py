"""From what a user types (a run directory, a run id) to a tracking store and an MLflow run."""

from __future__ import annotations

import os
from pathlib import Path

from dinoforge.lineage.journal import join, read_journal
from dinoforge.lineage.store import LOCAL_DB, RUN_KEY_TAG, client, local_store
from mlflow.entities import Run

# Where ``dinoforge pipeline --local`` writes: its outputs and the store all local runs share.
LOCAL_ROOT, LOCAL_OUTPUT = "runs", "runs/local"


def _pipeline_starts(run_dir: str) -> list[dict]:
    """The start events of the pipeline runs recorded in ``run_dir``'s journal, oldest first."""
    try:
        runs = read_journal(join(run_dir, "lineage"))
    except (FileNotFoundError, OSError):
        return []
    starts = [{**events[0], "key": key} for key, events in runs.items() if events]
    return sorted((s for s in starts if s["tags"].get("dinoforge.stage") == "pipeline"), key=lambda s: s["time"])


def find_store(run_dir: str) -> str:
    """The tracking store of a run directory: the one its journal recorded, else ``mlflow.db``
    or an older file store ``mlruns/`` in it. ValueError when there is none."""
    if starts := [s["store"] for s in _pipeline_starts(run_dir) if s.get("store")]:
        return starts[-1]
    path = Path(run_dir)
    if (path / LOCAL_DB).is_file():
        return local_store(run_dir)
    if (path / "mlruns").is_dir():
        return (path / "mlruns").resolve().as_uri()
    raise ValueError(
        f"no MLflow store recorded for {run_dir} (no lineage journal, {LOCAL_DB} or mlruns/ there): pass --tracking-uri"
    )


def pipeline_run(run_dir: str, tracking_uri: str) -> Run:
    """The newest pipeline run recorded in ``run_dir``'s journal, as MLflow holds it."""
    starts = _pipeline_starts(run_dir)
    if not starts:
        raise ValueError(f"{run_dir} has no pipeline run in its lineage journal ({join(run_dir, 'lineage')})")
    start = starts[-1]
    mlflow = client(tracking_uri)
    experiment = mlflow.get_experiment_by_name(start["experiment"])
    found = experiment and mlflow.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{start['key']}'")
    if not found:
        raise ValueError(
            f"pipeline run {start['name']} of {run_dir} is not in {tracking_uri} yet: "
            f"dinoforge lineage sync {join(run_dir, 'lineage')}"
        )
    return found[0]


def resolve_run(ref: str, tracking_uri: str | None) -> tuple[str, Run]:
    """(tracking store, run) for a run directory or an MLflow run id (with ``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else the ``--local`` store)."""
    if Path(ref).is_dir() or "://" in ref:
        uri = tracking_uri or find_store(ref)
        return uri, pipeline_run(ref, uri)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or find_store(LOCAL_OUTPUT)
    return uri, client(uri).get_run(ref)
