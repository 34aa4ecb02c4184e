"""The curation report (issue 6): what the steps did to a pool, in numbers and pictures, for
people to look at before training on a curated set.

Reads a curation directory ``OUT`` (any fsspec URI): ``embeddings/`` (``embed_manifest``),
``clusters.npz`` (``cluster_step``), optionally ``dedup.json`` (the de-duplication step) and any
curated manifests (``sample_step``). Writes ``OUT/report/``:

* ``report.json``: counts per step, per-level cluster statistics (``size_histogram``), each
  curated manifest's cluster entropies against the pool's, the pictures' contents, the files;
* ``report.md``: the same counts as tables, with the pictures linked;
* ``cluster_sizes.png``: histogram of bottom-level cluster sizes, pool and each curated set;
* ``clusters_montage.png``: a row of images nearest the centroid per sampled bottom cluster;
* ``near_duplicates.png``: removed image | the image it duplicates (only with removals).

Every file is uploaded in one ``pipe_file`` call, so the report works on object stores too.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from itertools import zip_longest
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dinoforge.curation.cluster import Hierarchy, cluster_entropy, size_histogram
from dinoforge.curation.embed import iter_chunks, embedding_info
from dinoforge.curation.steps import checked_manifest, read_clusters, read_dedup
from dinoforge.data.decode import BadImage
from dinoforge.data.manifest import Manifest
from dinoforge.data.sources import ManifestSource, Sample
from dinoforge.data.storage import join

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEDUP_STEPS = ("hash", "near", "eval_hash", "eval")  # dedup.json's steps, in the order they run
STEP_NAMES = {"pool": "pool rows", "skipped": "skipped (undecodable)", "hash": "removed: pHash copies",
              "near": "removed: near-duplicates", "eval_hash": "removed: pHash copies of eval images",
              "eval": "removed: near-copies of eval images", "kept": "kept after dedup", "clustered": "clustered"}
BINS = 20  # histogram bins of cluster sizes
DPI = 100
CELL = 1.0  # inches per montage image
PAIR_ROW = 1.9  # inches per near-duplicate pair: the image plus its title and caption
HEADER = 0.5  # inches for a figure's title


def _size_bins(sizes: Sequence[np.ndarray]) -> tuple[np.ndarray, bool]:
    """(histogram edges over every non-empty cluster size, log-spaced?). Log-spaced when sizes span
    more than 10x, where linear bins would squeeze all typical clusters into the first bin."""
    positive = np.concatenate(sizes)
    positive = positive[positive > 0]
    low, high = int(positive.min()), int(positive.max())
    if high > 10 * low:
        return np.geomspace(low, high + 1, BINS + 1), True
    return np.linspace(low, high + 1, min(BINS, high - low + 1) + 1), False


def _curated_positions(uri: str, pool: Manifest, ids: np.ndarray) -> tuple[Manifest, np.ndarray]:
    """The curated manifest and the positions of its images among the clustered pool rows ``ids``
    (sorted), matched by ``uri``: curated manifests hold pool rows, not row numbers."""
    curated = Manifest.read(uri)
    rows = pc.fill_null(pc.index_in(curated.table.column("uri"), value_set=pool.table.column("uri")), -1).to_numpy()
    positions = np.minimum(np.searchsorted(ids, rows), len(ids) - 1)
    missing = int((ids[positions] != rows).sum())
    if missing:
        raise ValueError(f"curated manifest {uri}: {missing} of its {len(curated)} images are not clustered "
                         "pool images; was it sampled from this curation directory?")
    return curated, positions


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # this figure's own Agg canvas: no pyplot state, no window
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: bytes depend on pixels only
    return buffer.getvalue()


def _show(axes: Axes, image: Sample | BadImage) -> None:
    axes.set_xticks([])
    axes.set_yticks([])  # ticks off but the axes kept, so its labels still show
    if isinstance(image, BadImage):
        axes.text(0.5, 0.5, image.reason, ha="center", va="center", fontsize=7, transform=axes.transAxes)
    elif image[0].shape[0] == 1:
        axes.imshow(image[0][0].numpy(), cmap="gray", vmin=0, vmax=255)  # grey as grey, not a colour map
    else:
        axes.imshow(image[0].permute(1, 2, 0).numpy())


def _sizes_png(series: list[tuple[str, dict[str, Any]]], log_bins: bool) -> bytes:
    """One outline per (name, ``size_histogram``): the pool's first, then each curated set's."""
    figure = _figure(7, 4)
    axes = figure.add_subplot()
    for name, histogram in series:
        axes.stairs(histogram["counts"], histogram["bin_edges"], label=f"{name} ({histogram['empty']} empty)")
    if log_bins:
        axes.set_xscale("log")
    axes.set_xlabel("images per bottom-level cluster")
    axes.set_ylabel("clusters")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"Bottom-level cluster sizes ({series[0][1]['clusters']} clusters)")
    axes.legend()
    return _png(figure)


def _montage_clusters(sizes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` non-empty clusters spread over sizes, largest first: the clusters sorted by size are
    cut into ``count`` equal runs and one is drawn from each, so small and huge clusters both show."""
    nonempty = np.flatnonzero(sizes)
    by_size = nonempty[np.argsort(sizes[nonempty], kind="stable")]
    return np.array([rng.choice(run) for run in np.array_split(by_size, min(count, len(by_size)))])[::-1]


