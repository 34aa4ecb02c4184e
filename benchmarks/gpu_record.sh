#!/usr/bin/env bash
# The GPU benchmark record, in one device call (../shared/ANCHORS.md holds the official numbers):
# `dinoforge bench` for the two anchored recipes, every variant on top of our eager step, a
# loss-curve check and an operator profile, on the device's own PyTorch (no install: the package
# is laid out under /tmp as setup.py maps it). Writes $OUT/<preset>.json, logs and profiles.
# QUICK=1 times only the baseline and the compiled step (no curve; the profile is of the model
# just timed, so it costs 3 steps); PRESETS picks the recipes (default "vits14 vitl14"). A full
# run took 340 s on an H200. On the H100 machine a QUICK run of both presets took 170-250 s:
# compiling took 59-95 s per preset on a fresh machine, 45 s on a warm one (Inductor's cache).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dinoforge-record}
mkdir -p "$OUT" /tmp/pk/dinoforge
cp -r platform/. /tmp/pk/dinoforge/ && cp -r model curation jobs /tmp/pk/dinoforge/
export PYTHONPATH=/tmp/pk
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, dinoforge.bench; print(torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt" || exit 1
bench() {  # preset batch anchor curve-steps
    extra=(--profile "$OUT/$1.profile.txt")
    if [ "${QUICK:-0}" = 1 ]; then
        extra+=(--variants baseline,compile)
    else
        extra+=(--curve "$4")
    fi
    python3 -m dinoforge.cli bench --preset "$1" --batch "$2" --steps 10 --warmup 3 --anchor "$3" "${extra[@]}" \
        --record "$OUT/$1.json" 2>&1 | tee "$OUT/$1.log"
}
for preset in ${PRESETS:-vits14 vitl14}; do
    case $preset in
        vits14) bench vits14 128 649 30 ;;
        vitl14) bench vitl14 32 134 20 ;;
        *) echo "no anchor for $preset" >&2; exit 2 ;;
    esac
done
