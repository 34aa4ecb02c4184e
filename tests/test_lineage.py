"""MLflow lineage (dinoforge.lineage): journal first, idempotent sync, a down server costs nothing."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # before mlflow is imported

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from mlflow.tracking import MlflowClient  # noqa: E402

from dinoforge.lineage import (  # noqa: E402
    RUN_KEY_TAG,
    SYNCED_TAG,
    Lineage,
    digest_uri,
    lineage_chain,
    pipeline_scope,
    read_journal,
    stage_lineage,
    sync_journal,
)
from object_store import free_port  # noqa: E402

CONFIG = {"model": {"arch": "vit_small", "patch_size": 14}, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "seed": 0}
LOSSES = [2.5, 2.1, 1.8, float("nan"), 1.5]


@pytest.fixture(autouse=True)
def lineage_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DINOFORGE_GIT_COMMIT", "0123abcd")
    monkeypatch.setenv("DINOFORGE_IMAGE", "dinoforge:test")
    monkeypatch.setenv("DINOFORGE_USER", "lineage-tester")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DINOFORGE_LINEAGE_PARENT", "DINOFORGE_LINEAGE_DIR",
                 "DINOFORGE_LINEAGE"):
        monkeypatch.delenv(name, raising=False)


def _unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _tiny_export(path: Path) -> str:
    """A real exported backbone (the smoke preset's architecture at random init): X.pth + X.json."""
    from dinoforge.config import load_config
    from dinoforge.export import export_random

    path.parent.mkdir(parents=True, exist_ok=True)
    export_random(load_config("smoke", []), str(path), seed=0)
    return str(path)


def run_chain(journal: str, files: Path, tracking_uri: str | None, experiment: str, model: str) -> dict:
    """A pipeline run and three stages: curate -> pretrain -> evaluate, with real files."""
    pool = _write(files / "pool.parquet", b"pool manifest")
    curated = _write(files / "curated.parquet", b"curated manifest")
    checkpoint = files / "checkpoints" / "step_00000005"
    _write(checkpoint / "model.distcp", b"shards")
    _write(checkpoint / "trainer.json", b'{"step": 5}')
    weights = _tiny_export(files / "teacher.pth")
    results = _write(files / "results.json", json.dumps({"knn_top1": 0.42}).encode())
    digests = {name: digest_uri(uri) for name, uri in
               {"pool": pool, "curated": curated, "checkpoint": str(checkpoint), "weights": weights, "results": results}.items()}
    common = {"tracking_uri": tracking_uri, "experiment": experiment}

    pipeline = Lineage(journal, "pipeline", run_name="smoke", **common)
    with Lineage(journal, "curate", parent=pipeline.key, **common) as curate:
        curate.input(pool, digests["pool"], name="pool", kind="manifest")
        curate.output(curated, digests["curated"], name="curated", kind="manifest")
    with Lineage(journal, "pretrain", parent=pipeline.key, **common) as pretrain:
        pretrain.params(CONFIG)
        pretrain.input(curated, digests["curated"], name="curated", kind="manifest")
        for step, loss in enumerate(LOSSES):
            pretrain.metrics({"loss": loss, "lr": 1e-3 * (step + 1)}, step=step)
        pretrain.output(str(checkpoint), digests["checkpoint"], name="checkpoint", kind="checkpoint")
        pretrain.output(weights, digests["weights"], name="teacher", kind="weights")
    with Lineage(journal, "evaluate", parent=pipeline.key, **common) as evaluate:
        evaluate.input(weights, digests["weights"], name="teacher", kind="weights")
        evaluate.register_model(weights, model, digest=digests["weights"], alias="current")
        evaluate.metrics({"knn_top1": 0.42})
        evaluate.output(results, digests["results"], name="results", kind="results")
        evaluate.artifact(results)
    pipeline.end()
    return {"pipeline": pipeline, "stages": [curate, pretrain, evaluate], "digests": digests, "weights": weights}


def check_chain(tracking_uri: str, experiment: str, model: str, chain: dict) -> MlflowClient:
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [pipeline_run] = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{chain['pipeline'].key}'")
    assert pipeline_run.info.run_name == "smoke" and pipeline_run.info.status == "FINISHED"

    stages = lineage_chain(tracking_uri, experiment, pipeline_run.info.run_id)
    assert [s["stage"] for s in stages] == ["curate", "pretrain", "evaluate"]
    assert all(s["status"] == "FINISHED" for s in stages)
    curate, pretrain, evaluate = stages
    digests = chain["digests"]
    files = Path(chain["weights"]).parent
    assert curate["inputs"] == [{"name": "pool", "uri": (files / "pool.parquet").as_uri(),  # absolute URIs
                                 "digest": digests["pool"], "kind": "manifest"}]
    assert curate["outputs"][0]["digest"] == pretrain["inputs"][0]["digest"] == digests["curated"]
    outputs = {o["kind"]: o for o in pretrain["outputs"]}
    assert outputs["checkpoint"]["digest"] == digests["checkpoint"]
    assert outputs["weights"]["digest"] == evaluate["inputs"][0]["digest"] == digests["weights"]
    assert evaluate["outputs"] == [{"name": "results", "uri": (files / "results.json").as_uri(),
                                    "digest": digests["results"], "kind": "results"}]
    assert [len(s["inputs"]) for s in stages] == [1, 1, 1]  # outputs are tags, never dataset inputs

    runs = {s["stage"]: client.get_run(s["run_id"]) for s in stages}
    for run in runs.values():
        assert run.data.tags["mlflow.parentRunId"] == pipeline_run.info.run_id
        assert run.data.tags["mlflow.source.git.commit"] == "0123abcd"
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.source.name"]
        assert run.data.tags["mlflow.user"] == "lineage-tester"
        assert run.data.tags["dinoforge.image"] == "dinoforge:test"
    pretrain_run = runs["pretrain"]
    assert pretrain_run.data.params["model.arch"] == "vit_small"
    assert pretrain_run.data.params["optim.betas"] == "[0.9, 0.999]"
    teacher = f"{Path(chain['weights']).as_uri()}@{digests['weights']}"
    assert pretrain_run.data.tags["dinoforge.output.weights.teacher"] == teacher
    history = client.get_metric_history(pretrain_run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(len(LOSSES)))
    assert [m.value for m in history][:3] == LOSSES[:3] and math.isnan(history[3].value)
    assert "results.json" in [a.path for a in client.list_artifacts(runs["evaluate"].info.run_id)]

    # The exported weights: a pyfunc MLflow Model, the evaluate run's model output, registered.
    [version] = client.search_model_versions(f"name = '{model}'")
    evaluate_run = runs["evaluate"]
    assert int(version.version) == 1
    assert version.run_id == evaluate_run.info.run_id
    [model_id] = evaluate["models"]  # the open-source registry keeps no model id on versions: their source
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == evaluate_run.info.run_id and version.source == logged.artifact_location
    assert int(client.get_model_version_by_alias(model, "current").version) == 1
    files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert {"MLmodel", "python_model.pkl"} <= files, files
    assert {a.path for a in client.list_logged_model_artifacts(model_id, "artifacts")} == \
        {"artifacts/teacher.pth", "artifacts/teacher.json"}
    return client


def test_chain_against_server_and_replays(mlflow_server, tmp_path):
    experiment, model = _unique("chain"), _unique("teacher")
    journal = str(tmp_path / "lineage")
    chain = run_chain(journal, tmp_path / "files", mlflow_server, experiment, model)
    assert all(stage.run_id for stage in chain["stages"])
    client = check_chain(mlflow_server, experiment, model, chain)

    pretrain_id = chain["stages"][1].run_id
    evaluate_id = chain["stages"][2].run_id
    before = (len(client.get_metric_history(pretrain_id, "loss")), len(client.get_run(pretrain_id).inputs.dataset_inputs))
    for _ in range(2):
        counts = sync_journal(journal, mlflow_server)
        assert counts == {"runs": 4, "events_pushed": 0, "pending": 0}
    after = (len(client.get_metric_history(pretrain_id, "loss")), len(client.get_run(pretrain_id).inputs.dataset_inputs))
    assert after == before == (len(LOSSES), 1)  # curated in
    assert len(client.search_model_versions(f"name = '{model}'")) == 1
    events = read_journal(journal)[chain["stages"][2].key]
    assert client.get_run(evaluate_id).data.tags[SYNCED_TAG] == str(len(events))

    # A replay behind the counter (a crash before it was updated) adds no model, version, output or input.
    client.set_tag(evaluate_id, SYNCED_TAG, "1")
    assert sync_journal(journal, mlflow_server)["events_pushed"] == len(events) - 1
    assert len(client.search_model_versions(f"name = '{model}'")) == 1
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    assert len(client.search_logged_models([experiment_id])) == 1
    assert len(client.get_run(evaluate_id).outputs.model_outputs) == 1
    assert len(client.get_run(evaluate_id).inputs.dataset_inputs) == 1


def test_down_server_costs_nothing_then_sync(mlflow_server, tmp_path, caplog):
    experiment = _unique("down")
    journal = str(tmp_path / "lineage")
    results = _write(tmp_path / "results.json", b"{}")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="dinoforge.lineage"):
        with Lineage(journal, "pretrain", tracking_uri=f"http://127.0.0.1:{free_port()}", experiment=experiment,
                     sync_every_s=0) as lineage:
            lineage.params({"optim": {"lr": 0.1}, "long": "x" * 7000})
            for step in range(50):
                lineage.metrics({"loss": 1.0 / (step + 1), "grad_norm": math.inf}, step=step)
            lineage.input(results, digest_uri(results), name="curated", kind="manifest")
            lineage.output(results, digest_uri(results), name="checkpoint", kind="checkpoint")
            lineage.artifact(results)
            assert lineage.sync() is False
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"a down server cost {elapsed:.1f} s"
    assert len([r for r in caplog.records if "unreachable" in r.message]) == 1
    assert lineage.run_id is None

    [(key, events)] = read_journal(journal).items()
    assert key == lineage.key
    assert [e["type"] for e in events] == ["start", "params"] + ["metrics"] * 50 + ["input", "output", "artifact", "end"]

    counts = sync_journal(journal, mlflow_server)
    assert counts == {"runs": 1, "events_pushed": len(events), "pending": 0}
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.tags[RUN_KEY_TAG] == key and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 50
    assert run.data.metrics["grad_norm"] == sys.float_info.max  # MLflow's SQL store clamps infinities
    assert run.data.params["optim.lr"] == "0.1"
    long = run.data.params["long"]
    assert len(long) == 6000 and long.endswith("...[truncated 7000 chars]")
    assert len(run.inputs.dataset_inputs) == 1  # the output is a tag