def _montage_png(source: ManifestSource, ids: np.ndarray, hierarchy: Hierarchy, clusters: np.ndarray,
                 per_cluster: int) -> tuple[bytes, list[dict[str, Any]]]:
    level, sizes = hierarchy.levels[0], hierarchy.cluster_sizes()[0]
    shown = []
    for cluster in clusters:
        members = np.flatnonzero(level.parents == cluster)
        shown.append(ids[members[np.argsort(level.distances[members], kind="stable")][:per_cluster]])
    images = iter(source.get_many(np.concatenate(shown).tolist()))  # one call: the reads overlap
    figure = _figure(1.5 + CELL * per_cluster, HEADER + CELL * len(clusters))
    for axes_row, cluster, rows in zip(figure.subplots(len(clusters), per_cluster, squeeze=False), clusters, shown):
        for column, axes in enumerate(axes_row):
            if column < len(rows):
                _show(axes, next(images))
            else:
                axes.set_axis_off()
        axes_row[0].set_ylabel(f"cluster {cluster}\n{sizes[cluster]} images", rotation=0, ha="right", va="center")
    figure.suptitle("Sample bottom-level clusters, images nearest the centroid first")
    entries = [{"cluster": int(c), "size": int(sizes[c]), "rows": rows.tolist()} for c, rows in zip(clusters, shown)]
    return _png(figure), entries


