"""TorchX's kubernetes scheduler plus what TorchX 0.7.0 cannot put in a Volcano Job: hardened pods,
object-store credentials from a Kubernetes Secret and Prometheus scrape annotations.

Installed, it is TorchX's ``kubernetes`` scheduler (``[project.entry-points."torchx.schedulers"]``
in pyproject.toml), so ``torchx run -s kubernetes -cfg queue=Q,object_store_secret=s3-creds ...``
uses it. setuptools writes entry points sorted by name, so ``torchx run`` without ``-s`` now
defaults to ``aws_batch`` (TorchX's own default is ``local_docker``): always pass ``-s``. Its
extra run options (``torchx runopts kubernetes`` lists them):

- ``object_store_secret=NAME``: every container of every task gets ``envFrom`` the Secret, so its
  keys become environment variables (for s3fs: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_ENDPOINT_URL``). A component's ``env`` wins over a key of the same name (Kubernetes
  gives ``env`` precedence over ``envFrom``).
- ``object_store_secret_mount=PATH``: also mounts that Secret read-only at ``PATH`` (one file per
  key), for credentials that must be files: e.g. a key ``key.json`` and
  ``--env GOOGLE_APPLICATION_CREDENTIALS=PATH/key.json``.
- ``metrics_annotations`` (default true): pods whose container has the port ``metrics-0`` (local
  rank 0's metrics port, see jobs/common.py) get ``prometheus.io/scrape``, ``prometheus.io/port``
  and ``prometheus.io/path`` annotations; ``metrics_annotations=False`` leaves them out.
- ``run_as_user`` (default the image's UID, ``dinoforge.build_info.IMAGE_UID``) and
  ``read_only_root_filesystem`` (default true): every pod gets the restricted security context
  (Kubernetes Pod Security Standards, "restricted"): non-root user and group, seccomp
  RuntimeDefault, no privilege escalation, all capabilities dropped, a read-only root filesystem
  with an ``emptyDir`` on each path the image writes (``build_info.WRITABLE_PATHS``), and no
  service-account token (the jobs never call the Kubernetes API). TorchX's memory-backed
  ``/dev/shm`` (DataLoader workers) stays. A device mount (``type=device``) makes TorchX's container
  privileged; that container then keeps privilege escalation, which Kubernetes requires with it.
  Every pod is also labelled ``app.kubernetes.io/part-of: dinoforge``, which the platform chart's
  NetworkPolicies select.
"""

from typing import Any, Dict, List, Optional, cast

from kubernetes.client import (
    ApiClient,
    V1Capabilities,
    V1EmptyDirVolumeSource,
    V1EnvFromSource,
    V1Pod,
    V1PodSecurityContext,
    V1SeccompProfile,
    V1SecretEnvSource,
    V1SecretVolumeSource,
    V1SecurityContext,
    V1Volume,
    V1VolumeMount,
)
from torchx.schedulers.api import AppDryRunInfo
from torchx.schedulers.kubernetes_scheduler import KubernetesJob, KubernetesOpts, KubernetesScheduler
from torchx.specs import AppDef, runopts

from dinoforge.build_info import IMAGE_UID, WRITABLE_PATHS

METRICS_PORT_NAME = "metrics-0"  # local rank 0's port: one scrape port per pod is all the annotations allow
SECRET_VOLUME = "object-store-secret"  # TorchX names its own volumes "dshm" and "mount-<i>"
PART_OF_LABEL = {"app.kubernetes.io/part-of": "dinoforge"}


class DinoforgeKubernetesOpts(KubernetesOpts, total=False):
    object_store_secret: Optional[str]
    object_store_secret_mount: Optional[str]
    metrics_annotations: bool
    run_as_user: int
    read_only_root_filesystem: bool


def pod_templates(job: KubernetesJob) -> List[V1Pod]:
    """The pod template of each Volcano task (TorchX makes one task per replica)."""
    spec = cast(Dict[str, Any], job.resource["spec"])
    return [task["template"] for task in spec["tasks"]]


def env_from_secret(pod: V1Pod, secret: str) -> None:
    for container in pod.spec.containers:
        container.env_from = [*(container.env_from or []), V1EnvFromSource(secret_ref=V1SecretEnvSource(name=secret))]


def mount_secret(pod: V1Pod, secret: str, path: str) -> None:
    pod.spec.volumes.append(V1Volume(name=SECRET_VOLUME, secret=V1SecretVolumeSource(secret_name=secret)))
    for container in pod.spec.containers:
        container.volume_mounts.append(V1VolumeMount(name=SECRET_VOLUME, mount_path=path, read_only=True))


def scratch_volume_name(path: str) -> str:
    return "scratch" + path.replace("/", "-")  # /tmp -> scratch-tmp


