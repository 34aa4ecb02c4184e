"""The helm/dinoforge-platform chart: ``helm lint --strict`` for the defaults and every example;
built-in objects checked by kubernetes-validate (strict) at the oldest and newest Kubernetes we
support, PodMonitor and PrometheusRule against prometheus-operator's CRD schemas (vendored in
tests/data/prometheus-operator); the rendered MLflow server command run for real; the alerts
unit-tested with ``promtool test rules``; every rule and dashboard query parsed by promtool and
reading only metrics that dinoforge.telemetry exports; bad values rejected naming the value;
every value documented; manifests/ equal to a fresh scripts/render_manifests.py run.

No cluster here: nothing is applied to an API server, Prometheus or Grafana (chart README,
"Tests"). promtool comes from Debian's prometheus package (scripts/setup.sh --test)."""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helm_chart import KUBE_VERSIONS, ROOT, Chart, by_kind, env_of

CHART = Chart("dinoforge-platform")
CURATION = Chart("dinov2-curation")
BUILT_IN = {"ConfigMap", "Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy"}
CRDS = ROOT / "tests" / "data" / "prometheus-operator"
SQLITE_EXAMPLE, POSTGRES_EXAMPLE = "mlflow-sqlite-minio.yaml", "mlflow-postgres-gcs.yaml"
render, rejected = CHART.render, CHART.rejected


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("no promtool: install Debian's prometheus package (scripts/setup.sh --test does)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rule_file(docs: list[dict]) -> dict:
    (rule,) = by_kind(docs, "PrometheusRule")
    return rule["spec"]  # a PrometheusRule's spec is a Prometheus rule file


def rules_by_name(docs: list[dict]) -> dict[str, dict]:
    return {rule.get("alert", rule.get("record")): rule for group in rule_file(docs)["groups"] for rule in group["rules"]}


def only(docs: list[dict], kind: str) -> dict:
    (doc,) = by_kind(docs, kind)
    return doc


def test_strict_lint_with_defaults_and_every_example():
    assert len(CHART.examples) >= 3
    for values in (None, *CHART.examples):
        CHART.lint_strict(values)


# --- schemas: kubernetes-validate for built-in kinds, the CRDs' openAPIV3Schema for the others ---

def strict_crd_schema(node):
    """A CRD schema as JSON Schema: int-or-string spelt out, and objects with listed properties
    closed to unknown fields (the API server prunes those silently; here they fail)."""
    if isinstance(node, list):
        return [strict_crd_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: strict_crd_schema(value) for key, value in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and isinstance(node["properties"], dict) and not node.get("x-kubernetes-preserve-unknown-fields"):
        node.setdefault("additionalProperties", False)
    return node


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_crd_schema(version["schema"]["openAPIV3Schema"]))


CRD_VALIDATORS = {kind: crd_validator(kind) for kind in ("PodMonitor", "PrometheusRule")}


@pytest.mark.parametrize("values", [None, *CHART.examples])
def test_every_rendered_object_is_valid_at_the_oldest_and_newest_kubernetes(values):
    for version in KUBE_VERSIONS:
        docs = render(values, kube_version=version)
        assert {doc["kind"] for doc in docs} <= BUILT_IN | set(CRD_VALIDATORS)
        for doc in docs:
            if doc["kind"] in BUILT_IN:
                kubernetes_validate.validate(doc, version, strict=True)
            else:
                CRD_VALIDATORS[doc["kind"]].validate(doc)


def test_crd_validation_catches_unknown_fields_and_wrong_types():
    docs = render()
    monitor = by_kind(docs, "PodMonitor")[0]
    monitor["spec"]["podMetricsEndpoints"][0]["honourLabels"] = True
    with pytest.raises(jsonschema.ValidationError, match="honourLabels"):
        CRD_VALIDATORS["PodMonitor"].validate(monitor)
    rule = only(docs, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["expr"] = ["not", "a", "string"]
    with pytest.raises(jsonschema.ValidationError):
        CRD_VALIDATORS["PrometheusRule"].validate(rule)


# --- MLflow ---

def container(docs: list[dict]) -> dict:
    (only_container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return only_container


def test_defaults_deploy_nothing_and_publish_the_existing_tracking_uri():
    docs = render()
    assert {doc["kind"] for doc in docs} == {"ConfigMap", "PrometheusRule", "PodMonitor"}
    endpoints = [doc for doc in by_kind(docs, "ConfigMap") if doc["metadata"]["name"].endswith("-endpoints")]
    assert endpoints[0]["data"] is None  # no tracking URI given: nothing to publish
    docs = render("kube-prometheus-stack.yaml")
    (endpoints,) = [doc for doc in by_kind(docs, "ConfigMap") if doc["metadata"]["name"].endswith("-endpoints")]
    assert endpoints["data"] == {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000"}


def test_deployed_server_is_non_root_read_only_without_token_and_published():
    docs = render(SQLITE_EXAMPLE)
    (endpoints,) = [doc for doc in by_kind(docs, "ConfigMap") if doc["metadata"]["name"].endswith("-endpoints")]
    service = only(docs, "Service")
    assert endpoints["data"]["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}.ml.svc:5000"
    deployment = only(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"} and deployment["spec"]["replicas"] == 1
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    server = container(docs)
    assert server["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in server["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == only(docs, "PersistentVolumeClaim")["metadata"]["name"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["envFrom"] == [{"secretRef": {"name": "minio-creds"}}]
    assert env_of(server)["AWS_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
    assert server["resources"]["limits"]["memory"] == "2Gi"
    assert "--serve-artifacts" in server["args"] and "--artifacts-destination=s3://mlflow-artifacts" in server["args"]


def test_database_backend_reads_its_uri_from_the_secret_and_clients_write_artifacts():
    docs = render(POSTGRES_EXAMPLE)
    server = container(docs)
    assert env_of(server)["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    # The kubelet expands $(VAR) in args from the container's env: the password stays in the Secret.
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in server["args"]
    assert {"--no-serve-artifacts", "--default-artifact-root=gs://example-mlflow/artifacts"} <= set(server["args"])
    assert "PersistentVolumeClaim" not in {doc["kind"] for doc in docs}
    assert only(docs, "Deployment")["spec"]["replicas"] == 2 and "strategy" not in only(docs, "Deployment")["spec"]


def kubelet_expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda match: env[match.group(1)], arg) for arg in args]


def test_database_example_args_parse_with_mlflows_own_cli():
    from mlflow.cli import server

    args = kubelet_expand(container(render(POSTGRES_EXAMPLE))["args"], {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db/mlflow"})
    assert args[0] == "server"
    params = server.make_context("server", args[1:]).params
    assert params["backend_store_uri"] == "postgresql://u:p@db/mlflow" and params["serve_artifacts"] is False
    assert params["default_artifact_root"] == "gs://example-mlflow/artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, host: str, credentials: tuple[str, str] | None = None) -> int:
    headers = {"Host": host}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # a loaded machine answers slowly
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_healthy(process: subprocess.Popen, base: str, seconds: float = 240) -> None:
    """Until /health answers (a fresh database is migrated first: tens of seconds, minutes on a busy machine)."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            if get(f"{base}/health", "localhost") == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"mlflow server did not answer /health in {seconds} s"
        time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory):
    """The sqlite example's server command run with this venv's mlflow, only the volume path,
    listen address, port and worker count changed. Autouse: it boots (tens of seconds on a busy
    machine) while the other tests of this module run."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    docs = render(SQLITE_EXAMPLE)
    command, args = container(docs)["command"], container(docs)["args"]
    port = free_port()
    local = [arg.replace("sqlite:////data/", f"sqlite:///{tmp_path}/").replace("--host=0.0.0.0", "--host=127.0.0.1")
             .replace("--port=5000", f"--port={port}").replace("--workers=2", "--workers=1") for arg in args]
    assert sum(new != old for new, old in zip(local, args)) == 4
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(tmp_path)}
    process = subprocess.Popen([str(Path(sys.executable).parent / command[0]), *local], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    yield process, f"http://127.0.0.1:{port}", only(docs, "Service")["metadata"]["name"]
    stop(process)


def stop(process: subprocess.Popen) -> None:
    """The server and its uvicorn workers, a process group of their own."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_rendered_server_command_starts_and_answers_the_service_name(mlflow_server):
    """/health answers; the API answers a request addressed to the Service's DNS name and
    refuses an unknown Host (MLflow's DNS-rebinding guard, which --allowed-hosts configures)."""
    process, base, service = mlflow_server
    wait_healthy(process, base)
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    assert get(search, f"{service}.ml.svc:5000") == 200
    assert get(search, f"{service}:5000") == 200
    assert get(search, "evil.example:5000") == 403


def test_network_policies_admit_dinoforge_pods_to_mlflow_and_keep_job_pods_to_themselves():
    from dinoforge.jobs.scheduler import PART_OF_LABEL

    docs = render(SQLITE_EXAMPLE, "networkPolicy.jobNamespaces={ml,research}",
                  "networkPolicy.mlflow.extraFrom[0].namespaceSelector.matchLabels.ingress=nginx")
    policies = {(doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc for doc in by_kind(docs, "NetworkPolicy")}
    mlflow = policies.pop((None, only(docs, "Deployment")["metadata"]["name"]))
    assert mlflow["spec"]["podSelector"]["matchLabels"].items() <= \
        only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    (rule,) = mlflow["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                             "podSelector": {"matchLabels": PART_OF_LABEL}} for namespace in ("ml", "research")] + [
        {"namespaceSelector": {"matchLabels": {"ingress": "nginx"}}}]
    assert sorted(policy["metadata"]["namespace"] for policy in policies.values()) == ["ml", "research"]
    for policy in policies.values():
        assert policy["spec"]["podSelector"] == {"matchLabels": PART_OF_LABEL}
        peers, metrics = policy["spec"]["ingress"]
        assert peers == {"from": [{"podSelector": {"matchLabels": PART_OF_LABEL}}]}
        assert metrics["ports"] == [{"port": 9400, "endPort": 9415, "protocol": "TCP"}]
    # the pods those policies are about carry the label: the curation chart's and the operator's
    worker = next(doc for doc in CURATION.render() if doc["kind"] == "Job")
    operator = next(doc for doc in Chart("dinoforge-operator").render() if doc["kind"] == "Deployment")
    for pod in (worker, operator):
        assert PART_OF_LABEL.items() <= pod["spec"]["template"]["metadata"]["labels"].items()
    # any namespace when none is named; nothing at all when switched off
    (rule,) = only(render(SQLITE_EXAMPLE), "NetworkPolicy")["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": PART_OF_LABEL}}]
    assert not by_kind(render(SQLITE_EXAMPLE, "networkPolicy.enabled=false"), "NetworkPolicy")


def test_basic_auth_server_refuses_anonymous_requests_and_admits_the_secrets_admin(tmp_path):
    """The chart's auth settings run for real: the rendered arguments, the ConfigMap's basic_auth.ini
    and the admin's credentials as the Secret would give them."""
    docs = render(SQLITE_EXAMPLE, "mlflow.auth.enabled=true", "mlflow.auth.secretName=mlflow-admin")
    server = container(docs)
    env = env_of(server)
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == {"secretKeyRef": {"name": "mlflow-admin", "key": "username"}}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"secretKeyRef": {"name": "mlflow-admin", "key": "password"}}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == {"secretKeyRef": {"name": "mlflow-admin", "key": "flask-secret-key"}}
    (auth,) = [doc for doc in by_kind(docs, "ConfigMap") if doc["metadata"]["name"].endswith("-mlflow-auth")]
    ini = auth["data"]["basic_auth.ini"]
    assert "sqlite:////data/basic_auth.db" in ini  # persistence: the users outlive the pod
    (tmp_path / "basic_auth.ini").write_text(ini.replace("sqlite:////data/", f"sqlite:///{tmp_path}/"))
    port = free_port()
    args = [arg.replace("sqlite:////data/", f"sqlite:///{tmp_path}/").replace("--host=0.0.0.0", "--host=127.0.0.1")
            .replace("--port=5000", f"--port={port}").replace("--workers=2", "--workers=1") for arg in server["args"]]
    assert "--app-name=basic-auth" in args
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(tmp_path),
             "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),  # the ConfigMap's mount, here
             "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-Passw0rd!",
             "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-signing-key"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(process, base)
        search, host = f"{base}/api/2.0/mlflow/experiments/search?max_results=1", f"{only(docs, 'Service')['metadata']['name']}:5000"
        assert get(search, host) == 401
        assert get(search, host, ("admin", "wrong")) == 401
        assert get(search, host, ("admin", "s3cret-Passw0rd!")) == 200
    finally:
        stop(process)


# --- Prometheus rules ---

def test_promtool_accepts_the_rules_of_the_defaults_and_every_example(tmp_path):
    for values in (None, *CHART.examples):
        path = tmp_path / "rules.yaml"
        path.write_text(yaml.safe_dump(rule_file(render(values))))
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0 and "SUCCESS: 6 rules found" in result.stdout, (values, result.stdout, result.stderr)


def expand(template: str, labels: dict[str, str], value: str) -> str:
    """The annotation as Prometheus fills it in (only the $labels.x and $value the chart uses)."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda match: labels.get(match.group(1), ""), template)
    return text.replace("{{ $value }}", value)


RULE_SETS = ("prometheusRules.stalledThroughput.window=3m", "prometheusRules.stalledThroughput.for=4m",
             "prometheusRules.restartLoop.maxRestarts=2", "prometheusRules.restartLoop.window=10m",
             "prometheusRules.gpuIdle.belowPercent=20", "prometheusRules.gpuIdle.for=5m")


def series(metric: str, values: str, /, **labels: str) -> dict:
    return {"series": metric + "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}", "values": values}


def test_alerts_fire_and_stay_quiet_as_intended_with_promtool(tmp_path):
    """promtool test rules on the rendered rules, thresholds set through values: each alert fires
    for the bad case only, at the time its window and `for` imply."""
    docs = render(None, *RULE_SETS)
    rules = rules_by_name(docs)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_file(docs)))

    def expected(alert: str, value: str = "", **labels: str) -> dict:
        labels = {**labels, "severity": rules[alert]["labels"]["severity"]}
        annotations = {key: expand(text, labels, value) for key, text in rules[alert]["annotations"].items()}
        return {"exp_labels": labels, "exp_annotations": annotations}

    pt0 = {"job": "pt", "stage": "pretrain", "rank": "0", "instance": "10.0.0.1:9400"}
    pt1 = {"job": "pt", "stage": "pretrain", "rank": "1", "instance": "10.0.0.2:9400"}
    cur = {"job": "cur", "stage": "curate", "rank": "0", "instance": "10.0.0.3:9400"}
    tests = [
        {   # Throughput: rank 0 stops at 10m and stays scraped; rank 1 stops too but its pod is gone
            # (no sample after 6m); curation never counts images (not a training stage).
            "interval": "1m",
            "input_series": [
                series("dinoforge_images_total", "0+100x10 1000x20", **pt0),
                series("dinoforge_up_timestamp_seconds", "1x30", **pt0),
                series("dinoforge_images_total", "0+100x10 1000x20", **pt1),
                series("dinoforge_up_timestamp_seconds", "1x6", **pt1),
                series("dinoforge_images_total", "0x30", **cur),
                series("dinoforge_up_timestamp_seconds", "1x30", **cur),
            ],
            "alert_rule_test": [
                {"eval_time": "12m", "alertname": "DinoforgeThroughputStalled", "exp_alerts": []},
                {"eval_time": "16m", "alertname": "DinoforgeThroughputStalled", "exp_alerts": []},  # pending (13m + 4m)
                {"eval_time": "18m", "alertname": "DinoforgeThroughputStalled",
                 "exp_alerts": [expected("DinoforgeThroughputStalled", **pt0)]},
            ],
        },
        {   # Loss: NaN on rank 0's dino_loss from 2m, +Inf on rank 1's koleo_loss at 1m only.
            "interval": "1m",
            "input_series": [
                series("dinoforge_loss", "2.5 2.4 NaN NaN", **pt0, name="dino_loss"),
                series("dinoforge_loss", "1.1 1.0 0.9 0.9", **pt0, name="ibot_loss"),
                series("dinoforge_loss", "0.1 +Inf 0.1 0.1", **pt1, name="koleo_loss"),
            ],
            "alert_rule_test": [
                {"eval_time": "0m", "alertname": "DinoforgeLossNotFinite", "exp_alerts": []},
                {"eval_time": "1m", "alertname": "DinoforgeLossNotFinite",
                 "exp_alerts": [expected("DinoforgeLossNotFinite", "+Inf", **pt1, name="koleo_loss")]},
                {"eval_time": "3m", "alertname": "DinoforgeLossNotFinite",
                 "exp_alerts": [expected("DinoforgeLossNotFinite", "NaN", **pt0, name="dino_loss")]},
            ],
        },
        {   # Restarts: job pt restarts every 2 minutes (both ranks report it), job ok once.
            "interval": "1m",
            "input_series": [
                series("dinoforge_restarts", "0 0 1 1 2 2 3 3 3x20", **pt0),
                series("dinoforge_restarts", "0 0 1 1 2 2 3 3 3x20", **pt1),
                series("dinoforge_restarts", "0 0 0 1x25", job="ok", stage="distill", rank="0", instance="10.0.0.4:9400"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "DinoforgeRestartLoop", "exp_alerts": []},  # 2 restarts: not more than 2
                {"eval_time": "7m", "alertname": "DinoforgeRestartLoop",
                 "exp_alerts": [expected("DinoforgeRestartLoop", "3", job="pt", stage="pretrain")]},
                {"eval_time": "20m", "alertname": "DinoforgeRestartLoop", "exp_alerts": []},  # settled
            ],
        },
        {   # GPU: rank 0 idles from 6m, rank 1 stays busy, the curation pod's GPU idles (not training).
            "interval": "1m",
            "input_series": [
                series("dinoforge_gpu_utilization_ratio", "0.9x5 0.05x20", **pt0, gpu="0"),
                series("dinoforge_gpu_utilization_ratio", "0.9x25", **pt1, gpu="1"),
                series("dinoforge_gpu_utilization_ratio", "0x25", **cur, gpu="0"),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "DinoforgeGpuIdle", "exp_alerts": []},
                {"eval_time": "13m", "alertname": "DinoforgeGpuIdle",
                 "exp_alerts": [expected("DinoforgeGpuIdle", **pt0, gpu="0")]},
            ],
        },
    ]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested == {name for name, rule in rules.items() if "alert" in rule}, "every alert needs a test"
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": tests}))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_recording_rules_sum_images_per_second_and_data_wait_share(tmp_path):
    docs = render()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_file(docs)))
    labels = {"job": "pt", "stage": "pretrain"}
    tests = [{
        "interval": "1m",
        "input_series": [  # two ranks at 60 and 120 images/s; each waits 6 s of every 60 s of steps
            series("dinoforge_images_total", "0+3600x10", **labels, rank="0"),
            series("dinoforge_images_total", "0+7200x10", **labels, rank="1"),
            series("dinoforge_data_wait_seconds_total", "0+6x10", **labels, rank="0"),
            series("dinoforge_data_wait_seconds_total", "0+6x10", **labels, rank="1"),
            series("dinoforge_step_seconds_total", "0+60x10", **labels, rank="0"),
            series("dinoforge_step_seconds_total", "0+60x10", **labels, rank="1"),
        ],
        "promql_expr_test": [
            {"expr": "round(job_stage:dinoforge_images:rate5m, 0.001)", "eval_time": "8m",
             "exp_samples": [{"labels": '{job="pt",stage="pretrain"}', "value": 180}]},
            {"expr": "round(job_stage:dinoforge_data_wait:ratio_rate5m, 0.001)", "eval_time": "8m",
             "exp_samples": [{"labels": '{job="pt",stage="pretrain"}', "value": 0.1}]},
        ],
    }]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": tests}))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_can_be_switched_off_one_by_one():
    names = set(rules_by_name(render(None, "prometheusRules.gpuIdle.enabled=false", "prometheusRules.recording=false")))
    assert names == {"DinoforgeThroughputStalled", "DinoforgeLossNotFinite", "DinoforgeRestartLoop"}
    assert "PrometheusRule" not in {doc["kind"] for doc in render(None, "prometheusRules.enabled=false")}


# --- metric names: only what dinoforge.telemetry exports ---

@pytest.fixture(scope="module")
def telemetry_metrics() -> set[str]:
    """Sample names a rank exports, from a Telemetry with every kind of reading recorded, plus
    the NVML gauges it exports only where a GPU answers."""
    from dinoforge import telemetry

    saved = os.environ.pop("DINOFORGE_METRICS_PORT", None)  # record only, serve nothing
    try:
        recorder = telemetry.Telemetry("pretrain", job="test", rank=0)
    finally:
        if saved is not None:
            os.environ["DINOFORGE_METRICS_PORT"] = saved
    try:
        recorder.train_step(8, 1.0, 0.1)
        recorder.train_values({"loss": 1.0, **{key: 0.5 for key in telemetry.SCHEDULE_GAUGES}})
        recorder.checkpoint("save", 2.0, 1024)
        recorder.skipped({"decode": 1})
        recorder.progress(1, 2)
        text = recorder.render()
    finally:
        recorder.close()
    names = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group() for line in text.splitlines() if line and line[0] != "#"}
    return names | {name for name, _, _ in telemetry.GPU_READINGS}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left after removing strings,
    label matchers, ranges and by/on(...) label lists, that are not functions or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group().lower() in {"and", "or", "unless", "bool", "offset", "inf", "nan"}:
            continue
        names.add(match.group())
    return names


def test_metric_name_extraction():
    assert metric_names('sum by (job, le) (rate(a_total{job=~"$job", x="y{z}"}[$__rate_interval])) / on (job) b '
                        "and c > 0.5 or abs(d) == Inf") == {"a_total", "b", "c", "d"}


def test_rules_read_only_metrics_that_telemetry_exports(telemetry_metrics):
    rules = rules_by_name(render())
    used = set().union(*(metric_names(rule["expr"]) for rule in rules.values()))
    assert used and used <= telemetry_metrics, used - telemetry_metrics


# --- Grafana dashboards ---

DASHBOARDS = sorted((CHART.path / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*", "$job": ".*", "$stage": ".*"}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expression) for every query target."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
            queries += [(path.name, panel["title"], target["expr"]) for target in panel["targets"]]
    return queries


def test_dashboards_ship_as_sidecar_configmaps_with_namespace_job_and_stage_variables():
    assert [path.name for path in DASHBOARDS] == ["gpus.json", "training.json"]
    maps = [doc for doc in render("kube-prometheus-stack.yaml") if doc["kind"] == "ConfigMap" and "grafana_dashboard" in
            doc["metadata"]["labels"]]
    assert {key: text for doc in maps for key, text in doc["data"].items()} == {path.name: path.read_text() for path in DASHBOARDS}
    assert all(doc["metadata"]["labels"]["grafana_dashboard"] == "1" and doc["metadata"]["annotations"] == {
        "grafana_folder": "dinoforge"} for doc in maps)
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert [var["name"] for var in dashboard["templating"]["list"]] == ["datasource", "namespace", "job", "stage"]
        assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert not [doc for doc in render(None, "dashboards.enabled=false") if "grafana_dashboard" in doc["metadata"]["labels"]]


def test_dashboard_queries_cover_the_topics_and_read_only_telemetry_metrics(telemetry_metrics):
    read = set()
    for dashboard, title, expr in panel_queries():
        names = metric_names(expr)
        assert names and names <= telemetry_metrics, (dashboard, title, names - telemetry_metrics)
        read |= names
    for topic in ("dinoforge_images_total", "dinoforge_loss", "dinoforge_gpu_utilization_ratio",
                  "dinoforge_gpu_memory_used_bytes", "dinoforge_gpu_power_watts", "dinoforge_data_wait_seconds_total",
                  "dinoforge_checkpoint_seconds", "dinoforge_checkpoint_bytes"):
        assert topic in read, f"no panel shows {topic}"


def test_dashboard_queries_keep_jobs_of_different_namespaces_apart():
    """Two jobs of the same name in two namespaces: every query filters by the namespace variable
    and every aggregation keeps the namespace, so their series never merge."""
    for dashboard, title, expr in panel_queries():
        selectors = re.findall(r"\{[^}]*\}", expr)
        assert selectors and all('namespace=~"$namespace"' in selector for selector in selectors), (dashboard, title)
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            assert "namespace" in grouping.split(", ") or "job" not in grouping, (dashboard, title, grouping)


def test_every_dashboard_query_parses_with_promtool(tmp_path):
    """Each query, Grafana's variables filled in, as a recording rule: promtool check rules parses it."""
    rules = []
    for index, (_, _, expr) in enumerate(panel_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    (tmp_path / "dashboards.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = promtool("check", "rules", str(tmp_path / "dashboards.rules.yaml"))
    assert result.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in result.stdout, result.stdout + result.stderr


# --- PodMonitors: the pods and ports dinoforge jobs have ---

def test_podmonitors_select_torchx_and_curation_pods_and_their_metrics_ports():
    from torchx import specs
    from torchx.schedulers.kubernetes_scheduler import pod_labels

    monitors = {doc["metadata"]["name"].rsplit("-", 1)[1]: doc for doc in by_kind(render(), "PodMonitor")}
    assert set(monitors) == {"torchx", "curation"}
    role = specs.Role(name="pretrain", image="dinoforge:0.1.0", entrypoint="bash")
    torchx_pod = pod_labels(specs.AppDef(name="dinoforge-pretrain", roles=[role]), 0, role, 0, "dinoforge-pretrain-abc")
    curation = CURATION.render("gpu-s3.yaml")
    curation_pod = only(curation, "Job")["spec"]["template"]["metadata"]["labels"]
    for name, pod in (("torchx", torchx_pod), ("curation", curation_pod)):
        assert monitors[name]["spec"]["selector"]["matchLabels"].items() <= pod.items(), name
    test_pod = only(curation, "Pod")["metadata"]["labels"]  # helm test's pod: not a worker
    assert not any(monitor["spec"]["selector"]["matchLabels"].items() <= test_pod.items() for monitor in monitors.values())
    (endpoint,) = monitors["torchx"]["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True and "port" not in endpoint
    (keep,) = endpoint["relabelings"]
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    # Prometheus anchors relabel regexes: the port names jobs/common.py and the curation chart use.
    for port in ("metrics", "metrics-0", "metrics-7", "metrics-15"):
        assert re.fullmatch(keep["regex"], port), port
    for port in ("c10d", "c10d-1", "http", "metrics-x", "prometheus-metrics"):
        assert not re.fullmatch(keep["regex"], port), port
    assert "namespaceSelector" not in monitors["torchx"]["spec"]  # the release namespace
    namespaces = by_kind(render("kube-prometheus-stack.yaml"), "PodMonitor")[0]["spec"]["namespaceSelector"]
    assert namespaces == {"matchNames": ["training", "curation"]}


# --- values ---

@pytest.mark.parametrize("sets, file_values, named", [
    ((), {"mlflow": {"deplooy": True}}, "deplooy"),
    ((), {"prometheusRules": {"nanLoss": {"severity": "page", "for": "soon"}}}, "/prometheusRules/nanLoss/for"),
    (("prometheusRules.gpuIdle.belowPercent=0",), None, "/prometheusRules/gpuIdle/belowPercent"),
    (("prometheusRules.gpuIdle.belowPercent=150",), None, "/prometheusRules/gpuIdle/belowPercent"),
    (("prometheusRules.restartLoop.maxRestarts=-1",), None, "/prometheusRules/restartLoop/maxRestarts"),
    (("podMonitors.interval=15",), None, "/podMonitors/interval"),
    ((), {"podMonitors": {"selectors": [{"name": "Bad_Name", "matchLabels": {"a": "b"}}]}}, "/podMonitors/selectors/0/name"),
    ((), {"podMonitors": {"selectors": [{"name": "empty", "matchLabels": {}}]}}, "/podMonitors/selectors/0/matchLabels"),
    (("mlflow.trackingUri=mlflow:5000",), None, "/mlflow/trackingUri"),
    (("mlflow.deploy=true", "mlflow.trackingUri=http://other:5000"), None, "/mlflow/trackingUri"),
    # sqlite lives on the volume: needs persistence and a single replica.
    (("mlflow.deploy=true", "mlflow.artifacts.destination=s3://b"), None, "/mlflow/persistence/enabled"),
    (("mlflow.deploy=true", "mlflow.persistence.enabled=true", "mlflow.replicas=2",
      "mlflow.artifacts.destination=s3://b"), None, "/mlflow/replicas"),
    (("mlflow.deploy=true", "mlflow.backendStore.type=database", "mlflow.artifacts.destination=s3://b"), None,
     "/mlflow/backendStore/secretName"),
    (("mlflow.backendStore.type=postgres",), None, "/mlflow/backendStore/type"),
    # Local artifacts need the volume, and clients cannot write into the pod themselves.
    (("mlflow.deploy=true", "mlflow.backendStore.type=database", "mlflow.backendStore.secretName=db",
      "mlflow.artifacts.serve=false"), None, "/mlflow/artifacts/serve"),
    (("mlflow.artifacts.destination=/mnt/artifacts",), None, "/mlflow/artifacts/destination"),
    (("mlflow.podSecurityContext.runAsNonRoot=false",), None, "/mlflow/podSecurityContext/runAsNonRoot"),
    (("mlflow.service.port=0",), None, "/mlflow/service/port"),
    (("mlflow.deploy=true", "mlflow.persistence.enabled=true", "mlflow.auth.enabled=true"), None,
     "/mlflow/auth/secretName"),
    (("mlflow.auth.defaultPermission=ALL",), None, "/mlflow/auth/defaultPermission"),
    (("networkPolicy.jobNamespaces={ML_Team}",), None, "/networkPolicy/jobNamespaces/0"),
    ((), {"networkPolicy": {"mlflow": {"extraFrom": [{"podSelectr": {}}]}}}, "/networkPolicy/mlflow/extraFrom/0"),
])
def test_bad_values_are_rejected_naming_the_value(sets, file_values, named, tmp_path):
    assert named in CHART.rejected_values(tmp_path, file_values, *sets)


def test_every_value_is_in_the_schema_typed_described_and_in_the_readme_table():
    CHART.check_values_documented(min_values=50)


# --- manifests/ ---

def test_committed_manifests_equal_a_fresh_render(tmp_path):
    script = ROOT / "scripts" / "render_manifests.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    fresh = {path.relative_to(tmp_path): path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    outputs = {path.parts[0] for path in fresh}
    committed = {path.relative_to(ROOT / "manifests"): path.read_bytes() for out in outputs
                 for path in (ROOT / "manifests" / out).rglob("*") if path.is_file()}
    stale = sorted(str(path) for path in fresh.keys() | committed.keys() if fresh.get(path) != committed.get(path))
    assert not stale, f"manifests/ is out of date ({', '.join(stale)}): run `python scripts/render_manifests.py`"
    rules = yaml.safe_load(fresh[Path("platform/prometheus/dinoforge-platform.rules.yaml")])
    assert rules == rule_file(CHART.render(str(ROOT / "manifests" / "values" / "platform.yaml")))
    for path, text in fresh.items():
        if path.suffix == ".yaml":
            assert b"helm.sh/chart" not in text and b"managed-by: Helm" not in text, path
