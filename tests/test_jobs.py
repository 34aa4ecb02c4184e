"""The TorchX components in jobs/: a real two-process ``torchx run -s local_cwd``, Kubernetes
dryruns checked against Volcano's Job CRD and the Pod schema, registration and bad input; our
kubernetes scheduler's Secret and Prometheus options, in dryruns and in a Job submitted to an
in-memory Kubernetes API server (kmock)."""

import asyncio
import inspect
import json
import os
import shlex
import subprocess
import sys
import threading
from dataclasses import fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from docker.models.containers import Container
from kmock import KubernetesEmulator, Server, action
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config
from kubernetes_validate.utils import all_versions
from torchx.runner import get_runner
from torchx.schedulers import DEFAULT_SCHEDULER_MODULES, get_scheduler_factories
from torchx.specs import AppState, CfgVal
from torchx.specs.file_linter import get_fn_docstring

from dinoforge.build_info import IMAGE_UID, WRITABLE_PATHS, default_image, version
from dinoforge.checkpoint import committed_checkpoints
from dinoforge.jobs.common import Launch
from dinoforge.jobs.curate import curate
from dinoforge.jobs.distill import distill
from dinoforge.jobs.evaluate import evaluate
from dinoforge.jobs.pretrain import pretrain
from dinoforge.jobs.docker_scheduler import PodmanAwareDockerScheduler
from dinoforge.jobs.scheduler import DinoforgeKubernetesScheduler
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: torchx, torchrun and dinoforge
CRD = Path(__file__).parent / "data" / "volcano" / "batch.volcano.sh_jobs.yaml"
CFG = {"queue": "research", "namespace": "ml", "service_account": "trainer", "priority_class": "high"}
LAUNCH_ARGS = ["--nnodes", "1:4", "--nproc_per_node", "2", "--gpus_per_node", "2", "--mlflow_tracking_uri",
               "http://mlflow:5000", "--lineage_parent", "pipeline-7", "--env", "AWS_ENDPOINT_URL=http://minio:9000"]
# stage -> (its own arguments, the dinoforge CLI command its torchrun runs)
STAGES = {
    "pretrain": (["--output", "s3://b/runs/p"], "pretrain"),
    "distill": (["--teacher", "s3://b/teacher.pth", "--output", "s3://b/runs/d"], "pretrain"),
    "curate": (["--manifest", "s3://b/pool.parquet", "--weights", "s3://b/w.pth", "--out", "s3://b/cur", "--n", "100",
                "--eval_manifest", "s3://b/eval.parquet"], "curate embed"),
    "evaluate": (["--weights", "s3://b/w.pth"], "evaluate suite"),
}
COMPONENTS = [curate, distill, evaluate, pretrain]


def _cli_env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
            "DINOFORGE_LINEAGE": "off"}


