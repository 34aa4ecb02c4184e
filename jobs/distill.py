"""TorchX component: distillation of a frozen teacher into a smaller student (``dinoforge pretrain``
with ``distill.teacher`` set) under torchrun."""

from typing import Dict, List, Optional

from torchx import specs

from dinoforge.jobs.common import Launch, with_launch_docs
from dinoforge.jobs.pretrain import pretrain_args


@with_launch_docs
def distill(
    *overrides: str,
    teacher: str,
    output: str,
    preset: str = "smoke_distill",
    max_steps: int = 0,
    name: str = "distill",
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
    """DINOv2 distillation: ``torchrun ... -m dinoforge.cli pretrain`` with ``distill.teacher=TEACHER``.

    The frozen teacher's targets train the preset's student; like pretraining, the run resumes
    from the newest committed checkpoint under ``output``.

    Args:
        overrides: config overrides KEY=VALUE (e.g. distill.teacher_arch=vit_large), after ``--``
        teacher: teacher URI: exported backbone weights (.pth), or a run directory or checkpoint
        output: run directory URI (local path, file://, s3://, gs://): checkpoints, metrics.jsonl
        preset: config preset name or YAML file (dinoforge config --preset NAME shows it)
        max_steps: stop after this global step (0: the preset's full length)
    """
    launch = Launch.from_args(locals())
    # Last, because later overrides win: the required teacher argument is the one used.
    cli_args = pretrain_args(preset, output, max_steps, [*overrides, f"distill.teacher={teacher}"])
    return launch.app("distill", [cli_args])
