"""What every dinoforge TorchX component shares: the launch parameters and the AppDef builder.

A stage is one TorchX role that runs ``bash -c "<steps>"``: one or more ``torchrun ... -m
dinoforge.cli ...`` invocations, then optionally a plain ``dinoforge ...`` on the first node
only. Going through bash, as ``torchx.components.dist.ddp`` does, lets the shell expand the
rendezvous host (``${TORCHX_RANK0_HOST:=localhost}`` on the first pod, Volcano's
``VC_<ROLE>_0_HOSTS`` on the others) inside the container.

Restarts. When a role has ``max_retries > 0``, TorchX 0.7.0's kubernetes scheduler gives each
Volcano task ``maxRetry`` and the policies ``PodEvicted``/``PodFailed`` -> ``RestartJob``
(``RetryPolicy.APPLICATION``, the Role default) and warns that Volcano does not handle these
retries correctly (volcano-sh/volcano#1651). So recovery does not rest on them:

- inside a pod, ``torchrun --max-restarts N`` restarts the worker group in place when a worker
  fails;
- ``dinoforge pretrain`` (and so distillation) resumes from the newest committed checkpoint
  under ``--output``, and ``dinoforge curate`` resumes the embedding chunks already written, so
  a resubmitted job (by hand or by a pipeline operator) carries on where the last one stopped.

The role's ``max_retries`` is therefore ``job_retries``, 0 by default: TorchX then emits no
Volcano policies, and with no matching policy Volcano's job controller takes its default
``SyncJob`` action on a pod failure, which does not restart the job (``applyPolicies`` in
volcano's pkg/controllers/job/job_controller_util.go). A positive ``job_retries`` opts into
Volcano whole-job restarts, which also resume from the checkpoints.
"""

import inspect
import shlex
import textwrap
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

from torchx import specs

from dinoforge.build_info import default_image

F = TypeVar("F", bound=Callable[..., specs.AppDef])

# Shown in every component's --help, before its arguments.
KUBERNETES_NOTES = """\
On Kubernetes (``-s kubernetes``: a Volcano Job), the namespace, Volcano queue, priority class
and service account are scheduler run options, not component arguments:
``-cfg namespace=N,queue=Q,priority_class=P,service_account=S``. dinoforge's kubernetes
scheduler (jobs/scheduler.py; ``torchx runopts kubernetes``) adds the options below.

Credentials: ``object_store_secret=NAME`` gives every container the keys of the Secret NAME as
environment variables (``envFrom``; e.g. ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, which s3fs reads); ``object_store_secret_mount=PATH`` also mounts that
Secret read-only at PATH, one file per key, for key files: for gcsfs, a key ``key.json`` and
``--env GOOGLE_APPLICATION_CREDENTIALS=PATH/key.json``. A cloud identity on the service account
(e.g. EKS IRSA, GKE Workload Identity) needs neither.

Metrics: unless ``metrics_annotations=False`` (or ``metrics_port`` is 0), every pod carries
``prometheus.io/scrape: "true"``, ``prometheus.io/port`` (local rank 0's port, ``metrics-0``)
and ``prometheus.io/path: /metrics``. Those annotations name one port per pod: to scrape every
local rank, select the container ports named ``metrics-<local rank>`` with a PodMonitor, by
TorchX's pod labels (``torchx.pytorch.org/app-name``, ``torchx.pytorch.org/role-name``)."""

