"""The operator under load (issue 20): 50 DinoPipelines created at once on kmock's emulated API
server, the operator (``dinoforge operator``, a real process running the kopf handlers) killed
with SIGKILL and later stopped with SIGTERM mid-way and started again each time, while this
test plays Volcano's job controller (every job it sees completes, or fails where a pipeline's
scenario says so, after a random delay). The emulated API server answers each job create a second
after storing the job, and each restart lands while such an answer is pending: the window in
which a restarted operator could start a stage twice.

Every pipeline must end in its expected phase with exactly the jobs its scenario implies, one
per (stage, attempt): zero duplicates, none missing; the figures (time to converge, API calls by
verb) are printed and go to the terminal summary."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes.client import CustomObjectsApi
from kubernetes.config import new_client_from_config

from conftest import report_figures
from test_operator import GROUP, JOBS, OPERATOR_TOKEN, PLURAL, VERSION, emulated_api_server, kubeconfig, pipeline

N_PIPELINES = 50
INTERVAL_S = 0.5  # the operator's timer period (DINOFORGE_OPERATOR_INTERVAL)
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds (the operator chart keeps it)
CREATE_LATENCY_S, MARGIN_S = 1.0, 0.3  # the emulator answers a job's creator this long after storing it
# scenario -> (final phase, the (stage, attempt) jobs it must have, the spec changes)
SCENARIOS = {
    "happy": ("Succeeded", {("curate", 1), ("pretrain", 1), ("evaluate", 1)}, {}),
    "retry": ("Succeeded", {("curate", 1), ("pretrain", 1), ("pretrain", 2), ("evaluate", 1)}, {"retries": 1}),
    "highres": ("Succeeded", {("curate", 1), ("pretrain", 1), ("highres", 1), ("evaluate", 1)},
                {"highRes": {"preset": "smoke_highres", "maxSteps": 5}}),
    "exhausted": ("Failed", {("curate", 1)}, {"curate": {"weights": "s3://w.pth", "n": 5, "retries": 0}}),
    "invalid": ("Invalid", set(), {"pretrain": {"preset": "no_such_preset"}}),
}
MIX = ["happy"] * 25 + ["retry"] * 10 + ["highres"] * 5 + ["exhausted"] * 5 + ["invalid"] * 5


class Volcano(threading.Thread):
    """Sets each stage job's ``status.state.phase`` a random 0.2-1.5 s after it appears: Failed
    for the first pretrain attempt of a ``retry`` pipeline and for an ``exhausted`` pipeline's
    curate job, else Completed."""

    def __init__(self, api: CustomObjectsApi, scenario_of: dict[str, str], seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.api, self.scenario_of, self.random = api, scenario_of, random.Random(seed)
        self.seen: dict[str, float] = {}
        self.jobs: list[dict] = []
        self.stop = threading.Event()

    def outcome(self, labels: dict) -> str:
        scenario = self.scenario_of[labels["dinoforge.io/pipeline"]]
        stage, attempt = labels["dinoforge.io/stage"], labels["dinoforge.io/attempt"]
        if (scenario, stage, attempt) in (("retry", "pretrain", "1"), ("exhausted", "curate", "1")):
            return "Failed"
        return "Completed"

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.jobs = self.api.list_namespaced_custom_object(*JOBS[:2], "ml", JOBS[2])["items"]
            now = time.monotonic()
            for job in self.jobs:
                name = job["metadata"]["name"]
                due = self.seen.setdefault(name, now + self.random.uniform(0.2, 1.5))
                if now >= due and not (job.get("status") or {}).get("state"):
                    phase = self.outcome(job["metadata"]["labels"])
                    self.api.patch_namespaced_custom_object_status(*JOBS[:2], "ml", JOBS[2], name,
                                                                   {"status": {"state": {"phase": phase}}})


def start_operator(folder: Path, url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig(folder / "operator", url, OPERATOR_TOKEN)),
           "DINOFORGE_OPERATOR_INTERVAL": str(INTERVAL_S), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen([sys.executable, "-m", "dinoforge.cli", "operator"], env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(operator: subprocess.Popen) -> dict:
    """What the kubelet does after its SIGTERM: waits the pod's grace period, then SIGKILLs."""
    begun = time.monotonic()
    try:
        operator.wait(GRACE_S)
        return {"stopped_s": round(time.monotonic() - begun, 1), "killed_after_grace": False}
    except subprocess.TimeoutExpired:
        os.killpg(operator.pid, signal.SIGKILL)
        operator.wait(30)
        return {"stopped_s": round(time.monotonic() - begun, 1), "killed_after_grace": True}


