"""Maps the repository's top-level folders onto the ``dinoforge`` import namespace.

``platform/`` becomes ``dinoforge`` without an ``__init__.py`` of its own, so a checkout on
``sys.path`` never shadows the standard library's ``platform`` module (which ``import torch``
needs). Every other top-level folder becomes a subpackage: ``model/`` -> ``dinoforge.model``.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
NAMESPACE_ROOT = "platform"
SUBPACKAGE_FOLDERS = ["model", "curation", "jobs", "operators"]


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = ["dinoforge"], {"dinoforge": NAMESPACE_ROOT}
    for sub in (ROOT / NAMESPACE_ROOT).rglob("__init__.py"):
        rel = sub.parent.relative_to(ROOT)
        packages.append("dinoforge." + ".".join(rel.parts[1:]))
    for folder in SUBPACKAGE_FOLDERS:
        package_dir[f"dinoforge.{folder}"] = folder
        for sub in (ROOT / folder).rglob("__init__.py"):
            rel = sub.parent.relative_to(ROOT)
            packages.append("dinoforge." + ".".join(rel.parts))
    return sorted(packages), package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