# The Args entries of the Launch fields, appended to every component's docstring.
LAUNCH_ARGS_DOC = """\
name: job name: the TorchX app name and DINOFORGE_JOB (Kubernetes adds a unique suffix to the Volcano Job's name)
image: container image with dinoforge installed (default: the release of this version; unused by local_cwd)
nnodes: nodes: N, or MIN:MAX for an elastic job (torchrun --nnodes; one pod per node, the first MIN required)
nproc_per_node: worker processes per node (torchrun --nproc-per-node)
gpus_per_node: GPUs per node (0: CPU only; else at least nproc_per_node, one per process)
cpu: CPUs per node
memMB: memory per node in MB
max_restarts: times torchrun restarts the node's worker group in place after a worker fails
job_retries: Volcano whole-job restarts after a pod fails (0: none; see jobs/common.py)
rdzv_port: c10d rendezvous port on the first node (multi-node jobs; later torchrun steps use the next ports; a single node picks free ports)
metrics_port: Prometheus port of local rank 0 (DINOFORGE_METRICS_PORT; local rank i uses port + i; 0: not served)
mlflow_tracking_uri: MLflow tracking server (MLFLOW_TRACKING_URI; empty: not set)
mlflow_experiment: MLflow experiment name (MLFLOW_EXPERIMENT_NAME)
lineage_parent: MLflow lineage parent key passed by a pipeline (DINOFORGE_LINEAGE_PARENT; empty: not set)
loglevel: torchrun's log level (LOGLEVEL)
env: more environment variables, KEY=VALUE,... (they win over the ones above); never secrets: the values are stored in the Job in plain text (use -cfg object_store_secret)
mounts: TorchX mounts, e.g. type=volume,src=CLAIM,dst=/data[,readonly] (a PersistentVolumeClaim on Kubernetes)"""


def parse_nnodes(nnodes: str) -> Tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:4"`` -> (1, 4) (elastic: at least 1 node, at most 4)."""
    parts = nnodes.split(":")
    if len(parts) > 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"nnodes must be N or MIN:MAX (e.g. 2 or 1:4), got {nnodes!r}")
    min_nodes, max_nodes = int(parts[0]), int(parts[-1])
    if not 1 <= min_nodes <= max_nodes:
        raise ValueError(f"nnodes must satisfy 1 <= MIN <= MAX, got {nnodes!r}")
    return min_nodes, max_nodes


def shell_words(words: List[str]) -> str:
    """Quotes each word for bash. ``$`` is doubled because TorchX runs ``string.Template``
    substitution (its macros, e.g. ``${app_id}``) over Role.args, which turns ``$$`` back into
    ``$``: user values reach the shell unchanged."""
    return " ".join(shlex.quote(word).replace("$", "$$") for word in words)


def check_cli(cli_args: List[str]) -> None:
    """Parses ``cli_args`` with the dinoforge CLI's own parser, so that a bad flag fails when the
    job is built rather than in a pod (after hours of embedding, for ``curate run``)."""
    from dinoforge.cli import build_parser  # imports torch: only when a component is built

    try:
        build_parser().parse_args(cli_args)
    except SystemExit:  # argparse has printed the reason
        raise ValueError(f"invalid dinoforge arguments: {shlex.join(cli_args)}") from None


def with_launch_docs(component: F) -> F:
    """Adds the shared Kubernetes notes and the Launch arguments to ``component``'s docstring
    (its own docstring ends with its Args section), where ``torchx run ... --help`` reads them."""
    head, _, own_args = inspect.cleandoc(component.__doc__ or "").partition("\nArgs:\n")
    shared_args = textwrap.indent(LAUNCH_ARGS_DOC, "    ")
    component.__doc__ = f"{head}\n\n{KUBERNETES_NOTES}\n\nArgs:\n{own_args}\n{shared_args}\n"
    return component


