"""The helm/dinoforge-operator chart: ``helm lint --strict``, every rendered built-in object valid
(kubernetes-validate, strict) at the oldest and newest Kubernetes we support, the CRD itself
valid as an apiextensions.k8s.io/v1 CustomResourceDefinition, the Deployment's hardening and
probes, a bad value rejected naming it, every value described and documented. The RBAC rules are
checked against the operator's real calls in tests/test_operator.py.

The shared helpers are tests/helm_chart.py's."""

import re

import kubernetes_validate
import pytest
import yaml
from helm_chart import KUBE_VERSIONS, Chart

CHART = Chart("dinoforge-operator")
CRD = CHART.path / "crds" / "dinopipelines.dinoforge.io.yaml"
EXAMPLES = CHART.examples
KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy"}
NAMESPACED_KINDS = {"ServiceAccount", "Role", "RoleBinding", "Deployment", "NetworkPolicy"}  # with operator.watchNamespaces
render = CHART.render


@pytest.mark.parametrize("values", [None, *EXAMPLES])
def test_strict_lint(values):
    CHART.lint_strict(values)


@pytest.mark.parametrize("values", [None, *EXAMPLES])
def test_every_rendered_object_and_the_crd_are_valid_at_the_oldest_and_newest_kubernetes(values):
    assert EXAMPLES, "no example values file"
    for version in KUBE_VERSIONS:
        docs = render(values, kube_version=version, include_crds=True)
        namespaced = values and yaml.safe_load((CHART.path / "examples" / values).read_text())["operator"].get("watchNamespaces")
        assert {doc["kind"] for doc in docs} == (NAMESPACED_KINDS if namespaced else KINDS) | {"CustomResourceDefinition"}
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
    # the API token only where the client looks for it, as an expiring projected token
    assert pod["automountServiceAccountToken"] is False
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token" and mount["readOnly"] is True
    assert {item["path"] for source in sources[1:] for item in next(iter(source.values()))["items"]} == {"ca.crt", "namespace"}
    assert {"name": "DINOFORGE_IMAGE", "value": container["image"]} in container["env"]  # stage jobs run it too


def test_the_network_policy_admits_no_connection_to_the_operator():
    (policy,) = [doc for doc in render() if doc["kind"] == "NetworkPolicy"]
    (deployment,) = [doc for doc in render() if doc["kind"] == "Deployment"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in policy["spec"]
    assert "NetworkPolicy" not in {doc["kind"] for doc in render(None, "networkPolicy.enabled=false")}


def test_watched_namespaces_get_a_role_each_and_the_operator_their_names():
    docs = render(None, "operator.watchNamespaces={ml,research}")
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][-4:] == ["--namespace", "ml", "--namespace", "research"]
    roles = {doc["metadata"]["namespace"]: doc for doc in docs if doc["kind"] == "Role"}
    bindings = {doc["metadata"]["namespace"]: doc for doc in docs if doc["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"ml", "research"}
    (cluster_role,) = [doc for doc in render() if doc["kind"] == "ClusterRole"]
    for namespace, binding in bindings.items():
        assert roles[namespace]["rules"] == cluster_role["rules"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": roles[namespace]["metadata"]["name"]}
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["namespace"] == "ml"  # the release's namespace
    assert not {doc["kind"] for doc in docs} & {"ClusterRole", "ClusterRoleBinding"}


@pytest.mark.parametrize("setting, named", [
    ("operator.intervalSeconds=0", "intervalSeconds"),
    ("operator.watchNamespaces={Team_A}", "watchNamespaces"),
    ("operator.livenessPort=70000", "livenessPort"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("watchNamespace=ml", "watchNamespace"),
])
def test_a_bad_value_is_rejected_naming_it(setting, named):
    assert re.search(rf"\b{named}\b", CHART.rejected(None, setting))


def test_every_value_is_typed_described_and_in_the_readme():
    CHART.check_values_documented(min_values=10)
