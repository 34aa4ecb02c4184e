"""Local S3 / GCS emulators for the tests (moto_server, gcp-storage-emulator).

The fixtures start real HTTP servers and configure them through ``os.environ``
only, so plain ``fsspec.core.url_to_fs("s3://bucket/key")`` / ``"gs://..."``
with no kwargs reaches them -- in this process, in forked DataLoader workers,
and in children started later (``subprocess``, ``torchrun``, ``spawn``).

Environment that makes plain URLs work (what production sets, too):

* s3 (botocore >= 1.31 reads ``AWS_ENDPOINT_URL``)::

      AWS_ENDPOINT_URL=http://127.0.0.1:<port>
      AWS_ACCESS_KEY_ID=testing  AWS_SECRET_ACCESS_KEY=testing
      AWS_DEFAULT_REGION=us-east-1

  (``AWS_PROFILE``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3`` are removed,
  ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE`` point at empty paths so
  a developer's ``~/.aws`` cannot interfere.)  ``FSSPEC_S3_ENDPOINT_URL`` would
  also work but is fsspec-only; it is not needed.
* gs::

      STORAGE_EMULATOR_HOST=http://127.0.0.1:<port>
      FSSPEC_GS_TOKEN=anon
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false

  ``STORAGE_EMULATOR_HOST`` alone already works on a machine without Google
  credentials (gcsfs falls back to anonymous), ``FSSPEC_GS_TOKEN=anon`` makes
  that deterministic (no ADC / GCE metadata probing, no real tokens).
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is read when ``gcsfs`` is *imported*
  (otherwise gcsfs picks its gRPC-capable class which retries TLS gRPC calls
  against the emulator forever), so this module sets it at import time --
  ``tests/conftest.py`` imports this module before any test imports gcsfs.

Caveats found while building this:

* ``fsspec.config.conf`` is read from ``FSSPEC_*`` variables once, when fsspec
  is imported.  Children pick them up from the environment; in this (already
  running) process the fixtures mirror them into ``fsspec.config.conf``.
* fsspec caches filesystem instances by their kwargs, not by the environment;
  the fixtures call ``clear_instance_cache()`` on both classes at setup and
  teardown so no instance bound to another endpoint (or a dead emulator) is
  reused.
* ``s3fs.S3FileSystem.cat_file(path, version_id=None, start=None, end=None)``:
  the 2nd positional argument is ``version_id``, so always pass
  ``start=``/``end=`` as keywords (positional ``cat_file(p, 1, 4)`` raises
  ``ParamValidationError`` on s3 but works on gs/file).
* Missing keys: ``fs.exists`` -> False; ``fs.cat_file`` and
  ``fsspec.open(url, "rb")`` raise the builtin ``FileNotFoundError`` on s3,
  gs and file.
* fork: an s3fs/gcsfs instance created in the parent and *used* in a forked
  child raises ``RuntimeError("This class is not fork-safe")`` (the async
  filesystem records its pid).  fsspec clears its instance cache and event
  loop after fork, so calling ``fsspec.core.url_to_fs(url)`` (or
  ``fsspec.open(url)``, or ``pickle.loads(pickle.dumps(fs))``) *in the child*
  yields a fresh, working instance (~0.02-0.2 s).  Datasets used with
  DataLoader workers must therefore keep the URL and resolve the filesystem
  lazily per process (e.g. cache it keyed by ``os.getpid()``).  ``spawn`` /
  subprocess children work from the environment alone (~0.7 s, mostly
  imports); an fs pickled to a spawn child also works.
* Publishing under a final name (measured against these emulators):

  - ``fs.mv`` on gs: gcsfs first tries the ``moveTo`` API; the emulator answers
    501 and gcsfs retries ~34 s before falling back to copy+delete.  Too slow
    for the suite (only covered by a ``slow`` test).  On s3 (moto) ``mv`` is
    copy+delete, ~0.06 s.
  - ``fs.cp_file(tmp, final)`` + ``fs.rm_file(tmp)`` is fast on both
    (server-side copy / ``rewriteTo``: ~0.01-0.02 s).
  - Writing straight to the final name is atomic on object stores: one PUT,
    or a multipart / resumable upload that only materialises on ``close()``.
    While a 6 MiB write is flushed but not closed the key does not exist, and
    an overwritten key keeps serving the old bytes until close.
  - BUT ``with fsspec.open(url, "wb") as f: ...; raise`` still *commits* what
    was written (``__exit__``/``__del__`` call ``close()``), on s3, gs and
    file alike.  To publish only on success use
    ``f = fs.open(path, "wb", autocommit=False)`` then ``f.commit()`` on
    success / ``f.discard()`` on failure (``fs.transaction`` does the same), or
    build the bytes in memory and ``fs.pipe_file(path, data)``.  Commit is fast
    everywhere; ``discard`` is fast on s3 (aborts the multipart upload) and
    file, but on the gs emulator the cancel DELETE of the resumable upload gets
    501 -> ~33 s of retries, then ``HttpError`` (seen for a 6 MiB file, and for
    a 1-byte file inside ``fs.transaction``); the object never appears though,
    so simply not committing is enough there.  Slow gs cases are ``slow`` tests.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

# Must happen before gcsfs is imported anywhere in this process (see docstring);
# children inherit it through the environment.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import fsspec  # noqa: E402
import fsspec.config  # noqa: E402
import pytest  # noqa: E402

BUCKET = "dinoforge-test"
START_TIMEOUT_S = 20.0
INSTALL_HINT = "install the test extras: pip install -e '.[test]'"


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_executable(name: str) -> str:
    """The console script from this interpreter's environment, else from PATH."""
    here = Path(sys.executable).parent / name  # .venv/bin even if PATH lacks it
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"object-store tests need the `{name}` executable, which was not found next to "
        f"{sys.executable} nor on PATH; {INSTALL_HINT}",
        pytrace=False,
    )


