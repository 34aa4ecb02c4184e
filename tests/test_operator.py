"""The DinoPipeline operator (operators/): its real kopf handlers, run by ``kopf run`` (KopfRunner)
against kmock's in-memory Kubernetes API server over HTTP, with this test playing Volcano's job
controller by patching the stage jobs' ``status.state.phase``. Also the CRD's schema (jsonschema)
and the RBAC diff: the chart's ClusterRole grants exactly the (apiGroup, resource, verb) the
operator called during these tests.

Not exercised here (README, operators/README.md): scheduling and real Volcano, the garbage
collector (the emulator has none: deletion is the operator's explicit deletes), admission and
the API server's own schema validation (the emulator stores any body)."""

import asyncio
import collections
import contextlib
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import aiohttp.web
import jsonpatch
import jsonschema
import pytest
import yaml
from kmock import Server, action
from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from dinoforge.operators.plan import plan
from helm_chart import ROOT
from test_helm_operator import CRD, render
from test_jobs import KubernetesAPI, _strict

GROUP, VERSION, PLURAL = "dinoforge.io", "v1alpha1", "dinopipelines"
JOBS = ("batch.volcano.sh", "v1alpha1", "jobs")
OPERATOR_TOKEN = "operator"  # the operator's kubeconfig; the test's own requests use another token
VERBS = {action.LIST: "list", action.WATCH: "watch", action.FETCH: "get", action.CREATE: "create",
         action.DELETE: "delete"}
SCENARIOS = {"happy", "retry", "exhausted", "invalid", "delete"}
ran: set[str] = set()


class RecordingAPI(KubernetesAPI):
    """The emulator, recording each (apiGroup, resource[/subresource], verb) the operator calls
    (``calls``) and how often it called each (verb, resource[/subresource]) (``counts``), and giving
    a created object the uid, resourceVersion and creationTimestamp an API server would (kopf's
    finalizer patch tests the resourceVersion; owner references need the uid).

    ``job_create_latency`` seconds pass between storing a created job and answering its creator
    (a loaded API server); ``creating`` maps each job stored but not yet answered to when it was
    stored (read it under ``lock``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: set[tuple[str, str, str]] = set()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.job_create_latency = 0.0
        self.creating: dict[str, float] = {}
        self.lock = threading.Lock()

    async def _handle(self, request):
        if request.action == action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta.setdefault("resourceVersion", "1")  # never bumped: kopf's optimistic patches always apply
        if request.action is not None and request.resource is not None and request.resource.plural \
                and request.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}":
            verb = VERBS.get(request.action) or ("patch" if str(request.method).upper().endswith("PATCH") else "update")
            resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            self.calls.add((request.resource.group or "", resource, verb))
            self.counts[(verb, resource)] += 1
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as error:  # kmock answers 500; kopf waits for a 422 and retries
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 422,
                                              "reason": "Invalid", "message": str(error)}, status=422)
        if self.job_create_latency and request.action == action.CREATE and request.resource.plural == JOBS[2]:
            name = request.data["metadata"]["name"]
            with self.lock:
                self.creating[name] = time.monotonic()
            try:
                await asyncio.sleep(self.job_create_latency)
            finally:
                with self.lock:
                    del self.creating[name]
        return response


def kubeconfig(path: Path, url: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": token}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
    }))
    return path


@contextlib.contextmanager
def emulated_api_server(host: str = "127.0.0.1"):
    """kmock's Kubernetes emulator with the resources the operator uses, served over HTTP on ``host``
    from a thread; yields its url, its RecordingAPI and the loop."""
    serving, server = threading.Event(), {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with RecordingAPI() as api, Server(api, host=host) as http:
            api.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = api.ResourceInfo(
                kind="DinoPipeline", singular="dinopipeline", namespaced=True, subresources={"status"},
                verbs={"list", "watch", "get", "create", "patch", "update", "delete"})
            api.resources["/".join(JOBS)] = api.ResourceInfo(kind="Job", singular="job", namespaced=True,
                                                             subresources={"status"})
            # what every cluster serves and kopf waits to discover
            api.resources["v1/namespaces"] = api.ResourceInfo(kind="Namespace", namespaced=False)
            api.resources["v1/events"] = api.ResourceInfo(kind="Event", namespaced=True, verbs={"create"})  # unused
            api.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = api.ResourceInfo(
                kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"})
            server.update(loop=asyncio.get_running_loop(), stop=stop, url=str(http.url), api=api)
            serving.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert serving.wait(30)
    try:
        yield server
    finally:
        server["loop"].call_soon_threadsafe(server["stop"].set)
        thread.join(30)


@pytest.fixture(scope="module")
def emulator():
    with emulated_api_server() as server:
        yield server


@contextlib.contextmanager
def running_operator(emulator: dict, folder: Path, scope: list[str]):
    """The operator (``kopf run -m dinoforge.operators.handlers``, watching ``scope``: kopf's
    ``--all-namespaces`` or ``--namespace=...``) running against the emulator; yields the
    test's own API client."""
    from kopf.testing import KopfRunner

    saved = {key: os.environ.get(key) for key in ("KUBECONFIG", "DINOFORGE_OPERATOR_INTERVAL")}
    os.environ["KUBECONFIG"] = str(kubeconfig(folder / "operator", emulator["url"], OPERATOR_TOKEN))
    os.environ["DINOFORGE_OPERATOR_INTERVAL"] = "0.2"
    try:
        with KopfRunner(["run", "--standalone", *scope, "-m", "dinoforge.operators.handlers"], timeout=30) as runner:
            yield CustomObjectsApi(new_client_from_config(str(kubeconfig(folder / "test", emulator["url"], "test"))))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert runner.exit_code == 0, runner.output[-4000:]