@dataclass(frozen=True)
class Launch:
    """How a stage is launched: the parameters every component takes (and documents through
    ``with_launch_docs``). Components use the class attributes as their defaults
    (``image: str = Launch.image``), so each default is written once."""

    name: str
    image: str = default_image()
    nnodes: str = "1"
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    cpu: int = 4
    memMB: int = 16384
    max_restarts: int = 3
    job_retries: int = 0
    rdzv_port: int = 29500
    metrics_port: int = 9400
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "dinoforge"
    lineage_parent: str = ""
    loglevel: str = "WARNING"
    env: Optional[Dict[str, str]] = None
    mounts: Optional[List[str]] = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "Launch":
        """Picks the Launch fields out of a component's arguments (its ``locals()``), so the
        components declare them (TorchX reads parameters from the signature) but never copy them."""
        return cls(**{field.name: args[field.name] for field in fields(cls)})

    def __post_init__(self) -> None:
        # Fail when the component is built, not minutes later inside a pod.
        parse_nnodes(self.nnodes)
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be at least 1, got {self.nproc_per_node}")
        if 0 < self.gpus_per_node < self.nproc_per_node:
            raise ValueError(f"nproc_per_node ({self.nproc_per_node}) exceeds gpus_per_node ({self.gpus_per_node}): "
                             "each process needs its own GPU")

    @property
    def multi_node(self) -> bool:
        return parse_nnodes(self.nnodes)[1] > 1

    def rdzv_ports(self, count: int) -> Dict[str, int]:
        """Ports of ``count`` successive torchrun steps, one each: a node that starts the next
        step cannot join the previous step's rendezvous store while the first node still hosts it."""
        return {("c10d" if step == 0 else f"c10d-{step}"): self.rdzv_port + step for step in range(count)}

    def _torchrun(self, cli_args: List[str], port: int) -> str:
        """``torchrun ... -m dinoforge.cli CLI_ARGS`` with the c10d rendezvous on the first node."""
        check_cli(cli_args)
        if self.multi_node:
            # $$ escapes TorchX's macro substitution; the shell expands the variable in the pod.
            endpoint = f"$${{{specs.macros.rank0_env}:=localhost}}:{port}"
        else:
            endpoint = "localhost:0"  # one agent: any free port (as torchx's dist.ddp does)
        launcher = ["torchrun", "--nnodes", self.nnodes, "--nproc-per-node", str(self.nproc_per_node),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", specs.macros.app_id,
                    "--max-restarts", str(self.max_restarts), "-m", "dinoforge.cli"]
        return " ".join(launcher) + " " + shell_words(cli_args)

    def app(self, stage: str, sharded: List[List[str]], first_node: Optional[List[str]] = None,
            before: Optional[List[str]] = None) -> specs.AppDef:
        """One role that runs ``before`` as one plain ``dinoforge`` process (single-node jobs
        only: other nodes would not wait for it), then, on every node, each CLI invocation of
        ``sharded`` under torchrun in turn, then ``first_node`` as one plain ``dinoforge`` process
        on the first replica only; each step must succeed for the next to start."""
        min_nodes, max_nodes = parse_nnodes(self.nnodes)
        rdzv = self.rdzv_ports(len(sharded))
        steps = [self._torchrun(cli_args, port) for cli_args, port in zip(sharded, rdzv.values())]
        if before:
            if self.multi_node:
                raise ValueError(f"a step before torchrun needs nnodes=1, got {self.nnodes!r}")
            check_cli(before)
            steps.insert(0, f"dinoforge {shell_words(before)}")
        if first_node:
            check_cli(first_node)
            steps.append(f"if [ {specs.macros.replica_id} = 0 ]; then dinoforge {shell_words(first_node)}; fi")
        ports = rdzv if self.multi_node else {}
        if self.metrics_port:
            ports |= {f"metrics-{rank}": self.metrics_port + rank for rank in range(self.nproc_per_node)}
        return specs.AppDef(
            name=self.name,
            roles=[specs.Role(
                name=stage,
                image=self.image,
                entrypoint="bash",
                args=["-c", " && ".join(steps)],
                env=self.job_env(stage),
                num_replicas=max_nodes,
                min_replicas=min_nodes,
                resource=specs.Resource(cpu=self.cpu, gpu=self.gpus_per_node, memMB=self.memMB),
                port_map=ports,
                max_retries=self.job_retries,
                mounts=specs.parse_mounts(self.mounts) if self.mounts else [],
            )],
        )

    def job_env(self, stage: str) -> Dict[str, str]:
        env = {
            "DINOFORGE_JOB": self.name,
            "DINOFORGE_STAGE": stage,
            "DINOFORGE_IMAGE": self.image,  # an MLflow tag of every stage run (lineage)
            "DINOFORGE_METRICS_PORT": str(self.metrics_port),
            "MLFLOW_EXPERIMENT_NAME": self.mlflow_experiment,
            "LOGLEVEL": self.loglevel,
        }
        if self.mlflow_tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_tracking_uri
        if self.lineage_parent:
            env["DINOFORGE_LINEAGE_PARENT"] = self.lineage_parent
        return env | (self.env or {})
