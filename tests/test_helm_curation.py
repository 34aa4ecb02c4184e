"""The helm/dinov2-curation chart: ``helm lint --strict`` and every rendered object checked by
kubernetes-validate (strict) at the oldest and newest Kubernetes versions we support, for the
defaults and every example; what the objects do (sharding, security, secrets, metrics, GPUs);
the worker script run with stand-in commands and, end to end, with the real dinoforge CLI on
local storage; the chart's two helper scripts run for real; bad values rejected naming the
value; every value typed, described and documented.

No cluster here: nothing is applied to an API server and no image is pulled (see the chart
README, "Tests"). helm comes from $DINOFORGE_HELM, else beside this Python (.venv/bin/helm,
which `scripts/setup.sh --test` installs), else PATH; without it these tests fail."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helm_chart import KUBE_VERSIONS, Chart, by_kind, env_of, helm

CHART = Chart("dinov2-curation")
EXAMPLES = CHART.examples
BUILT_IN = {"ServiceAccount", "ConfigMap", "Job", "Pod", "NetworkPolicy"}
render, rejected = CHART.render, CHART.rejected


def job_of(docs: list[dict]) -> dict:
    (job,) = by_kind(docs, "Job")
    return job


def container(pod_spec: dict) -> dict:
    (only,) = pod_spec["containers"]
    return only


def worker_script(docs: list[dict]) -> str:
    command = container(job_of(docs)["spec"]["template"]["spec"])["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return command[2]


def test_strict_lint_with_defaults_and_every_example():
    assert EXAMPLES, "no examples"
    for values in (None, *EXAMPLES):
        CHART.lint_strict(values)


@pytest.mark.parametrize("values", [None, *EXAMPLES])
def test_every_rendered_object_is_valid_at_the_oldest_and_newest_kubernetes(values):
    for version in KUBE_VERSIONS:
        docs = render(values, kube_version=version)
        kinds = {doc["kind"] for doc in docs}
        assert {"ServiceAccount", "ConfigMap", "Job", "Pod"} <= kinds <= BUILT_IN | {"PodMonitor"}
        for doc in docs:
            if doc["kind"] in BUILT_IN:  # kubernetes-validate has no schemas for CRD kinds (PodMonitor below)
                kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_field_unknown_to_kubernetes():
    job = job_of(render())
    job["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContex"):
        kubernetes_validate.validate(job, KUBE_VERSIONS[0], strict=True)


def test_indexed_job_has_one_pod_per_shard_and_passes_the_index_as_rank():
    docs = render(None, "shards=7")
    spec = job_of(docs)["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 7, 7)
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    worker = container(spec["template"]["spec"])
    assert env_of(worker)["JOB_COMPLETION_INDEX"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    script = worker_script(docs)
    assert 'rank="${JOB_COMPLETION_INDEX:?' in script
    (embed,) = [line for line in script.splitlines() if " curate embed " in line]
    assert '--rank "$rank" --world 7' in embed
    assert "--out 's3://dinoforge/curation/teacher'" in embed
    # Only pod 0 goes on to wait and curate.
    lines = script.splitlines()
    gate = lines.index('if [ "$rank" != 0 ]; then exit 0; fi')
    assert "wait_for_embeddings.py --world 7" in lines[gate + 1] and lines[gate + 2].startswith("exec dinoforge curate run ")


FAKE_COMMAND = """#!/bin/sh
# Records its name and arguments, one JSON list per call.
exec "{python}" -c 'import json, os, sys; open(os.environ["CALLS"], "a").write(json.dumps(sys.argv[1:]) + "\\n")' "$(basename "$0")" "$@"
"""


def run_worker(script: str, index: str, tmp_path: Path) -> list[list[str]]:
    """Runs the worker script under sh with stand-in ``dinoforge`` and ``python3`` commands that
    record their arguments; returns the calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / f"calls-{index}.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for name in ("dinoforge", "python3"):
        (bin_dir / name).write_text(FAKE_COMMAND.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "CALLS": str(calls), "JOB_COMPLETION_INDEX": index}
    result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]