def _log_tail(log: Path, n: int = 40) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {log}: {e}>"
    return "\n".join(lines[-n:]) or "<empty>"


class ServerProcess:
    """A server subprocess that logs to a file and answers HTTP on 127.0.0.1:port."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path):
        self.name, self.argv, self.port, self.log = name, argv, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._log_fh = open(log, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # no terminal signals from the test runner
        )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self._fail(f"exited with status {rc} before accepting connections")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
                try:
                    conn.request("GET", "/")
                    conn.getresponse().read()  # any HTTP status means it is serving
                    return
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                last_err = e
                time.sleep(0.05)
        self._fail(f"did not answer HTTP within {timeout:.0f}s (last error: {last_err!r})")

    def _fail(self, why: str) -> None:
        self.stop()
        pytest.fail(
            f"{self.name} {why}.\ncommand: {' '.join(self.argv)}\n"
            f"log {self.log}:\n{_log_tail(self.log)}",
            pytrace=False,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_fh.close()


def start_server(name: str, argv: list[str], port: int, log_dir: Path) -> ServerProcess:
    server = ServerProcess(name, argv, port, log_dir / f"{name}.log")
    server.wait_ready()
    return server


# --------------------------------------------------------------------------- environment
_UNSET = object()


def set_environment(updates: dict[str, str], remove: tuple[str, ...] = ()) -> Callable[[], None]:
    """Set/remove variables in ``os.environ`` (inherited by all children).

    ``FSSPEC_<PROTO>_<KWARG>`` variables are mirrored into ``fsspec.config.conf``
    because fsspec only reads them at import time.  Returns a function that
    restores the previous state.
    """
    saved_env = {k: os.environ.get(k) for k in (*updates, *remove)}
    saved_conf: dict[tuple[str, str], object] = {}
    for k in remove:
        os.environ.pop(k, None)
    for k, v in updates.items():
        os.environ[k] = v
        m = re.fullmatch(r"FSSPEC_([A-Z0-9]+)_(\w+)", k)
        if m:
            proto, kwarg = m.group(1).lower(), m.group(2).lower()
            section = fsspec.config.conf.setdefault(proto, {})
            saved_conf[(proto, kwarg)] = section.get(kwarg, _UNSET)
            section[kwarg] = v

    def restore() -> None:
        for k, old in saved_env.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
        for (proto, kwarg), old in saved_conf.items():
            section = fsspec.config.conf.setdefault(proto, {})
            if old is _UNSET:
                section.pop(kwarg, None)
            else:
                section[kwarg] = old

    return restore


def _no_proxy_for_localhost() -> dict[str, str]:
    hosts = "127.0.0.1,localhost"
    out = {}
    for var in ("NO_PROXY", "no_proxy"):
        cur = os.environ.get(var, "")
        out[var] = f"{cur},{hosts}" if cur else hosts
    return out


def clear_fs_caches(*protocols: str) -> None:
    """Drop cached fsspec instances of these protocols (bound to old endpoints)."""
    for proto in protocols:
        fsspec.get_filesystem_class(proto).clear_instance_cache()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory) -> Iterator[str]:
    """Session moto_server with bucket created; yields ``"s3://dinoforge-test"``.

    ``os.environ`` points botocore at it for the whole session (children too).
    """
    exe = find_executable("moto_server")
    try:
        import s3fs  # noqa: F401
    except ImportError as e:
        pytest.fail(f"s3:// tests need s3fs ({e}); {INSTALL_HINT}", pytrace=False)
    log_dir = tmp_path_factory.mktemp("moto")
    port = free_port()
    server = start_server("moto_server", [exe, "-H", "127.0.0.1", "-p", str(port)], port, log_dir)
    restore = set_environment(
        {
            "AWS_ENDPOINT_URL": server.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(log_dir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(log_dir / "no-aws-credentials"),
            **_no_proxy_for_localhost(),
        },
        remove=("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"),
    )
    try:
        clear_fs_caches("s3")
        fs, _ = fsspec.core.url_to_fs(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        clear_fs_caches("s3")
        restore()
        server.stop()


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory) -> Iterator[str]:
    """Session gcp-storage-emulator with bucket created; yields ``"gs://dinoforge-test"``.

    ``os.environ`` points gcsfs at it (anonymous) for the whole session.
    """
    exe = find_executable("gcp-storage-emulator")
    try:
        import gcsfs
    except ImportError as e:
        pytest.fail(f"gs:// tests need gcsfs ({e}); {INSTALL_HINT}", pytrace=False)
    if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        pytest.fail(
            "gcsfs was imported before tests/object_store.py set "
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (got "
            f"{gcsfs.GCSFileSystem.__qualname__}); import object_store first (tests/conftest.py)",
            pytrace=False,
        )
    work = tmp_path_factory.mktemp("gcs")
    port = free_port()
    server = start_server(
        "gcp-storage-emulator",
        [exe, "-d", str(work / "data"), "start", "--host", "127.0.0.1",
         "--port", str(port), "--default-bucket", BUCKET],
        port,
        work,
    )
    restore = set_environment(
        {
            "STORAGE_EMULATOR_HOST": server.url,
            "FSSPEC_GS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            **_no_proxy_for_localhost(),
        }
    )
    try:
        clear_fs_caches("gs")
        fs, _ = fsspec.core.url_to_fs(f"gs://{BUCKET}")
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        yield f"gs://{BUCKET}"
    finally:
        clear_fs_caches("gs")
        restore()
        server.stop()


def unique_prefix(bucket_url: str, label: str = "t") -> str:
    """``f"{bucket_url}/{label}-{uuid}"`` -- a key prefix no other test uses."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", label)[:60].strip("-") or "t"
    return f"{bucket_url.rstrip('/')}/{label}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_prefix(s3_bucket, request) -> str:
    """Per-test unique ``s3://dinoforge-test/<test>-<uuid>`` prefix."""
    return unique_prefix(s3_bucket, request.node.name)


