"""The evaluation suite: any chosen set of protocols on one or more backbones (the trained
weights and, as baselines, the same architecture at random init), one JSON line per result,
all results in ``results.jsonl`` and the pictures as PNGs in the output directory.

Features are extracted once per backbone and shared by the protocols that use the same
images (k-NN, linear probe and logistic regression all use the last blocks' CLS tokens).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.config import DataConfig
from dinoforge.eval.features import labelled_images, linear_features

log = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear", "logreg", "retrieval", "seg", "depth", "pca")
CLASSIFICATION = {"knn", "linear", "logreg"}

# The number each protocol is judged by, and whether higher is better.
HEADLINE: dict[str, tuple[Callable[[dict], float], bool]] = {
    "knn": (lambda r: r["k"]["20"]["top1"] if "20" in r["k"] else next(iter(r["k"].values()))["top1"], True),
    "linear": (lambda r: r["best"]["test_top1"], True),
    "logreg": (lambda r: r["test_top1"], True),
    "retrieval": (lambda r: r["mAP_medium"], True),
    "seg": (lambda r: r["mIoU"], True),
    "depth": (lambda r: r["rmse"], False),
    "pca": (lambda r: r["mean_iou"], True),
}


@dataclass(frozen=True)
class SuiteSettings:
    """What the protocols run on. Classification protocols use ``train``/``test`` (any
    labelled source spec); retrieval and the dense scenes are built from Fashion-MNIST
    (``data.fashion_mnist_root``); PCA uses scikit-image's bundled photographs."""

    train: str = "fashion-mnist:train"
    test: str = "fashion-mnist:test"
    train_limit: int | None = None
    test_limit: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    linear_epochs: int | None = None  # None: the probe's default step budget
    logreg_max_iter: int = 300
    retrieval_queries: int = 200
    retrieval_distractors: int = 2000
    dense_train: int = 2000
    dense_test: int = 500
    dense_size: int = 56
    dense_epochs: int = 10
    pca_size: int = 112
    pictures: bool = True


def parse_protocols(text: str) -> tuple[str, ...]:
    """``knn,linear`` or ``all`` -> protocol names in suite order; unknown names fail fast."""
    names = PROTOCOLS if text.strip() == "all" else tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(f"unknown protocol(s) {unknown or text!r}: choose from {', '.join(PROTOCOLS)} or 'all'")
    return tuple(name for name in PROTOCOLS if name in names)


