"""MLflow lineage for every stage, written so that MLflow can never block or break training.

Each stage process records EVENTS (start, params, metrics, inputs, outputs, artifacts, a
registered model, end) into a JOURNAL first: JSON lines at ``JOURNAL/<run_key>.jsonl``, one
file per run, on any fsspec URI. Then it tries to SYNC them to MLflow. While the tracking
server is unreachable the stage carries on: one warning, a retry at most every
``retry_every_s`` seconds, nothing raised into the caller, and the events wait in the journal
for ``Lineage.end()`` or ``sync_journal`` (``dinoforge lineage sync DIR``).

Syncing is idempotent: a run is found (or created) by its tag ``dinoforge.run_key``, and its
tag ``dinoforge.synced_events`` counts the events already pushed, so a replay starts after
them. A crash between a push and the counter update replays that one step, which is harmless:
tags, artifacts, dataset inputs, model versions (looked up by run and digest) and the end
status are idempotent; only metrics could repeat, and they share a ``log_batch`` call with the
counter. Two processes syncing the same run at the same moment may duplicate events: run
``dinoforge lineage sync`` once the stages have ended.

Tracking store: ``tracking_uri`` or ``MLFLOW_TRACKING_URI``; without either, a file store
``mlruns/`` beside a local journal directory. mlflow-skinny 3.17.2 (no sqlalchemy, so no
``sqlite:``) serves tracking and the model registry from a ``file:`` store only with
``MLFLOW_ALLOW_FILE_STORE=true`` (the file store is in maintenance mode and refuses otherwise),
which this module sets while it talks to such a store. A journal on an object store with no
tracking URI keeps its events until synced with one.

MLflow's HTTP client defaults (7 retries with backoff, 120 s timeout) would stall a stage for
minutes on a down server, so MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and
MLFLOW_HTTP_REQUEST_TIMEOUT=5 apply while this module talks to MLflow, unless already set. That
swaps process environment variables, so use one thread per process for lineage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    _validate_model_alias_name,
    _validate_model_alias_name_reserved,
)

log = logging.getLogger("dinoforge.lineage")

RUN_KEY_TAG = "dinoforge.run_key"
SYNCED_TAG = "dinoforge.synced_events"
STAGE_TAG = "dinoforge.stage"
DIGEST_TAG = "dinoforge.digest"
OUTPUT_TAG_PREFIX = "dinoforge.output."
DEFAULT_EXPERIMENT = "dinoforge"
# While lineage talks to MLflow: fail fast (see the module docstring), and keep stdout clean
# (MLflow prints a "View run" link when a run ends; callers may parse stdout).
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
CHUNK_BYTES = 8 << 20
# Per-entity allowance for JSON keys and punctuation when sizing a log_batch request.
ENTITY_OVERHEAD_BYTES = 100


# ----------------------------------------------------------------------------- digests
def _file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def digest_uri(uri: str) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a directory: the SHA-256 of its files' sorted
    relative paths, each with its own SHA-256 (empty directories do not count: object stores
    have none). Files are read in 8 MiB chunks; a big checkpoint directory is read whole."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isdir(path):
        return "sha256:" + _file_sha256(fs, path)
    root = path.rstrip("/")
    listing = hashlib.sha256()
    for file in sorted(fs.find(root)):
        listing.update(f"{file[len(root) + 1:]}\0{_file_sha256(fs, file)}\n".encode())
    return "sha256:" + listing.hexdigest()


# ----------------------------------------------------------------------------- journal
def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _parse(text: str) -> list[dict]:
    lines = text.splitlines()
    events = []
    for number, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise
            # A process killed mid-append leaves a torn last line: that event was never recorded.
    return events


def read_journal(journal_dir: str) -> dict[str, list[dict]]:
    """Every run's events in a journal directory, by run key."""
    fs, path = fsspec.core.url_to_fs(journal_dir)
    return {posixpath.basename(file)[: -len(".jsonl")]: _parse(fs.cat_file(file).decode())
            for file in sorted(fs.glob(_join(path, "*.jsonl")))}


