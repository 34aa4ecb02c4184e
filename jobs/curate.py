"""TorchX component: data curation (``dinoforge curate``), with the embedding sharded under torchrun."""

from typing import Dict, List, Optional

from torchx import specs

from dinoforge.jobs.common import Launch, with_launch_docs


@with_launch_docs
def curate(
    *run_args: str,
    manifest: str,
    weights: str,
    out: str,
    n: int,
    eval_manifest: str = "",
    dedup_method: str = "copy",
    chunk_rows: int = 4096,
    batch_size: int = 256,
    name: str = "curate",
    image: str = Launch.image,
    nnodes: str = Launch.nnodes,
    nproc_per_node: int = Launch.nproc_per_node,
    gpus_per_node: int = Launch.gpus_per_node,
    cpu: int = Launch.cpu,
    memMB: int = Launch.memMB,
    max_restarts: int = Launch.max_restarts,
    job_retries: int = Launch.job_retries,
    rdzv_port: int = Launch.rdzv_port,
    metrics_port: int = Launch.metrics_port,
    mlflow_tracking_uri: str = Launch.mlflow_tracking_uri,
    mlflow_experiment: str = Launch.mlflow_experiment,
    lineage_parent: str = Launch.lineage_parent,
    loglevel: str = Launch.loglevel,
    env: Optional[Dict[str, str]] = Launch.env,
    mounts: Optional[List[str]] = Launch.mounts,
) -> specs.AppDef:
    """LVD-142M-style curation: sharded embedding, then dedup, clustering, sampling and report.

    Every rank embeds its share of ``manifest`` (``torchrun ... -m dinoforge.cli curate embed``,
    resumable chunks under OUT/embeddings/), and of ``eval_manifest`` into OUT/eval when given.
    Then the first node alone runs ``dinoforge curate run`` with the same settings, once its
    torchrun has returned (torchrun's agents wait for each other at exit, by default up to 300 s):
    it skips the chunks already complete, embeds any still missing, then runs dedup, clustering,
    the balanced sample (OUT/curated.parquet) and the report (OUT/report/).

    Args:
        run_args: more ``dinoforge curate run`` flags (e.g. --levels 1000 100 --seeds URI), after ``--``
        manifest: pool manifest URI (Parquet)
        weights: exported weights of the embedding model (.pth with its .json beside it)
        out: curation URI (any fsspec URI)
        n: images in the balanced sample
        eval_manifest: evaluation images whose copies are removed from the pool (empty: none)
        dedup_method: copy, embedding, hash or none (dinoforge curate run --dedup)
        chunk_rows: manifest rows per resumable embedding chunk
        batch_size: images per embedding batch
    """
    from dinoforge.data.storage import join  # the eval layout `curate run` reads: OUT/eval

    launch = Launch.from_args(locals())
    shared = ["--weights", weights, "--chunk-rows", str(chunk_rows), "--batch-size", str(batch_size)]
    embeds = [["curate", "embed", manifest, "--out", out, *shared]]
    final = ["curate", "run", manifest, "--out", out, "--n", str(n), "--dedup", dedup_method, *shared]
    if eval_manifest:
        embeds.append(["curate", "embed", eval_manifest, "--out", join(out, "eval"), *shared])
        final += ["--eval-manifest", eval_manifest]
    return launch.app("curate", embeds, first_node=final + list(run_args))
