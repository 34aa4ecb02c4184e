"""The training loop end to end on Fashion-MNIST: exact resume, worker-count independence,
metrics, export in the official key format, and the k-NN command."""

import json
import math

import pytest
import torch
import yaml

from checkpoints import checkpoint_tensors
from tiny import TINY as TINY_BASE

from dinoforge.checkpoint import latest_checkpoint, read_train_state
from dinoforge.cli import main
from dinoforge.config import load_config, to_dict
from dinoforge.export import load_backbone
from dinoforge.train import pretrain
from dinoforge.training.state import TrainState

TINY = TINY_BASE + [
    "train.batch_size_per_gpu=8", "train.checkpoint_period=2", "train.keep_checkpoints=2", "model.drop_path_rate=0.2",
]


def final_state(output):
    return checkpoint_tensors(latest_checkpoint(str(output)))


def metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    summary = pretrain(load_config("smoke", TINY), str(output), progress=False)
    return output, summary


def test_straight_run_writes_metrics_config_and_checkpoints(straight_run):
    output, summary = straight_run
    assert summary["step"] == 6 and summary["resumed_from"] is None
    rows = metrics(output)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] > 0  # linear warmup from 0 over the first epoch (3 steps)
    assert rows[0]["teacher_temp"] == pytest.approx(0.04) and rows[-1]["teacher_temp"] == pytest.approx(0.07)
    kept = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]  # retention of the newest 2
    assert read_train_state(str(output / "checkpoints" / "step_00000006")).position == 6 * 8
    written = yaml.safe_load((output / "config.yaml").read_text())
    assert written["model"]["arch"] == "vit_nano" and written["train"]["batch_size_per_gpu"] == 8


def test_train_state_reads_the_trainer_json_of_earlier_checkpoints():
    saved = {"step": 6, "world_size": 2, "batch_size_per_gpu": 8,  # as checkpoints before TrainState wrote it
             "data": {"position": 96, "dataset": "sha256:ab", "skipped": {"files": {"3": "truncated"}, "events": 2}},
             "config": to_dict(load_config("smoke"))}
    state = TrainState.from_dict(saved)
    assert (state.step, state.position, state.world_size, state.skipped.files) == (6, 96, 2, {3: "truncated"})
    assert state.to_dict() == saved and state.run_config() == load_config("smoke")


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_is_bitwise_identical(straight_run, tmp_path, workers):
    reference, _ = straight_run
    cfg = load_config("smoke", TINY + [f"data.num_workers={workers}"])
    first = pretrain(cfg, str(tmp_path), max_steps=4, progress=False)
    assert first["step"] == 4
    second = pretrain(cfg, str(tmp_path), progress=False)
    assert second["start_step"] == 4 and second["resumed_from"].endswith("step_00000004")
    expected, got = final_state(reference), final_state(tmp_path)
    assert expected["model"].keys() == got["model"].keys()
    for key in expected["model"]:
        assert torch.equal(expected["model"][key], got["model"][key]), key
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference)]