class Suite:
    """Runs protocols for named backbones of one architecture (``meta`` from the exported
    weights), sharing data between backbones and features between protocols."""

    def __init__(self, meta: dict, settings: SuiteSettings, out_dir: str | Path | None) -> None:
        self.meta, self.settings = meta, settings
        self.out = Path(out_dir) if out_dir is not None else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        self._data: dict[str, object] = {}
        self._features: dict[tuple[str, str], object] = {}

    # Data shared by every backbone, built on first use.
    def _cached(self, key: str, build: Callable[[], object]) -> object:
        if key not in self._data:
            started = time.perf_counter()
            self._data[key] = build()
            log.info("evaluation data %s ready in %.1f s", key, time.perf_counter() - started)
        return self._data[key]

    def classification_data(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        s = self.settings
        return self._cached("classification", lambda: (
            labelled_images(self.meta, s.train, s.data, s.train_limit),
            labelled_images(self.meta, s.test, s.data, s.test_limit),
        ))

    def _fashion_mnist(self, split: str):
        from dinoforge.data.sources import FashionMNIST

        return self._cached(f"fashion-mnist:{split}", lambda: FashionMNIST(self.settings.data.fashion_mnist_root, split))

    def retrieval_set(self):
        from dinoforge.eval.retrieval import build_retrieval_set

        s = self.settings
        return self._cached("retrieval", lambda: build_retrieval_set(
            self._fashion_mnist("test").images, s.retrieval_queries, s.retrieval_distractors, seed=s.seed))

    def dense_sets(self):
        from dinoforge.eval.dense import make_scenes

        s = self.settings
        return self._cached("dense", lambda: (
            make_scenes(s.dense_train, s.dense_size, seed=s.seed, source=self._fashion_mnist("train")),
            make_scenes(s.dense_test, s.dense_size, seed=s.seed + 1, source=self._fashion_mnist("test")),
        ))

    def classification_features(self, name: str, backbone: nn.Module) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """(cls of the last 4 blocks, avgpool, labels) for train and test, per backbone."""
        key = (name, "classification")
        if key not in self._features:
            (train_x, train_y), (test_x, test_y) = self.classification_data()
            self._features[key] = (
                (*linear_features(backbone, train_x, n_last_blocks=4), train_y),
                (*linear_features(backbone, test_x, n_last_blocks=4), test_y),
            )
        return self._features[key]

    def run(self, protocol: str, name: str, backbone: nn.Module) -> dict:
        """One protocol on one backbone: the result dict, also appended to results.jsonl."""
        started = time.perf_counter()
        result = getattr(self, f"_{protocol}")(name, backbone)
        result = {**result, "init": name, "seconds": round(time.perf_counter() - started, 1)}
        if self.out is not None:
            with open(self.out / "results.jsonl", "a") as handle:
                handle.write(json.dumps(result) + "\n")
        return result

    def _knn(self, name: str, backbone: nn.Module) -> dict:
        from dinoforge.eval.knn import knn_protocol, nearest_neighbours

        train, test = self.classification_features(name, backbone)
        # The final norm's CLS token of the last block: what `backbone(x)` returns.
        train_f, test_f = F.normalize(train[0][:, -1], dim=-1), F.normalize(test[0][:, -1], dim=-1)
        result = knn_protocol(train_f, train[2], test_f, test[2], ks=self.settings.ks, temperature=self.settings.temperature)
        if self.out is not None and self.settings.pictures:
            from dinoforge.eval.pictures import neighbour_grid

            (train_x, train_y), (test_x, test_y) = self.classification_data()
            queries = torch.arange(0, len(test_f), max(1, len(test_f) // 8))[:8]
            _, neighbours = nearest_neighbours(train_f, test_f[queries], 8)
            raw_train, raw_test = self._denormalised(train_x), self._denormalised(test_x[queries])
            path = self.out / f"knn_neighbours_{name}.png"
            neighbour_grid(raw_test, raw_train, neighbours, path, labels=(test_y[queries], train_y), class_names=self._class_names(), zoom=3)
            result["picture"] = str(path)
        return result

    def _linear(self, name: str, backbone: nn.Module) -> dict:
        from dinoforge.eval.linear import linear_probe

        train, test = self.classification_features(name, backbone)
        num_classes = int(max(train[2].max(), test[2].max())) + 1
        return linear_probe(train, test, num_classes, epochs=self.settings.linear_epochs, seed=self.settings.seed)

    def _logreg(self, name: str, backbone: nn.Module) -> dict:
        from dinoforge.eval.linear import logistic_regression

        train, test = self.classification_features(name, backbone)
        return logistic_regression(train[0][:, -1], train[2], test[0][:, -1], test[2], max_iter=self.settings.logreg_max_iter,
                                   seed=self.settings.seed)

    def _retrieval(self, name: str, backbone: nn.Module) -> dict:
        from dinoforge.eval.retrieval import retrieval_eval

        return retrieval_eval(backbone, self.meta, self.retrieval_set())

    def _dense(self, name: str, backbone: nn.Module) -> tuple[dict, dict]:
        from dinoforge.eval.dense import dense_eval

        key = (name, "dense")
        if key not in self._features:
            train, test = self.dense_sets()
            self._features[key] = dense_eval(backbone, self.meta, train, test, epochs=self.settings.dense_epochs, seed=self.settings.seed)
        return self._features[key]

    def _seg(self, name: str, backbone: nn.Module) -> dict:
        return self._dense(name, backbone)[0]

    def _depth(self, name: str, backbone: nn.Module) -> dict:
        return self._dense(name, backbone)[1]

    def _pca(self, name: str, backbone: nn.Module) -> dict:
        from dinoforge.eval.pictures import benchmark_images, foreground_benchmark, pca_picture

        result = foreground_benchmark(backbone, self.meta)
        if self.out is not None and self.settings.pictures:
            images = [image for image, _ in benchmark_images().values()]
            path = self.out / f"pca_{name}.png"
            pca_picture(backbone, images, self.meta, size=self.settings.pca_size).save(path)
            result["picture"] = str(path)
        return result

    def _denormalised(self, images: Tensor) -> Tensor:
        """Prepared images back to uint8 for pictures."""
        mean = torch.tensor(self.meta["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(self.meta["std"]).view(1, 3, 1, 1)
        return (images * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)

    def _class_names(self) -> list[str] | None:
        if self.settings.train.startswith("fashion-mnist"):
            from dinoforge.data.sources import FashionMNIST

            return list(FashionMNIST.CLASSES)
        return None

    def per_class_plot(self, results: list[dict]) -> str | None:
        """Per-class top-1 of every backbone for the k-NN (k=20) and linear results."""
        from dinoforge.eval.pictures import per_class_plot

        series = {}
        for result in results:
            per_class = result.get("per_class_top1")
            if per_class is None:
                continue
            values = per_class["20"] if isinstance(per_class, dict) else per_class
            if None not in values:  # a class without test samples has no accuracy to plot
                series[f"{result['protocol']} {result['init']}"] = values
        if not series or self.out is None or not self.settings.pictures:
            return None
        names = self._class_names() or [str(i) for i in range(len(next(iter(series.values()))))]
        path = self.out / "per_class_top1.png"
        per_class_plot(series, names, path, "Per-class top-1 (%) on frozen features")
        return str(path)


def run_suite(backbones: dict[str, nn.Module], meta: dict, protocols: tuple[str, ...], settings: SuiteSettings,
              out_dir: str | Path | None, emit: Callable[[dict], None] = lambda result: print(json.dumps(result), flush=True)) -> dict:
    """Every protocol on every backbone, in that order; each result is passed to ``emit`` as
    soon as it exists. Returns a summary: the headline number per protocol and backbone and,
    when a ``random_init`` backbone is among them, whether each other backbone beats it."""
    suite = Suite(meta, settings, out_dir)
    results = []
    for protocol in protocols:
        for name, backbone in backbones.items():
            result = suite.run(protocol, name, backbone)
            emit(result)
            results.append(result)
    headline = {name: {r["protocol"]: HEADLINE[r["protocol"]][0](r) for r in results if r["init"] == name} for name in backbones}
    summary: dict = {"protocol": "summary", "protocols": list(protocols), "headline": headline,
                     "settings": {k: v for k, v in asdict(settings).items() if k != "data"}}
    if "random_init" in backbones:
        summary["beats_random_init"] = {
            name: {p: (v > headline["random_init"][p]) == HEADLINE[p][1] and v != headline["random_init"][p] for p, v in values.items()}
            for name, values in headline.items() if name != "random_init"
        }
    plot = suite.per_class_plot(results)
    if plot is not None:
        summary["per_class_picture"] = plot
    if out_dir is not None:
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