def test_hanging_server_costs_one_timeout_per_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the user's setting wins over lineage's 5 s
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        started = time.perf_counter()
        with Lineage(str(tmp_path / "lineage"), "pretrain", tracking_uri=f"http://127.0.0.1:{silent.getsockname()[1]}",
                     sync_every_s=0) as lineage:
            for step in range(20):
                lineage.metrics({"loss": 1.0}, step=step)
        elapsed = time.perf_counter() - started
    assert 2 <= elapsed < 4, elapsed  # the first sync and the one at end(); the rest wait retry_every_s
    assert len(read_journal(str(tmp_path / "lineage"))[lineage.key]) == 22


def test_local_default_store(tmp_path, monkeypatch):
    """No tracking URI: a sqlite store beside the journal, artifacts beside it, nothing in the
    working directory and no environment variable changed."""
    experiment, model = _unique("local"), _unique("teacher")
    (tmp_path / "files").mkdir()
    monkeypatch.chdir(tmp_path / "files")
    environ = dict(os.environ)
    chain = run_chain(str(tmp_path / "lineage"), tmp_path / "files", None, experiment, model)
    assert dict(os.environ) == environ
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert chain["stages"][0].run_id is not None
    check_chain(store, experiment, model, chain)
    assert sync_journal(str(tmp_path / "lineage")) == {"runs": 4, "events_pushed": 0, "pending": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files", "lineage", "mlartifacts", "mlflow.db"]
    assert not [p for p in (tmp_path / "files").iterdir() if p.name.startswith(("mlruns", "mlflow"))]


def test_parent_synced_later_completes_its_bare_run(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pipeline = Lineage(str(tmp_path / "a"), "pipeline", run_name="smoke", tracking_uri=f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DINOFORGE_LINEAGE_PARENT", pipeline.key)
    with Lineage(str(tmp_path / "b"), "curate", tracking_uri=store) as curate:
        curate.metrics({"kept": 10.0})
    pipeline.end()
    client = MlflowClient(store, registry_uri=store)
    parent_id = client.get_run(curate.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).data.tags[RUN_KEY_TAG] == pipeline.key
    assert client.get_run(parent_id).info.status == "RUNNING"  # the bare run the child made

    assert sync_journal(str(tmp_path / "a"), store) == {"runs": 1, "events_pushed": 2, "pending": 0}
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "smoke" and parent.info.status == "FINISHED"
    assert parent.data.tags["dinoforge.stage"] == "pipeline"


def test_journal_on_object_store(mlflow_server, s3_prefix, tmp_path):
    experiment, model = _unique("s3"), _unique("teacher")
    journal = f"{s3_prefix}/lineage"
    chain = run_chain(journal, tmp_path / "files", f"http://127.0.0.1:{free_port()}", experiment, model)
    fs, path = fsspec.core.url_to_fs(journal)
    assert len(fs.ls(path)) == 4
    counts = sync_journal(journal, mlflow_server)
    assert counts["runs"] == 4 and counts["pending"] == 0
    assert counts["events_pushed"] == sum(len(events) for events in read_journal(journal).values())
    check_chain(mlflow_server, experiment, model, chain)


def test_disabled_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFORGE_LINEAGE", "off")
    lineage = Lineage(str(tmp_path / "lineage"), "pretrain")
    lineage.metrics({"loss": 1.0}, step=0)
    lineage.end()
    assert lineage.sync() and not list(tmp_path.iterdir())


def test_stage_lineage_uses_the_pipeline_journal_and_parent(tmp_path, monkeypatch):
    down = f"http://127.0.0.1:{free_port()}"
    alone = stage_lineage("evaluate", str(tmp_path / "eval"), tracking_uri=down)
    assert list(read_journal(str(tmp_path / "eval" / "lineage"))) == [alone.key]
    monkeypatch.chdir(tmp_path)
    assert not stage_lineage("evaluate", None, tracking_uri=down).enabled  # writes nothing: no lineage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    monkeypatch.setenv("DINOFORGE_LINEAGE_DIR", str(tmp_path / "pipeline"))
    assert stage_lineage("evaluate", None, tracking_uri=down).enabled  # inside a pipeline: its journal
    monkeypatch.setenv("DINOFORGE_LINEAGE_PARENT", "feedface")
    staged = stage_lineage("curate", str(tmp_path / "curate"), tracking_uri=down)
    [start] = read_journal(str(tmp_path / "pipeline"))[staged.key]
    assert start["parent"] == "feedface" and start["tags"]["dinoforge.stage"] == "curate"
    with pytest.raises(ValueError, match="reserved"):
        staged.register_model(str(tmp_path / "w.pth"), "teacher", digest="sha256:0", alias="latest")


def test_digest_uri(tmp_path):
    _write(tmp_path / "d" / "a.bin", b"a")
    _write(tmp_path / "d" / "sub" / "b.bin", b"b" * (9 << 20))  # more than one read chunk
    first = digest_uri(str(tmp_path / "d"))
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert digest_uri(f"file://{tmp_path / 'd'}") == first
    (tmp_path / "d" / "a.bin").write_bytes(b"A")
    assert digest_uri(str(tmp_path / "d")) != first
    assert digest_uri(str(tmp_path / "d" / "a.bin")) == \
        "sha256:559aead08264d5795d3909718cdd05abd49572e84fe55590eef31a88a08fdffd"


def test_two_pipelines_in_one_process_do_not_interfere(mlflow_server, tmp_path):
    """Two pipelines record and sync from two threads at once (as the operator's handlers do), one
    to a server, one to a local store: each stage finds its own pipeline's parent and journal,
    each store holds only its own runs with their own metrics, and no environment variable changes."""
    stores = {"a": mlflow_server, "b": f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"}
    experiment = _unique("parallel")
    together = threading.Barrier(len(stores))
    environ = dict(os.environ)

    def pipeline(name: str) -> tuple[str, list[str]]:
        journal, common = str(tmp_path / name / "lineage"), {"tracking_uri": stores[name], "experiment": experiment}
        parent = Lineage(journal, "pipeline", run_name=f"pipeline-{name}", sync_every_s=0, **common)
        children = []
        with parent, pipeline_scope(parent):
            for stage in ("curate", "pretrain", "export"):
                together.wait(timeout=120)  # every stage starts and syncs alongside the other pipeline's
                with stage_lineage(stage, None, sync_every_s=0, **common) as lineage:
                    lineage.params({"pipeline": name})
                    for step in range(5):
                        lineage.metrics({"loss": ord(name) + step}, step=step)
                children.append(lineage.key)
        return parent.key, children

    with ThreadPoolExecutor(len(stores)) as pool:
        keys = dict(zip(stores, pool.map(pipeline, stores)))
    assert dict(os.environ) == environ
    for name, uri in stores.items():
        parent_key, child_keys = keys[name]
        assert set(read_journal(str(tmp_path / name / "lineage"))) == {parent_key, *child_keys}
        client = MlflowClient(uri, registry_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        by_key = {run.data.tags[RUN_KEY_TAG]: run for run in runs}
        assert set(by_key) == {parent_key, *child_keys}  # nothing of the other pipeline
        parent_id = by_key[parent_key].info.run_id
        for key in child_keys:
            run = by_key[key]
            assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.params == {"pipeline": name}
            history = client.get_metric_history(run.info.run_id, "loss")
            assert [m.value for m in history] == [ord(name) + step for step in range(5)]
            assert run.info.status == "FINISHED"
