"""MLflow access for lineage: which tracking store, a client for it, a fail-fast reachability
check, the tags dinoforge sets, uploads, and how a refused request is told from a down server.

Nothing here changes process state (no environment variables, no global tracking URI): every
call names its store, so lineages of different pipelines can sync from one process at once.
"""

from __future__ import annotations

import http.client
import logging
import os
import posixpath
import ssl
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger("dinoforge.lineage")

RUN_KEY_TAG = "dinoforge.run_key"
SYNCED_TAG = "dinoforge.synced_events"
STAGE_TAG = "dinoforge.stage"
DIGEST_TAG = "dinoforge.digest"
# Outputs other than models (MLflow 3 runs have model outputs, no dataset outputs): one tag each,
# ``dinoforge.output.<kind>.<name>`` = ``<absolute uri>@<digest>``.
OUTPUT_TAG_PREFIX = "dinoforge.output."
DEFAULT_EXPERIMENT = "dinoforge"
# The local store beside a local journal: a sqlite database and a folder of run artifacts.
LOCAL_DB, LOCAL_ARTIFACTS = "mlflow.db", "mlartifacts"
# How long the reachability check waits for an answer, unless MLFLOW_HTTP_REQUEST_TIMEOUT says.
PROBE_TIMEOUT_S = 5.0


class Unreachable(ConnectionError):
    """The tracking server did not answer the reachability check."""


def output_tag(kind: str, name: str) -> str:
    return f"{OUTPUT_TAG_PREFIX}{kind}.{name}"


def parse_output_tag(key: str, value: str) -> dict | None:
    """``{"name", "uri", "digest", "kind"}`` of an output tag; None for other tags."""
    if not key.startswith(OUTPUT_TAG_PREFIX):
        return None
    kind, _, name = key.removeprefix(OUTPUT_TAG_PREFIX).partition(".")
    uri, _, digest = value.rpartition("@")
    return {"name": name, "uri": uri, "digest": digest, "kind": kind}


def resolve_tracking_uri(journal_dir: str, tracking_uri: str | None = None, recorded: str | None = None) -> str | None:
    """``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the store the journal's runs were
    recorded for (``recorded``), else a sqlite store ``mlflow.db`` beside a local journal
    directory; None for a remote journal without any of these."""
    if uri := tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded:
        return uri
    fs, path = fsspec.core.url_to_fs(journal_dir)
    if not isinstance(fs, LocalFileSystem):
        return None
    return local_store(posixpath.dirname(path.rstrip("/")))


def local_store(directory: str) -> str:
    """The sqlite store ``mlflow.db`` in a local ``directory``, as an absolute URI."""
    return "sqlite:///" + str(Path(directory, LOCAL_DB).resolve())


def public_uri(tracking_uri: str) -> str:
    """``tracking_uri`` without credentials (``https://user:password@host`` -> ``https://host``),
    as the journal records it."""
    parts = urlsplit(tracking_uri)
    if parts.username is None and parts.password is None:
        return tracking_uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def is_local(tracking_uri: str) -> bool:
    """A store this process opens itself (sqlite database or file store), not a server."""
    return urlsplit(tracking_uri).scheme in ("sqlite", "file", "")


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local sqlite store keeps its artifacts: ``mlartifacts/``
    beside the database (MLflow's own default is ``./mlruns`` in the working directory). None
    for other stores, which have their own default."""
    parts = urlsplit(tracking_uri)
    if parts.scheme != "sqlite":
        return None
    database = Path(unquote(parts.path[1:] if parts.path.startswith("//") else parts.path))
    return (database.parent / LOCAL_ARTIFACTS / experiment.replace("/", "_")).as_uri()


def client(tracking_uri: str) -> MlflowClient:
    """A local store holds its own registry; for servers MLflow's default (or MLFLOW_REGISTRY_URI) applies."""
    return MlflowClient(tracking_uri, registry_uri=tracking_uri if is_local(tracking_uri) else None)


def check_reachable(tracking_uri: str) -> None:
    """Raises ``Unreachable`` unless an HTTP(S) tracking server answers ``/health`` within the
    timeout (any HTTP status counts: the server is there). MLflow's own client retries a down
    server for minutes (7 retries with backoff, 120 s timeouts), so every sync checks first and
    a down server costs at most one timeout. Local stores and other schemes are not checked."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or PROBE_TIMEOUT_S)
    if parts.scheme == "https":  # only reachability is checked: certificates are MLflow's business
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + "/health")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException) as error:
        raise Unreachable(f"{tracking_uri}: {error}") from error
    finally:
        conn.close()


def fit(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending in a ``...[truncated N chars]`` note."""
    if len(value) <= limit:
        return value
    note = f"...[truncated {len(value)} chars]"
    return value[: limit - len(note)] + note


def _rejected(error: Exception) -> bool:
    """The server refused this request for good (HTTP 400: invalid value, changed param...), a
    recorded file is gone, or its contents are unusable (ValueError): retrying cannot help."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() == 400
    return isinstance(error, (FileNotFoundError, ValueError))


def attempt(call: Callable[[], Any], what: str) -> bool:
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
def local_copy(uri: str) -> Iterator[str]:
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


def upload(mlflow: MlflowClient, run_id: str, uri: str, artifact_path: str | None) -> None:
    """As ``MlflowClient.log_artifact`` (a file goes under ``artifact_path``) or
    ``log_artifacts`` (a directory's contents go under ``artifact_path``)."""
    with local_copy(uri) as local:
        if os.path.isdir(local):
            mlflow.log_artifacts(run_id, local, artifact_path)
        else:
            mlflow.log_artifact(run_id, local, artifact_path)
