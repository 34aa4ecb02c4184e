"""The container image, built and run for real with podman (slow; scripts/setup.sh --test installs
podman, runc, mmdebstrap and docker-registry):

- it imports everything every stage needs as its non-root user on a read-only root filesystem,
  with writable tmpfs only on the paths it declares, and names its version and commit;
- ``torchx run -s local_docker`` (TorchX's Docker scheduler, through podman's Docker API) trains
  two processes in it against an S3 emulator on the host, and a second submission resumes;
- the curation chart's pod and the operator chart's pod, run as rendered (command, environment,
  security context, volumes) with the image;
- TorchX's workspace path: a checkout with a change, built as Dockerfile.torchx on top of the
  image, pushed to a local registry (Debian's docker-registry) by ``torchx run -s kubernetes``
  (Volcano Job on kmock's API server), and the Job's pod, pulled from the registry, runs the change.

The image comes from ``$DINOFORGE_TEST_IMAGE`` (CI builds it first, .ci/run) or is built here with
scripts/build_image.sh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from dinoforge.build_info import IMAGE_UID, WRITABLE_PATHS, version
from helm_chart import Chart
from object_store import free_port, start_server
from test_jobs import container as task_container
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "dinoforge-images"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
HOST = "host.containers.internal"  # the host, as podman's containers see it

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (scripts/setup.sh --test)")


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory) -> dict[str, str]:
    """podman's settings: runc with explicit ulimits where the default runtime fails (this VM), and a
    registries.conf that lets it push to and pull from the local test registry over plain HTTP."""
    folder = tmp_path_factory.mktemp("podman")
    registry_port = free_port()
    (folder / "registries.conf").write_text(f'[[registry]]\nlocation = "127.0.0.1:{registry_port}"\ninsecure = true\n')
    env = {
        **os.environ,
        "CONTAINERS_REGISTRIES_CONF": str(folder / "registries.conf"),
        "DINOFORGE_TEST_REGISTRY_PORT": str(registry_port),
    }
    if "CONTAINERS_CONF" not in env and shutil.which("runc"):
        env["CONTAINERS_CONF"] = str(ROOT / "scripts" / "containers.conf")
    return env


def podman(env: dict, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="session")
def image(podman_env) -> str:
    tag = os.environ.get("DINOFORGE_TEST_IMAGE")
    if not tag:
        built = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_image.sh")],
            env=podman_env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert built.returncode == 0, built.stderr[-4000:]
        tag = built.stdout.strip().splitlines()[-1]
    labels = json.loads(podman(podman_env, "image", "inspect", tag).stdout)[0]["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == version() and labels["io.dinoforge.flavor"] == "cpu"
    return tag


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> dict[str, str]:
    """An S3 emulator (moto_server) that containers reach: it listens on every interface. Yields
    the environment for this host's processes; containers use the same keys with ``endpoint_in``."""
    port = free_port()
    # moto takes the first label of an unknown host name for a bucket (virtual-host style) unless the
    # name is declared an endpoint; real S3 services and MinIO need no such thing.
    server = start_server(
        "moto_server",
        [
            "env",
            f"MOTO_S3_CUSTOM_ENDPOINTS=http://{HOST}:{port}",
            str(BIN / "moto_server"),
            "-H",
            "0.0.0.0",
            "-p",
            str(port),
        ],
        port,
        tmp_path_factory.mktemp("moto"),
    )
    env = {
        **os.environ,
        **S3_KEYS,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DINOFORGE_LINEAGE": "off",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    subprocess.run(
        [sys.executable, "-c", f"import s3fs; s3fs.S3FileSystem().mkdir('{BUCKET}')"], env=env, check=True, timeout=60
    )
    yield env | {"endpoint_in": f"http://{HOST}:{port}"}
    server.stop()


def s3_for_containers(s3: dict) -> dict[str, str]:
    return {**S3_KEYS, "AWS_ENDPOINT_URL": s3["endpoint_in"], "DINOFORGE_LINEAGE": "off"}


