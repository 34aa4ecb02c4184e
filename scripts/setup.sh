#!/usr/bin/env bash
# Installs what dinoforge needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# Debian's Fashion-MNIST package (the embedded default dataset) and a venv in .venv.
# `--test` adds the test dependencies: the MLflow server, object-store emulators, Kubernetes
# schema validation (pip) and Prometheus (Debian), which the tests start as real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="" packages=()
[ "${1:-}" = "--test" ] && extras="[test]"
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
[ -z "$extras" ] || command -v prometheus >/dev/null || packages+=(prometheus)
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
