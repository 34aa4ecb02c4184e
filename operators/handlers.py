"""The DinoPipeline operator's kopf handlers (``kopf run -m dinoforge.operators.handlers``, or
``dinoforge operator``).

- create/resume: the spec is checked (operators/plan.py builds every stage's job up front), an
  invalid one gets phase Invalid and a message naming the field; else a pipeline lineage run is
  opened and the first stage's Volcano Job created.
- a timer on every DinoPipeline (every ``DINOFORGE_OPERATOR_INTERVAL`` seconds, default 10)
  reads the current stage job's ``status.state.phase``: Completed starts the next stage (or ends
  the pipeline Succeeded); Failed/Aborted/Terminated re-creates the stage's job as attempt+1
  while the stage's retry budget lasts (the stage resumes from its newest checkpoint under the
  same output URI), else the pipeline is Failed with a condition naming the stage.
- delete: kopf's finalizer (``dinoforge.io/stage-jobs``) holds the DinoPipeline until every job
  labelled with it is deleted explicitly (owner references are set too, for clusters whose
  garbage collector would do it).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Mapping

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dinoforge.operators.plan import InvalidSpec, Stage, job_body, join, plan

GROUP, VERSION, PLURAL = "dinoforge.io", "v1alpha1", "dinopipelines"
JOBS = ("batch.volcano.sh", "v1alpha1", "jobs")
PIPELINE_LABEL, STAGE_LABEL, ATTEMPT_LABEL = "dinoforge.io/pipeline", "dinoforge.io/stage", "dinoforge.io/attempt"
FINALIZER = "dinoforge.io/stage-jobs"
INTERVAL = float(os.environ.get("DINOFORGE_OPERATOR_INTERVAL", "10"))
DONE, FAILED = {"Completed"}, {"Failed", "Aborted", "Terminated"}  # Volcano Job phases

log = logging.getLogger("dinoforge.operator")
_api: client.CustomObjectsApi | None = None
_lineages: dict[str, Any] = {}  # pipeline uid -> its open lineage.Lineage


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _api
    settings.peering.standalone = True  # one replica (the chart's Deployment): no peering resources
    settings.persistence.finalizer = FINALIZER
    # The chart installs the CRD before the operator starts: no watching CRDs (or namespaces) for changes.
    settings.scanning.disabled = True
    # No Kubernetes Events: the status (phase, stages, conditions) and the log say it all, and the
    # ClusterRole stays smaller.
    settings.posting.enabled = False
    # On deletion kopf waits for a running timer tick (a sync call, not cancellable) before the
    # finalizer goes: wait for it in place for up to 5 s, then re-check every 5 s (not kopf's 60).
    settings.background.instant_exit_timeout = 5.0
    settings.background.cancellation_polling = 5.0
    try:  # like kopf's own login: the pod's service account, else KUBECONFIG (or ~/.kube/config)
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
    _api = client.CustomObjectsApi()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own readers of the pod's service account, else of KUBECONFIG at start-up (its
    default login through the kubernetes library reads KUBECONFIG when that library is imported)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def api() -> client.CustomObjectsApi:
    assert _api is not None, "the startup handler has not run"
    return _api


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(status: Mapping[str, Any], kind: str, value: bool, reason: str, message: str) -> list[dict]:
    """``status.conditions`` with the condition ``kind`` set (its transition time kept when the
    value does not change)."""
    conditions = [dict(c) for c in status.get("conditions") or []]
    text = "True" if value else "False"
    for entry in conditions:
        if entry["type"] == kind:
            if entry["status"] != text:
                entry["lastTransitionTime"] = now()
            entry.update(status=text, reason=reason, message=message)
            return conditions
    return conditions + [{"type": kind, "status": text, "reason": reason, "message": message,
                          "lastTransitionTime": now()}]


def progress(stages: Mapping[str, Mapping[str, Any]]) -> str:
    done = sum(1 for s in stages.values() if s.get("phase") == "Succeeded")
    return f"{done}/{len(stages)} stages"


# ----------------------------------------------------------------------------- lineage
def open_lineage(spec: Mapping[str, Any], name: str, uid: str, stages: list[Stage]) -> str:
    """The pipeline's MLflow parent run (journal ``<output>/lineage``, as ``dinoforge pipeline``
    keeps it); its key goes to every stage as DINOFORGE_LINEAGE_PARENT. An unreachable tracking
    server costs one warning: lineage.Lineage never raises on sync failures."""
    from dinoforge.lineage import Lineage

    mlflow = spec.get("mlflow") or {}
    parent = Lineage(join(spec["output"], "lineage"), "pipeline", run_name=f"pipeline-{name}",
                     tracking_uri=mlflow.get("trackingUri") or None, experiment=mlflow.get("experiment") or None,
                     tags={"dinoforge.pipeline": name})
    parent.params({"pool": spec["pool"], "output": spec["output"], "stages": ",".join(s.name for s in stages)})
    _lineages[uid] = parent
    return parent.key


def close_lineage(uid: str, status: str) -> None:
    """Ends the parent run this process opened (one opened by an earlier operator process stays
    open in the journal until ``dinoforge lineage sync``)."""
    parent = _lineages.pop(uid, None)
    if parent is not None:
        parent.end(status)


# ----------------------------------------------------------------------------- jobs
def labelled_jobs(namespace: str, labels: Mapping[str, str]) -> list[dict]:
    """The Volcano Jobs in ``namespace`` carrying all of ``labels``."""
    selector = ",".join(f"{key}={value}" for key, value in labels.items())
    listed = api().list_namespaced_custom_object(*JOBS[:2], namespace, JOBS[2], label_selector=selector)["items"]
    # filtered here too: a real API server applies the selector, the test emulator does not
    return [job for job in listed if labels.items() <= (job["metadata"].get("labels") or {}).items()]


def find_job(name: str, namespace: str, stage: str, attempt: int) -> dict | None:
    """The job of ``stage``'s ``attempt`` of pipeline ``name``, if one exists."""
    found = labelled_jobs(namespace, {PIPELINE_LABEL: name, STAGE_LABEL: stage, ATTEMPT_LABEL: str(attempt)})
    return found[0] if found else None