def read_journal_run(journal_dir: str, key: str) -> list[dict]:
    """One run's events; FileNotFoundError if the journal has no such run."""
    fs, path = fsspec.core.url_to_fs(_join(journal_dir, f"{key}.jsonl"))
    return _parse(fs.cat_file(path).decode())


class _Journal:
    """One run's events, in memory and at ``JOURNAL/<key>.jsonl``. Object stores cannot append,
    so there the whole file is rewritten for each event. A failed write warns once and is
    retried with the next event: the events stay in memory meanwhile."""

    def __init__(self, journal_dir: str, key: str) -> None:
        self.fs, self.path = fsspec.core.url_to_fs(_join(journal_dir, f"{key}.jsonl"))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.events: list[dict] = []
        self.lines: list[str] = []
        self.written = 0
        self.warned = False

    def append(self, event: dict) -> None:
        self.events.append(event)
        self.lines.append(json.dumps(event) + "\n")
        try:
            if self.local:
                if self.written == 0:
                    self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
                with self.fs.open(self.path, "a") as handle:
                    handle.write("".join(self.lines[self.written:]))
            else:
                self.fs.pipe_file(self.path, "".join(self.lines).encode())
            self.written = len(self.lines)
        except Exception as error:  # a journal outage must not stop training either
            if not self.warned:
                log.warning("lineage journal %s not writable (%s); keeping events in memory", self.path, error)
            self.warned = True


# ----------------------------------------------------------------------------- MLflow access
def resolve_tracking_uri(journal_dir: str, tracking_uri: str | None = None) -> str | None:
    """``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a file store ``mlruns/`` beside a
    local journal directory; None for a remote journal without either."""
    if uri := tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    fs, path = fsspec.core.url_to_fs(journal_dir)
    if not isinstance(fs, LocalFileSystem):
        return None
    return Path(posixpath.dirname(path.rstrip("/")), "mlruns").as_uri()


@contextmanager
def _client_env(tracking_uri: str) -> Iterator[None]:
    """``CLIENT_ENV``, and the file store allowed, for the calls made inside; variables
    the user has set win. The file store's model registry reads each version through a client
    on the *global* tracking URI (MLflow 3.17.2), so that is pointed at the store too: else the
    full mlflow package would create ``./mlflow.db`` in the working directory."""
    file_store = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_TRACKING_URI": tracking_uri}
    wanted = CLIENT_ENV | (file_store if tracking_uri.startswith("file:") else {})
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _client(tracking_uri: str) -> MlflowClient:
    # A file store holds its own registry; for servers MLflow's default (or MLFLOW_REGISTRY_URI) applies.
    return MlflowClient(tracking_uri, registry_uri=tracking_uri if tracking_uri.startswith("file:") else None)


def _fit(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    note = f"...[truncated {len(value)} chars]"
    return value[: limit - len(note)] + note


def _rejected(error: Exception) -> bool:
    """The server refused this request for good (HTTP 400: invalid value, changed param...),
    or a recorded file is gone: retrying cannot help."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() == 400
    return isinstance(error, FileNotFoundError)


def _attempt(call: Callable[[], Any], what: str) -> bool:
    """Runs ``call``; a rejected request is skipped with a warning (False), so it cannot hold
    back the events after it. Other errors (unreachable server) propagate: the sync stops there."""
    try:
        call()
    except Exception as error:
        if not _rejected(error):
            raise
        log.warning("lineage: skipping %s, which MLflow cannot take: %s", what, error)
        return False
    return True


@contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """A local path holding ``uri``'s file or directory (downloaded when remote)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        if not os.path.exists(path):  # log_artifacts would log an empty folder
            raise FileNotFoundError(uri)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:  # fs.get raises FileNotFoundError for a missing uri
        local = os.path.join(tmp, posixpath.basename(path.rstrip("/")))
        fs.get(path, local, recursive=fs.isdir(path))
        yield local


def _upload(client: MlflowClient, run_id: str, uri: str, artifact_path: str | None) -> None:
    """As ``MlflowClient.log_artifact`` (a file goes under ``artifact_path``) or
    ``log_artifacts`` (a directory's contents go under ``artifact_path``)."""
    with _local_copy(uri) as local:
        if os.path.isdir(local):
            client.log_artifacts(run_id, local, artifact_path)
        else:
            client.log_artifact(run_id, local, artifact_path)


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
    context = event["kind"] if event["type"] == "input" else f"output:{event['kind']}"
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag(DIGEST_TAG, digest)])


