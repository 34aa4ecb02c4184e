"""Journal -> MLflow: pushes a run's journal events to a tracking store, idempotently.

A run is found (or created) by its tag ``dinoforge.run_key``; its tag ``dinoforge.synced_events``
counts the events already pushed, so a replay starts after them. A crash between a push and the
counter update replays that one step, which is harmless: tags, artifacts, dataset inputs, model
versions (looked up by run and digest) and the end status are idempotent; only metrics could
repeat, and they share a ``log_batch`` call with the counter. Two processes syncing the same run
at the same moment may duplicate events: run ``dinoforge lineage sync`` once the stages have ended.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Callable
from urllib.parse import urlsplit

from dinoforge.lineage.journal import read_journal, read_journal_run
from dinoforge.lineage.registry import register
from dinoforge.lineage.store import (
    DIGEST_TAG,
    RUN_KEY_TAG,
    SYNCED_TAG,
    artifact_location,
    attempt,
    check_reachable,
    client,
    fit,
    output_tag,
    resolve_tracking_uri,
    upload,
)
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

log = logging.getLogger("dinoforge.lineage")

# Per-entity allowance for JSON keys and punctuation when sizing a log_batch request.
ENTITY_OVERHEAD_BYTES = 100


def _dataset_input(event: dict) -> DatasetInput:
    uri, digest = event["uri"], event["digest"]
    scheme = urlsplit(uri).scheme
    dataset = Dataset(
        name=event["name"],
        # MLflow caps dataset digests at 36 characters; the full digest goes in an input tag.
        digest=digest.split(":")[-1][:MAX_DATASET_DIGEST_SIZE],
        source_type=scheme if scheme not in ("", "file") else "local",
        source=json.dumps({"uri": uri}),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, event["kind"]), InputTag(DIGEST_TAG, digest)])


class _Batch:
    """Metrics, params and tags gathered into as few ``log_batch`` calls as MLflow's limits
    allow; each call also sets the run's synced-events counter."""

    def __init__(self, mlflow: MlflowClient, run_id: str, synced: int) -> None:
        self.client, self.run_id, self.synced = mlflow, run_id, synced
        self.metrics: list[Metric] = []
        self.params: list[Param] = []
        self.tags: dict[str, str] = {}  # a later value of a key replaces the earlier one
        self.size = 0

    def _full(self, entity: Metric | Param | RunTag, size: int) -> bool:
        count = len(self.metrics) + len(self.params) + len(self.tags) + 1  # + the counter tag
        if isinstance(entity, Metric):
            kind_full = len(self.metrics) >= MAX_METRICS_PER_BATCH
        elif isinstance(entity, Param):
            kind_full = len(self.params) >= MAX_PARAMS_TAGS_PER_BATCH
        else:
            kind_full = len(self.tags) + 1 >= MAX_PARAMS_TAGS_PER_BATCH
        budget = MAX_BATCH_LOG_REQUEST_SIZE - 10 * ENTITY_OVERHEAD_BYTES  # room for the run id, counter...
        return kind_full or count >= MAX_ENTITIES_PER_BATCH or self.size + size > budget

    def add(self, entity: Metric | Param | RunTag, synced: int) -> None:
        """Adds ``entity``, first flushing what is gathered (with counter ``synced``) if full."""
        size = len(entity.key) + len(str(entity.value)) + ENTITY_OVERHEAD_BYTES
        if self._full(entity, size):
            self.flush(synced)
        self.size += size
        if isinstance(entity, Metric):
            self.metrics.append(entity)
        elif isinstance(entity, Param):
            self.params.append(entity)
        else:
            self.tags[entity.key] = entity.value

    def flush(self, synced: int) -> None:
        if synced == self.synced and not (self.metrics or self.params or self.tags):
            return
        tags = [RunTag(k, v) for k, v in self.tags.items()] + [RunTag(SYNCED_TAG, str(synced))]
        if not attempt(
            lambda: self.client.log_batch(self.run_id, self.metrics, self.params, tags),
            f"{len(self.metrics)} metrics, {len(self.params)} params, {len(tags) - 1} tags",
        ):
            self.client.set_tag(self.run_id, SYNCED_TAG, str(synced))
        self.synced = synced
        self.metrics, self.params, self.tags, self.size = [], [], {}, 0


