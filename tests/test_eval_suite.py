"""The evaluation suite end to end through the CLI: every protocol, pictures, determinism,
k-NN sharded across torchrun ranks, and (slow) a trained checkpoint against its random init."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dinoforge.cli import main
from dinoforge.data.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from dinoforge.eval.suite import PROTOCOLS, parse_protocols
from dinoforge.export import build_from_meta

SMALL = ["--train-limit", "300", "--test-limit", "100", "--retrieval-queries", "10", "--retrieval-distractors", "60",
         "--dense-train", "64", "--dense-test", "32", "--dense-epochs", "2", "--linear-epochs", "2", "--logreg-max-iter", "30", "--k", "5", "20"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A seeded random ViT-pico/4 with LayerScale 1 exported like ``dinoforge export`` does."""
    meta = {"embed_dim": 64, "depth": 4, "num_heads": 2, "patch_size": 4, "img_size": 28, "in_chans": 3,
            "num_register_tokens": 0, "ffn_layer": "mlp", "layerscale_init": 1.0, "interpolate_offset": 0.1,
            "interpolate_antialias": False, "image_size": 28, "resize_size": 28,
            "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD)}
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "pico.pth"
    torch.save(build_from_meta(meta).state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return str(path)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def without_timing(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in ("seconds", "picture")}


def test_parse_protocols():
    assert parse_protocols("all") == PROTOCOLS
    assert parse_protocols("pca, knn") == ("knn", "pca")  # suite order
    with pytest.raises(ValueError, match="knnn"):
        parse_protocols("knn,knnn")


def test_suite_runs_every_protocol_with_pictures_and_is_deterministic(weights, tmp_path, capsys):
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(["evaluate", "suite", "--weights", weights, "--protocols", "all", "--compare-random-init",
                     "--out", str(out), *SMALL]) == 0
        runs.append(json_lines(capsys.readouterr().out))
    first, second = runs
    results = first[:-1]
    assert [(r["protocol"], r["init"]) for r in results] == [(p, init) for p in PROTOCOLS for init in ("trained", "random_init")]
    assert [without_timing(r) for r in results] == [without_timing(r) for r in second[:-1]]  # same seed, same numbers

    by_key = {(r["protocol"], r["init"]): r for r in results}
    knn = by_key["knn", "trained"]
    assert knn["n_train"] == 300 and knn["n_test"] == 100 and set(knn["k"]) == {"5", "20"}
    assert 0 <= knn["k"]["20"]["top1"] <= knn["k"]["20"]["top5"] <= 100
    assert by_key["linear", "trained"]["best"]["blocks"] in (1, 4)
    assert 0 <= by_key["seg", "trained"]["mIoU"] <= 100 and by_key["depth", "trained"]["rmse"] > 0
    assert by_key["retrieval", "trained"]["n_queries"] == 10

    summary = first[-1]
    assert summary["protocol"] == "summary"
    assert summary["headline"]["trained"]["knn"] == knn["k"]["20"]["top1"]
    assert summary["headline"]["trained"]["depth"] == by_key["depth", "trained"]["rmse"]
    assert set(summary["beats_random_init"]["trained"]) == set(PROTOCOLS)

    out = tmp_path / "a"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [without_timing(r) for r in rows] == [without_timing(r) for r in results]
    assert json.loads((out / "summary.json").read_text())["headline"] == summary["headline"]
    for name in ("per_class_top1.png", "knn_neighbours_trained.png", "knn_neighbours_random_init.png", "pca_trained.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 50


def test_single_protocol_command_prints_one_result(weights, capsys):
    assert main(["evaluate", "logreg", "--weights", weights, *SMALL]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert [r["protocol"] for r in lines] == ["logreg", "summary"]
    assert lines[0]["init"] == "trained" and "beats_random_init" not in lines[1]


def test_unknown_protocol_fails_fast(weights, capsys):
    assert main(["evaluate", "suite", "--weights", weights, "--protocols", "knn,segmentation"]) == 2
    assert "segmentation" in capsys.readouterr().err


@pytest.mark.parametrize("nproc", [2, 3])
def test_knn_sharded_across_torchrun_ranks_equals_one_process(weights, nproc, capsys):
    args = ["evaluate", "knn", "--weights", weights, "--train-limit", "500", "--test-limit", "100", "--k", "10", "20", "200"]
    assert main(args) == 0
    single = json_lines(capsys.readouterr().out)[0]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                             "-m", "dinoforge.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json_lines(result.stdout)
    assert len(sharded) == 1 and sharded[0]["world_size"] == nproc  # rank 0 prints
    assert sharded[0]["k"] == single["k"] and sharded[0]["n_train"] == 500
    assert sharded[0]["per_class_top1"] == single["per_class_top1"]


@pytest.mark.slow(seconds=200)
def test_trained_checkpoint_beats_random_init_on_every_protocol(smoke_run, tmp_path, capsys):
    """Issue acceptance on the smoke checkpoint (README's main job): every protocol against
    the same architecture at its training init; 10k/2k Fashion-MNIST for the classifiers."""
    weights = smoke_run[1]["weights"]
    assert main(["evaluate", "suite", "--weights", weights, "--protocols", "all", "--compare-random-init",
                 "--train-limit", "10000", "--test-limit", "2000", "--out", str(tmp_path)]) == 0
    summary = json_lines(capsys.readouterr().out)[-1]
    print("\n" + json.dumps(summary["headline"]))
    beats = summary["beats_random_init"]["trained"]
    # PCA foreground on the photographs is separable by brightness, so the random init (a
    # random projection of the pixels) does as well there: a bar, not a comparison (README).
    assert summary["headline"]["trained"]["pca"] >= 0.8
    assert all(beats[p] for p in PROTOCOLS if p != "pca"), beats
