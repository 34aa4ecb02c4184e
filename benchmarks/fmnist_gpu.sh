#!/usr/bin/env bash
# The Fashion-MNIST GPU record (issue 23) in one device call: `fmnist_gpu` trained for at most
# BUDGET_S seconds (default 480) on the device's own PyTorch, exported, 20-NN on 60k/10k, the
# record written flat to $OUT (benchmarks/fmnist_gpu.py says what is in it).
#
#   bash benchmarks/fmnist_gpu.sh --prepare   # here, once: the wheels the device lacks -> .whl/,
#                                             # Fashion-MNIST -> .fmnist/ (both git-ignored)
#   bash benchmarks/fmnist_gpu.sh             # on the device, carrying .whl and .fmnist
#
# The device has no dinoforge install, no MLflow (which pretraining's lineage imports) and no
# Fashion-MNIST: the package is laid out under /tmp as setup.py maps it (as gpu_record.sh does),
# the wheels go to /tmp/site, the data comes from .fmnist/. Extra arguments go to
# benchmarks/fmnist_gpu.py (e.g. `--calibration-steps 4 train.batch_size_per_gpu=16` for a CPU try).
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=/usr/share/datasets/fashion-mnist
# Packages the device image already has (/work/.library/device/KINDS.md), among those MLflow needs.
DEVICE_HAS="annotated-doc anyio certifi charset-normalizer click cloudpickle h11 idna packaging protobuf pyyaml requests
typing-extensions urllib3 zipp"

if [ "${1:-}" = "--prepare" ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    for path in /.whl/ /.fmnist/; do grep -qx "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"; done
    mkdir -p .whl .fmnist
    cp "$FMNIST"/*.gz .fmnist/
    # mlflow-skinny and everything it needs, at the versions this checkout's .venv runs, less what
    # the device has.
    mapfile -t pins < <(.venv/bin/python - $DEVICE_HAS <<'EOF'
import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement

skip, seen, stack = set(sys.argv[1:]), {}, ["mlflow-skinny"]
while stack:
    name = stack.pop().lower().replace("_", "-")
    if name not in seen:
        seen[name] = metadata.version(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(requirement.name)
print("\n".join(f"{name}=={version}" for name, version in sorted(seen.items()) if name not in skip))
EOF
)
    rm -f .whl/*.whl
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
    du -sh .whl .fmnist
    exit 0
fi

export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fmnist-gpu-record}
mkdir -p "$OUT" /tmp/pk/dinoforge
cp -r platform/. /tmp/pk/dinoforge/ && cp -r model curation jobs /tmp/pk/dinoforge/
export PYTHONPATH=/tmp/pk
if ! python3 -c "import mlflow" 2>/dev/null; then
    [ -d .whl ] || { echo "no MLflow here and no .whl/: run 'bash benchmarks/fmnist_gpu.sh --prepare' and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/pk:/tmp/site
fi
[ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || FMNIST=$PWD/.fmnist
python3 benchmarks/fmnist_gpu.py --out "$OUT" --budget-s "${BUDGET_S:-480}" "$@" data.fashion_mnist_root="$FMNIST" \
    2>&1 | tee "$OUT/log.txt"