def host_env(s3: dict) -> dict[str, str]:
    return {key: value for key, value in s3.items() if key != "endpoint_in"}


def s3_read(s3: dict, path: str) -> str:
    code = f"import s3fs, sys; sys.stdout.write(s3fs.S3FileSystem().cat('{BUCKET}/{path}').decode())"
    return subprocess.run(
        [sys.executable, "-c", code], env=host_env(s3), capture_output=True, text=True, check=True, timeout=60
    ).stdout


def s3_list(s3: dict, prefix: str) -> list[str]:
    code = f"import json, s3fs; print(json.dumps(s3fs.S3FileSystem().find('{BUCKET}/{prefix}')))"
    return json.loads(
        subprocess.run(
            [sys.executable, "-c", code], env=host_env(s3), capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )


@pytest.fixture(scope="session")
def pool(s3) -> str:
    """512 Fashion-MNIST training images as PNG shards on the emulator, and their manifest."""
    uri = f"s3://{BUCKET}/data/train.parquet"
    result = subprocess.run(
        [str(BIN / "dinoforge"), "data", "import", "fashion-mnist:train", "--limit", "512", "--out", uri],
        env=host_env(s3),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return uri


# --- the image itself ---

HARDENED = [
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    *[arg for path in WRITABLE_PATHS for arg in ("--tmpfs", f"{path}:rw,exec,mode=1777")],
]


@pytest.mark.slow(seconds=90)
def test_the_image_imports_every_stage_as_non_root_on_a_read_only_root(image, podman_env):
    size = json.loads(podman(podman_env, "image", "inspect", image).stdout)[0]["Size"]
    print(f"\n{image}: {size / 1e6:.0f} MB")
    script = (
        "import os, dinoforge.cli, torch, faiss, mlflow, kopf, s3fs, gcsfs, prometheus_client\n"
        "import matplotlib.pyplot as plt; plt.figure()\n"
        "try:\n    open('/opt/dinoforge/probe', 'w')\n"
        "except OSError as error:\n    print('root read-only:', error.errno)\n"
        "print(os.getuid(), os.getgid(), torch.__version__, sorted(os.listdir('/cache')))\n"
    )
    result = podman(podman_env, "run", "--rm", "--network", "none", *HARDENED, image, "python", "-c", script)
    lines = result.stdout.splitlines()
    assert lines[0] == "root read-only: 30"  # EROFS
    uid, gid, torch_version, caches = lines[1].split(" ", 3)
    assert (int(uid), int(gid)) == (IMAGE_UID, IMAGE_UID) and torch_version.endswith("+cpu")
    assert "matplotlib" in caches  # MPLCONFIGDIR is under /cache
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    printed = podman(podman_env, "run", "--rm", "--network", "none", *HARDENED, image, "dinoforge", "--version").stdout
    assert printed.startswith(f"dinoforge {version()} (commit {commit}")  # `-dirty` when built with local changes


# --- TorchX's local_docker scheduler, through podman's Docker API ---


@pytest.fixture(scope="session")
def docker_host(podman_env, tmp_path_factory) -> str:
    """``podman system service``: the Docker API that docker-py, and so TorchX, talk to."""
    socket_path = tmp_path_factory.mktemp("docker") / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env=podman_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert service.poll() is None and time.monotonic() < deadline, service.stderr.read()[-2000:]
        time.sleep(0.2)
    yield f"unix://{socket_path}"
    os.killpg(service.pid, signal.SIGTERM)
    service.wait(timeout=30)


def torchx(args: list[str], env: dict, cwd: Path = ROOT, timeout: float = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "torchx"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode:
        Path("/tmp/torchx-fail.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def remove_containers(env: dict, handle: str) -> None:
    """TorchX's local_docker keeps an app's containers (for their logs); the tests remove theirs."""
    app_id = handle.strip().rsplit("/", 1)[-1]
    ids = podman(env, "ps", "-aq", "--filter", f"label=torchx.pytorch.org/app-id={app_id}").stdout.split()
    if ids:
        podman(env, "rm", "-f", *ids)


@pytest.mark.slow(seconds=420)
def test_torchx_local_docker_trains_two_processes_and_a_second_submission_resumes(
    image, docker_host, s3, pool, podman_env
):
    output = f"s3://{BUCKET}/runs/local-docker"
    env = {**host_env(s3), **podman_env, "DOCKER_HOST": docker_host, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    container_env = ",".join(f"{key}={value}" for key, value in s3_for_containers(s3).items())
    for max_steps in (2, 4):
        result = torchx(
            [
                "run",
                "--wait",
                "--log",
                "-s",
                "local_docker",
                "jobs/pretrain.py:pretrain",
                "--image",
                image,
                "--nproc_per_node",
                "2",
                "--cpu",
                "2",
                "--memMB",
                "6000",
                "--max_restarts",
                "0",
                "--metrics_port",
                "0",
                "--max_steps",
                str(max_steps),
                "--output",
                output,
                "--env",
                container_env,
                "--",
                *TINY,
                f"data.dataset=manifest:{pool}",
                "train.batch_size_per_gpu=8",
                "train.checkpoint_period=2",
            ],
            env,
        )
        assert "SUCCEEDED" in result.stdout + result.stderr
        remove_containers(podman_env, result.stdout.splitlines()[0])
    rows = [json.loads(line) for line in s3_read(s3, "runs/local-docker/metrics.jsonl").splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and {row["world_size"] for row in rows} == {2}
    committed = sorted(
        path.split("/")[-2] for path in s3_list(s3, "runs/local-docker/checkpoints") if path.endswith("/COMMITTED")
    )
    assert committed == ["step_00000002", "step_00000004"]
    assert '"resumed_from": ' in result.stdout + result.stderr and "step_00000002" in result.stdout + result.stderr


# --- pods as the charts render them ---


def run_pod(
    env: dict,
    pod: dict,
    image: str,
    *,
    files: dict[str, Path] | None = None,
    field_env: dict | None = None,
    extra_env: dict | None = None,
    extra_args: tuple[str, ...] = (),
    detach: bool = False,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """Runs the first container of ``pod`` (a PodSpec, or a pod template with ``spec``) with podman as
    the kubelet would: its command, environment and security context; emptyDir volumes as tmpfs,
    others (configMap, secret, projected) from ``files[volume name]`` (a folder) and left out if
    absent there. ``field_env`` gives the values of fieldRef variables."""
    spec = pod.get("spec", pod)
    (container,) = spec["containers"]
    security, pod_security = container.get("securityContext", {}), spec.get("securityContext", {})
    args = ["run", "--rm", "--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    if security.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("capabilities", {}).get("drop") == ["ALL"]:
        args += ["--cap-drop", "ALL"]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,exec,mode=1777"]
        elif files and mount["name"] in files:
            args += ["-v", f"{files[mount['name']]}:{mount['mountPath']}:ro"]
    for variable in container.get("env", []):
        if "value" in variable:
            args += ["-e", f"{variable['name']}={variable['value']}"]
        elif "fieldRef" in variable.get("valueFrom", {}):
            args += ["-e", f"{variable['name']}={(field_env or {})[variable['name']]}"]
    for name, value in (extra_env or {}).items():
        args += ["-e", f"{name}={value}"]
    command = [*container.get("command", []), *container.get("args", [])]
    result = podman(env, *args, *(["-d"] if detach else []), *extra_args, image, *command, timeout=timeout, check=False)
    assert result.returncode == 0, (command, result.stdout[-4000:], result.stderr[-4000:])
    return result


def configmap_folder(docs: list[dict], name_suffix: str, folder: Path) -> Path:
    (configmap,) = [doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith(name_suffix)]
    folder.mkdir(parents=True)
    for key, text in configmap["data"].items():
        (folder / key).write_text(text)
        (folder / key).chmod(0o755)
    return folder


@pytest.mark.slow(seconds=300)
def test_the_curation_charts_pods_curate_in_the_image(image, podman_env, s3, pool, tmp_path):
    from test_curation_embed import export_random_backbone

    weights = Path(export_random_backbone(tmp_path / "w.pth", seed=1))
    upload = (
        f"import s3fs; fs = s3fs.S3FileSystem(); fs.put('{weights}', '{BUCKET}/weights/w.pth'); "
        f"fs.put('{weights.with_suffix('.json')}', '{BUCKET}/weights/w.json')"
    )
    subprocess.run([sys.executable, "-c", upload], env=host_env(s3), check=True, timeout=60)
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "shards": 2,
                "image": {"repository": image.rsplit(":", 1)[0], "tag": image.rsplit(":", 1)[1]},
                "objectStore": {"endpointUrl": s3["endpoint_in"]},
                "curation": {
                    "pool": pool,
                    "weights": f"s3://{BUCKET}/weights/w.pth",
                    "out": f"s3://{BUCKET}/curation",
                    "sampleSize": 100,
                    "levels": [8, 2],
                    "chunkRows": 128,
                    "batchSize": 64,
                    "dedupMethod": "hash",
                    "waitPollSeconds": 2,
                },
            }
        )
    )
    docs = Chart("dinov2-curation").render(str(values))
    (job,) = [doc for doc in docs if doc["kind"] == "Job"]
    scripts = configmap_folder(docs, "-scripts", tmp_path / "scripts")
    for index in ("1", "0"):  # pod 1 first: pod 0 would otherwise wait for its chunks
        # S3_KEYS stand in for the object-store Secret the chart loads with envFrom
        run_pod(
            podman_env,
            job["spec"]["template"],
            image,
            files={"scripts": scripts},
            field_env={"JOB_COMPLETION_INDEX": index},
            extra_env=S3_KEYS | {"DINOFORGE_LINEAGE": "off"},
        )
    curated = s3_list(s3, "curation")
    assert f"{BUCKET}/curation/report/report.json" in curated
    rows = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import pyarrow.parquet as pq, s3fs; "
            f"print(pq.read_table(s3fs.S3FileSystem().open('{BUCKET}/curation/curated.parquet')).num_rows)",
        ],
        env=host_env(s3),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert int(rows) == 100


@pytest.mark.slow(seconds=240)
def test_the_operator_charts_pod_drives_a_pipeline_from_the_image(image, podman_env, tmp_path):
    from kubernetes.client import CustomObjectsApi
    from kubernetes.config import new_client_from_config
    from test_operator import GROUP, JOBS, PLURAL, VERSION, emulated_api_server, kubeconfig

    repository, tag = image.rsplit(":", 1)
    (deployment,) = [
        doc
        for doc in Chart("dinoforge-operator").render(
            None, f"image.repository={repository}", f"image.tag={tag}", "operator.intervalSeconds=2"
        )
        if doc["kind"] == "Deployment"
    ]
    with emulated_api_server(host="0.0.0.0") as server:
        port = server["url"].rsplit(":", 1)[1]
        config_dir = tmp_path / "kube"
        config_dir.mkdir()
        kubeconfig(config_dir / "config", f"http://{HOST}:{port}", "operator")
        name = f"dinoforge-operator-{os.getpid()}"
        # The emulator speaks plain HTTP, so the operator finds it through a kubeconfig instead of the
        # projected service-account token (left out: run_pod gets no folder for it).
        run_pod(
            podman_env,
            deployment["spec"]["template"],
            image,
            extra_env={"KUBECONFIG": "/kube/config"},
            extra_args=("--name", name, "-v", f"{config_dir}:/kube:ro"),
            detach=True,
        )
        try:
            api = CustomObjectsApi(
                new_client_from_config(str(kubeconfig(tmp_path / "test-config", server["url"], "t")))
            )
            pipeline = yaml.safe_load((ROOT / "operators" / "examples" / "dinopipeline.yaml").read_text())
            api.create_namespaced_custom_object(
                GROUP, VERSION, "ml", PLURAL, pipeline | {"metadata": {"name": "p1", "namespace": "ml"}}
            )
            deadline = time.monotonic() + 300
            while not (jobs := api.list_namespaced_custom_object(*JOBS[:2], "ml", JOBS[2])["items"]):
                assert time.monotonic() < deadline, podman(podman_env, "logs", name, check=False).stderr[-4000:]
                time.sleep(2)
            (job,) = jobs
            assert job["metadata"]["name"].startswith("p1-curate")
            (task, *_) = job["spec"]["tasks"]
            assert task_container(task)["image"] == image  # the operator's own image (DINOFORGE_IMAGE)
        finally:
            podman(podman_env, "rm", "-f", name, check=False)


# --- TorchX's workspace path: a patched image, pushed to a registry ---


@pytest.fixture(scope="session")
def registry(podman_env, tmp_path_factory) -> str:
    """Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1, plain HTTP."""
    folder = tmp_path_factory.mktemp("registry")
    port = int(podman_env["DINOFORGE_TEST_REGISTRY_PORT"])
    (folder / "config.yml").write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "storage": {"filesystem": {"rootdirectory": str(folder / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
                "log": {"level": "warn"},
            }
        )
    )
    server = subprocess.Popen(
        ["/usr/bin/docker-registry", "serve", str(folder / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as response:
                assert response.status == 200
                break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-2000:]
            time.sleep(0.3)
    yield f"127.0.0.1:{port}"
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.mark.slow(seconds=600)
def test_a_workspace_change_is_built_pushed_and_run_by_the_submitted_job(
    image, docker_host, registry, s3, pool, podman_env, tmp_path
):
    from kubernetes.client import CustomObjectsApi
    from kubernetes.config import new_client_from_config
    from test_operator import emulated_api_server, kubeconfig

    workspace = tmp_path / "workspace"  # a user's checkout, with a preset the released image lacks
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (workspace / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, workspace / name)
    (workspace / "platform" / "presets" / "workspace_probe.yaml").write_text(
        "base: smoke\noptim:\n  base_lr: 0.00123\n"
    )
    with emulated_api_server() as server:
        config = kubeconfig(tmp_path / "config", server["url"], "t")
        env = {
            **host_env(s3),
            **podman_env,
            "DOCKER_HOST": docker_host,
            "KUBECONFIG": str(config),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
        container_env = ",".join(f"{key}={value}" for key, value in s3_for_containers(s3).items())
        submitted = torchx(
            [
                "run",
                "--workspace",
                f"file://{workspace}",
                "-s",
                "kubernetes",
                "-cfg",
                f"namespace=ml,image_repo={registry}/dinoforge",
                "jobs/pretrain.py:pretrain",
                "--image",
                image,
                "--preset",
                "workspace_probe",
                "--max_steps",
                "1",
                "--metrics_port",
                "0",
                "--output",
                f"s3://{BUCKET}/runs/workspace",
                "--env",
                container_env,
                "--",
                *TINY,
                f"data.dataset=manifest:{pool}",
                "train.batch_size_per_gpu=8",
            ],
            env,
            cwd=workspace,
        )
        namespace, name = submitted.stdout.strip().removeprefix("kubernetes://torchx/").split(":")
        job = CustomObjectsApi(new_client_from_config(str(config))).get_namespaced_custom_object(
            "batch.volcano.sh", "v1alpha1", namespace, "jobs", name
        )
    (task,) = job["spec"]["tasks"]
    pushed = task_container(task)["image"]
    assert pushed.startswith(f"{registry}/dinoforge:")
    podman(podman_env, "rmi", "--force", pushed, check=False)  # the pod must pull it from the registry
    run_pod(podman_env, task["template"], pushed)
    inspected = json.loads(podman(podman_env, "image", "inspect", pushed).stdout)[0]["Config"]["Env"]
    podman(podman_env, "rmi", "--force", pushed, check=False)
    assert any(item.startswith("DINOFORGE_GIT_COMMIT=") and item.endswith("-workspace") for item in inspected)
    config_yaml = yaml.safe_load(s3_read(s3, "runs/workspace/config.yaml"))
    assert config_yaml["optim"]["base_lr"] == 0.00123  # the preset only the workspace has
    assert "step_00000001" in " ".join(s3_list(s3, "runs/workspace/checkpoints"))
