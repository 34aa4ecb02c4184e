"""Helpers the chart tests share: find and run helm, render a chart, expect a rejection, and
check that every value is typed, described and documented.

helm comes from $DINOFORGE_HELM, else beside this Python (.venv/bin/helm, which
`scripts/setup.sh --test` installs), else PATH (scripts/render_manifests.py finds it); without it
the chart tests fail."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE_VERSIONS = ("1.25.0", "1.37.0")  # the oldest and newest we support (chart READMEs)


def _load_render_manifests():
    spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "scripts" / "render_manifests.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


render_manifests = _load_render_manifests()  # scripts/render_manifests.py: one place that finds helm


def find_helm() -> str:
    return render_manifests.find_helm() or pytest.fail(render_manifests.NO_HELM)


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_helm(), *args], capture_output=True, text=True, timeout=60)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def env_of(container: dict) -> dict:
    """A container's env as name -> value (or its valueFrom)."""
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in container.get("env", [])}


class Chart:
    """One chart under helm/: its examples, rendering and rejected values."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = ROOT / "helm" / name
        self.examples = sorted(path.name for path in (self.path / "examples").glob("*.yaml"))

    def value_args(self, values: str | None, sets: tuple[str, ...] = ()) -> list[str]:
        """``values``: an example's file name, a path, or None for the defaults."""
        args = []
        if values:
            args += ["-f", str(self.path / "examples" / values if values in self.examples else values)]
        for item in sets:
            args += ["--set", item]
        return args

    def render(self, values: str | None = None, *sets: str, kube_version: str = KUBE_VERSIONS[-1],
               release: str | None = None, include_crds: bool = False) -> list[dict]:
        result = helm("template", release or self.name, str(self.path), "--namespace", "ml", "--kube-version",
                      kube_version, *(["--include-crds"] if include_crds else []), *self.value_args(values, sets))
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def rejected(self, values: str | None, *sets: str) -> str:
        """helm template's and helm lint --strict's error output; both must fail."""
        template = helm("template", "x", str(self.path), *self.value_args(values, sets))
        lint = helm("lint", "--strict", str(self.path), *self.value_args(values, sets))
        assert template.returncode != 0 and lint.returncode != 0, (template.stdout[-2000:], lint.stdout[-2000:])
        return template.stderr + lint.stdout + lint.stderr

    def rejected_values(self, tmp_path: Path, file_values: dict | None, *sets: str) -> str:
        """rejected() for values given as --set items and/or a values file written from file_values."""
        values = None
        if file_values is not None:
            values = str(tmp_path / "bad.yaml")
            Path(values).write_text(yaml.safe_dump(file_values))
        return self.rejected(values, *sets)

    def lint_strict(self, values: str | None = None) -> None:
        result = helm("lint", "--strict", str(self.path), *self.value_args(values))
        assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, (values, result.stdout, result.stderr)

    def check_values_documented(self, min_values: int) -> None:
        """Every value in values.yaml is in the schema (typed and described, objects closed to
        misspelt keys) and in the README's table, and the table names no value that is gone."""
        schema = json.loads((self.path / "values.schema.json").read_text())
        for path, node in schema_nodes(schema)[1:]:
            assert "description" in node and ("type" in node or "anyOf" in node), f"schema {path}: type and description"
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"schema {path} accepts misspelt keys"
        assert schema["additionalProperties"] is False
        readme = (self.path / "README.md").read_text()
        documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
        paths = value_paths(yaml.safe_load((self.path / "values.yaml").read_text()), schema)
        assert len(paths) > min_values
        missing = [path for path in paths if path not in documented]
        assert not missing, f"values missing from the README table: {missing}"
        stale = documented - set(paths)
        assert not stale, f"README documents values that values.yaml does not have: {sorted(stale)}"


def value_paths(values: dict, schema: dict, prefix: str = "") -> list[str]:
    """Dotted paths of values.yaml: into an object the schema spells out, else a leaf."""
    paths = []
    for key, value in values.items():
        path, node = f"{prefix}{key}", schema["properties"].get(key)
        assert node is not None, f"{path} is in values.yaml but not in values.schema.json"
        if isinstance(value, dict) and value and "properties" in node:
            paths += value_paths(value, node, f"{path}.")
        else:
            paths.append(path)
    return paths


def schema_nodes(node: dict, path: str = "") -> list[tuple[str, dict]]:
    nodes = [(path, node)]
    for key, child in node.get("properties", {}).items():
        nodes += schema_nodes(child, f"{path}.{key}" if path else key)
    if "properties" in node.get("items", {}):  # arrays of objects (tolerations, extraEnv, imagePullSecrets)
        nodes += schema_nodes(node["items"], f"{path}[]")
    return nodes
