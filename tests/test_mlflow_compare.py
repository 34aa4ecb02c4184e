"""Experiment comparison the way MLflow users expect it (issue 21): two small pipelines against a
real MLflow server, checked through MLflow's client and in MLflow's own UI in headless Chromium;
``dinoforge compare`` and ``dinoforge ui`` on local stores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # before mlflow is imported

from object_store import free_port  # noqa: E402

PYTHON = [sys.executable, "-m", "dinoforge.cli"]
ROOT = Path(__file__).resolve().parents[1]
# Where the UI screenshot is kept for a person to look at (ignored by git).
ARTIFACTS = Path(os.environ.get("DINOFORGE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.user", "mlflow.source.git.commit")
# Two small pipelines that differ in two settings (steps, learning rate).
SETTINGS = {"a": (["--max-steps", "3"], []), "b": (["--max-steps", "4"], ["optim.base_lr=0.002"])}


def _pipeline(
    output: Path, tracking_uri: str, experiment: str, name: str, flags: list[str], overrides: list[str]
) -> dict:
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": experiment}
    small = "--pool-size 400 --curated-size 200 --train-limit 500 --test-limit 100 --no-progress".split()
    command = [
        *PYTHON,
        "pipeline",
        "--output",
        str(output),
        "--tracking-uri",
        tracking_uri,
        "--run-name",
        name,
        *small,
        *flags,
        "train.log_period=1",
        "data.num_workers=0",
        *overrides,
    ]  # overrides last
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _chromium(url: str, user_data: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium as the machine notes say (no sandbox as root, no background networking)."""
    argv = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
        "--window-size=1600,1200",
        "--virtual-time-budget=60000",
        *extra,
        url,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _embeddings(weights: str, images: list[np.ndarray]) -> np.ndarray:
    """dinoforge's embeddings of uint8 HWC images: what evaluation and curation compute."""
    import torch

    from dinoforge.eval.features import cls_features, prepare_image
    from dinoforge.export import load_backbone

    backbone, meta = load_backbone(weights)
    prepared = [
        prepare_image(
            torch.from_numpy(image).permute(2, 0, 1), meta["image_size"], meta["resize_size"], meta["mean"], meta["std"]
        )
        for image in images
    ]
    return cls_features(backbone, torch.stack(prepared)).numpy()


def _serve_and_ask(model_name: str, tracking_uri: str, uris: list[str], images: list[np.ndarray]) -> np.ndarray:
    """`mlflow models serve` on the registered model (this environment's packages); the CLS
    embeddings it answers for two requests: file URIs, then pixels."""
    import urllib.request

    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{model_name}@current",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # The scoring server runs `uvicorn` from PATH: this environment's, as an activated venv has it.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    server = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
                time.sleep(0.5)
        answers = []
        for body in (
            {"dataframe_records": [{"uri": uri} for uri in uris]},
            {"dataframe_split": {"columns": ["image"], "data": [[image.tolist()] for image in images]}},
        ):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            answers.append(np.asarray(json.load(urllib.request.urlopen(request, timeout=120))["predictions"]["cls"]))
        return np.concatenate(answers)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def _test_images(folder: Path) -> tuple[list[np.ndarray], list[str]]:
    """The first 8 Fashion-MNIST test images as uint8 HWC arrays, and the same as PNG file URIs."""
    from PIL import Image

    from dinoforge.config import DataConfig
    from dinoforge.data import open_source

    source = open_source("fashion-mnist:test", DataConfig())
    images = [pixels.permute(1, 2, 0).numpy() for pixels, _ in source.get_many(range(8))]
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for index, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(folder / f"{index}.png")
        uris.append((folder / f"{index}.png").as_uri())
    return images, uris


