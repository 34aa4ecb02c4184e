"""The platform around the stages: a real Prometheus scraping a real training job, and the
MLflow lineage chain of a (small) local pipeline run on a real tracking server."""

import json
import os
import subprocess
import sys
import time

import pytest

from prometheus_server import free_port, prometheus, query

PYTHON = [sys.executable, "-m", "dinoforge.cli"]


def test_prometheus_scrapes_a_training_job(tmp_path):
    """`dinoforge pretrain` serves its metrics; Prometheus (the Debian server, 1 s scrapes)
    records the throughput, and per step exactly one batch of 128 images."""
    port = free_port()
    env = {**os.environ, "DINOFORGE_METRICS_PORT": str(port), "DINOFORGE_JOB": "promtest", "DINOFORGE_LINEAGE": "off"}
    command = PYTHON + ["pretrain", "--preset", "smoke", "--output", str(tmp_path / "run"), "--max-steps", "30",
                        "--no-progress", "train.log_period=1", "data.num_workers=0"]
    with prometheus([f"127.0.0.1:{port}"], tmp_path) as url:
        job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            selector = '{job="promtest",stage="pretrain",rank="0"}'
            (labels, throughput), = query(url, f"dinoforge_images_per_second{selector}", timeout=120)
            (_, per_step), = query(url, f"dinoforge_images_total{selector} / dinoforge_steps_total{selector} > 0", timeout=60)
            (_, learning_rate), = query(url, f"dinoforge_learning_rate{selector} > 0", timeout=60)
        finally:
            job.kill()
            job.communicate()
    print(f"\nPrometheus: {throughput:.1f} images/s on rank {labels['rank']}, {per_step:.0f} images per step, lr {learning_rate:.2e}")
    assert 1 < throughput < 100_000
    assert per_step == 128
    assert learning_rate < 0.004 * 0.1  # warming up from 0 towards the smoke preset's base lr (one 40-step epoch)


def _small_pipeline(output, tracking_uri: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": "pipeline-test"}
    command = PYTHON + ["pipeline", "--output", str(output), "--pool-size", "600", "--dedup", "hash", "--eval-size", "300",
                        "--curated-size", "300", "--max-steps", "4", "--train-limit", "1000", "--test-limit", "200",
                        "--no-progress", "train.log_period=2", "data.num_workers=0"]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\npipeline in {time.perf_counter() - started:.0f} s: {summary['stage_seconds']}")
    return summary


def _check_chain(tracking_uri: str, run_id: str, summary: dict) -> None:
    """One run per stage under the pipeline run, each stage's output digest the next stage's
    input digest (pool -> curated manifest -> checkpoint -> exported weights -> results),
    step-indexed training metrics, the exported model registered."""
    from mlflow import MlflowClient

    from dinoforge.lineage import lineage_chain

    chain = lineage_chain(tracking_uri, "pipeline-test", run_id)
    assert [run["stage"] for run in chain] == ["curate", "pretrain", "export", "evaluate"]
    assert all(run["status"] == "FINISHED" for run in chain)
    by_stage = {run["stage"]: {side: {item["name"]: item for item in run[side]} for side in ("inputs", "outputs")}
                for run in chain}
    links = [("curate", "curated", "pretrain", "train_data"), ("pretrain", "checkpoint", "export", "checkpoint"),
             ("export", "weights", "evaluate", "weights")]
    for producer, output, consumer, input_ in links:
        assert by_stage[producer]["outputs"][output]["digest"] == by_stage[consumer]["inputs"][input_]["digest"], (producer, consumer)
    assert by_stage["export"]["outputs"]["weights"]["digest"] == summary["weights_digest"]
    assert by_stage["curate"]["inputs"]["pool"]["kind"] == "manifest"
    assert by_stage["evaluate"]["outputs"]["results"]["kind"] == "evaluation"

    client = MlflowClient(tracking_uri)
    runs = {run["stage"]: run["run_id"] for run in chain}
    assert [m.step for m in client.get_metric_history(runs["pretrain"], "loss")] == [2, 4]
    assert client.get_run(runs["pretrain"]).data.params["optim.base_lr"] == "0.004"
    assert client.get_run(run_id).data.metrics["knn_top1"] == pytest.approx(summary["knn_top1_trained"])
    assert client.get_run(runs["evaluate"]).data.metrics["knn_top1"] == pytest.approx(summary["knn_top1_trained"])
    versions = client.search_model_versions(f"run_id = '{runs['export']}'")
    assert len(versions) == 1 and versions[0].name == "dinoforge-vit_nano-smoke"
    assert client.get_model_version_by_alias(versions[0].name, "current").version == versions[0].version


def test_pipeline_lineage_chain_on_a_tracking_server(mlflow_server, tmp_path):
    """A small `dinoforge pipeline` against a real MLflow server (sqlite backend)."""
    summary = _small_pipeline(tmp_path / "out", mlflow_server)
    assert summary["mlflow"]["tracking_uri"] == mlflow_server and summary["mlflow"]["pipeline_run_id"]
    _check_chain(mlflow_server, summary["mlflow"]["pipeline_run_id"], summary)


@pytest.mark.slow(seconds=90)
def test_pipeline_survives_a_down_tracking_server_and_syncs_later(mlflow_server, tmp_path):
    """MLflow unreachable during the whole run: the pipeline finishes, keeps the lineage in
    its journal, and `dinoforge lineage sync` pushes the same chain once a server answers."""
    from mlflow import MlflowClient

    down = f"http://127.0.0.1:{free_port()}"
    summary = _small_pipeline(tmp_path / "out", down)
    assert summary["mlflow"]["pipeline_run_id"] is None and summary["knn_top1_trained"] > 0
    journal = summary["mlflow"]["journal"]
    sync = subprocess.run(PYTHON + ["lineage", "sync", journal, "--tracking-uri", mlflow_server],
                          capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stderr[-3000:]
    counts = json.loads(sync.stdout.strip().splitlines()[-1])
    assert counts["runs"] == 5 and counts["pending"] == 0 and counts["events_pushed"] > 0
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("pipeline-test")
    parent, = client.search_runs([experiment.experiment_id],
                                 f"tags.`dinoforge.run_key` = '{summary['mlflow']['pipeline_run_key']}'")
    _check_chain(mlflow_server, parent.info.run_id, summary)
    again = subprocess.run(PYTHON + ["lineage", "sync", journal, "--tracking-uri", mlflow_server],
                           capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout.strip().splitlines()[-1])["events_pushed"] == 0