class _Batch:
    """Metrics, params and tags gathered into as few ``log_batch`` calls as MLflow's limits
    allow; each call also sets the run's synced-events counter."""

    def __init__(self, client: MlflowClient, run_id: str, synced: int) -> None:
        self.client, self.run_id, self.synced = client, run_id, synced
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
        if not _attempt(lambda: self.client.log_batch(self.run_id, self.metrics, self.params, tags),
                        f"{len(self.metrics)} metrics, {len(self.params)} params, {len(tags) - 1} tags"):
            self.client.set_tag(self.run_id, SYNCED_TAG, str(synced))
        self.synced = synced
        self.metrics, self.params, self.tags, self.size = [], [], {}, 0


class _Sync:
    """Pushes journal events to one tracking store, creating experiments and runs on demand.
    Must be used inside ``_client_env``."""

    def __init__(self, tracking_uri: str, journal_dir: str, starts: dict[str, dict] | None = None) -> None:
        self.client = _client(tracking_uri)
        self.journal_dir = journal_dir
        self.starts = dict(starts or {})
        self.experiments: dict[str, str] = {}
        self.run_ids: dict[str, str] = {}
        self.synced: dict[str, int] = {}
        self.pushed = 0

    def _experiment_id(self, name: str) -> str:
        if name not in self.experiments:
            experiment = self.client.get_experiment_by_name(name)
            self.experiments[name] = experiment.experiment_id if experiment else self.client.create_experiment(name)
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
        return {k: _fit(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()}

    def run_id(self, key: str, experiment: str) -> str:
        """The MLflow run with tag ``dinoforge.run_key=key``, created (parent first) if missing.
        A parent not yet in the journal becomes a bare run in ``experiment`` that its own sync
        completes later."""
        if key in self.run_ids:
            return self.run_ids[key]
        start = self._start_of(key)
        experiment_id = self._experiment_id(start["experiment"] if start else experiment)
        found = self.client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                        order_by=["attributes.start_time ASC"], max_results=1)
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
                    _attempt(functools.partial(_SIDE_EFFECTS[event["type"]], self, run_id, event), f"{event['type']} event")
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
            return [Param(k, _fit(v, MAX_PARAM_VAL_LENGTH)) for k, v in event["params"].items()]
        if event_type == "metrics":
            return [Metric(k, v, event["time"], event["step"] or 0) for k, v in event["values"].items()]
        if event_type == "output":
            value = f"{event['uri']}@{event['digest']}"
            return [RunTag(OUTPUT_TAG_PREFIX + event["name"], _fit(value, MAX_TAG_VAL_LENGTH))]
        return []

    def _log_input(self, run_id: str, event: dict) -> None:
        self.client.log_inputs(run_id, [_dataset_input(event)])

    def _log_artifact(self, run_id: str, event: dict) -> None:
        _upload(self.client, run_id, event["path"], event["artifact_path"])

    def _register(self, run_id: str, event: dict) -> None:
        """Logs the weights (and their JSON) under ``models/<name>`` of the run and registers
        that folder as a model version, unless this run already registered this digest."""
        from dinoforge.export import meta_uri  # imports torch: only model registration needs it

        name, weights, digest = event["name"], event["weights_uri"], event["digest"]
        folder = f"models/{name}"
        _upload(self.client, run_id, weights, folder)
        fs, path = fsspec.core.url_to_fs(meta_uri(weights))
        if fs.exists(path):
            _upload(self.client, run_id, meta_uri(weights), folder)
        try:
            self.client.get_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(name)
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        version = next((v for v in versions if v.tags.get(DIGEST_TAG) == digest), None)
        if version is None:
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{folder}"
            # No waiting for READY: open-source registries create versions READY at once.
            version = self.client.create_model_version(name, source, run_id, await_creation_for=0,
                                                       tags={DIGEST_TAG: digest, "dinoforge.weights_uri": weights})
        if event["alias"]:
            self.client.set_registered_model_alias(name, event["alias"], version.version)

    def _end(self, run_id: str, event: dict) -> None:
        self.client.set_terminated(run_id, event["status"], end_time=event["time"])


