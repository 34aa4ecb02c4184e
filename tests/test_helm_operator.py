"""The helm/dinoforge-operator chart: ``helm lint --strict``, every rendered built-in object valid
(kubernetes-validate, strict) at the oldest and newest Kubernetes we support, the CRD itself
valid as an apiextensions.k8s.io/v1 CustomResourceDefinition, the Deployment's hardening and
probes, a bad value rejected naming it, every value described and documented. The RBAC rules are
checked against the operator's real calls in tests/test_operator.py.

``helm`` comes from tests/test_helm_curation.py; value_args, render and rejected below are that
file's helpers with the chart as a parameter, ready to move into a shared tests/helm_chart.py."""

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from test_helm_curation import helm  # finds helm as that file says; not chart-specific

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "dinoforge-operator"
CRD = CHART / "crds" / "dinopipelines.dinoforge.io.yaml"
EXAMPLES = sorted(path.name for path in (CHART / "examples").glob("*.yaml"))
KUBE_VERSIONS = ("1.25.0", "1.37.0")  # the oldest and newest we support
KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}


def value_args(values: str | None, sets: tuple[str, ...] = (), chart: Path = CHART) -> list[str]:
    """``values``: an example's file name, a path, or None for the defaults."""
    args = []
    if values:
        args += ["-f", str(chart / "examples" / values if (chart / "examples" / values).exists() else values)]
    for item in sets:
        args += ["--set", item]
    return args


def render(values: str | None = None, *sets: str, kube_version: str = KUBE_VERSIONS[-1], chart: Path = CHART,
           include_crds: bool = False) -> list[dict]:
    result = helm("template", "ops", str(chart), "--namespace", "dinoforge", "--kube-version", kube_version,
                  *(["--include-crds"] if include_crds else []), *value_args(values, sets, chart))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rejected(values: str | None, *sets: str, chart: Path = CHART) -> str:
    """helm template's and helm lint --strict's error output; both must fail."""
    template = helm("template", "x", str(chart), *value_args(values, sets, chart))
    lint = helm("lint", "--strict", str(chart), *value_args(values, sets, chart))
    assert template.returncode != 0 and lint.returncode != 0, (template.stdout[-2000:], lint.stdout[-2000:])
    return template.stderr + lint.stdout + lint.stderr


@pytest.mark.parametrize("values", [None, *EXAMPLES])
def test_strict_lint(values):
    linted = helm("lint", "--strict", str(CHART), *value_args(values))
    assert (linted.returncode, "0 chart(s) failed" in linted.stdout) == (0, True), linted.stdout + linted.stderr


@pytest.mark.parametrize("values", [None, *EXAMPLES])
def test_every_rendered_object_and_the_crd_are_valid_at_the_oldest_and_newest_kubernetes(values):
    assert EXAMPLES, "no example values file"
    for version in KUBE_VERSIONS:
        docs = render(values, kube_version=version, include_crds=True)
        assert {doc["kind"] for doc in docs} == KINDS | {"CustomResourceDefinition"}
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_field_unknown_to_kubernetes_in_the_crd():
    crd = yaml.safe_load(CRD.read_text())
    crd["spec"]["versions"][0]["subresource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="subresource"):
        kubernetes_validate.validate(crd, KUBE_VERSIONS[0], strict=True)


def test_the_deployment_is_hardened_probed_and_runs_the_operator():
    (deployment,) = [doc for doc in render() if doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["command"] == ["dinoforge", "operator", "--liveness", "http://0.0.0.0:8080/healthz"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert {"requests", "limits"} <= set(container["resources"])
    assert deployment["spec"]["replicas"] == 1


@pytest.mark.parametrize("setting, named", [
    ("operator.intervalSeconds=0", "intervalSeconds"),
    ("operator.livenessPort=70000", "livenessPort"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("watchNamespace=ml", "watchNamespace"),
])
def test_a_bad_value_is_rejected_naming_it(setting, named):
    assert re.search(rf"\b{named}\b", rejected(None, setting))


def _described(schema: dict, path: str = "") -> list[str]:
    """Schema paths of values without a description."""
    missing = [] if "description" in schema else [path or "(root)"]
    for key, sub in schema.get("properties", {}).items():
        missing += _described(sub, f"{path}.{key}" if path else key)
    if isinstance(schema.get("items"), dict):
        missing += _described(schema["items"], f"{path}[]")
    return missing


def _leaves(schema: dict, path: str = "") -> list[str]:
    props = schema.get("properties")
    if not props or schema.get("type") != "object" or "additionalProperties" in schema and path.count(".") > 1:
        return [path]
    return [leaf for key, sub in props.items() for leaf in _leaves(sub, f"{path}.{key}" if path else key)]


def test_every_value_is_typed_described_and_in_the_readme():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _described(schema) == []
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values:
        assert key in schema["properties"], key
    for leaf in _leaves(schema):
        if leaf != "global":
            assert f"`{leaf}`" in readme, leaf
