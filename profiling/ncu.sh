#!/usr/bin/env bash
# Nsight Compute over the fused kernels of one training step, then a short table per kernel
# (time, DRAM bandwidth and its share of peak, achieved occupancy).
#   bash profiling/ncu.sh [OUT_DIR] [extra profiling.step args, e.g. --batch 8]
# Needs `ncu` on PATH and a CUDA GPU. Only the measured step is profiled (--profile-from-start off;
# profiling.step brackets it with cudaProfilerStart/Stop), and only the project's Triton kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-profiling/out}; shift || true
mkdir -p "$out"
python=${PYTHON:-python3}
command -v ncu >/dev/null || { echo "ncu not found: install Nsight Compute" >&2; exit 1; }
regex=$($python -m profiling.ncu_table --regex)
ncu --profile-from-start off --target-processes all --kernel-name "$regex" \
    --metrics gpu__time_duration.sum,dram__bytes.sum.per_second,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
    --csv --page raw \
    $python -m profiling.step --backend triton --steps 1 --warmup 1 "$@" > "$out/ncu.csv"
$python -m profiling.ncu_table "$out/ncu.csv" | tee "$out/ncu-table.txt"
