"""TorchX component: self-supervised pretraining (``dinoforge pretrain``) under torchrun."""

from typing import Dict, List, Optional

from torchx import specs

from dinoforge.jobs.common import Launch, with_launch_docs


def pretrain_args(preset: str, output: str, max_steps: int, overrides: List[str]) -> List[str]:
    """The ``dinoforge pretrain`` arguments, shared with distillation."""
    cli_args = ["pretrain", "--preset", preset, "--output", output, "--no-progress"]
    if max_steps:
        cli_args += ["--max-steps", str(max_steps)]
    return cli_args + overrides


@with_launch_docs
def pretrain(
    *overrides: str,
    output: str,
    preset: str = "smoke",
    max_steps: int = 0,
    name: str = "pretrain",
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
    """DINOv2 self-supervised pretraining: ``torchrun ... -m dinoforge.cli pretrain``.

    Every node runs torchrun with the c10d rendezvous; each rank takes ``train.batch_size_per_gpu``
    images per step and the model is sharded with FSDP2. The run resumes from the newest committed
    checkpoint under ``output``, so a restarted or resubmitted job continues where the last stopped.

    Args:
        overrides: config overrides KEY=VALUE (e.g. optim.base_lr=1e-3), after ``--``
        output: run directory URI (local path, file://, s3://, gs://): checkpoints, metrics.jsonl
        preset: config preset name or YAML file (dinoforge config --preset NAME shows it)
        max_steps: stop after this global step (0: the preset's full length)
    """
    launch = Launch.from_args(locals())
    return launch.app("pretrain", [pretrain_args(preset, output, max_steps, list(overrides))])
