"""The container image's definition and the one versioned tag: Containerfile, scripts/build_image.sh's
helpers, the charts, manifests/, the TorchX components and the operator all name the release of the
package version, never ``latest``; and the README's Kubernetes commands run as printed (dry runs).
Building and running the image itself: tests/test_container.py (slow)."""

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from dinoforge.build_info import IMAGE_REPOSITORY, IMAGE_UID, WRITABLE_PATHS, default_image, describe, version
from dinoforge.jobs.common import Launch
from dinoforge.operators.plan import plan
from helm_chart import Chart, find_helm

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONTAINERFILE = (ROOT / "Containerfile").read_text()
CHARTS = ("dinov2-curation", "dinoforge-platform", "dinoforge-operator")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_package_version_names_the_release_everywhere():
    release = f"{IMAGE_REPOSITORY}:{pyproject()['project']['version']}"
    assert version() == pyproject()["project"]["version"] and default_image() == release
    assert Launch.image == release  # every TorchX component's default (test_jobs checks they share it)
    for chart in CHARTS:
        assert yaml.safe_load((ROOT / "helm" / chart / "Chart.yaml").read_text())["appVersion"] == version(), chart
    images = {
        container["image"]
        for chart in ("dinov2-curation", "dinoforge-operator")
        for doc in Chart(chart).render()
        if doc["kind"] in ("Job", "Pod", "Deployment")
        for container in (doc["spec"].get("template", doc)["spec"]["containers"])
    }
    assert images == {release}
    manifests = {
        image
        for path in (ROOT / "manifests").rglob("*.yaml")
        for image in re.findall(r"^\s*image: (\S+)$", path.read_text(), re.MULTILINE)
    }
    assert manifests == {release}


def test_nothing_defaults_to_latest():
    sources = [
        path
        for folder in ("jobs", "operators", "helm", "manifests", "platform", "scripts")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix in (".py", ".yaml", ".tpl", ".sh")
    ]
    sources += [ROOT / "Containerfile", ROOT / "Dockerfile.torchx"]
    offenders = [str(path.relative_to(ROOT)) for path in sources if re.search(r"dinoforge:latest\b", path.read_text())]
    assert not offenders


def test_operator_stages_run_the_pipelines_image_else_the_operators_own(monkeypatch):
    spec = yaml.safe_load((ROOT / "operators" / "examples" / "dinopipeline.yaml").read_text())["spec"]
    spec.pop("image", None)

    def images(spec: dict) -> set[str]:
        return {
            args[args.index("--image") + 1] if "--image" in args else Launch.image
            for stage in plan(spec, "p")
            for args in [stage.args]
        }

    monkeypatch.delenv("DINOFORGE_IMAGE", raising=False)
    assert images(spec) == {default_image()}
    monkeypatch.setenv("DINOFORGE_IMAGE", "registry.local/dinoforge:0.1.0")  # the operator chart sets it
    assert images(spec) == {"registry.local/dinoforge:0.1.0"}
    assert images(spec | {"image": "mine:1"}) == {"mine:1"}


def test_the_image_builds_exactly_the_folders_setup_py_maps():
    tree = ast.parse((ROOT / "setup.py").read_text())
    assigned = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("NAMESPACE_ROOT", "SUBPACKAGE_FOLDERS")
    }
    copied = re.findall(r"^COPY (\w+) /src/\1$", CONTAINERFILE, re.MULTILINE)
    assert copied == [assigned["NAMESPACE_ROOT"], *assigned["SUBPACKAGE_FOLDERS"]]


def test_the_image_runs_as_its_uid_and_writes_only_the_declared_paths():
    assert re.search(rf"^USER {IMAGE_UID}:{IMAGE_UID}$", CONTAINERFILE, re.MULTILINE)
    assert f'io.dinoforge.uid="{IMAGE_UID}"' in CONTAINERFILE
    assert f'io.dinoforge.writable-paths="{" ".join(WRITABLE_PATHS)}"' in CONTAINERFILE
    assert f'echo "dinoforge:x:{IMAGE_UID}:{IMAGE_UID}:' in CONTAINERFILE
    env = dict(re.findall(r"^\s+(?:ENV )?([A-Z_]+)=(\S+?)(?: \\)?$", CONTAINERFILE.split("\nENV ", 1)[1], re.MULTILINE))
    written = {
        name: value
        for name, value in env.items()
        if name
        in (
            "HOME",
            "TMPDIR",
            "XDG_CACHE_HOME",
            "TORCH_HOME",
            "TORCHINDUCTOR_CACHE_DIR",
            "TRITON_CACHE_DIR",
            "MPLCONFIGDIR",
            "PIP_CACHE_DIR",
        )
    }
    assert len(written) == 8
    assert all(
        any(value == path or value.startswith(path + "/") for path in WRITABLE_PATHS) for value in written.values()
    ), written