def create_job(stage: Stage, attempt: int, spec: Mapping[str, Any], body: Mapping[str, Any]) -> str:
    """Creates the stage's Volcano Job for ``attempt`` unless one exists already (a handler
    retried after the create but before its status patch); returns its name."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    existing = find_job(name, namespace, stage.name, attempt)
    if existing:
        log.info("[%s/%s] adopting job %s: stage %s attempt %d was created before (by a handler that was retried "
                 "or an operator process that stopped)", namespace, name, existing["metadata"]["name"], stage.name,
                 attempt)
        return existing["metadata"]["name"]
    job = job_body(stage, attempt, spec, namespace)
    job["metadata"].setdefault("labels", {}).update(
        {PIPELINE_LABEL: name, STAGE_LABEL: stage.name, ATTEMPT_LABEL: str(attempt)})
    kopf.append_owner_reference(job, owner=body)
    created = api().create_namespaced_custom_object(*JOBS[:2], namespace, JOBS[2], job)
    return created["metadata"]["name"]


def lineage_parent_of(job: Mapping[str, Any]) -> str:
    """The DINOFORGE_LINEAGE_PARENT a stage job was given."""
    for task in job["spec"]["tasks"]:
        for container in task["template"]["spec"]["containers"]:
            for var in container.get("env") or []:
                if var["name"] == "DINOFORGE_LINEAGE_PARENT":
                    return var["value"]
    return ""


def job_phase(namespace: str, job: str) -> str | None:
    """The Volcano Job's ``status.state.phase`` (None before the controller sets it); "Missing"
    when the job is gone."""
    try:
        found = api().get_namespaced_custom_object(*JOBS[:2], namespace, JOBS[2], job)
    except ApiException as error:
        if error.status == 404:
            return "Missing"
        raise
    return ((found.get("status") or {}).get("state") or {}).get("phase")


def start_stage(stages: list[Stage], index: int, attempt: int, spec: Mapping[str, Any], body: Mapping[str, Any],
                status: dict) -> None:
    stage = stages[index]
    job = create_job(stage, attempt, spec, body)
    status["stages"][stage.name] = {"job": job, "phase": "Running", "attempts": attempt, "output": stage.output}
    status.update(phase="Running", stage=stage.name, progress=progress(status["stages"]))
    status["conditions"] = condition(status, "Ready", False, "StageRunning",
                                     f"stage {stage.name}, attempt {attempt}: job {job}")


# ----------------------------------------------------------------------------- handlers
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
def start(spec: Mapping[str, Any], name: str, uid: str, body: Mapping[str, Any], status: Mapping[str, Any],
          patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    if status.get("phase") or status.get("lineageParent"):  # resumed: the timer carries on from the status
        return
    try:
        stages = plan(spec, name)
        for stage in stages:  # every job is built (and its dinoforge arguments parsed) before any starts
            job_body(stage, 1, spec, body["metadata"]["namespace"])
    except InvalidSpec as error:
        logger.error("invalid DinoPipeline: %s", error)
        patch.status.update(phase="Invalid", message=str(error), progress="0/0 stages",
                            conditions=condition(status, "Ready", False, "InvalidSpec", str(error)))
        return
    # A first job already there: this handler ran before, but its status patch was lost (or not
    # seen yet); carry on with that job's lineage parent rather than open a second one.
    first = find_job(name, body["metadata"]["namespace"], stages[0].name, 1)
    parent = lineage_parent_of(first) if first else open_lineage(spec, name, uid, stages)
    stages = plan(spec, name, parent)
    new = {"stages": {s.name: {"phase": "Pending", "attempts": 0, "output": s.output} for s in stages},
           "lineageParent": parent, "conditions": []}
    start_stage(stages, 0, 1, spec, body, new)
    patch.status.update(new)


@kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL)
def advance(spec: Mapping[str, Any], name: str, namespace: str, uid: str, body: Mapping[str, Any],
            status: Mapping[str, Any], patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    if status.get("phase") != "Running":
        return
    current = status["stage"]
    record = status["stages"][current]
    phase = job_phase(namespace, record["job"])
    if phase not in DONE | FAILED | {"Missing"}:
        return
    # Planned only now: plan() loads every stage's preset, too much CPU for each tick of every pipeline.
    stages = plan(spec, name, status.get("lineageParent", ""))
    index = [s.name for s in stages].index(current)
    new = {"stages": {k: dict(v) for k, v in status["stages"].items()}, "conditions": status.get("conditions") or []}
    if phase in DONE:
        new["stages"][current]["phase"] = "Succeeded"
        logger.info("stage %s succeeded (job %s)", current, record["job"])
        if index + 1 < len(stages):
            start_stage(stages, index + 1, 1, spec, body, new)
        else:
            new.update(phase="Succeeded", progress=progress(new["stages"]))
            new["conditions"] = condition(new, "Ready", True, "Succeeded", f"all {len(stages)} stages succeeded")
            close_lineage(uid, "FINISHED")
    elif record["attempts"] <= stages[index].retries:
        logger.warning("stage %s job %s is %s; retrying (attempt %d of %d)", current, record["job"], phase,
                       record["attempts"] + 1, stages[index].retries + 1)
        start_stage(stages, index, record["attempts"] + 1, spec, body, new)
    else:
        message = (f"stage {current} failed {record['attempts']} time(s), retry budget "
                   f"{stages[index].retries} spent (last job {record['job']}: {phase})")
        new["stages"][current]["phase"] = "Failed"
        new.update(phase="Failed", message=message, progress=progress(new["stages"]))
        new["conditions"] = condition(new, "Ready", False, f"{current.capitalize()}Failed", message)
        logger.error("%s", message)
        close_lineage(uid, "FAILED")
    patch.status.update(new)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def delete_jobs(name: str, namespace: str, uid: str, logger: logging.Logger, **_: Any) -> None:
    for job in labelled_jobs(namespace, {PIPELINE_LABEL: name}):
        try:
            api().delete_namespaced_custom_object(*JOBS[:2], namespace, JOBS[2], job["metadata"]["name"])
        except ApiException as error:
            if error.status != 404:
                raise
        logger.info("deleted job %s", job["metadata"]["name"])
    close_lineage(uid, "KILLED")