@pytest.fixture(scope="module")
def cluster(emulator, tmp_path_factory):
    """The operator watching all namespaces while the module's tests run."""
    with running_operator(emulator, tmp_path_factory.mktemp("kube"), ["--all-namespaces"]) as api:
        yield api


def wait_for(what: str, probe: Callable[[], object], timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def pipeline(name: str, out: str, **spec) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DinoPipeline", "metadata": {"name": name, "namespace": "ml"},
            "spec": {"pool": "s3://pool/pool.parquet", "output": out, "mlflow": {"trackingUri": "http://127.0.0.1:9"},
                     "curate": {"weights": "s3://models/embedder.pth", "n": 100},
                     "pretrain": {"preset": "smoke", "maxSteps": 20}, **spec}}


def get(api: CustomObjectsApi, name: str) -> dict:
    return api.get_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, name)


def jobs_of(api: CustomObjectsApi, name: str) -> list[dict]:
    # the emulator ignores label selectors: filter here
    items = api.list_namespaced_custom_object(*JOBS[:2], "ml", JOBS[2])["items"]
    return [job for job in items if job["metadata"].get("labels", {}).get("dinoforge.io/pipeline") == name]


def stage_job(api: CustomObjectsApi, name: str, stage: str, attempt: int = 1) -> dict:
    def find():
        for job in jobs_of(api, name):
            labels = job["metadata"]["labels"]
            if (labels["dinoforge.io/stage"], labels["dinoforge.io/attempt"]) == (stage, str(attempt)):
                return job
    return wait_for(f"{name}: job of {stage} attempt {attempt}", find)


def finish(api: CustomObjectsApi, job: dict, phase: str) -> None:
    """What Volcano's job controller would write."""
    api.patch_namespaced_custom_object_status(*JOBS[:2], "ml", JOBS[2], job["metadata"]["name"],
                                              {"status": {"state": {"phase": phase}}})


def command(job: dict) -> str:
    (task, *_) = job["spec"]["tasks"]
    (container,) = task["template"]["spec"]["containers"]
    assert container["command"][:2] == ["bash", "-c"]
    return container["command"][2]


def env(job: dict) -> dict:
    (container,) = job["spec"]["tasks"][0]["template"]["spec"]["containers"]
    return {var["name"]: var.get("value") for var in container["env"]}


def phase_is(api: CustomObjectsApi, name: str, phase: str) -> Callable[[], dict | None]:
    return lambda: (body := get(api, name)).get("status", {}).get("phase") == phase and body