@pytest.fixture
def gcs_prefix(gcs_bucket, request) -> str:
    """Per-test unique ``gs://dinoforge-test/<test>-<uuid>`` prefix."""
    return unique_prefix(gcs_bucket, request.node.name)


# --------------------------------------------------------------------------- child helpers
def child_range_read(url: str, start: int, end: int, fs=None, queue=None):
    """Run in a child process: range-read ``url`` and report via ``queue``.

    With ``fs`` given (inherited through fork or pickled to spawn) that instance
    is tried first; the URL is then always resolved afresh with plain
    ``fsspec.core.url_to_fs(url)`` (environment-only configuration).
    Puts a dict: ``inherited`` (bytes or "ExcType: msg"), ``fresh`` (bytes),
    ``fresh_is_inherited`` and ``storage_options`` of the fresh instance.
    """
    out: dict = {}
    try:
        if fs is not None:
            try:
                out["inherited"] = fs.cat_file(fs._strip_protocol(url), start=start, end=end)
            except Exception as e:  # report, the parent asserts
                out["inherited"] = f"{type(e).__name__}: {e}"
        fresh, path = fsspec.core.url_to_fs(url)
        out["fresh"] = fresh.cat_file(path, start=start, end=end)
        out["fresh_is_inherited"] = fresh is fs
        out["storage_options"] = dict(fresh.storage_options)
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
    if queue is not None:
        queue.put(out)
    return out
