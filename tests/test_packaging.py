"""The folder -> namespace mapping survives a real wheel build: every module imports from
outside the repository, the presets ship, and the standard library's `platform` is intact."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_and_imports_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
    )
    wheel = next((tmp_path / "dist").glob("dinoforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.relative_to(ROOT) for folder in ("platform", "model", "operators") for p in (ROOT / folder).rglob("*.py"))
    expected = {("dinoforge/" + "/".join(p.parts[1:])) if p.parts[0] == "platform" else "dinoforge/" + "/".join(p.parts) for p in sources}
    assert expected <= set(names), expected - set(names)
    assert "dinoforge/__init__.py" not in names  # namespace root: never shadows stdlib `platform`
    assert {"dinoforge/presets/smoke.yaml", "dinoforge/presets/vitl14.yaml"} <= set(names)

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py"))
    script = (
        "import importlib, platform, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), mod.__file__\n"
        "import torch\n"
        "from dinoforge.config import load_config\n"
        "assert load_config('vitl14').model.arch == 'vit_large'\n"
        "print(platform.system(), len(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Linux", str(len(modules))]