def test_worker_script_embeds_every_set_and_pod_zero_waits_then_curates(tmp_path):
    # URIs with a quote, spaces and a $ reach dinoforge verbatim.
    odd = "s3://b/it's a \"pool\" $HOME.parquet"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"shards": 3, "curation": {
        "pool": odd, "weights": "s3://b/w.pth", "out": "s3://b/cur/", "evalManifest": "s3://b/eval.parquet",
        "seeds": "s3://b/seeds.parquet", "sampleSize": 500, "levels": [40, 6], "device": "cuda", "verbose": True}}))
    script = worker_script(render(str(values)))
    shared = ["--rank", "2", "--world", "3", "--weights", "s3://b/w.pth", "--chunk-rows", "4096", "--batch-size", "256",
              "--device", "cuda"]
    assert run_worker(script, "2", tmp_path) == [
        ["dinoforge", "-v", "curate", "embed", odd, "--out", "s3://b/cur/", *shared],
        ["dinoforge", "-v", "curate", "embed", "s3://b/eval.parquet", "--out", "s3://b/cur/eval", *shared],
        ["dinoforge", "-v", "curate", "embed", "s3://b/seeds.parquet", "--out", "s3://b/cur/seeds", *shared],
    ]
    calls = run_worker(script, "0", tmp_path)
    assert [call[:4] for call in calls[:3]] == [["dinoforge", "-v", "curate", "embed"]] * 3
    assert calls[3] == ["python3", "/opt/dinov2-curation/wait_for_embeddings.py", "--world", "3", "--poll-seconds", "30",
                        "--stall-seconds", "1800", "s3://b/cur/", "s3://b/cur/eval", "s3://b/cur/seeds"]
    assert calls[4] == ["dinoforge", "-v", "curate", "run", odd, "--out", "s3://b/cur/", "--weights", "s3://b/w.pth",
                        "--chunk-rows", "4096", "--batch-size", "256", "--device", "cuda", "--n", "500", "--dedup", "copy",
                        "--eval-manifest", "s3://b/eval.parquet", "--seeds", "s3://b/seeds.parquet", "--retrieve", "exact",
                        "--k", "4", "--per-cluster", "10000", "--levels", "40", "6", "--resampling-steps", "10", "--seed", "0"]
    assert len(calls) == 5


def test_worker_command_lines_parse_with_the_dinoforge_cli(tmp_path):
    """The flags the chart writes exist in the dinoforge CLI (its own argparse parser)."""
    from dinoforge.cli import build_parser

    docs = render("gpu-s3.yaml")
    for index in ("0", "1"):
        for call in run_worker(worker_script(docs), index, tmp_path):
            if call[0] == "dinoforge":
                build_parser().parse_args(call[1:])


