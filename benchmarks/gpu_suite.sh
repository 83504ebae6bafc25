#!/usr/bin/env bash
# The GPU suite in one device call (benchmarks/README.md, "The GPU suite").
#   bash benchmarks/gpu_suite.sh [gpu_suite.py flags]
# Carry `.whl` (../shared/tools/gpu-wheels.sh) and `build/official_slate`; the report and every
# figure land in $OUT (report.md, <step>.json, logs/). --dry_run: tiny shapes on a CPU.
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  # fixed_slots' dependencies the GPU image lacks, installed aside (no network there)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
fi
exec python3 benchmarks/gpu_suite.py --out="$OUT" "$@"