def test_pretrain_runs_two_processes_under_local_cwd(tmp_path):
    output = tmp_path / "run"
    command = [str(BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
               "jobs/pretrain.py:pretrain", "--output", str(output), "--nproc_per_node", "2", "--max_steps", "2",
               "--max_restarts", "0", "--metrics_port", "0",
               "--", *TINY, "train.batch_size_per_gpu=4", "train.checkpoint_period=2"]
    result = subprocess.run(command, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Job finished: SUCCEEDED" in result.stderr
    assert [Path(path).name for _, path in committed_checkpoints(str(output))] == ["step_00000002"]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and {row["world_size"] for row in rows} == {2}


def _strict(schema: object) -> object:
    """A CRD's structural schema as JSON Schema that rejects fields it does not declare."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("x-kubernetes-int-or-string"):
            schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def volcano_job_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def dryrun(stage: str, *args: str, **cfg: CfgVal) -> dict:
    """The Volcano Job that ``torchx run --dryrun -s kubernetes -cfg CFG,... dinoforge.<stage>.<stage>``
    prints, as plain data."""
    info = get_runner().dryrun_component(f"dinoforge.{stage}.{stage}", list(args), "kubernetes", cfg=CFG | cfg,
                                         workspace=None)
    return ApiClient().sanitize_for_serialization(info.request.resource)


def validate_job(job: dict, volcano_job_schema: dict) -> None:
    """Checks ``job`` against Volcano's Job CRD and each task's template as a v1 Pod at the oldest
    and newest Kubernetes versions kubernetes-validate knows, unknown fields rejected."""
    jsonschema.Draft7Validator(volcano_job_schema).validate(job)
    for version in (all_versions()[0], all_versions()[-1]):
        for task in job["spec"]["tasks"]:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", **task["template"]}, version, strict=True)


def container(task: dict) -> dict:
    (only,) = task["template"]["spec"]["containers"]
    return only


def shell(task: dict) -> str:
    entrypoint, flag, command = container(task)["command"]
    assert (entrypoint, flag) == ("bash", "-c")
    return command


def test_the_strict_volcano_schema_rejects_unknown_fields(volcano_job_schema):
    job = dryrun("evaluate", "--weights", "w.pth")
    task = job["spec"]["tasks"][0]
    unknown_in_spec = {**job, "spec": {**job["spec"], "replicas": 2}}
    unknown_in_task = {**job, "spec": {**job["spec"], "tasks": [{**task, "retries": 1}]}}
    for bad in (unknown_in_spec, unknown_in_task):
        with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
            jsonschema.Draft7Validator(volcano_job_schema).validate(bad)


@pytest.mark.parametrize("stage", STAGES)
def test_kubernetes_dryrun_is_a_valid_volcano_job_of_valid_pods(stage, volcano_job_schema):
    own_args, cli = STAGES[stage]
    job = dryrun(stage, *LAUNCH_ARGS, *own_args)
    validate_job(job, volcano_job_schema)
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert job["metadata"]["name"].startswith(f"{stage}-")
    assert (job["spec"]["queue"], job["spec"]["priorityClassName"]) == ("research", "high")
    # job_retries 0: no Volcano restarts (recovery is torchrun's --max-restarts plus checkpoints)
    assert job["spec"]["maxRetry"] == 0 and all("policies" not in task for task in job["spec"]["tasks"])
    # elastic 1:4: one task per node up to 4; Volcano's webhook sums the tasks' minAvailable into
    # the job's when the job sets none, so 1 pod is required and 3 are optional
    tasks = job["spec"]["tasks"]
    assert [task["minAvailable"] for task in tasks] == [1, 0, 0, 0] and "minAvailable" not in job["spec"]

    first, second = tasks[0], tasks[1]
    assert first["template"]["spec"]["serviceAccountName"] == "trainer"
    command = shell(first)
    assert "torchrun --nnodes 1:4 --nproc-per-node 2 --rdzv-backend c10d" in command
    assert "--rdzv-endpoint ${TORCHX_RANK0_HOST:=localhost}:29500 --rdzv-id " in command
    assert f"--rdzv-endpoint ${{VC_{stage.upper()}_0_HOSTS:=localhost}}:29500" in shell(second)
    assert f"--max-restarts 3 -m dinoforge.cli {cli} " in command
    env = {item["name"]: item["value"] for item in container(first)["env"]}
    assert env | {
        "DINOFORGE_JOB": stage, "DINOFORGE_STAGE": stage, "DINOFORGE_IMAGE": default_image(),
        "DINOFORGE_METRICS_PORT": "9400",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "dinoforge",
        "DINOFORGE_LINEAGE_PARENT": "pipeline-7", "LOGLEVEL": "WARNING", "AWS_ENDPOINT_URL": "http://minio:9000",
    } == env
    ports = {port["name"]: port["containerPort"] for port in container(first)["ports"]}
    assert {"c10d": 29500, "metrics-0": 9400, "metrics-1": 9401}.items() <= ports.items()
    assert container(first)["resources"]["limits"]["nvidia.com/gpu"] == "2"


RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
                  "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def volume_at(task: dict, path: str) -> dict:
    """The pod volume mounted at ``path`` in the task's container."""
    (name,) = [mount["name"] for mount in container(task)["volumeMounts"] if mount["mountPath"] == path]
    (volume,) = [volume for volume in task["template"]["spec"]["volumes"] if volume["name"] == name]
    return volume


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_pod_is_restricted_read_only_tokenless_and_runs_the_versioned_image(stage):
    job = dryrun(stage, *STAGES[stage][0], "--nnodes", "2")
    for task in job["spec"]["tasks"]:
        spec = task["template"]["spec"]
        assert spec["securityContext"] == RESTRICTED_POD
        assert container(task)["securityContext"] == RESTRICTED_CONTAINER
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
        assert task["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dinoforge"
        for path in WRITABLE_PATHS:  # what the image writes, on a read-only root
            assert volume_at(task, path) == {"name": volume_at(task, path)["name"], "emptyDir": {}}
        assert volume_at(task, "/dev/shm")["emptyDir"] == {"medium": "Memory"}  # DataLoader workers
        assert container(task)["image"] == f"ghcr.io/dinoforge/dinoforge:{version()}"


def test_security_options_another_user_a_writable_root_and_a_user_mount_on_a_scratch_path():
    (task,) = dryrun("pretrain", "--output", "o", "--mounts", "type=volume,src=scratch-claim,dst=/tmp",
                     run_as_user=2000, read_only_root_filesystem=False)["spec"]["tasks"]
    assert task["template"]["spec"]["securityContext"]["runAsUser"] == 2000
    assert container(task)["securityContext"]["readOnlyRootFilesystem"] is False
    assert "/cache" not in {mount["mountPath"] for mount in container(task)["volumeMounts"]}  # not needed
    (task,) = dryrun("pretrain", "--output", "o", "--mounts", "type=volume,src=scratch-claim,dst=/tmp")["spec"]["tasks"]
    assert volume_at(task, "/tmp")["persistentVolumeClaim"] == {"claimName": "scratch-claim"}  # the user's, not ours
    assert "emptyDir" in volume_at(task, "/cache")
    with pytest.raises(ValueError, match="run_as_user must be a non-root user id"):
        dryrun("pretrain", "--output", "o", run_as_user=0)


def test_curate_embeds_under_torchrun_then_runs_the_rest_on_the_first_node():
    job = dryrun("curate", "--nnodes", "2", *STAGES["curate"][0], "--", "--levels", "10", "2")
    first, second = job["spec"]["tasks"]
    steps = shell(first).split(" && ")
    assert [step.split(" -m dinoforge.cli ")[1].split(" --out ")[0] for step in steps[:2]] == [
        "curate embed s3://b/pool.parquet", "curate embed s3://b/eval.parquet"]
    assert ":29500 " in steps[0] and ":29501 " in steps[1]  # each torchrun step has its own rendezvous port
    assert "--out s3://b/cur/eval " in steps[1]
    assert steps[2].startswith("if [ 0 = 0 ]; then dinoforge curate run s3://b/pool.parquet --out s3://b/cur --n 100 ")
    assert steps[2].endswith(" --eval-manifest s3://b/eval.parquet --levels 10 2; fi")
    assert shell(second).split(" && ")[2].startswith("if [ 1 = 0 ]; then ")
    ports = {port["name"]: port["containerPort"] for port in container(first)["ports"]}
    assert (ports["c10d"], ports["c10d-1"]) == (29500, 29501)


def test_single_node_needs_no_rendezvous_port_and_user_values_reach_the_shell_verbatim():
    job = dryrun("pretrain", "--output", "s3://b/my run", "--metrics_port", "0", "--", "train.note=a b$HOME'x")
    (task,) = job["spec"]["tasks"]
    words = shlex.split(shell(task))
    assert words[words.index("--rdzv-endpoint") + 1] == "localhost:0"
    assert words[-1] == "train.note=a b$HOME'x" and words[words.index("--output") + 1] == "s3://b/my run"
    assert "ports" not in container(task) or not container(task)["ports"]


def test_job_retries_opt_into_volcano_restart_policies():
    with pytest.warns(UserWarning, match=r"Volcano\s+does NOT support retries correctly"):  # TorchX's own warning
        (task,) = dryrun("pretrain", "--output", "o", "--job_retries", "2")["spec"]["tasks"]
    assert task["maxRetry"] == 2
    assert {policy["event"]: policy["action"] for policy in task["policies"]} == {
        "PodEvicted": "RestartJob", "PodFailed": "RestartJob"}


def test_torchx_cli_dryrun_prints_a_volcano_job():
    command = [str(BIN / "torchx"), "run", "--dryrun", "--workspace", "", "-s", "kubernetes",
               "-cfg", "queue=default,namespace=ml", "jobs/evaluate.py:evaluate", "--weights", "s3://b/w.pth"]
    result = subprocess.run(command, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    request = yaml.safe_load(result.stdout.split("=== SCHEDULER REQUEST ===")[1])
    assert (request["apiVersion"], request["kind"], request["spec"]["queue"]) == ("batch.volcano.sh/v1alpha1", "Job", "default")
    assert "-m dinoforge.cli evaluate suite --weights s3://b/w.pth --protocols knn" in shell(request["spec"]["tasks"][0])


SECRET_MOUNT = "/var/run/secrets/object-store"
PROMETHEUS = {"prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": "/metrics"}


def prometheus_annotations(task: dict) -> dict:
    return {key: value for key, value in task["template"]["metadata"]["annotations"].items()
            if key.startswith("prometheus.io/")}


def test_kubernetes_and_local_docker_are_ours_and_torchx_defaults_stay_registered():
    assert isinstance(get_scheduler_factories()["kubernetes"]("test"), DinoforgeKubernetesScheduler)
    assert isinstance(get_scheduler_factories()["local_docker"]("test"), PodmanAwareDockerScheduler)
    registered = {ep.name: ep.value for ep in entry_points(group="torchx.schedulers")}
    assert registered.pop("kubernetes") == "dinoforge.jobs.scheduler:create_scheduler"
    assert registered.pop("local_docker") == "dinoforge.jobs.docker_scheduler:create_scheduler"
    assert registered == {name: f"{module}:create_scheduler" for name, module in DEFAULT_SCHEDULER_MODULES.items()
                          if name not in ("kubernetes", "local_docker")}


class ExitedContainer(Container):
    """A container as docker-py describes it (``attrs`` from the API), whose ``wait`` reports ``code``."""

    def __init__(self, state, code: int = 0):
        super().__init__(attrs={"Id": "c1", "State": state})
        self.code = code

    def wait(self, timeout=None):
        return {"StatusCode": self.code}


@pytest.mark.parametrize("state, code, expected", [
    ({"Status": "stopped"}, 0, AppState.SUCCEEDED), ({"Status": "stopped"}, 3, AppState.FAILED),
    ("stopped", 0, AppState.SUCCEEDED), ({"Status": "stopping"}, 0, AppState.RUNNING),
    ({"Status": "configured"}, 0, AppState.SUBMITTED), ({"Status": "exited"}, 1, AppState.FAILED),
    ({"Status": "running"}, 0, AppState.RUNNING),
])
def test_local_docker_reads_podmans_container_states(state, code, expected):
    """podman's Docker API reports states Docker has not (TorchX 0.7.0 fails on them with KeyError)."""
    assert PodmanAwareDockerScheduler("test")._get_app_state(ExitedContainer(state, code)) == expected


@pytest.mark.parametrize("stage", STAGES)
def test_object_store_secret_reaches_every_container_and_pods_carry_prometheus_annotations(stage, volcano_job_schema):
    job = dryrun(stage, *LAUNCH_ARGS, *STAGES[stage][0], object_store_secret="s3-creds",
                 object_store_secret_mount=SECRET_MOUNT)
    validate_job(job, volcano_job_schema)
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 4
    for task in tasks:
        assert container(task)["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        volume = {"name": "object-store-secret", "secret": {"secretName": "s3-creds"}}
        assert volume in task["template"]["spec"]["volumes"]
        mount = {"name": "object-store-secret", "mountPath": SECRET_MOUNT, "readOnly": True}
        assert mount in container(task)["volumeMounts"]
        # rank 0's port of the two local ranks (metrics-0: 9400, metrics-1: 9401)
        assert prometheus_annotations(task) == PROMETHEUS
        assert task["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"  # TorchX's own


def test_without_the_options_there_is_no_secret_and_annotations_follow_the_metrics_port():
    (task,) = dryrun("pretrain", "--output", "o")["spec"]["tasks"]
    assert "envFrom" not in container(task)
    assert all("secret" not in volume for volume in task["template"]["spec"]["volumes"])
    assert prometheus_annotations(task) == PROMETHEUS  # metrics_annotations defaults to true
    (task,) = dryrun("pretrain", "--output", "o", metrics_annotations=False)["spec"]["tasks"]
    assert prometheus_annotations(task) == {}
    (task,) = dryrun("pretrain", "--output", "o", "--metrics_port", "0")["spec"]["tasks"]
    assert prometheus_annotations(task) == {}  # no metrics port, nothing to scrape


def test_secret_mount_without_a_secret_is_an_error():
    with pytest.raises(ValueError, match="object_store_secret_mount needs object_store_secret"):
        dryrun("pretrain", "--output", "o", object_store_secret_mount=SECRET_MOUNT)


def test_torchx_cli_dryrun_prints_the_secret_and_the_annotations():
    command = [str(BIN / "torchx"), "run", "--dryrun", "--workspace", "", "-s", "kubernetes",
               "-cfg", "queue=default,namespace=ml,object_store_secret=s3-creds", "jobs/pretrain.py:pretrain",
               "--output", "s3://b/run"]
    result = subprocess.run(command, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = result.stdout.split("=== SCHEDULER REQUEST ===")[1]
    assert "secretRef" in printed and "prometheus.io/port" in printed
    (task,) = yaml.safe_load(printed)["spec"]["tasks"]
    assert container(task)["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert prometheus_annotations(task) == PROMETHEUS


class KubernetesAPI(KubernetesEmulator):
    """kmock's in-memory Kubernetes API server, answering a create with 201 as Kubernetes does: kmock
    0.8 answers 200, for which kubernetes-client 36 returns no body, and TorchX's schedule() then
    fails reading the created Job's name from it."""

    async def _handle(self, request):
        response = await super()._handle(request)
        if request.action == action.CREATE and response.status == 200:
            response.set_status(201)
        return response


@pytest.fixture
def kubeconfig(tmp_path) -> Iterator[Path]:
    """A kubeconfig naming a KubernetesAPI served on a thread of its own while the test runs."""
    serving, server = threading.Event(), {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with KubernetesAPI() as api, Server(api) as http:
            server.update(loop=asyncio.get_running_loop(), stop=stop, url=str(http.url))
            serving.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert serving.wait(30)
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server["url"]}}],
        "users": [{"name": "emulator", "user": {"token": "unused"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
    }))
    yield path
    server["loop"].call_soon_threadsafe(server["stop"].set)
    thread.join(30)


def test_torchx_run_submits_the_secret_and_the_annotations(kubeconfig):
    command = [str(BIN / "torchx"), "run", "--workspace", "", "-s", "kubernetes",
               "-cfg", "queue=default,namespace=ml,object_store_secret=s3-creds", "jobs/pretrain.py:pretrain",
               "--output", "s3://b/run"]
    result = subprocess.run(command, cwd=ROOT, env=_cli_env() | {"KUBECONFIG": str(kubeconfig)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    handle = result.stdout.strip()  # kubernetes://torchx/<namespace>:<job name>
    namespace, name = handle.removeprefix("kubernetes://torchx/").split(":")
    api = CustomObjectsApi(new_client_from_config(str(kubeconfig)))
    job = api.get_namespaced_custom_object("batch.volcano.sh", "v1alpha1", namespace, "jobs", name)
    (task,) = job["spec"]["tasks"]
    assert namespace == "ml"
    assert container(task)["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert prometheus_annotations(task) == PROMETHEUS


def test_torchx_status_and_cancel_follow_the_job_on_the_api_server(kubeconfig):
    """`torchx status` reads what Volcano's controller writes (the test plays it by patching the
    Job's status subresource) and `torchx cancel` deletes the Job."""
    env = _cli_env() | {"KUBECONFIG": str(kubeconfig)}

    def torchx(*args: str) -> str:
        result = subprocess.run([str(BIN / "torchx"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    handle = torchx("run", "--workspace", "", "-s", "kubernetes", "-cfg", "queue=default,namespace=ml",
                    "jobs/evaluate.py:evaluate", "--weights", "s3://b/w.pth").strip()
    namespace, name = handle.removeprefix("kubernetes://torchx/").split(":")
    api = CustomObjectsApi(new_client_from_config(str(kubeconfig)))
    jobs = ("batch.volcano.sh", "v1alpha1", namespace, "jobs", name)
    for phase, state in (("Pending", "PENDING"), ("Running", "RUNNING")):
        api.patch_namespaced_custom_object_status(*jobs, {"status": {"state": {"phase": phase}}})
        assert f"State: {state}" in torchx("status", handle)
    torchx("cancel", handle)  # TorchX cancels only a job that is not finished
    with pytest.raises(ApiException) as gone:
        api.get_namespaced_custom_object(*jobs)
    assert gone.value.status == 404


def test_torchx_lists_the_four_components_and_shows_their_arguments(tmp_path):
    listed = subprocess.run([str(BIN / "torchx"), "builtins"], cwd=tmp_path, env=_cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-4000:]
    names = [line.split(". ", 1)[1] for line in listed.stdout.splitlines() if ". " in line]
    assert [name for name in names if name.startswith("dinoforge.")] == [
        "dinoforge.curate.curate", "dinoforge.distill.distill", "dinoforge.evaluate.evaluate",
        "dinoforge.pretrain.pretrain"]
    assert {"dist.ddp", "utils.echo"} <= set(names)  # TorchX's own, registered beside ours in pyproject.toml
    shown = subprocess.run([str(BIN / "torchx"), "run", "dinoforge.distill.distill", "--help"], cwd=tmp_path,
                           env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-4000:]
    assert "teacher URI: exported backbone weights" in shown.stdout  # its own argument
    assert "torchrun restarts the node's worker group" in shown.stdout  # a shared one
    assert "-cfg namespace=N,queue=Q,priority_class=P,service_account=S" in shown.stdout


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.__name__)
def test_components_declare_and_document_every_launch_argument(component):
    parameters = inspect.signature(component).parameters
    _, described = get_fn_docstring(component)
    for field in fields(Launch):
        assert field.name in parameters
        if field.name != "name":
            assert parameters[field.name].default == field.default, field.name
    assert parameters["name"].default == component.__name__
    assert all(described[name].strip() for name in parameters), [n for n in parameters if not described[n].strip()]


@pytest.mark.parametrize("nnodes", ["2:1", "x", "0", "1:", ":2"])
def test_malformed_nnodes_is_a_clear_error(nnodes):
    with pytest.raises(ValueError, match="nnodes"):
        pretrain(output="o", nnodes=nnodes)


def test_bad_arguments_fail_when_the_job_is_built():
    with pytest.raises(ValueError, match="only protocols='knn' shards"):
        evaluate(weights="w.pth", protocols="knn,linear", nproc_per_node=2)
    with pytest.raises(ValueError, match="invalid dinoforge arguments: curate run"):
        curate(manifest="m", weights="w", out="o", n=10, dedup_method="exact")
    with pytest.raises(ValueError, match="each process needs its own GPU"):
        distill(teacher="t.pth", output="o", nproc_per_node=4, gpus_per_node=2)


def test_evaluate_exports_a_run_first_on_a_single_node():
    (task,) = dryrun("evaluate", "--weights", "s3://b/e/w.pth", "--export_from", "s3://b/run")["spec"]["tasks"]
    assert shell(task).startswith("dinoforge export s3://b/run s3://b/e/w.pth && torchrun ")
    with pytest.raises(ValueError, match="nnodes=1"):  # the other nodes would not wait for the export
        dryrun("evaluate", "--weights", "w.pth", "--export_from", "run", "--nnodes", "2")