def test_the_crd_schema_rejects_type_errors():
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    good = pipeline("p", "s3://b/p", resources={"nnodes": 2, "gpusPerNode": 8}, highRes={"preset": "smoke_highres"})
    jsonschema.Draft7Validator(schema).validate(good)
    for bad, match in [({"resources": {"nnodes": "two"}}, "'two' is not of type 'integer'"),
                       ({"resources": {"nnodes": -1}}, "-1 is less than the minimum of 1"),
                       ({"retries": 1.5}, "1.5 is not of type 'integer'"),
                       ({"pretrain": {"preset": 3}}, "3 is not of type 'string'"),
                       ({"curate": {"dedupMethod": "fuzzy", "weights": "w", "n": 1}}, "'fuzzy' is not one of"),
                       ({"resource": {}}, "Additional properties are not allowed")]:
        with pytest.raises(jsonschema.ValidationError, match=re.escape(match)):
            jsonschema.Draft7Validator(schema).validate(pipeline("p", "s3://b/p", **bad))
    example = yaml.safe_load((ROOT / "operators" / "examples" / "dinopipeline.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(example)
    assert [stage.name for stage in plan(example["spec"], "smoke")] == ["curate", "pretrain", "distill", "evaluate"]
    missing = pipeline("p", "s3://b/p")
    del missing["spec"]["pool"]
    with pytest.raises(jsonschema.ValidationError, match="'pool' is a required property"):
        jsonschema.Draft7Validator(schema).validate(missing)


def test_all_stages_run_in_order_and_chain_their_outputs_by_uri(cluster, tmp_path):
    out = str(tmp_path / "full")
    cluster.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, pipeline(
        "full", out, highRes={"preset": "smoke_highres", "maxSteps": 5},
        distill={"preset": "smoke_distill", "student": "vit_pico"}, objectStoreSecret="s3-creds",
        resources={"nnodes": 1, "nprocPerNode": 2, "cpu": 8}, evaluate={"resources": {"nprocPerNode": 1}}))
    jobs = {}
    for stage in ("curate", "pretrain", "highres", "distill", "evaluate"):
        jobs[stage] = stage_job(cluster, "full", stage)
        body = wait_for(f"stage {stage}", lambda: (b := get(cluster, "full")).get("status", {}).get("stage") == stage and b)
        assert body["status"]["phase"] == "Running" and body["status"]["stages"][stage]["job"] == jobs[stage]["metadata"]["name"]
        assert set(jobs) == {job["metadata"]["labels"]["dinoforge.io/stage"] for job in jobs_of(cluster, "full")}
        finish(cluster, jobs[stage], "Completed")
    body = wait_for("Succeeded", phase_is(cluster, "full", "Succeeded"))
    status = body["status"]
    assert status["progress"] == "5/5 stages"
    assert {s: (v["phase"], v["attempts"]) for s, v in status["stages"].items()} == {
        s: ("Succeeded", 1) for s in jobs}
    assert [c["type"] for c in status["conditions"] if c["status"] == "True"] == ["Ready"]
    curated = f"{out}/curate/curated.parquet"
    assert f"--out {out}/curate " in command(jobs["curate"])
    assert "curate run s3://pool/pool.parquet" in command(jobs["curate"])
    assert f"--output {out}/pretrain" in command(jobs["pretrain"])
    assert f"data.dataset=manifest:{curated}" in command(jobs["pretrain"])
    assert f"train.init_from={out}/pretrain" in command(jobs["highres"])
    assert f"--output {out}/highres" in command(jobs["highres"])
    assert f"distill.teacher={out}/highres" in command(jobs["distill"])
    assert "model.arch=vit_pico" in command(jobs["distill"])
    assert command(jobs["evaluate"]).startswith(f"dinoforge export {out}/distill {out}/evaluate/backbone.pth && ")
    assert f"evaluate suite --weights {out}/evaluate/backbone.pth" in command(jobs["evaluate"])
    assert "--nproc-per-node 2" in command(jobs["pretrain"]) and "--nproc-per-node 1" in command(jobs["evaluate"])
    for job in jobs.values():
        (owner,) = job["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("DinoPipeline", "full", body["metadata"]["uid"])
        assert env(job)["DINOFORGE_LINEAGE_PARENT"] == status["lineageParent"]
        assert env(job)["DINOFORGE_LINEAGE_DIR"] == f"{out}/lineage"
        assert job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "s3-creds"}}]
    # the parent run's journal, although MLflow (port 9) is unreachable
    assert (tmp_path / "full" / "lineage" / f"{status['lineageParent']}.jsonl").exists()
    ran.add("happy")