def harden(pod: V1Pod, uid: int, read_only_root: bool) -> None:
    """The restricted security context described in this module's docstring, in place."""
    spec = pod.spec
    spec.security_context = V1PodSecurityContext(
        run_as_non_root=True, run_as_user=uid, run_as_group=uid, fs_group=uid,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"))
    spec.automount_service_account_token = False
    spec.enable_service_links = False
    pod.metadata.labels = {**(pod.metadata.labels or {}), **PART_OF_LABEL}
    for container in spec.containers:
        context = container.security_context or V1SecurityContext()
        context.run_as_non_root = True
        context.capabilities = V1Capabilities(drop=["ALL"])
        context.seccomp_profile = V1SeccompProfile(type="RuntimeDefault")
        if not context.privileged:
            context.allow_privilege_escalation = False
        context.read_only_root_filesystem = read_only_root
        container.security_context = context
    if read_only_root:
        mounted = {mount.mount_path for container in spec.containers for mount in container.volume_mounts or []}
        for path in WRITABLE_PATHS:
            if path in mounted:  # a user mount (TorchX's --mounts) is there already
                continue
            spec.volumes.append(V1Volume(name=scratch_volume_name(path), empty_dir=V1EmptyDirVolumeSource()))
            for container in spec.containers:
                container.volume_mounts.append(V1VolumeMount(name=scratch_volume_name(path), mount_path=path))


def annotate_metrics(pod: V1Pod) -> None:
    """Prometheus annotations naming the pod's ``metrics-0`` port; none when it has no such port."""
    ports = {port.name: port.container_port for container in pod.spec.containers for port in container.ports or []}
    if METRICS_PORT_NAME in ports:
        pod.metadata.annotations |= {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(ports[METRICS_PORT_NAME]),
            "prometheus.io/path": "/metrics",
        }


class DinoforgeKubernetesScheduler(KubernetesScheduler):
    """TorchX's kubernetes scheduler with the run options described in this module's docstring."""

    def _run_opts(self) -> runopts:
        opts = super()._run_opts()
        opts.add("object_store_secret", type_=str,
                 help="Secret whose keys become environment variables of every container (envFrom)")
        opts.add("object_store_secret_mount", type_=str,
                 help="Also mount object_store_secret read-only at this path (one file per key)")
        opts.add("metrics_annotations", type_=bool, default=True,
                 help="Annotate pods with a metrics-0 port for Prometheus (prometheus.io/scrape, port, path)")
        opts.add("run_as_user", type_=int, default=IMAGE_UID,
                 help="User and group id of every container (the dinoforge image's user by default)")
        opts.add("read_only_root_filesystem", type_=bool, default=True,
                 help=f"Read-only root filesystem, with emptyDir volumes on {', '.join(WRITABLE_PATHS)}")
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: KubernetesOpts) -> AppDryRunInfo[KubernetesJob]:
        # TorchX builds the whole Job here; its dryrun printout (repr of the request) and schedule()
        # both read info.request.resource, so editing the pod templates in place changes both.
        info = super()._submit_dryrun(app, cfg)
        opts = cast(DinoforgeKubernetesOpts, cfg)
        secret, mount = opts.get("object_store_secret"), opts.get("object_store_secret_mount")
        if mount and not secret:
            raise ValueError("object_store_secret_mount needs object_store_secret (the Secret to mount)")
        uid = opts.get("run_as_user", IMAGE_UID)
        if uid < 1:
            raise ValueError(f"run_as_user must be a non-root user id (>= 1), got {uid}")
        for pod in pod_templates(info.request):
            harden(pod, uid, bool(opts.get("read_only_root_filesystem")))
            if secret:
                env_from_secret(pod, secret)
                if mount:
                    mount_secret(pod, secret, mount)
            if opts.get("metrics_annotations"):
                annotate_metrics(pod)
        return info


class LazyDockerClient:
    """``docker.from_env(timeout=...)``, made on first use: a dry run or a submission without a
    workspace needs no Docker daemon. The timeout is long because a push through podman's Docker API
    sends no progress while it compresses a multi-GB layer, and docker-py's default (60 s) gives up."""

    def __init__(self, timeout_s: int = 1800) -> None:
        self.timeout_s = timeout_s
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            import docker

            self._client = docker.from_env(timeout=self.timeout_s)
        return getattr(self._client, name)


def create_scheduler(
    session_name: str, client: Optional[ApiClient] = None, **kwargs: Any
) -> DinoforgeKubernetesScheduler:
    """The ``torchx.schedulers`` entry point: TorchX calls it with the session name. ``client``, as
    in TorchX's own kubernetes factory, brings a configured API client; other keywords are ignored."""
    return DinoforgeKubernetesScheduler(session_name, client=client, docker_client=LazyDockerClient())
