"""What this installation of dinoforge is: its version, its source commit and the container image
that carries it.

The package version in pyproject.toml is the one place a release is named: the image tag that the
TorchX components, the operator's stage jobs and (through their ``appVersion``) the Helm charts
default to is that version, never ``latest``. The image (``Containerfile``) runs as ``IMAGE_UID``
and writes only ``WRITABLE_PATHS``, so pods mount those as ``emptyDir`` and keep the root
filesystem read-only.
"""

import functools
import os
import subprocess
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version
from pathlib import Path

IMAGE_REPOSITORY = "ghcr.io/dinoforge/dinoforge"
IMAGE_UID = 10001  # the Containerfile's user and group
WRITABLE_PATHS = ("/tmp", "/cache")  # HOME and TMPDIR; XDG_CACHE_HOME and every cache below it


@functools.cache
def version() -> str:
    try:
        return _distribution_version("dinoforge")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def default_image() -> str:
    """The released image of this version (the CUDA flavour, which also runs without a GPU)."""
    return f"{IMAGE_REPOSITORY}:{version()}"


def git_commit() -> str | None:
    """The source commit: ``DINOFORGE_GIT_COMMIT`` (baked into the image at build time), else HEAD of
    the git checkout this module was imported from, if it is one."""
    return os.environ.get("DINOFORGE_GIT_COMMIT") or _checkout_head()


@functools.cache
def _checkout_head() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def describe() -> str:
    """``dinoforge --version``: the version and the commit."""
    return f"dinoforge {version()} (commit {git_commit() or 'unknown'})"