def _duplicate_examples(removed: list[dict[str, Any]], count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Up to ``count`` removals, drawn at random within each step and taken from the steps in turn,
    so every step with removals shows (count allowing) however lopsided the steps are."""
    by_step = [[entry for entry in removed if entry["step"] == step] for step in DEDUP_STEPS]
    shuffled = [[run[i] for i in rng.permutation(len(run))] for run in by_step if run]
    return [entry for turn in zip_longest(*shuffled) for entry in turn if entry is not None][:count]


def _duplicates_png(pool: ManifestSource, dedup: dict[str, Any], examples: list[dict[str, Any]]) -> bytes:
    eval_source = None
    if any(e["step"].startswith("eval") for e in examples):
        # the evaluation manifest was embedded too: the same check that its rows did not change
        eval_source = ManifestSource(checked_manifest({"manifest_uri": dedup["eval"]["uri"],
                                                     "manifest_digest": dedup["eval"]["digest"]}))
    removed = pool.get_many([e["row"] for e in examples])
    figure = _figure(4, HEADER + PAIR_ROW * len(examples))
    for (left, right), entry, image in zip(figure.subplots(len(examples), 2, squeeze=False), examples, removed):
        origin, source = ("eval", eval_source) if entry["step"].startswith("eval") else ("pool", pool)
        _show(left, image)
        _show(right, source.get_many([entry["duplicate_of"]])[0])
        similarity = "pHash match" if entry["similarity"] is None else f"similarity {entry['similarity']:.3f}"
        left.set_title(f"{entry['step']}: {similarity}", fontsize=8, loc="left")
        left.set_xlabel(f"removed: pool row {entry['row']}", fontsize=7)
        right.set_xlabel(f"duplicate of: {origin} row {entry['duplicate_of']}", fontsize=7)
    figure.suptitle("Near-duplicate removals")
    return _png(figure)


def _markdown(report: dict[str, Any]) -> str:
    pool = report["pool"]
    lines = [f"# Curation report: {report['out_uri']}", "", f"Pool `{pool['uri']}` ({pool['digest']}).", "",
             "| step | images |", "|---|---:|"]
    lines += [f"| {STEP_NAMES[step]} | {count} |" for step, count in report["counts"].items()]
    if report["skipped_reasons"]:
        lines += ["", "Skipped: " + ", ".join(f"{reason} {n}" for reason, n in report["skipped_reasons"].items()) + "."]
    lines += ["", "| level | clusters | empty | entropy (nats) | max log k |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {i} | {h['clusters']} | {h['empty']} | {h['entropy']:.3f} | {h['max_entropy']:.3f} |"
              for i, h in enumerate(report["clusters"]["levels"])]
    if report["curated"]:
        lines += ["", "| curated manifest | images | bottom entropy: curated / pool | top entropy: curated / pool |",
                  "|---|---:|---:|---:|"]
        for entry in report["curated"]:
            entropy = [f"{entry['entropy_nats'][end]['curated']:.3f} / {entry['entropy_nats'][end]['pool']:.3f}"
                       for end in ("bottom", "top")]
            lines.append(f"| `{entry['uri']}` | {entry['images']} | {entropy[0]} | {entropy[1]} |")
    lines += ["", "![cluster sizes](cluster_sizes.png)", "", "![sample clusters](clusters_montage.png)", ""]
    near = report["near_duplicates"]
    lines.append(f"![near duplicates]({near['file']})" if near["file"] else
                 f"No near-duplicate examples: {near['reason']}.")
    return "\n".join(lines) + "\n"


def write_report(out_uri: str, *, curated: Sequence[str] = (), montage_clusters: int = 6, per_cluster: int = 8,
                 duplicate_examples: int = 8, seed: int = 0) -> dict[str, Any]:
    """Writes ``OUT/report/`` (see the module docstring) for the curation directory ``out_uri`` and
    the ``curated`` manifests sampled from it; returns the contents of ``report.json``. Which
    clusters and removals are pictured is fixed by ``seed``."""
    if min(montage_clusters, per_cluster, duplicate_examples) < 1:
        raise ValueError("montage_clusters, per_cluster and duplicate_examples must be positive")
    fs, root = fsspec.core.url_to_fs(out_uri)
    if not fs.exists(join(root, "clusters.npz")):
        raise FileNotFoundError(f"{fs.unstrip_protocol(join(root, 'clusters.npz'))} not found: run the cluster step "
                                "(`dinoforge curate cluster`) before the report")
    info = embedding_info(out_uri)
    ids, hierarchy, cluster_params = read_clusters(out_uri)
    pool = checked_manifest(info)
    source = ManifestSource(pool)
    # only the reasons: the embeddings themselves are not needed here
    chunks = iter_chunks(out_uri, ("skipped_reasons",))
    skipped = Counter(reason for chunk in chunks for reason in chunk["skipped_reasons"].tolist())
    dedup = read_dedup(out_uri)
    if dedup is not None and dedup["pool"]["digest"] != pool.digest:
        raise ValueError(f"{join(out_uri, 'dedup.json')} is about pool {dedup['pool']['digest']}, "
                         f"not the embedded pool {pool.digest}: its row numbers mean other images")

    points, sizes = hierarchy.point_clusters(), hierarchy.cluster_sizes()
    selections = [(uri, *_curated_positions(uri, pool, ids)) for uri in curated]
    # one set of bins for the pool and every curated set, so their outlines share the x axis
    curated_sizes = [np.bincount(points[positions, 0], minlength=len(sizes[0])) for _, _, positions in selections]
    bins, log_bins = _size_bins([sizes[0], *curated_sizes])
    levels = [size_histogram(points[:, i], len(s), bins if i == 0 else _size_bins([s])[0]) for i, s in enumerate(sizes)]
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "out_uri": out_uri,
        "pool": {"uri": info["manifest_uri"], "digest": pool.digest},
        "counts": {"pool": info["num_rows"], "skipped": sum(skipped.values()),
                   **({step: dedup["counts"][step] for step in (*DEDUP_STEPS, "kept")} if dedup else {}),
                   "clustered": len(ids)},
        "skipped_reasons": dict(sorted(skipped.items())),
        "dedup": None if dedup is None else {key: dedup[key] for key in ("method", "params", "eval", "counts")},
        "clusters": {"params": cluster_params, "levels": levels},
        "curated": [{"uri": uri, "digest": manifest.digest, "images": len(manifest),
                     "entropy_nats": {end: {"curated": cluster_entropy(points[positions, i], len(sizes[i])),
                                            "pool": levels[i]["entropy"]} for end, i in (("bottom", 0), ("top", -1))},
                     "bottom_sizes": size_histogram(points[positions, 0], len(sizes[0]), bins)}
                    for uri, manifest, positions in selections],
    }

    fs.makedirs(join(root, "report"), exist_ok=True)
    files: list[str] = []

    def upload(name: str, data: bytes) -> None:
        path = join(root, "report", name)
        fs.pipe_file(path, data)
        files.append(name)
        log.info("curation report: wrote %s (%d bytes)", fs.unstrip_protocol(path), len(data))

    series = [("pool", levels[0])] + [(c["uri"].rsplit("/", 1)[-1], c["bottom_sizes"]) for c in report["curated"]]
    upload("cluster_sizes.png", _sizes_png(series, log_bins))
    # Separate streams per picture, so asking for more duplicate examples leaves the montage alone.
    clusters = _montage_clusters(sizes[0], montage_clusters, np.random.default_rng([seed, 0]))
    montage, entries = _montage_png(source, ids, hierarchy, clusters, per_cluster)
    upload("clusters_montage.png", montage)
    report["montage"] = {"file": "clusters_montage.png", "seed": seed, "clusters": entries}
    if dedup is None or not dedup["removed"]:
        reason = "no dedup.json in the curation directory" if dedup is None else "dedup.json lists no removals"
        report["near_duplicates"] = {"file": None, "reason": reason}
        stale = join(root, "report", "near_duplicates.png")
        if fs.exists(stale):  # from an earlier report: it would show removals this one does not list
            fs.rm(stale)
    else:
        examples = _duplicate_examples(dedup["removed"], duplicate_examples, np.random.default_rng([seed, 1]))
        upload("near_duplicates.png", _duplicates_png(source, dedup, examples))
        report["near_duplicates"] = {"file": "near_duplicates.png", "seed": seed, "examples": examples}
    upload("report.md", _markdown(report).encode())
    report["files"] = [*files, "report.json"]
    upload("report.json", json.dumps(report, indent=2).encode())
    return report