@pytest.mark.slow(seconds=680)
def test_fifty_pipelines_converge_through_two_operator_restarts_without_duplicate_jobs(tmp_path):
    rng = random.Random(20)
    scenarios = MIX[:]
    rng.shuffle(scenarios)
    scenario_of = {f"load-{i:02d}": scenario for i, scenario in enumerate(scenarios)}
    log = tmp_path / "operator.log"
    with emulated_api_server() as server:
        api = CustomObjectsApi(new_client_from_config(str(kubeconfig(tmp_path / "test", server["url"], "test"))))
        server["api"].job_create_latency = CREATE_LATENCY_S
        volcano = Volcano(api, scenario_of)
        operator = start_operator(tmp_path, server["url"], log)
        restarts: list[dict] = []
        try:
            started = time.monotonic()
            creates = [threading.Thread(target=api.create_namespaced_custom_object, args=(
                GROUP, VERSION, "ml", PLURAL, pipeline(name, str(tmp_path / name), **SCENARIOS[scenario][2])))
                for name, scenario in scenario_of.items()]
            for thread in creates:
                thread.start()
            for thread in creates:
                thread.join()
            volcano.start()
            expected_jobs = sum(len(SCENARIOS[s][1]) for s in scenario_of.values())
            # Restart mid-way: SIGKILL (a crash: no clean-up at all) once a third of the jobs exist,
            # SIGTERM (a rollout: kopf stops its handlers) at two thirds; each at a moment when the
            # API server has stored a job whose creator has not had the answer yet (and will not
            # for at least another MARGIN_S), the window where a restart could start a job twice.
            for fraction, sig in ((1 / 3, signal.SIGKILL), (2 / 3, signal.SIGTERM)):
                deadline = time.monotonic() + 240
                while True:
                    assert time.monotonic() < deadline, f"stuck at {len(volcano.jobs)} jobs: {log.read_text()[-3000:]}"
                    assert operator.poll() is None, log.read_text()[-3000:]
                    with server["api"].lock:
                        unanswered = [job for job, stored in server["api"].creating.items()
                                      if time.monotonic() - stored < CREATE_LATENCY_S - MARGIN_S]
                        if len(volcano.jobs) >= fraction * expected_jobs and unanswered:
                            os.killpg(operator.pid, sig)
                            break
                    time.sleep(0.01)
                restarts.append({"signal": sig.name, "after_s": round(time.monotonic() - started, 1),
                                 "jobs": len(volcano.jobs), "unanswered_creates": sorted(unanswered)})
                restarts[-1].update(stop(operator))
                operator = start_operator(tmp_path, server["url"], log)

            def phases() -> dict[str, str]:
                items = api.list_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL)["items"]
                return {item["metadata"]["name"]: (item.get("status") or {}).get("phase") for item in items}

            expected = {name: SCENARIOS[s][0] for name, s in scenario_of.items()}
            deadline = time.monotonic() + 300
            while (current := phases()) != expected:
                assert time.monotonic() < deadline, (
                    {n: (p, expected[n]) for n, p in current.items() if p != expected[n]}, log.read_text()[-3000:])
                assert operator.poll() is None, log.read_text()[-3000:]
                time.sleep(1.0)
            converged_s = time.monotonic() - started
            time.sleep(3 * INTERVAL_S)  # a few more timer ticks: nothing new may start
            jobs = api.list_namespaced_custom_object(*JOBS[:2], "ml", JOBS[2])["items"]
            bodies = {item["metadata"]["name"]: item for item in
                      api.list_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL)["items"]}
        finally:
            volcano.stop.set()
            if operator.poll() is None:
                os.killpg(operator.pid, signal.SIGTERM)
                stop(operator)
        calls = server["api"].counts

    per_pipeline = collections.defaultdict(list)
    for job in jobs:
        labels = job["metadata"]["labels"]
        key = (labels["dinoforge.io/stage"], int(labels["dinoforge.io/attempt"]))
        per_pipeline[labels["dinoforge.io/pipeline"]].append(key)
    duplicates = {name: [key for key, n in collections.Counter(keys).items() if n > 1]
                  for name, keys in per_pipeline.items()}
    duplicates = {name: keys for name, keys in duplicates.items() if keys}
    assert duplicates == {}, duplicates
    for name, scenario in scenario_of.items():
        assert set(per_pipeline.get(name, [])) == SCENARIOS[scenario][1], (name, scenario, per_pipeline.get(name))
        status = bodies[name]["status"]
        if scenario != "invalid":  # each stage's record counts its attempts: every job once
            attempts = collections.Counter(stage for stage, _ in SCENARIOS[scenario][1])
            recorded = {stage: record["attempts"] for stage, record in status["stages"].items() if record["attempts"]}
            assert recorded == attempts, (name, recorded)
    # A job whose creator was stopped before the answer came is taken over by the next operator
    # process (SIGKILL: nothing could finish), not created again.
    adopted = set(re.findall(r"adopting job (\S+):", log.read_text()))
    assert set(restarts[0]["unanswered_creates"]) <= adopted, (restarts[0], adopted)
    job_creates = sum(n for (verb, resource), n in calls.items() if (verb, resource) == ("create", "jobs"))
    assert job_creates == len(jobs) == expected_jobs

    by_verb = collections.Counter()
    for (verb, resource), n in calls.items():
        by_verb[f"{verb} {resource}"] += n
    figures = {
        "pipelines": N_PIPELINES, "scenarios": dict(collections.Counter(scenarios)), "operator_restarts": restarts,
        "converged_s": round(converged_s, 1), "jobs": len(jobs), "duplicate_jobs": 0, "adopted_jobs": sorted(adopted),
        "api_calls": sum(by_verb.values()), "api_calls_per_pipeline": round(sum(by_verb.values()) / N_PIPELINES, 1),
        "api_calls_by_verb": dict(sorted(by_verb.items())),
    }
    print("\n" + json.dumps(figures))
    report_figures("operator load (50 pipelines, 2 restarts)", figures)
