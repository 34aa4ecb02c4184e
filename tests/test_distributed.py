"""The distributed engine with real torchrun processes (gloo on CPU): FSDP2 training, DCP
checkpoints that resume bitwise at the same world size and reshard to other world sizes,
uncommitted checkpoints ignored, a killed worker restarted by torchrun, object storage."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from checkpoints import checkpoint_tensors
from tiny import TINY as TINY_BASE

from dinoforge.checkpoint import COMMIT_MARKER, committed_checkpoints, read_train_state

TINY = TINY_BASE + [
    "train.batch_size_per_gpu=4", "train.checkpoint_period=2", "train.keep_checkpoints=3", "model.drop_path_rate=0.2",
]


def torchrun_command(nproc: int, output: str, *overrides: str, max_steps: int | None = None, restarts: int = 0) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={restarts}", "-m", "dinoforge.cli", "pretrain", "--preset", "smoke",
               "--output", output, "--no-progress", *TINY, *overrides]
    return command + (["--max-steps", str(max_steps)] if max_steps else [])


def torchrun(nproc: int, output: str, *overrides: str, max_steps: int | None = None) -> str:
    result = subprocess.run(torchrun_command(nproc, output, *overrides, max_steps=max_steps),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def final_tensors(uri: str) -> dict:
    return checkpoint_tensors(committed_checkpoints(uri)[-1][1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process run of 6 steps."""
    output = tmp_path_factory.mktemp("reference")
    torchrun(2, str(output))
    return output


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The same run stopped after step 4 (a copy is kept before it goes on)."""
    output = tmp_path_factory.mktemp("interrupted")
    torchrun(2, str(output), max_steps=4)
    at_step_4 = tmp_path_factory.mktemp("at_step_4") / "run"
    shutil.copytree(output, at_step_4)
    return output, at_step_4


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(reference, interrupted):
    output, _ = interrupted
    log = torchrun(2, str(output))
    assert "resumed from" in log and "step_00000004" in log
    ref, got = final_tensors(str(reference)), final_tensors(str(output))
    assert any("student.backbone.blocks.0" in key for key in ref["model"])
    assert_same_tensors(ref["model"], got["model"])
    assert_same_tensors(ref["optimizer"], got["optimizer"])
    assert [r["loss"] for r in metrics(output)] == [r["loss"] for r in metrics(reference)]
    state = read_train_state(committed_checkpoints(str(output))[-1][1])
    assert state.world_size == 2 and state.position == 6 * 8


@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_a_two_process_checkpoint_at_another_world_size(reference, interrupted, tmp_path, nproc):
    _, at_step_4 = interrupted
    run = tmp_path / "run"
    shutil.copytree(at_step_4, run)
    log = torchrun(nproc, str(run))
    assert f"resuming 2-rank checkpoint on {nproc} ranks" in log
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["world_size"] == nproc
    state = read_train_state(committed_checkpoints(str(run))[-1][1])
    assert state.position == 4 * 8 + 2 * 4 * nproc  # the stream went on where it stopped
    # The model continues from step 4's weights: the loss stays near the uninterrupted run's.
    expected = {r["step"]: r["loss"] for r in metrics(reference)}
    for row in rows[4:]:
        assert abs(row["loss"] - expected[row["step"]]) < 0.1 * expected[row["step"]], (row, expected)


def test_uncommitted_or_truncated_checkpoints_are_never_loaded(reference, interrupted, tmp_path):
    _, at_step_4 = interrupted
    run = tmp_path / "run"
    shutil.copytree(at_step_4, run)
    checkpoints = run / "checkpoints"
    # A save cut short after its shards (no marker), and one cut short in the middle of a shard.
    shutil.copytree(checkpoints / "step_00000004", checkpoints / "step_00000005")
    (checkpoints / "step_00000005" / COMMIT_MARKER).unlink()
    shutil.copytree(checkpoints / "step_00000004", checkpoints / "step_00000006")
    (checkpoints / "step_00000006" / COMMIT_MARKER).unlink()
    shard = checkpoints / "step_00000006" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert [step for step, _ in committed_checkpoints(str(run))] == [2, 4]
    log = torchrun(2, str(run))
    assert "step_00000004" in log.split("resumed from", 1)[1].splitlines()[0]
    assert_same_tensors(final_tensors(str(reference))["model"], final_tensors(str(run))["model"])


def _workers(pid: int) -> list[int]:
    """Worker processes of a torchrun agent (its children running dinoforge)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if "dinoforge" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]


def test_a_killed_worker_is_restarted_and_the_run_completes(tmp_path):
    output = tmp_path / "run"
    steps = ["optim.epochs=10", "optim.epoch_length=3"]  # 30 steps, a checkpoint every 2
    agent = subprocess.Popen(torchrun_command(2, str(output), *steps, restarts=2), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not committed_checkpoints(str(output)) and time.time() < deadline:
            time.sleep(0.05)
        killed_after = committed_checkpoints(str(output))[-1][0]
        victims = _workers(agent.pid)
        assert len(victims) == 2, victims
        os.kill(victims[1], signal.SIGKILL)
        _, stderr = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, stderr[-4000:]
    assert killed_after < 30, "the run finished before the worker was killed"
    resumed_step = int(stderr.split("resumed from", 1)[1].split("step_", 1)[1][:8])
    assert killed_after <= resumed_step < 30  # lost at most the steps since the last checkpoint
    assert committed_checkpoints(str(output))[-1][0] == 30
    steps_logged = [r["step"] for r in metrics(output)]
    assert steps_logged[-1] == 30 and set(steps_logged) == set(range(1, 31))


def _download(uri: str, target: Path) -> str:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.get(path, str(target), recursive=True)
    return str(target)


@pytest.mark.parametrize("store", ["s3_prefix", pytest.param("gcs_prefix", marks=pytest.mark.slow(seconds=200))])
def test_round_trip_on_object_storage(store, request, reference, tmp_path):
    prefix = request.getfixturevalue(store)
    output = f"{prefix}/run"
    torchrun(2, output, max_steps=4)
    log = torchrun(2, output)
    assert "resumed from" in log and "step_00000004" in log
    newest = committed_checkpoints(output)[-1][1]
    assert newest.endswith("step_00000006")
    local = _download(newest, tmp_path / "step_00000006")
    assert_same_tensors(final_tensors(str(reference))["model"], checkpoint_tensors(local)["model"])
