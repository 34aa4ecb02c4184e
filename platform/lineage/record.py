"""Recording a stage's lineage: ``Lineage`` (one MLflow run) and ``stage_lineage`` (a stage's,
inside a pipeline or on its own)."""

from __future__ import annotations

import getpass
import logging
import os
import posixpath
import re
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from dinoforge.build_info import git_commit
from dinoforge.lineage.journal import Journal, absolute_uri, join
from dinoforge.lineage.registry import check_alias
from dinoforge.lineage.store import (
    DEFAULT_EXPERIMENT,
    STAGE_TAG,
    check_reachable,
    public_uri,
    resolve_tracking_uri,
)
from dinoforge.lineage.sync import Sync
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

log = logging.getLogger("dinoforge.lineage")


@dataclass(frozen=True)
class Scope:
    """The pipeline whose stages run in this thread: its run key, journal, tracking store and
    experiment (None: the stage's own default)."""

    parent: str
    journal: str
    tracking_uri: str | None = None
    experiment: str | None = None


_scope: ContextVar[Scope | None] = ContextVar("dinoforge_lineage_scope", default=None)


@contextmanager
def pipeline_scope(parent: Lineage) -> Iterator[None]:
    """Stages that start inside (``stage_lineage``, ``Lineage``) record in ``parent``'s journal
    and tracking store, as its child runs, as ``DINOFORGE_LINEAGE_DIR``/``DINOFORGE_LINEAGE_PARENT``
    say for a stage launched on its own. A context variable: pipelines in other threads are not
    affected."""
    token = _scope.set(Scope(parent.key, parent.journal_dir, parent.tracking_uri, parent.experiment))
    try:
        yield
    finally:
        _scope.reset(token)


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


def _user() -> str:
    """``DINOFORGE_USER`` (the operator passes the pipeline's creator), else the login name."""
    try:
        return os.environ.get("DINOFORGE_USER") or getpass.getuser()
    except (OSError, KeyError):  # a container user with no passwd entry and no LOGNAME/USER
        return f"uid-{os.getuid()}"


def _source_name() -> str:
    """The command this process runs, as typed: ``dinoforge pipeline --local`` (also for
    ``python -m dinoforge.cli ...``), else the program and its arguments."""
    program = posixpath.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program in ("dinoforge", "cli.py") or program == "-m":
        program = "dinoforge"
    return " ".join([program, *sys.argv[1:]])


def _default_tags(stage: str) -> dict[str, str]:
    # MLflow's source tags: the run page's Source, User and Git Commit; JOB inside a Kubernetes pod.
    tags = {
        STAGE_TAG: stage,
        "dinoforge.host": socket.gethostname(),
        MLFLOW_USER: _user(),
        MLFLOW_SOURCE_NAME: _source_name(),
        MLFLOW_SOURCE_TYPE: "JOB" if "KUBERNETES_SERVICE_HOST" in os.environ else "LOCAL",
    }
    if commit := git_commit():
        tags[MLFLOW_GIT_COMMIT] = commit
    if image := os.environ.get("DINOFORGE_IMAGE"):
        tags["dinoforge.image"] = image
    return tags


def _now_ms() -> int:
    return int(time.time() * 1000)