def test_version_names_the_commit(monkeypatch):
    assert describe().startswith(f"dinoforge {version()} (commit ")
    result = subprocess.run(
        [str(BIN / "dinoforge"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DINOFORGE_GIT_COMMIT": "0123abc"},
    )
    assert result.returncode == 0 and result.stdout.strip() == f"dinoforge {version()} (commit 0123abc)"


def requirements(*extras: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "requirements.py"), str(ROOT / "pyproject.toml"), ",".join(extras)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_image_extra_is_every_stages_extras_without_the_test_ones():
    project = pyproject()["project"]
    assert project["optional-dependencies"]["image"] == ["dinoforge[cloud,operator]"]
    listed = requirements("image")
    assert listed[: len(project["dependencies"])] == project["dependencies"]
    assert set(listed) == set(project["dependencies"]) | set(project["optional-dependencies"]["cloud"]) | set(
        project["optional-dependencies"]["operator"]
    )
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "requirements.py"), str(ROOT / "pyproject.toml"), "imgae"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "no extra 'imgae'" in bad.stderr


def test_build_script_rejects_bad_arguments_before_building():
    for args, message in (
        (["--flavor", "rocm"], "--flavor must be cpu or cuda"),
        (["--tagg", "x"], "unknown argument"),
    ):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_image.sh"), *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and message in result.stderr


def readme_commands(program: str) -> list[list[str]]:
    """Every command line of the README that starts with ``program``, continuation lines joined."""
    commands, text = [], (ROOT / "README.md").read_text().replace("\\\n", " ")
    for block in re.findall(r"```\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            if line.startswith(program + " "):
                commands.append(shlex.split(line.split(" #", 1)[0]))
    return commands


def test_readmes_kubernetes_torchx_commands_dry_run_as_printed(tmp_path):
    """Run from the checkout, as a user would: .torchxconfig turns TorchX's Docker workspace off, so
    no container engine is needed, and the Job runs the released image, hardened."""
    commands = [command for command in readme_commands("torchx") if "kubernetes" in command]
    assert len(commands) >= 2
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DOCKER_HOST": "unix:///nonexistent"}
    for command in commands:
        assert command[:2] == ["torchx", "run"]
        result = subprocess.run(
            [str(BIN / "torchx"), "run", "--dryrun", *command[2:]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (command, result.stderr[-3000:])
        job = yaml.safe_load(result.stdout.split("=== SCHEDULER REQUEST ===")[1])
        for task in job["spec"]["tasks"]:
            (container,) = task["template"]["spec"]["containers"]
            assert container["image"] == default_image() and container["securityContext"]["readOnlyRootFilesystem"]
        assert job["spec"]["queue"] == "default"  # .torchxconfig's


def test_readmes_helm_commands_dry_run_as_printed():
    commands = [command for command in readme_commands("helm") if command[1] in ("install", "upgrade")]
    assert {command[2] for command in commands} >= {"dinov2-curation", "dinoforge-platform", "dinoforge-operator"}
    for command in commands:
        result = subprocess.run(
            [find_helm(), *command[1:], "--dry-run=client"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KUBECONFIG": os.devnull},
        )
        assert result.returncode == 0 and "STATUS: pending-install" in result.stdout, (command, result.stderr)


@pytest.mark.parametrize("chart", CHARTS)
def test_chart_pods_run_as_the_image_user(chart):
    for doc in Chart(chart).render(
        None, *(("mlflow.deploy=true", "mlflow.persistence.enabled=true") if chart == "dinoforge-platform" else ())
    ):
        if doc["kind"] in ("Job", "Pod", "Deployment"):
            spec = doc["spec"].get("template", doc)["spec"]
            assert spec["securityContext"]["runAsUser"] == IMAGE_UID and spec["securityContext"]["runAsNonRoot"]