def test_pods_run_as_non_root_with_a_read_only_root_and_no_api_access():
    docs = render()
    (account,) = by_kind(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & {doc["kind"] for doc in docs}
    pod_specs = [job_of(docs)["spec"]["template"]["spec"], by_kind(docs, "Pod")[0]["spec"]]
    for spec in pod_specs:
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == account["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        worker = container(spec)
        assert worker["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}}
        # Writable scratch for what the image writes: /tmp (HOME) and caches.
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in worker["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/cache"]]
        env = env_of(worker)
        assert env["HOME"] == "/tmp" and env["MPLCONFIGDIR"].startswith("/cache/") and env["TORCH_HOME"].startswith("/cache/")


def test_object_store_secret_endpoint_and_mount():
    assert "envFrom" not in container(job_of(render())["spec"]["template"]["spec"])  # defaults: no secret
    docs = render("cpu-minimal.yaml")
    for spec in (job_of(docs)["spec"]["template"]["spec"], by_kind(docs, "Pod")[0]["spec"]):
        worker = container(spec)
        assert worker["envFrom"] == [{"secretRef": {"name": "minio-creds"}}]
        assert env_of(worker)["AWS_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
    spec = job_of(render("gcs-retrieval.yaml"))["spec"]["template"]["spec"]
    worker = container(spec)
    assert "envFrom" not in worker  # secretAsEnv: false
    (mount,) = [m for m in worker["volumeMounts"] if m["name"] == "object-store-secret"]
    assert mount == {"name": "object-store-secret", "mountPath": "/var/run/secrets/gcs", "readOnly": True}
    assert {"name": "object-store-secret", "secret": {"secretName": "gcs-key", "defaultMode": 0o440}} in spec["volumes"]
    assert env_of(worker)["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/run/secrets/gcs/key.json"


def test_prometheus_annotations_name_the_metrics_port():
    template = job_of(render(None, "metrics.port=9500"))["spec"]["template"]
    worker = container(template["spec"])
    assert worker["ports"] == [{"name": "metrics", "containerPort": 9500, "protocol": "TCP"}]
    assert env_of(worker)["DINOFORGE_METRICS_PORT"] == "9500"
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9500",
                                                   "prometheus.io/path": "/metrics"}
    off = job_of(render("gcs-retrieval.yaml"))["spec"]["template"]  # metrics.port: 0
    assert "annotations" not in off["metadata"] and "ports" not in container(off["spec"])
    assert env_of(container(off["spec"]))["DINOFORGE_METRICS_PORT"] == "0"


def test_gpu_example_requests_a_gpu_on_tainted_gpu_nodes_with_mlflow_and_a_podmonitor():
    docs = render("gpu-s3.yaml")
    template = job_of(docs)["spec"]["template"]
    spec, worker = template["spec"], container(template["spec"])
    assert worker["resources"]["limits"] == {"memory": "96Gi", "nvidia.com/gpu": 1}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["priorityClassName"] == "batch-high"
    env = env_of(worker)
    assert (env["MLFLOW_TRACKING_URI"], env["MLFLOW_EXPERIMENT_NAME"]) == ("http://mlflow.mlflow.svc:5000", "curation")
    assert (env["DINOFORGE_JOB"], env["DINOFORGE_STAGE"]) == ("dinov2-curation", "curate")
    # The PodMonitor (a CRD kind: checked here by hand, not by kubernetes-validate).
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                                       "honorLabels": True}]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert not selector.items() <= by_kind(docs, "Pod")[0]["metadata"]["labels"].items()  # not the test pod
    assert "PodMonitor" not in {doc["kind"] for doc in render()}  # off by default


def test_helm_test_hook_checks_storage_with_the_release_settings():
    docs = render("cpu-minimal.yaml")
    (pod,) = by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = container(pod["spec"])["command"]
    assert command == ["python3", "/opt/dinov2-curation/preflight.py", "--weights",
                       "s3://curation/run/curate/embedder/random_init.pth", "--out", "s3://curation/hash-2k",
                       "--manifest", "pool=s3://curation/run/data/pool.parquet"]
    assert "Pod" not in {doc["kind"] for doc in render(None, "test.enabled=false")}


def test_backoff_limit_per_index_needs_kubernetes_1_29():
    spec = job_of(render(None, "job.backoffLimitPerIndex=2"))["spec"]
    assert spec["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec
    kubernetes_validate.validate(job_of(render(None, "job.backoffLimitPerIndex=2")), KUBE_VERSIONS[-1], strict=True)
    result = helm("template", "x", str(CHART.path), "--kube-version", "1.28.0", "--set", "job.backoffLimitPerIndex=2")
    assert result.returncode != 0 and "job.backoffLimitPerIndex needs Kubernetes 1.29" in result.stderr


def test_long_release_names_leave_room_for_the_pod_hostname():
    name = job_of(render(None, release="a" * 53))["metadata"]["name"]
    assert len(name) <= 52 and not name.endswith("-")


@pytest.mark.parametrize("sets, file_values, named", [
    ((), {"curation": {"sampel": 3}}, "sampel"),  # misspelt key in a values file
    ((), {"shard": 4}, "shard"),
    (("shards=-1",), None, "/shards"),
    (("shards=0",), None, "/shards"),
    (("curation.dedupMethod=fuzzy",), None, "/curation/dedupMethod"),
    (("curation.retrieveMethod=hnsw",), None, "/curation/retrieveMethod"),
    (("gpu.count=2",), None, "/gpu/count"),
    (("curation.chunkRows=0",), None, "/curation/chunkRows"),
    (("metrics.port=70000",), None, "/metrics/port"),
    (("curation.pool=",), None, "/curation/pool"),
    (("image.pullPolicy=Sometimes",), None, "/image/pullPolicy"),
    ((), {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exist"}]}, "/tolerations/0/operator"),
    ((), {"resources": {"requets": {"cpu": "1"}}}, "requets"),
    (("curation.sampleSize=0",), None, "/curation/seeds"),  # nothing to output
    (("curation.sampleSize=-5",), None, "/curation/sampleSize"),
    (("objectStore.mountPath=/creds",), None, "/objectStore/secretName"),  # a mount of no Secret
])
def test_bad_values_are_rejected_naming_the_value(sets, file_values, named, tmp_path):
    assert named in CHART.rejected_values(tmp_path, file_values, *sets)


# --- the chart's helper scripts, as rendered into the ConfigMap, run on local storage ---

def chart_script(name: str, tmp_path: Path) -> Path:
    (config,) = by_kind(render(), "ConfigMap")
    path = tmp_path / name
    path.write_text(config["data"][name])
    assert config["data"][name] == (CHART.path / "files" / name).read_text()
    return path


def run_script(script: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout)


def write_embeddings(out: Path, num_chunks: int, present: list[int]) -> None:
    """meta.json only when absent (as `curate embed` writes it; rewriting it would race the
    waiter's read), then the chunks."""
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    meta = out / "embeddings" / "meta.json"
    if not meta.exists():
        meta.write_text(json.dumps({"num_chunks": num_chunks}))
    for chunk in present:
        (out / "embeddings" / f"chunk_{chunk:06d}.npz").write_bytes(b"chunk")


def test_wait_returns_once_the_other_shards_chunks_arrive(tmp_path):
    script = chart_script("wait_for_embeddings.py", tmp_path)
    pool, evals = tmp_path / "cur", tmp_path / "cur" / "eval"
    write_embeddings(pool, 4, [0, 2])
    write_embeddings(evals, 2, [0])
    started = time.monotonic()
    waiter = subprocess.Popen([sys.executable, str(script), "--world", "2", "--poll-seconds", "0.1",
                               "--stall-seconds", "20", f"file://{pool}", str(evals)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = waiter.stdout.readline()  # it has seen the chunks so far: now shard 1 delivers the rest
        assert "2 chunks to go" in first and "1 chunks to go" in first, first
        write_embeddings(pool, 4, [1])
        time.sleep(0.3)
        write_embeddings(pool, 4, [3])
        write_embeddings(evals, 2, [1])
        rest, errors = waiter.communicate(timeout=30)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, errors
    assert "all chunks present" in rest and time.monotonic() - started < 10


def test_wait_gives_up_after_a_stall_and_names_the_missing_chunks_and_shards(tmp_path):
    script = chart_script("wait_for_embeddings.py", tmp_path)
    write_embeddings(tmp_path / "cur", 6, [0, 1, 3, 4])
    result = run_script(script, "--world", "3", "--poll-seconds", "0.1", "--stall-seconds", "0.5", str(tmp_path / "cur"))
    assert result.returncode == 0, result.stderr
    assert "2 chunks missing (first: [2, 5]), of shards [2]" in result.stdout
    assert "curate run embeds the missing chunks in this pod" in result.stdout


def test_preflight_passes_on_readable_inputs_and_names_what_fails(tmp_path):
    from dinoforge.data.manifest import Manifest

    script = chart_script("preflight.py", tmp_path)
    pool = tmp_path / "pool.parquet"
    rows = [{"uri": f"file:///img/{i}.png", "size": 10, "sha256": "0" * 64, "width": 28, "height": 28} for i in range(5)]
    digest = Manifest.from_rows(rows).write(str(pool))
    (tmp_path / "w.pth").write_bytes(b"weights")
    (tmp_path / "w.json").write_text(json.dumps({"arch": "vit_nano", "embed_dim": 128}))
    out = tmp_path / "out"
    result = run_script(script, "--manifest", f"pool={pool}", "--weights", f"file://{tmp_path}/w.pth", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()[:-1]]
    assert lines[0] == {"check": "manifest pool", "uri": str(pool), "ok": True, "rows": 5, "digest": digest}
    assert lines[1]["ok"] and lines[1]["arch"] == "vit_nano"
    assert lines[2]["ok"] and list(out.iterdir()) == []  # the probe object is gone again
    assert lines[3] == {"progress": str(out), "state": "not started"}
    write_embeddings(out, 3, [0])
    assert json.loads(run_script(script, "--manifest", f"pool={pool}", "--weights", f"{tmp_path}/w.pth", "--out",
                                 str(out)).stdout.splitlines()[3])["chunks"] == 1

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"uri": ["x"]}), tmp_path / "plain.parquet")
    result = run_script(script, "--manifest", f"pool={tmp_path}/plain.parquet", "--manifest", f"eval={tmp_path}/none.parquet",
                        "--weights", f"{tmp_path}/missing.pth", "--out", str(out))
    assert result.returncode == 1
    failed = {line["check"]: line["error"] for line in map(json.loads, result.stdout.splitlines()[:-1]) if line.get("ok") is False}
    assert set(failed) == {"manifest pool", "manifest eval", "weights"}
    assert "not a dinoforge manifest" in failed["manifest pool"] and "FileNotFoundError" in failed["weights"]
    assert result.stdout.splitlines()[-1] == "preflight: 1 of 4 checks passed"


def test_pod_zero_alone_takes_over_a_missing_shard_and_curates_for_real(tmp_path):
    """The rendered worker script with the real dinoforge CLI on local storage, 2 shards: pod 0
    embeds its chunks, waits, gives up after the stall (pod 1 has not started), and `curate run`
    embeds pod 1's chunks itself and curates; pod 1, started late, finds its chunks done."""
    import numpy as np
    from PIL import Image

    from dinoforge.data.importers import import_images
    from dinoforge.data.manifest import Manifest
    from test_curation_embed import export_random_backbone

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # distinct noise images: no copies to remove
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    pool = str(tmp_path / "pool.parquet")
    import_images(str(images), labels_from_folders=False).manifest.write(pool)
    out = f"file://{tmp_path}/out"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"shards": 2, "curation": {
        "pool": pool, "weights": export_random_backbone(tmp_path / "w.pth", seed=1), "out": out, "sampleSize": 12,
        "dedupMethod": "hash", "levels": [6, 2], "chunkRows": 8, "batchSize": 8, "device": "cpu",
        "waitPollSeconds": 1, "waitStallSeconds": 2}}))
    docs = render(str(values))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, text in by_kind(docs, "ConfigMap")[0]["data"].items():
        (scripts / name).write_text(text)
    script = worker_script(docs).replace("/opt/dinov2-curation/", f"{scripts}/")
    bin_dir = tmp_path / "bin"  # the image's commands, from this environment
    bin_dir.mkdir()
    for name, command in (("dinoforge", f'"{sys.executable}" -m dinoforge.cli'), ("python3", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DINOFORGE_METRICS_PORT": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DINOFORGE_LINEAGE": "off"}

    def pod(index: int) -> tuple[str, list[dict]]:
        result = subprocess.run(["/bin/sh", "-c", script], env=env | {"JOB_COMPLETION_INDEX": str(index)},
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    stdout, summaries = pod(0)
    assert summaries[0]["num_chunks"] == 5 and summaries[0]["computed"] == [0, 2, 4]  # its own shard
    assert "2 chunks missing (first: [1, 3]), of shards [1]" in stdout
    assert "curate run embeds the missing chunks in this pod" in stdout
    (run_embed,) = [summary for summary in summaries if summary.get("step") == "embed"]
    assert run_embed["computed"] == [1, 3]
    assert len(Manifest.read(f"{out}/curated.parquet")) == 12
    _, late = pod(1)
    assert [(summary["rank"], summary["computed"], summary["already_done"]) for summary in late] == [(1, [], [1, 3])]


# --- every value typed, described and documented ---

def test_every_value_is_in_the_schema_typed_described_and_in_the_readme_table():
    CHART.check_values_documented(min_values=60)
