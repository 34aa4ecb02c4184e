"""Plain fsspec URLs against the local S3/GCS emulators (see tests/object_store.py).

Every test resolves URLs with ``fsspec.core.url_to_fs(url)`` / ``fsspec.open(url)``
and no storage kwargs, exactly like production code: endpoints and credentials
come from the environment the session fixtures set.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time

import fsspec
import pytest

from object_store import child_range_read

STORES = ["s3", "gs", "file"]
DATA = bytes(range(256)) * 40  # 10 KiB, every slice distinguishable
BIG = 6 * 2**20 + 12345
# With BLOCK-sized buffers, writing BIG and flush()ing really uploads parts (s3
# multipart; s3fs's default block is 50 MiB) / chunks (gcs resumable upload).
BLOCK = 5 * 2**20


@pytest.fixture(params=STORES)
def prefix(request, tmp_path) -> str:
    """A unique, empty ``<proto>://.../<test>-<uuid>`` prefix on each store."""
    if request.param == "s3":
        return request.getfixturevalue("s3_prefix")
    if request.param == "gs":
        return request.getfixturevalue("gcs_prefix")
    root = tmp_path / "store"
    root.mkdir()
    return f"file://{root}"


def proto(url: str) -> str:
    return url.split("://", 1)[0]


def write(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def fresh_exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs.exists(path)


# --------------------------------------------------------------------------- basics
def test_roundtrip_range_list_and_missing(prefix):
    write(f"{prefix}/a.bin", DATA)
    write(f"{prefix}/sub/b.bin", DATA[::-1])

    with fsspec.open(f"{prefix}/a.bin", "rb") as f:
        assert f.read() == DATA
        f.seek(1000)
        assert f.read(24) == DATA[1000:1024]

    fs, base = fsspec.core.url_to_fs(prefix)
    a, b = f"{base}/a.bin", f"{base}/sub/b.bin"
    assert fs.cat_file(a) == DATA
    # keywords: s3fs's 2nd positional parameter is version_id, not start
    assert fs.cat_file(a, start=10, end=100) == DATA[10:100]
    assert fs.cat_file(a, start=len(DATA) - 7) == DATA[-7:]
    assert fs.cat_file(b, start=0, end=1) == DATA[-1:]
    assert fs.info(a)["size"] == len(DATA)

    fs.invalidate_cache()
    assert sorted(p.rstrip("/") for p in fs.ls(base, detail=False)) == [a, f"{base}/sub"]
    assert fs.find(base) == [a, b]

    missing = f"{base}/no/such.key"
    assert not fs.exists(missing)
    with pytest.raises(FileNotFoundError) as e1:
        fs.cat_file(missing)
    with pytest.raises(FileNotFoundError) as e2:
        with fsspec.open(f"{prefix}/no/such.key", "rb") as f:
            f.read()
    # the builtin itself, not an HTTP/botocore error subclass
    assert type(e1.value) is FileNotFoundError and type(e2.value) is FileNotFoundError


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_plain_urls_are_configured_by_environment(store, request):
    bucket = request.getfixturevalue({"s3": "s3_bucket", "gs": "gcs_bucket"}[store])
    fs, path = fsspec.core.url_to_fs(f"{bucket}/probe")
    fs.pipe_file(path, b"x")
    if store == "s3":
        assert fs.storage_options == {}
        assert fs.s3.meta.endpoint_url == os.environ["AWS_ENDPOINT_URL"]
    else:
        assert fs.storage_options == {"token": "anon"}  # from FSSPEC_GS_TOKEN
        assert fs.credentials.method == "anon"
        assert fs._location == os.environ["STORAGE_EMULATOR_HOST"]
        assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
        assert type(fs).__name__ == "GCSFileSystem"


# --------------------------------------------------------------------------- child processes
def _run_child(ctx_name: str, url: str, start: int, end: int, fs=None) -> dict:
    ctx = mp.get_context(ctx_name)
    q = ctx.Queue()
    p = ctx.Process(target=child_range_read, args=(url, start, end, fs, q))
    p.start()
    try:
        out = q.get(timeout=60)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    assert "error" not in out, out["error"]
    return out


def test_fork_child_range_read(prefix):
    """DataLoader workers (fork) after the parent already used the filesystem."""
    url = f"{prefix}/shard.bin"
    write(url, DATA)
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.cat_file(path, start=1, end=3) == DATA[1:3]  # parent's loop/session is live

    out = _run_child("fork", url, 5, 50, fs=fs)

    # re-resolving the URL in the child always works (fsspec drops its instance
    # cache and event loop after fork, so this is a brand-new instance)
    assert out["fresh"] == DATA[5:50]
    assert out["fresh_is_inherited"] is False
    if proto(prefix) == "file":
        assert out["inherited"] == DATA[5:50]
    else:
        # the parent's async instance itself must not be used in the child
        assert out["inherited"] == "RuntimeError: This class is not fork-safe"
    assert fs.cat_file(path, start=5, end=50) == DATA[5:50]  # parent unaffected


def test_spawn_child_reads_with_env_only(prefix):
    url = f"{prefix}/shard.bin"
    write(url, DATA)
    out = _run_child("spawn", url, 100, 300)
    assert out["fresh"] == DATA[100:300]
    assert out["storage_options"] == ({"token": "anon"} if proto(prefix) == "gs" else {})


def test_subprocess_reads_with_env_only(prefix):
    """A fresh interpreter that never imports the test helpers (torchrun-like)."""
    url = f"{prefix}/shard.bin"
    write(url, DATA)
    code = textwrap.dedent(
        """
        import sys, fsspec
        fs, path = fsspec.core.url_to_fs(sys.argv[1])
        sys.stdout.write(fs.cat_file(path, start=7, end=77).hex())
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert bytes.fromhex(r.stdout) == DATA[7:77]


# --------------------------------------------------------------------------- publishing
def test_direct_write_is_invisible_until_close(prefix):
    """On object stores the final name is written atomically (one PUT, or a
    multipart/resumable upload completed by close()); readers of an existing key
    keep seeing the old bytes.  Plain local files are written in place."""
    big = os.urandom(BIG)
    new, old = f"{prefix}/new.bin", f"{prefix}/old.bin"
    write(old, b"old")
    fs, _ = fsspec.core.url_to_fs(prefix)

    # fs.open, not fsspec.open: the latter hands block_size to the fs constructor
    f_new = fs.open(fs._strip_protocol(new), "wb", block_size=BLOCK)
    f_old = fs.open(fs._strip_protocol(old), "wb", block_size=BLOCK)
    try:
        for f in (f_new, f_old):
            f.write(big)
            f.flush()
        if proto(prefix) == "s3":
            assert f_new.mpu is not None and f_new.parts  # parts already uploaded
        elif proto(prefix) == "gs":
            assert f_new.location is not None and f_new.offset > 0  # chunks uploaded

        if proto(prefix) == "file":
            assert fresh_exists(new)
            assert fs.cat_file(fs._strip_protocol(old)) == big
        else:
            assert not fresh_exists(new)
            assert fs.cat_file(fs._strip_protocol(old)) == b"old"
    finally:
        f_new.close()
        f_old.close()
    fs.invalidate_cache()
    assert fs.cat_file(fs._strip_protocol(new)) == big
    assert fs.cat_file(fs._strip_protocol(old)) == big


def test_exception_inside_with_open_still_commits(prefix):
    """Hazard: ``__exit__`` closes (= commits) the file even when the block raised."""
    url = f"{prefix}/half.bin"
    with pytest.raises(ValueError):
        with fsspec.open(url, "wb") as f:
            f.write(b"partial")
            raise ValueError("writer crashed")
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"partial"


@pytest.mark.parametrize("size", [10, BIG])
def test_autocommit_false_publishes_only_on_commit(prefix, size):
    data = os.urandom(size)
    fs, base = fsspec.core.url_to_fs(prefix)
    path = f"{base}/committed.bin"
    t0 = time.perf_counter()
    f = fs.open(path, "wb", autocommit=False, block_size=BLOCK)
    f.write(data)
    f.close()  # uploads everything but does not publish
    fs.invalidate_cache()
    assert not fs.exists(path)
    f.commit()
    fs.invalidate_cache()
    assert fs.cat_file(path) == data
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("store", ["s3", "file"])  # gs: the emulator answers the cancel with 501 (gcsfs retries ~34 s)
def test_autocommit_false_discard_leaves_nothing(store, request, tmp_path):
    prefix = (
        request.getfixturevalue("s3_prefix") if store == "s3" else f"file://{tmp_path}"
    )
    fs, base = fsspec.core.url_to_fs(prefix)
    path = f"{base}/discarded.bin"
    f = fs.open(path, "wb", autocommit=False, block_size=BLOCK)
    f.write(os.urandom(BIG))
    f.close()
    if store == "s3":
        assert f.mpu is not None and f.parts  # an open multipart upload to abort
    f.discard()
    fs.invalidate_cache()
    assert not fs.exists(path)
    assert fs.find(base) == []


def test_copy_then_delete_publishes_fast(prefix):
    fs, base = fsspec.core.url_to_fs(prefix)
    tmp, final = f"{base}/.tmp-x.bin", f"{base}/x.bin"
    fs.pipe_file(tmp, DATA)
    t0 = time.perf_counter()
    fs.cp_file(tmp, final)  # server-side copy (s3 CopyObject / gcs rewriteTo)
    fs.rm_file(tmp)
    elapsed = time.perf_counter() - t0
    fs.invalidate_cache()
    assert fs.cat_file(final) == DATA
    assert not fs.exists(tmp)
    assert elapsed < 2, elapsed


@pytest.mark.parametrize(
    "store",
    ["s3", "file", pytest.param("gs", marks=pytest.mark.slow(seconds=60))],  # gs: moveTo -> 501, ~34 s
)
def test_mv(store, request, tmp_path):
    prefix = {
        "s3": lambda: request.getfixturevalue("s3_prefix"),
        "gs": lambda: request.getfixturevalue("gcs_prefix"),
        "file": lambda: f"file://{tmp_path}",
    }[store]()
    fs, base = fsspec.core.url_to_fs(prefix)
    tmp, final = f"{base}/.tmp-y.bin", f"{base}/y.bin"
    fs.pipe_file(tmp, DATA)
    t0 = time.perf_counter()
    fs.mv(tmp, final)
    elapsed = time.perf_counter() - t0
    fs.invalidate_cache()
    assert fs.cat_file(final) == DATA and not fs.exists(tmp)
    if store != "gs":
        assert elapsed < 2, elapsed
    print(f"{store} mv took {elapsed:.2f}s")