def test_a_failed_stage_is_retried_on_the_same_output_and_the_pipeline_succeeds(cluster, tmp_path):
    out = str(tmp_path / "retry")
    cluster.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, pipeline("retry", out, retries=1))
    finish(cluster, stage_job(cluster, "retry", "curate"), "Completed")
    first = stage_job(cluster, "retry", "pretrain")
    finish(cluster, first, "Failed")
    second = stage_job(cluster, "retry", "pretrain", attempt=2)
    assert second["metadata"]["name"] != first["metadata"]["name"]
    # same command line, so the same output URI: `dinoforge pretrain` resumes its newest checkpoint
    assert command(second) == command(first).replace(first["metadata"]["name"], second["metadata"]["name"])
    assert get(cluster, "retry")["status"]["stages"]["pretrain"]["attempts"] == 2
    finish(cluster, second, "Completed")
    finish(cluster, stage_job(cluster, "retry", "evaluate"), "Completed")
    body = wait_for("Succeeded", phase_is(cluster, "retry", "Succeeded"))
    assert body["status"]["stages"]["pretrain"] | {"job": "-"} == {
        "job": "-", "phase": "Succeeded", "attempts": 2, "output": f"{out}/pretrain"}
    assert body["status"]["progress"] == "3/3 stages"
    ran.add("retry")


def test_a_stage_out_of_retries_fails_the_pipeline_naming_the_stage(cluster, tmp_path):
    cluster.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, pipeline(
        "doomed", str(tmp_path), retries=2, curate={"weights": "s3://w.pth", "n": 5, "retries": 0}))
    finish(cluster, stage_job(cluster, "doomed", "curate"), "Failed")
    status = wait_for("Failed", phase_is(cluster, "doomed", "Failed"))["status"]
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "CurateFailed")
    assert "stage curate failed 1 time(s), retry budget 0 spent" in ready["message"]
    assert status["stages"]["curate"]["phase"] == "Failed" and status["progress"] == "0/3 stages"
    time.sleep(0.5)  # a few timer ticks: no new job for a failed pipeline
    assert len(jobs_of(cluster, "doomed")) == 1
    ran.add("exhausted")


@pytest.mark.parametrize("name, change, field", [
    ("bad-preset", {"pretrain": {"preset": "no_such_preset"}}, "spec.pretrain.preset"),
    ("bad-override", {"pretrain": {"preset": "smoke", "overrides": ["optim.no_such_key=1"]}}, "spec.pretrain.overrides"),
    ("negative-nnodes", {"resources": {"nnodes": -2}}, "spec.resources.nnodes"),
    ("no-pool", {"pool": ""}, "spec.pool"),
    ("bad-student", {"distill": {"preset": "smoke_distill", "student": "vit_colossal"}}, "spec.distill.student"),
    ("bad-protocol", {"evaluate": {"protocols": "knn,astrology"}}, "spec.evaluate"),
])
def test_an_invalid_pipeline_is_marked_invalid_naming_the_field(cluster, tmp_path, name, change, field):
    cluster.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, pipeline(name, str(tmp_path), **change))
    status = wait_for("Invalid", phase_is(cluster, name, "Invalid"))["status"]
    assert status["message"].startswith(f"{field}: "), status["message"]
    assert status["conditions"][0]["reason"] == "InvalidSpec" and not jobs_of(cluster, name)
    ran.add("invalid")


def test_deleting_a_pipeline_deletes_its_jobs(cluster, tmp_path):
    cluster.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, pipeline("gone", str(tmp_path), retries=3))
    finish(cluster, stage_job(cluster, "gone", "curate"), "Completed")
    finish(cluster, stage_job(cluster, "gone", "pretrain"), "Failed")
    stage_job(cluster, "gone", "pretrain", attempt=2)
    assert len(jobs_of(cluster, "gone")) == 3
    assert "dinoforge.io/stage-jobs" in get(cluster, "gone")["metadata"]["finalizers"]
    cluster.delete_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "gone")

    def gone():
        try:
            left["body"] = get(cluster, "gone")
        except ApiException as error:
            return error.status == 404
    left = {}
    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline, f"the pipeline is still there: {left['body']['metadata']}"
        time.sleep(0.05)
    assert jobs_of(cluster, "gone") == []
    if "happy" in ran:
        assert len(jobs_of(cluster, "full")) == 5  # another pipeline's jobs stay
    ran.add("delete")


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    """A (Cluster)Role's rules as (apiGroup, resource, verb) triples, as RecordingAPI records calls."""
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_chart_grants_exactly_what_the_operator_called(cluster, emulator):
    if ran != SCENARIOS:
        pytest.skip(f"needs the scenarios above in the same run (missing: {sorted(SCENARIOS - ran)})")
    (role,) = [doc for doc in render() if doc["kind"] == "ClusterRole"]
    granted = rules_of(role)
    called = set(emulator["api"].calls)
    assert called == granted, {"granted, never called": granted - called, "called, not granted": called - granted}

