"""``dinoforge curate run``: every curation step in one process, in order, on one curation
directory: embed the pool (and the evaluation and seed sets) -> de-duplicate -> cluster ->
balanced sample and/or seed retrieval -> report. Each step is the same function its own
command runs, so a cluster can run the steps as separate (sharded) jobs and get the same files.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from dinoforge.curation.embed import embed_manifest
from dinoforge.curation.report import write_report
from dinoforge.curation import DEDUP_METHODS
from dinoforge.curation.steps import cluster_step, dedup_step, kept_rows, read_dedup, retrieve_step, sample_step
from dinoforge.data.storage import join

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurateSettings:
    """One local curation run. ``levels`` None: two levels, about 20 images per bottom cluster
    and sqrt(bottom) top clusters (``auto_levels``). ``n`` None: no balanced sample; ``seeds``
    None: no retrieval; at least one of them is needed."""

    manifest: str
    weights: str
    out: str
    eval_manifest: str | None = None
    seeds: str | None = None
    dedup_method: str = "copy"
    levels: tuple[int, ...] | None = None
    resampling_steps: int = 10
    n: int | None = None
    retrieve_method: str = "exact"
    k: int = 4
    per_cluster: int = 10_000
    chunk_rows: int = 4096
    batch_size: int = 256
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n is None and self.seeds is None:
            raise ValueError("nothing to output: give n (balanced sample) and/or seeds (retrieval)")
        if self.dedup_method not in DEDUP_METHODS + ("none",):
            raise ValueError(f"dedup_method must be one of {DEDUP_METHODS + ('none',)}, got {self.dedup_method!r}")


def auto_levels(points: int) -> list[int]:
    """[bottom, top] cluster counts for ``points`` images: bottom = points / 20, top =
    sqrt(bottom), at least 2 each (hierarchical k-means needs fewer clusters than points)."""
    bottom = max(2, min(points - 1, points // 20))
    return [bottom, max(2, min(bottom - 1, round(math.sqrt(bottom))))]


def _timed(step: str, fn: Callable[[], dict[str, Any]], **labels: str) -> dict[str, Any]:
    """``fn()``'s summary with the step's name, ``labels`` and its duration."""
    started = time.perf_counter()
    summary = fn()
    seconds = round(time.perf_counter() - started, 3)
    log.info("curate %s %s done in %.1f s", step, " ".join(labels.values()), seconds)
    return {"step": step, **labels, **summary, "seconds": seconds}


def run_curation(settings: CurateSettings) -> list[dict[str, Any]]:
    """Runs the steps in one process (resuming embeddings already computed) and returns each
    step's summary; outputs: ``OUT/curated.parquet`` (sample), ``OUT/retrieved.parquet``
    (retrieval), ``OUT/report/``."""
    s, out = settings, settings.out
    summaries = []
    sets = [("pool", s.manifest, out)]
    sets += [("eval", s.eval_manifest, join(out, "eval"))] if s.eval_manifest else []
    sets += [("seeds", s.seeds, join(out, "seeds"))] if s.seeds else []
    for name, manifest, where in sets:
        summaries.append(_timed("embed", lambda: embed_manifest(
            manifest, s.weights, where, rank=0, world=1, chunk_rows=s.chunk_rows, batch_size=s.batch_size, device=s.device),
            images=name))
    if s.dedup_method != "none":
        summaries.append(_timed("dedup", lambda: dedup_step(
            out, eval_uri=join(out, "eval") if s.eval_manifest else None, method=s.dedup_method)))
    dedup = read_dedup(out)
    if s.dedup_method == "none" and dedup is not None:
        raise ValueError(f"{out} holds a dedup.json from an earlier run, which cluster would apply: "
                         "remove it or use another output")
    levels = list(s.levels) if s.levels else auto_levels(len(kept_rows(out)))
    summaries.append(_timed("cluster", lambda: cluster_step(out, levels, resampling_steps=s.resampling_steps, seed=s.seed)))
    curated = []
    if s.n is not None:
        curated.append(join(out, "curated.parquet"))
        summaries.append(_timed("sample", lambda: sample_step(out, s.n, curated[-1], seed=s.seed)))
    if s.seeds is not None:
        curated.append(join(out, "retrieved.parquet"))
        summaries.append(_timed("retrieve", lambda: retrieve_step(
            out, join(out, "seeds"), curated[-1], method=s.retrieve_method, k=s.k, per_cluster=s.per_cluster, seed=s.seed)))
    report = _timed("report", lambda: write_report(out, curated=curated, seed=s.seed))
    summaries.append({"step": "report", "files": report.get("files"), "seconds": report["seconds"]})
    summaries.append({"step": "run", "settings": asdict(s), "outputs": curated})
    return summaries
