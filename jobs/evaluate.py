"""TorchX component: frozen-feature evaluation (``dinoforge evaluate suite``) under torchrun."""

from typing import Dict, List, Optional

from torchx import specs

from dinoforge.jobs.common import Launch, with_launch_docs


@with_launch_docs
def evaluate(
    *suite_args: str,
    weights: str,
    protocols: str = "knn",
    out: str = "",
    export_from: str = "",
    name: str = "evaluate",
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
    """Evaluation of exported weights: ``torchrun ... -m dinoforge.cli evaluate suite``.

    With several ranks, k-NN alone shards the train set across them (each rank embeds its share;
    rank 0 prints the merged result and writes no files). Any other protocol set runs the suite
    in one process, so it needs nnodes=1 and nproc_per_node=1.

    Args:
        suite_args: more ``dinoforge evaluate suite`` flags (e.g. --train-limit 1000 --k 20), after ``--``
        weights: exported weights URI (.pth with its .json beside it)
        protocols: comma-separated protocols or 'all' (dinoforge evaluate --help lists them)
        out: local directory in the container for results.jsonl, summary.json and pictures (empty: none)
        export_from: run directory or checkpoint to export to ``weights`` first (``dinoforge export``; nnodes=1 only)
    """
    from dinoforge.eval.suite import parse_protocols  # imports torch: only when the job is built

    launch = Launch.from_args(locals())
    if parse_protocols(protocols) != ("knn",) and (launch.multi_node or nproc_per_node > 1):
        raise ValueError(f"protocols {protocols!r} run in one process: use nnodes=1 and nproc_per_node=1 "
                         "(only protocols='knn' shards across ranks)")
    cli_args = ["evaluate", "suite", "--weights", weights, "--protocols", protocols, *(["--out", out] if out else [])]
    before = ["export", export_from, weights] if export_from else None
    return launch.app("evaluate", [cli_args + list(suite_args)], before=before)
