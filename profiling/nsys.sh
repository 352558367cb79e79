#!/usr/bin/env bash
# Nsight Systems timeline of a few training steps with the project's NVTX ranges:
#   step > data | forward+loss > encoder/stage1..4, decoder > decoder/lmsa, triton/<op> or eager/<op>,
#   loss | backward | optimizer
#   bash profiling/nsys.sh [OUT_DIR] [extra msf.profiling.step args, e.g. --backend eager]
# Open OUT_DIR/msf-step.nsys-rep in the Nsight Systems GUI (or `nsys stats` it). Only the measured
# steps are captured (--capture-range=cudaProfilerApi; the warm-up is left out).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-profiling/out}; shift || true
mkdir -p "$out"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python   # the project's environment
command -v nsys >/dev/null || { echo "nsys not found: install Nsight Systems" >&2; exit 1; }
nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \
    --force-overwrite=true --output "$out/msf-step" \
    "$python" -m msf.profiling.step --steps 5 --warmup 2 "$@"
nsys stats --report nvtx_sum,cuda_gpu_kern_sum "$out/msf-step.nsys-rep" | tee "$out/nsys-summary.txt"