# Events that need their own MLflow call (the rest travel in log_batch).
_SIDE_EFFECTS: dict[str, Callable[[_Sync, str, dict], None]] = {
    "input": _Sync._log_input,
    "output": _Sync._log_input,
    "artifact": _Sync._log_artifact,
    "model": _Sync._register,
    "end": _Sync._end,
}


# ----------------------------------------------------------------------------- recording
def _name(key: str) -> str:
    """``key`` with the characters MLflow refuses in metric and param names replaced by ``_``."""
    return re.sub(r"[^/\w.\- :]", "_", key)


def _flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[_name(f"{prefix}{key}")] = str(value)
    return flat


@functools.cache
def _source_commit() -> str | None:
    """HEAD of the git checkout this module was imported from, if it is one."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _default_tags(stage: str) -> dict[str, str]:
    tags = {STAGE_TAG: stage, "dinoforge.host": socket.gethostname()}
    if commit := os.environ.get("DINOFORGE_GIT_COMMIT") or _source_commit():
        tags[MLFLOW_GIT_COMMIT] = commit
    if image := os.environ.get("DINOFORGE_IMAGE"):
        tags["dinoforge.image"] = image
    return tags


def _now_ms() -> int:
    return int(time.time() * 1000)


class Lineage:
    """One stage's MLflow run, recorded to the journal first and synced on a best-effort basis.

    ``parent`` (else env ``DINOFORGE_LINEAGE_PARENT``) is the key of the pipeline's run. Tags
    always hold the stage, the host, the git commit (env ``DINOFORGE_GIT_COMMIT``, else ``git
    rev-parse HEAD`` of this source if it is a checkout) and the image (env ``DINOFORGE_IMAGE``)
    when known. With ``enabled=False`` or env ``DINOFORGE_LINEAGE=off`` every method does
    nothing beyond checking its arguments. After each recorded event a sync is attempted once ``sync_every_s`` have passed
    since the last one (``retry_every_s`` after a failure); ``end`` and ``sync`` always try.
    """

    def __init__(self, journal_dir: str, stage: str, *, run_name: str | None = None, parent: str | None = None,
                 tracking_uri: str | None = None, experiment: str | None = None, tags: dict[str, str] | None = None,
                 enabled: bool = True, sync_every_s: float = 10.0, retry_every_s: float = 60.0) -> None:
        self.key = uuid.uuid4().hex
        self.enabled = enabled and os.environ.get("DINOFORGE_LINEAGE", "").lower() != "off"
        self.journal_dir = journal_dir
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.tracking_uri = resolve_tracking_uri(journal_dir, tracking_uri)
        self.run_id: str | None = None  # MLflow's id, once a sync has found or created the run
        if not self.enabled:
            return
        if self.tracking_uri is None:
            log.warning("lineage: no MLFLOW_TRACKING_URI for remote journal %s; run `dinoforge lineage sync` later", journal_dir)
        self.sync_every_s, self.retry_every_s = sync_every_s, retry_every_s
        self._journal = _Journal(journal_dir, self.key)
        self._sync: _Sync | None = None
        self._params: dict[str, str] = {}
        self._next_sync = 0.0
        self._down = False
        self._ended = False
        self._record("start", stage=stage, name=run_name or stage,
                     parent=parent or os.environ.get("DINOFORGE_LINEAGE_PARENT") or None, experiment=self.experiment,
                     tags=_default_tags(stage) | (tags or {}))

    def _write(self, event_type: str, /, **fields: Any) -> None:
        self._journal.append({"type": event_type, "time": _now_ms(), **fields})

    def _record(self, event_type: str, /, **fields: Any) -> None:
        if not self.enabled:
            return
        self._write(event_type, **fields)
        if time.monotonic() >= self._next_sync:
            self.sync()

    def params(self, params: Mapping) -> None:
        """Nested mappings become dotted keys; values are str()'d. Values over MLflow's length
        limit are cut, ending in a ``...[truncated N chars]`` note. MLflow params cannot change:
        a new value for a logged key is dropped with a warning (the server would refuse it)."""
        if not self.enabled:
            return
        new = {}
        for key, value in _flatten(params).items():
            logged = self._params.get(key)
            if logged is None:
                new[key] = self._params[key] = value
            elif logged != value:
                log.warning("lineage: param %s already logged as %r; dropping %r", key, logged, value)
        if new:
            self._record("params", params=new)

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Step None logs step 0, as MLflow does. Non-finite values are sent as they are: MLflow
        keeps NaN, and its SQL store saves infinities as the largest finite float of their sign."""
        self._record("metrics", values={_name(k): float(v) for k, v in values.items()}, step=step)

    def input(self, uri: str, digest: str, *, name: str, kind: str) -> None:
        """An MLflow dataset input (source ``uri``) with context ``kind``: manifest, checkpoint..."""
        self._record("input", uri=uri, digest=digest, name=name, kind=kind)

    def output(self, uri: str, digest: str, *, name: str, kind: str) -> None:
        """A dataset input with context ``output:<kind>`` (MLflow runs have no dataset outputs)
        plus the tag ``dinoforge.output.<name>=<uri>@<digest>``."""
        self._record("output", uri=uri, digest=digest, name=name, kind=kind)

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A file or directory (any fsspec URI) uploaded when synced, as MLflow's
        ``log_artifact``/``log_artifacts`` do. Only the path is journaled: if it is gone by
        then, the artifact is skipped with a warning."""
        self._record("artifact", path=local_path, artifact_path=artifact_path)

    def register_model(self, weights_uri: str, name: str, *, digest: str, alias: str | None = None) -> None:
        """Exported weights (``X.pth``, with ``X.json`` beside it when present) become run
        artifacts under ``models/<name>`` and a new version of registered model ``name`` whose
        source is that folder; ``alias`` then points at it. An alias MLflow refuses (``latest``
        and ``v<N>`` are reserved) raises ValueError here, even when disabled, so every rank
        fails alike."""
        if alias is not None:
            try:
                _validate_model_alias_name(alias)
                _validate_model_alias_name_reserved(alias)
            except MlflowException as error:
                raise ValueError(error.message) from error
        self._record("model", weights_uri=weights_uri, name=name, digest=digest, alias=alias)

    def end(self, status: str = "FINISHED") -> None:
        """Records the end (``FINISHED``, ``FAILED`` or ``KILLED``) once, then syncs. Another
        status raises ValueError, even when disabled."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
        if not self.enabled or self._ended:
            return
        self._ended = True
        self._write("end", status=status)
        self.sync()

    def sync(self) -> bool:
        """Pushes this run's pending events; False when MLflow is unreachable (never raises)."""
        if not self.enabled:
            return True
        synced = self._push()
        self._next_sync = time.monotonic() + (self.sync_every_s if synced else self.retry_every_s)
        return synced

    def _push(self) -> bool:
        if self.tracking_uri is None:
            return False
        try:
            with _client_env(self.tracking_uri):
                self._sync = self._sync or _Sync(self.tracking_uri, self.journal_dir)
                self.run_id = self._sync.push(self.key, self._journal.events)
        except Exception as error:  # whatever MLflow raises, training goes on
            if not self._down:
                log.warning("lineage: MLflow at %s unreachable (%s); events wait in %s, retried every %.0f s",
                            self.tracking_uri, error, self.journal_dir, self.retry_every_s)
            self._down = True
            return False
        if self._down:
            log.info("lineage: MLflow at %s reachable again", self.tracking_uri)
        self._down = False
        return True

    def __enter__(self) -> Lineage:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        if kind is None:
            self.end()
        else:
            self.end("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


def stage_lineage(stage: str, output: str | None, **kwargs: Any) -> Lineage:
    """The lineage of a stage writing under ``output``: its journal is ``DINOFORGE_LINEAGE_DIR``
    (a pipeline's, shared by its stages) or else ``<output>/lineage``; ``kwargs`` go to ``Lineage``.
    ``output`` None (a stage that writes nothing, e.g. ``evaluate`` without ``--out``): recorded
    only inside a pipeline, so no journal or file store lands in the working directory."""
    journal = os.environ.get("DINOFORGE_LINEAGE_DIR") or (output and _join(output, "lineage"))
    if not journal:
        return Lineage("lineage", stage, **{**kwargs, "enabled": False})
    return Lineage(journal, stage, **kwargs)


# ----------------------------------------------------------------------------- journal-wide
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
    uri = resolve_tracking_uri(journal_dir, tracking_uri)
    if uri is None:
        log.warning("lineage: no tracking URI for remote journal %s: set MLFLOW_TRACKING_URI", journal_dir)
    if uri is None or not runs:
        return counts
    with _client_env(uri):
        sync: _Sync | None = None
        try:
            sync = _Sync(uri, journal_dir, starts={key: events[0] for key, events in runs.items()})
            for key in sorted(runs, key=lambda k: (_depth(k, runs), runs[k][0]["time"])):
                sync.push(key, runs[key])
        except Exception as error:
            log.warning("lineage: MLflow at %s unreachable (%s); events stay in %s", uri, error, journal_dir)
    if sync is not None:
        counts["events_pushed"] = sync.pushed
        counts["pending"] = sum(len(events) - sync.synced.get(key, 0) for key, events in runs.items())
    return counts


def _dataset_entry(dataset_input: DatasetInput) -> tuple[str, dict]:
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    dataset = dataset_input.dataset
    source = json.loads(dataset.source)
    entry = {"name": dataset.name, "uri": source.get("uri"), "digest": tags.get(DIGEST_TAG, dataset.digest)}
    return tags.get(MLFLOW_DATASET_CONTEXT, ""), entry


def lineage_chain(tracking_uri: str, experiment: str, pipeline_run_id: str) -> list[dict]:
    """The child runs of a pipeline run in start order, each ``{"run_id", "name", "stage",
    "status", "inputs", "outputs"}`` with inputs/outputs as ``{"name", "uri", "digest", "kind"}``.
    MLflow errors propagate (this is a reporting helper, not part of training)."""
    with _client_env(tracking_uri):
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs([found.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{pipeline_run_id}'",
                                  order_by=["attributes.start_time ASC"])
        chain = []
        for run in runs:
            entry = {"run_id": run.info.run_id, "name": run.info.run_name, "stage": run.data.tags.get(STAGE_TAG),
                     "status": run.info.status, "inputs": [], "outputs": []}
            for dataset_input in client.get_run(run.info.run_id).inputs.dataset_inputs:
                context, item = _dataset_entry(dataset_input)
                is_output = context.startswith("output:")
                item["kind"] = context.removeprefix("output:")
                entry["outputs" if is_output else "inputs"].append(item)
            chain.append(entry)
        return chain
