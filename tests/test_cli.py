"""The CLI's flags come from the settings dataclasses and functions they fill: defaults,
types, nested fields, and a subcommand imports only what it needs."""

import subprocess
import sys

from dinoforge.arguments import build_from
from dinoforge.cli import build_parser
from dinoforge.config import DataConfig
from dinoforge.curation.pipeline import CurateSettings
from dinoforge.data.importers import DEFAULT_SHARD_BYTES
from dinoforge.eval.suite import SuiteSettings
from dinoforge.pipeline import PipelineSettings


def test_flag_defaults_are_the_settings_defaults():
    parser = build_parser()
    assert build_from(PipelineSettings, parser.parse_args(["pipeline", "--local"]), output="o") == PipelineSettings("o")
    suite = parser.parse_args(["evaluate", "suite", "--weights", "w.pth"])
    assert build_from(SuiteSettings, suite) == SuiteSettings()
    run = parser.parse_args(["curate", "run", "m.parquet", "--weights", "w.pth", "--out", "o", "--n", "5"])
    assert build_from(CurateSettings, run) == CurateSettings("m.parquet", "w.pth", "o", n=5)
    assert parser.parse_args(["data", "import", "d", "--out", "m.parquet"]).shard_bytes == DEFAULT_SHARD_BYTES


def test_flags_fill_typed_and_nested_fields():
    parser = build_parser()
    argv = [
        "pipeline",
        "--output",
        "o",
        "--preset",
        "vits14",
        "--fashion-mnist-root",
        "/fm",
        "--no-progress",
        "--dedup",
        "copy",
        "--max-steps",
        "3",
        "optim.epochs=2",
    ]
    expected = PipelineSettings(
        "o",
        "vits14",
        ("optim.epochs=2",),
        data=DataConfig(fashion_mnist_root="/fm"),
        progress=False,
        dedup_method="copy",
        max_steps=3,
    )
    assert build_from(PipelineSettings, parser.parse_args(argv)) == expected
    knn = parser.parse_args(["evaluate", "knn", "--weights", "w.pth", "--k", "10", "20", "--train-limit", "50"])
    assert build_from(SuiteSettings, knn, pictures=False) == SuiteSettings(ks=(10, 20), train_limit=50, pictures=False)
    run = ["curate", "run", "m", "--weights", "w", "--out", "o", "--seeds", "s", "--retrieve", "ivfpq"]
    run += ["--levels", "8", "2"]
    settings = build_from(CurateSettings, parser.parse_args(run))
    assert (settings.retrieve_method, settings.levels, settings.n) == ("ivfpq", (8, 2), None)
    assert parser.parse_args(["data", "pack", "m", "--out", "p", "--shard-size", "1M"]).shard_bytes == 1 << 20


def test_a_command_imports_only_what_it_needs():
    script = (
        "import sys\nfrom dinoforge.cli import main\nassert main(['config']) == 0\n"
        "print(sorted(m for m in ('mlflow', 'dinoforge.pipeline', 'dinoforge.train') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