@pytest.mark.slow(seconds=900)
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/setup.sh --test)")
def test_two_pipelines_compare_in_the_mlflow_ui(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from dinoforge.lineage.compare import compare_path, compare_rows
    from dinoforge.lineage.store import OUTPUT_TAG_PREFIX

    experiment = f"compare-{uuid.uuid4().hex[:8]}"
    names = {key: f"{key}-{uuid.uuid4().hex[:6]}" for key in SETTINGS}
    started = time.perf_counter()
    summaries = {
        key: _pipeline(tmp_path / key, mlflow_server, experiment, names[key], *settings)
        for key, settings in SETTINGS.items()
    }
    print(f"\ntwo pipelines in {time.perf_counter() - started:.0f} s")
    client = MlflowClient(mlflow_server)
    runs = {key: client.get_run(summary["mlflow"]["pipeline_run_id"]) for key, summary in summaries.items()}

    # The registered model is an MLflow Model: pyfunc load + predict gives dinoforge's embeddings.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model_name = "dinoforge-vit_nano-smoke"
    current = client.get_model_version_by_alias(model_name, "current")
    assert current.run_id in [
        r.info.run_id
        for r in client.search_runs(
            [runs["b"].info.experiment_id], f"tags.`mlflow.parentRunId` = '{runs['b'].info.run_id}'"
        )
    ]
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@current")
    images, uris = _test_images(tmp_path / "images")
    expected = _embeddings(summaries["b"]["weights"], images)
    from_pixels = model.predict(pd.DataFrame({"image": images}))["cls"]
    from_files = model.predict(pd.DataFrame({"uri": uris}))["cls"]
    assert from_pixels.shape == (8, 128)
    np.testing.assert_allclose(from_pixels, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(from_files, expected, rtol=0, atol=1e-5)
    tokens = model.predict(pd.DataFrame({"image": images[:2]}), params={"patch_tokens": True})["patch_tokens"]
    assert tokens.shape == (2, 49, 128)
    served = _serve_and_ask(model_name, mlflow_server, uris[:2], images[2:4])
    np.testing.assert_allclose(served, np.concatenate([expected[:2], expected[2:4]]), rtol=0, atol=1e-5)
    signature = model.metadata.signature
    assert [c.name for c in signature.inputs.inputs] == ["image", "uri"]
    assert signature.outputs.inputs[0].name == "cls"

    # Every run (pipeline and stages): standard source tags; no output among the inputs.
    for key, pipeline in runs.items():
        stages = client.search_runs(
            [pipeline.info.experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'"
        )
        assert sorted(s.data.tags["dinoforge.stage"] for s in stages) == ["curate", "evaluate", "export", "pretrain"]
        for run in [pipeline, *[client.get_run(s.info.run_id) for s in stages]]:
            assert all(run.data.tags.get(tag) for tag in SOURCE_TAGS), (key, run.info.run_name, run.data.tags)
            assert run.data.tags["mlflow.source.name"].startswith("dinoforge pipeline")
            outputs = {
                value.rpartition("@")[2] for tag, value in run.data.tags.items() if tag.startswith(OUTPUT_TAG_PREFIX)
            }
            for dataset_input in run.inputs.dataset_inputs:
                tags = {t.key: t.value for t in dataset_input.tags}
                assert not tags["mlflow.data.context"].startswith("output"), (run.info.run_name, tags)
                assert tags["dinoforge.digest"] not in outputs, run.info.run_name
                assert json.loads(dataset_input.dataset.source)["uri"].startswith("file:///")
        export = next(s for s in stages if s.data.tags["dinoforge.stage"] == "export")
        assert len(client.get_run(export.info.run_id).outputs.model_outputs) == 1

    # Headline metrics and the params that differ, retrievable through the client.
    for key, run in runs.items():
        assert run.info.run_name == names[key]
        assert run.data.metrics["knn_top1"] == pytest.approx(summaries[key]["knn_top1_trained"])
        assert run.data.metrics["images_per_s"] > 0 and run.data.metrics["wall_seconds"] > 0
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(
            range(1, int(SETTINGS[key][0][1]) + 1)
        )
        assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    metrics, params = compare_rows(runs["a"], runs["b"])
    differing = {name: (a, b) for name, a, b in params}
    assert differing["max_steps"] == ("3", "4") and differing["optim.base_lr"] == ("0.004", "0.002")
    assert [name for name, _, _ in metrics][:1] == ["knn_top1"]

    # `dinoforge compare` prints the same table in the terminal.
    printed = subprocess.run(
        PYTHON + ["compare", str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True, timeout=300
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    for text in (names["a"], names["b"], "knn_top1", "optim.base_lr", "0.002", "max_steps"):
        assert text in printed.stdout, (text, printed.stdout)

    # MLflow's compare page of the two runs, rendered by headless Chromium.
    url = mlflow_server + compare_path(runs["a"], runs["b"])
    dom = _chromium(url, tmp_path / "chromium-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "mlflow-compare-runs.png"
    shot = _chromium(url, tmp_path / "chromium-shot", f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-3000:]
    print(f"compare page {url}\nscreenshot {screenshot}")
    for text in (names["a"], names["b"], "knn_top1"):
        assert text in dom.stdout, (text, re.sub(r"\s+", " ", dom.stdout)[-3000:])


def _tiny_pipeline(run_dir: Path, name: str, max_steps: int, base_lr: float, tracking_uri: str | None = None) -> Path:
    """A pipeline's lineage as `dinoforge pipeline` records it, without the work: params, a pretrain
    stage with a loss curve, the headline metrics on the pipeline run."""
    from dinoforge.lineage import Lineage, pipeline_scope, stage_lineage

    parent = Lineage(str(run_dir / "lineage"), "pipeline", run_name=name, tracking_uri=tracking_uri, experiment="tiny")
    with parent, pipeline_scope(parent):
        parent.params({"preset": "smoke", "max_steps": max_steps, "optim": {"base_lr": base_lr}})
        with stage_lineage("pretrain", None) as pretrain:
            for step in range(1, max_steps + 1):
                pretrain.metrics({"loss": 10.0 / step}, step=step)
                parent.metrics({"loss": 10.0 / step}, step=step)
        parent.metrics({"knn_top1": 50.0 + max_steps, "images_per_s": 100.0, "wall_seconds": 60.0})
    return run_dir


def test_compare_prints_headline_metrics_and_the_params_that_differ(tmp_path, capsys):
    from dinoforge.lineage.compare import print_compare
    from dinoforge.lineage.store import local_store

    shared = local_store(str(tmp_path))  # as `pipeline --local` shares runs/mlflow.db
    a = _tiny_pipeline(tmp_path / "a", "run-a", 3, 0.004, shared)
    b = _tiny_pipeline(tmp_path / "b", "run-b", 4, 0.002, shared)
    print_compare(str(a), str(b))
    out = capsys.readouterr().out
    rows = {
        line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:4]]
        for line in out.splitlines()
        if line.count("│") >= 3
    }
    assert rows["knn_top1"] == ["53", "54"] and rows["loss"] == ["3.333", "2.5"]
    assert rows["max_steps"] == ["3", "4"] and rows["optim.base_lr"] == ["0.004", "0.002"]
    assert "preset" not in rows  # equal params are not shown
    assert list(rows)[:4] == ["knn_top1", "images_per_s", "wall_seconds", "loss"]
    assert "compare-runs?runs=" in out  # one store: MLflow's compare page path


def _ui(argv: list[str], port: int) -> tuple[subprocess.Popen, list[str]]:
    """`dinoforge ui ...` started; the lines it printed up to "Ctrl-C stops it."."""
    ui = subprocess.Popen(
        PYTHON + ["ui", *argv, "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    lines = []
    while not lines or lines[-1] != "Ctrl-C stops it.":
        line = ui.stdout.readline()
        assert line, f"dinoforge ui exited {ui.wait()} after printing {lines}"
        lines.append(line.strip())
    return ui, lines


def _runs_named(address: str) -> list[str]:
    import urllib.request

    experiments = json.load(
        urllib.request.urlopen(f"{address}/api/2.0/mlflow/experiments/search?max_results=50", timeout=30)
    )["experiments"]
    request = urllib.request.Request(
        f"{address}/api/2.0/mlflow/runs/search",
        method="POST",
        data=json.dumps({"experiment_ids": [e["experiment_id"] for e in experiments]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    return [run["info"]["run_name"] for run in json.load(urllib.request.urlopen(request, timeout=30)).get("runs", [])]


@pytest.mark.slow(seconds=300)
def test_ui_serves_a_run_directory_and_an_older_file_store(tmp_path, monkeypatch):
    """`dinoforge ui RUN_DIR` finds the run's sqlite store and links its pipeline run;
    `--tracking-uri file://...` opens a file store from before (MLflow 3.17 needs a flag for those,
    set for the server process alone). Ctrl-C (SIGTERM here) stops the server too."""
    from mlflow import MlflowClient

    run_dir = _tiny_pipeline(tmp_path / "run", "ui-run", 2, 0.004)
    port = free_port()
    ui, lines = _ui([str(run_dir)], port)
    try:
        address = f"http://127.0.0.1:{port}"
        assert lines[0] == f"MLflow UI on sqlite:///{run_dir / 'mlflow.db'}: {address}"
        assert re.fullmatch(rf"pipeline run ui-run: {address}/#/experiments/\d+/runs/[0-9a-f]{{32}}", lines[1])
        assert sorted(_runs_named(address)) == ["pretrain", "ui-run"]
    finally:
        ui.terminate()
        assert ui.wait(timeout=60) == 0
    time.sleep(1)
    with pytest.raises(OSError):  # the MLflow server went with it
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)

    store = (tmp_path / "old" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # only to write the old store in this test
    client = MlflowClient(store)
    client.create_run(client.create_experiment("old"), run_name="from-a-file-store")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    ui, lines = _ui(["--tracking-uri", store], port)
    try:
        assert lines[0] == f"MLflow UI on {store}: http://127.0.0.1:{port}"
        assert _runs_named(f"http://127.0.0.1:{port}") == ["from-a-file-store"]
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def test_pipeline_loss_curve_takes_the_latest_record_of_each_step(tmp_path):
    """A resumed (or interrupted and rerun) training log repeats steps: the pipeline run gets the
    latest record of each step, none past the run's last step, and their mean throughput."""
    from dinoforge.lineage import Lineage, read_journal
    from dinoforge.pipeline import _record_training

    records = [(1, 9.0, 10.0), (2, 8.0, 10.0), (3, 7.0, 10.0), (4, 6.0, 10.0), (1, 5.0, 20.0), (2, 4.0, 20.0)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": loss, "images_per_s": ips}) + "\n" for s, loss, ips in records)
    )
    parent = Lineage(
        str(tmp_path / "lineage"), "pipeline", tracking_uri=f"http://127.0.0.1:{free_port()}", sync_every_s=3600
    )
    _record_training(parent, str(tmp_path / "run"), last_step=2)
    events = [e for e in read_journal(str(tmp_path / "lineage"))[parent.key] if e["type"] == "metrics"]
    assert [(e["step"], e["values"]) for e in events] == [
        (1, {"loss": 5.0}),
        (2, {"loss": 4.0}),
        (None, {"images_per_s": 20.0}),
    ]