def test_export_official_keys_and_knn_command(straight_run, tmp_path, capsys):
    output, _ = straight_run
    weights = tmp_path / "teacher.pth"
    assert main(["export", str(output), str(weights)]) == 0
    meta = json.loads((tmp_path / "teacher.json").read_text())
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "num_register_tokens", "ffn_layer",
                "interpolate_offset", "interpolate_antialias", "image_size", "mean", "std"):
        assert key in meta, key
    assert (meta["embed_dim"], meta["depth"], meta["num_heads"], meta["patch_size"], meta["image_size"]) == (128, 4, 4, 4, 16)
    state = torch.load(weights, weights_only=True)
    assert "cls_token" in state and "blocks.0.attn.qkv.weight" in state and not any(k.startswith("teacher") for k in state)
    backbone, _ = load_backbone(str(weights))
    teacher = final_state(output)["model"]
    assert torch.equal(backbone.state_dict()["pos_embed"], teacher["teacher.backbone.pos_embed"])
    capsys.readouterr()
    assert main(["evaluate", "knn", "--weights", str(weights), "--train-limit", "500", "--test-limit", "200"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    k20 = result["k"]["20"]
    assert result["protocol"] == "knn" and result["n_train"] == 500 and result["n_test"] == 200 and 0 <= k20["top1"] <= k20["top5"] <= 100


def test_pretrain_cli_rejects_bad_override(tmp_path, capsys):
    assert main(["pretrain", "--output", str(tmp_path), "optim.nonsense=1"]) == 2
    assert "unknown config key 'optim.nonsense'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_resume_with_changed_config_warns_naming_keys(straight_run, tmp_path, caplog):
    output, _ = straight_run
    target = tmp_path / "run"
    import shutil

    shutil.copytree(output, target)
    cfg = load_config("smoke", TINY + ["train.log_period=2", "optim.epochs=3"])
    with caplog.at_level("WARNING", logger="dinoforge.train"):
        summary = pretrain(cfg, str(target), max_steps=6, progress=False)
    assert summary["start_step"] == 6 and summary["step"] == 6  # nothing left to do up to max_steps
    assert "differs from the checkpoint's in: optim.epochs, train.log_period" in caplog.text


def test_trains_from_a_folder_of_images(tmp_path):
    from PIL import Image

    from dinoforge.data import open_source

    g = torch.Generator().manual_seed(0)
    for label in ("cats", "dogs"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = torch.randint(0, 256, (20 + i, 24, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    Image.fromarray(pixels[:, :, 0]).convert("L").save(tmp_path / "images" / "loose.jpg")
    cfg = load_config("smoke", TINY + [f"data.dataset=folder:{tmp_path / 'images'}", "optim.epochs=1", "optim.warmup_epochs=0"])
    folder = open_source(cfg.data.dataset, cfg.data)
    assert len(folder) == 13 and folder.manifest.classes == ["cats", "dogs"]
    (image, label), (_, dog), (grey, loose) = folder.get_many([0, 6, 12])
    assert image.shape == (3, 20, 24) and image.dtype == torch.uint8 and (label, dog, loose) == (0, 1, -1)
    assert grey.shape == (1, 25, 24)
    summary = pretrain(cfg, str(tmp_path / "run"), progress=False)
    assert summary["step"] == 3 and math.isfinite(summary["last_metrics"]["loss"])


def test_async_checkpoints_equal_synchronous_ones(straight_run, tmp_path):
    reference, _ = straight_run
    pretrain(load_config("smoke", TINY + ["train.async_checkpoint=true"]), str(tmp_path), max_steps=4, progress=False)
    summary = pretrain(load_config("smoke", TINY + ["train.async_checkpoint=true"]), str(tmp_path), progress=False)
    assert summary["start_step"] == 4
    expected, got = final_state(reference), final_state(tmp_path)
    for key in expected["model"]:
        assert torch.equal(expected["model"][key], got["model"][key]), key


def test_bf16_precision_trains_with_fp32_master_weights(tmp_path):
    summary = pretrain(load_config("smoke", TINY + ["train.precision=bf16"]), str(tmp_path), progress=False)
    assert math.isfinite(summary["last_metrics"]["loss"])
    state = final_state(tmp_path)
    assert all(v.dtype == torch.float32 for k, v in state["model"].items() if v.is_floating_point())


def test_storage_errors_are_retried_with_backoff_then_fail_naming_the_action():
    from dinoforge.checkpoint import with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert with_retries(flaky, "saving x", backoff_s=0) == "ok" and len(calls) == 3
    attempts = []

    def broken():
        attempts.append(1)
        raise ConnectionError("reset by peer")

    with pytest.raises(OSError, match="saving y failed after 4 attempts: reset by peer"):
        with_retries(broken, "saving y", backoff_s=0)
    assert len(attempts) == 4
    missing = []
    with pytest.raises(FileNotFoundError):
        with_retries(lambda: missing.append(1) or open("/nonexistent/x"), "reading z", backoff_s=0)
    assert len(missing) == 1  # a missing path is not transient: no retry
