#!/usr/bin/env bash
# GPU throughput of the stage-2 training step with each speed lever on and off, one table
# (benchmarks/gpu_bench.py: DiT-B/2, DiT-XL/2 and the SD-sized UNet, bf16, 32x32x4 latents;
# images/s, step time, peak memory, MFU; the facebookresearch/DiT recipe as a baseline row).
#
#   bash scripts/gpu_bench.sh                        # one GPU (sized for < 8 min; not yet timed on one)
#   bash scripts/gpu_bench.sh --models DiT-XL/2      # a subset (see --help)
#   bash scripts/gpu_bench.sh --dry-run              # CPU: build every configuration, one tiny step each
#
# Needs the project venv (.venv or $VENV). Output also goes to $OUT (default runs/gpu-bench/table.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
OUT="${OUT:-runs/gpu-bench}"
mkdir -p "$OUT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
if [[ " $* " != *" --dry-run "* ]]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "gpu_bench: no CUDA GPU visible (use --dry-run on CPU)" >&2; exit 2; }
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one GPU: the table is per device
fi
"$PY" benchmarks/gpu_bench.py "$@" 2>&1 | tee "$OUT/table.txt"
exit "${PIPESTATUS[0]}"