class Lineage:
    """One stage's MLflow run, recorded to the journal first and synced on a best-effort basis:
    while the tracking server is unreachable the stage carries on (one warning, a retry at most
    every ``retry_every_s`` seconds, nothing raised into the caller), and the events wait in the
    journal for ``end()`` or ``sync_journal`` (``dinoforge lineage sync DIR``).

    Tracking store: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a sqlite store
    ``mlflow.db`` beside a local journal directory. ``parent`` (else the ``pipeline_scope``, else
    env ``DINOFORGE_LINEAGE_PARENT``) is the key of the pipeline's run. Tags always hold the
    stage, the host, the git commit (env ``DINOFORGE_GIT_COMMIT``, else ``git rev-parse HEAD``
    of this source if it is a checkout) and the image (env ``DINOFORGE_IMAGE``) when known. With
    ``enabled=False`` or env ``DINOFORGE_LINEAGE=off`` every method does nothing beyond checking
    its arguments. After each recorded event a sync is attempted once ``sync_every_s`` have
    passed since the last one (``retry_every_s`` after a failure); ``end`` and ``sync`` always try.
    """

    def __init__(
        self,
        journal_dir: str,
        stage: str,
        *,
        run_name: str | None = None,
        parent: str | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        tags: dict[str, str] | None = None,
        enabled: bool = True,
        sync_every_s: float = 10.0,
        retry_every_s: float = 60.0,
    ) -> None:
        self.key = uuid.uuid4().hex
        self.run_name = run_name or stage
        self.enabled = enabled and os.environ.get("DINOFORGE_LINEAGE", "").lower() != "off"
        self.journal_dir = journal_dir
        scope = _scope.get()
        self.experiment = (
            experiment or (scope and scope.experiment) or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        )
        self.tracking_uri = resolve_tracking_uri(journal_dir, tracking_uri or (scope and scope.tracking_uri))
        self.run_id: str | None = None  # MLflow's id, once a sync has found or created the run
        if not self.enabled:
            return
        if self.tracking_uri is None:
            log.warning(
                "lineage: no MLFLOW_TRACKING_URI for remote journal %s; run `dinoforge lineage sync` later", journal_dir
            )
        self.sync_every_s, self.retry_every_s = sync_every_s, retry_every_s
        self._journal = Journal(journal_dir, self.key)
        self._sync: Sync | None = None
        self._params: dict[str, str] = {}
        self._next_sync = 0.0
        self._down = False
        self._ended = False
        parent = parent or (scope and scope.parent) or os.environ.get("DINOFORGE_LINEAGE_PARENT") or None
        self._record(
            "start",
            stage=stage,
            name=self.run_name,
            parent=parent,
            experiment=self.experiment,
            store=self.tracking_uri and public_uri(self.tracking_uri),
            tags=_default_tags(stage) | (tags or {}),
        )

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
        """An MLflow dataset input (source: ``uri`` made absolute) with context ``kind``:
        manifest, checkpoint, weights..."""
        self._record("input", uri=absolute_uri(uri), digest=digest, name=name, kind=kind)

    def output(self, uri: str, digest: str, *, name: str, kind: str) -> None:
        """The tag ``dinoforge.output.<kind>.<name>=<absolute uri>@<digest>``: MLflow 3 runs log
        models as outputs (``register_model`` does) but have no dataset outputs."""
        self._record("output", uri=absolute_uri(uri), digest=digest, name=name, kind=kind)

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A file or directory (any fsspec URI) uploaded when synced, as MLflow's
        ``log_artifact``/``log_artifacts`` do. Only the path is journaled: if it is gone by
        then, the artifact is skipped with a warning."""
        self._record("artifact", path=local_path, artifact_path=artifact_path)

    def register_model(self, weights_uri: str, name: str, *, digest: str, alias: str | None = None) -> None:
        """Exported weights (``X.pth`` with ``X.json`` beside it) become an MLflow Model (pyfunc:
        images in, embeddings out; see ``dinoforge.lineage.pyfunc``) logged as this run's model
        output, and a new version of registered model ``name``; ``alias`` then points at it. An
        alias MLflow refuses (``latest`` and ``v<N>`` are reserved) raises ValueError here, even
        when disabled, so every rank fails alike."""
        if alias is not None:
            check_alias(alias)
        self._record("model", weights_uri=absolute_uri(weights_uri), name=name, digest=digest, alias=alias)

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
            check_reachable(self.tracking_uri)
            self._sync = self._sync or Sync(self.tracking_uri, self.journal_dir)
            self.run_id = self._sync.push(self.key, self._journal.events)
        except Exception as error:  # whatever MLflow raises, training goes on
            if not self._down:
                log.warning(
                    "lineage: MLflow at %s unreachable (%s); events wait in %s, retried every %.0f s",
                    self.tracking_uri,
                    error,
                    self.journal_dir,
                    self.retry_every_s,
                )
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
    """The lineage of a stage writing under ``output``: its journal is the pipeline's
    (``pipeline_scope``, else ``DINOFORGE_LINEAGE_DIR``, shared by its stages) or else
    ``<output>/lineage``; ``kwargs`` go to ``Lineage``. ``output`` None (a stage that writes
    nothing, e.g. ``evaluate`` without ``--out``): recorded only inside a pipeline, so no
    journal or local store lands in the working directory."""
    scope = _scope.get()
    journal = (
        (scope and scope.journal) or os.environ.get("DINOFORGE_LINEAGE_DIR") or (output and join(output, "lineage"))
    )
    if not journal:
        return Lineage("lineage", stage, **{**kwargs, "enabled": False})
    return Lineage(journal, stage, **kwargs)