class Sync:
    """Pushes journal events to one tracking store, creating experiments and runs on demand."""

    def __init__(self, tracking_uri: str, journal_dir: str, starts: dict[str, dict] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)
        self.journal_dir = journal_dir
        self.starts = dict(starts or {})
        self.experiments: dict[str, str] = {}
        self.run_ids: dict[str, str] = {}
        self.synced: dict[str, int] = {}
        self.pushed = 0

    def _experiment_id(self, name: str) -> str:
        if name not in self.experiments:
            experiment = self.client.get_experiment_by_name(name)
            self.experiments[name] = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(name, artifact_location=artifact_location(self.tracking_uri, name))
            )
        return self.experiments[name]

    def _start_of(self, key: str) -> dict | None:
        """A run's start event, read from the journal when another process wrote it."""
        if key not in self.starts:
            try:
                self.starts[key] = read_journal_run(self.journal_dir, key)[0]
            except (FileNotFoundError, IndexError):
                return None
        return self.starts[key]

    def _start_tags(self, start: dict) -> dict[str, str]:
        tags = {**start["tags"], MLFLOW_RUN_NAME: start["name"]}
        if start["parent"]:
            tags[MLFLOW_PARENT_RUN_ID] = self.run_id(start["parent"], start["experiment"])
        return {k: fit(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()}

    def run_id(self, key: str, experiment: str) -> str:
        """The MLflow run with tag ``dinoforge.run_key=key``, created (parent first) if missing.
        A parent not yet in the journal becomes a bare run in ``experiment`` that its own sync
        completes later."""
        if key in self.run_ids:
            return self.run_ids[key]
        start = self._start_of(key)
        experiment_id = self._experiment_id(start["experiment"] if start else experiment)
        found = self.client.search_runs(
            [experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'", order_by=["attributes.start_time ASC"], max_results=1
        )
        if found:
            run = found[0]
        else:
            tags = {RUN_KEY_TAG: key} | (self._start_tags(start) if start else {})
            run = self.client.create_run(experiment_id, start_time=start["time"] if start else None, tags=tags)
        self.run_ids[key] = run.info.run_id
        return run.info.run_id

    def push(self, key: str, events: list[dict]) -> str:
        """Pushes ``events`` past the run's counter; returns the run id. Raises when MLflow is
        unreachable, after recording how far it got in ``synced``."""
        self.starts.setdefault(key, events[0])
        run_id = self.run_id(key, events[0]["experiment"])
        self.synced[key] = int(self.client.get_run(run_id).data.tags.get(SYNCED_TAG, "0"))
        batch = _Batch(self.client, run_id, self.synced[key])
        done = self.synced[key]
        try:
            for index in range(done, len(events)):
                event = events[index]
                if event["type"] in _SIDE_EFFECTS:
                    batch.flush(done)
                    attempt(
                        functools.partial(_SIDE_EFFECTS[event["type"]], self, run_id, event), f"{event['type']} event"
                    )
                for entity in self._entities(event):
                    batch.add(entity, done)
                done = index + 1
            batch.flush(done)
        finally:
            self._progress(key, batch.synced)
        return run_id

    def _progress(self, key: str, synced: int) -> None:
        self.pushed += synced - self.synced[key]
        self.synced[key] = synced

    def _entities(self, event: dict) -> list[Metric | Param | RunTag]:
        event_type = event["type"]
        if event_type == "start":
            return [RunTag(k, v) for k, v in self._start_tags(event).items()]
        if event_type == "params":
            return [Param(k, fit(v, MAX_PARAM_VAL_LENGTH)) for k, v in event["params"].items()]
        if event_type == "metrics":
            return [Metric(k, v, event["time"], event["step"] or 0) for k, v in event["values"].items()]
        if event_type == "output":
            value = f"{event['uri']}@{event['digest']}"
            return [RunTag(output_tag(event["kind"], event["name"]), fit(value, MAX_TAG_VAL_LENGTH))]
        return []

    def _log_input(self, run_id: str, event: dict) -> None:
        self.client.log_inputs(run_id, [_dataset_input(event)])

    def _log_artifact(self, run_id: str, event: dict) -> None:
        upload(self.client, run_id, event["path"], event["artifact_path"])

    def _register(self, run_id: str, event: dict) -> None:
        register(self.client, run_id, event)

    def _end(self, run_id: str, event: dict) -> None:
        self.client.set_terminated(run_id, event["status"], end_time=event["time"])


# Events that need their own MLflow call (the rest travel in log_batch).
_SIDE_EFFECTS: dict[str, Callable[[Sync, str, dict], None]] = {
    "input": Sync._log_input,
    "artifact": Sync._log_artifact,
    "model": Sync._register,
    "end": Sync._end,
}


def _depth(key: str, runs: dict[str, list[dict]]) -> int:
    parent = runs[key][0].get("parent")
    return 1 + _depth(parent, runs) if parent in runs else 0


def sync_journal(journal_dir: str, tracking_uri: str | None = None) -> dict:
    """Pushes every run of a journal directory, parents first; stops at the first failure to
    reach MLflow. Returns ``{"runs", "events_pushed", "pending"}``: pending counts the events not
    confirmed in MLflow (in full for runs not reached). Never raises: stages call it too; an
    unreadable journal warns and counts as empty."""
    try:
        runs = {key: events for key, events in read_journal(journal_dir).items() if events}
    except Exception as error:
        log.warning("lineage: journal %s unreadable (%s)", journal_dir, error)
        runs = {}
    counts = {"runs": len(runs), "events_pushed": 0, "pending": sum(len(events) for events in runs.values())}
    recorded = next((events[0]["store"] for events in runs.values() if events[0].get("store")), None)
    uri = resolve_tracking_uri(journal_dir, tracking_uri, recorded)
    if uri is None:
        log.warning("lineage: no tracking URI for remote journal %s: set MLFLOW_TRACKING_URI", journal_dir)
    if uri is None or not runs:
        return counts
    sync: Sync | None = None
    try:
        check_reachable(uri)
        sync = Sync(uri, journal_dir, starts={key: events[0] for key, events in runs.items()})
        for key in sorted(runs, key=lambda k: (_depth(k, runs), runs[k][0]["time"])):
            sync.push(key, runs[key])
    except Exception as error:
        log.warning("lineage: MLflow at %s unreachable (%s); events stay in %s", uri, error, journal_dir)
    if sync is not None:
        counts["events_pushed"] = sync.pushed
        counts["pending"] = sum(len(events) - sync.synced.get(key, 0) for key, events in runs.items())
    return counts
