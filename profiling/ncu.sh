#!/usr/bin/env bash
# Nsight Compute over the fused kernels of one training step (triton backend, bf16 autocast), then
# a short table per kernel and the comparison with the cost model (measured ÷ predicted).
#   bash profiling/ncu.sh [OUT_DIR] [extra msf.profiling.step args, e.g. --batch 8]
# Writes OUT_DIR/ncu.csv (ncu --csv --page raw), ncu-app.log (the step's own output), ncu-table.txt,
# ncu-compare.{md,json}. The cost model's rows come from $COST_JSON, else the current committed
# table (`msf.bench.predicted.CURRENT_COST_TABLE`, bench/results/predicted/cost-model.json), else
# `python -m msf.profiling.cost --json` when that module exists (at most $COST_TIMEOUT s, default 120),
# else the comparison holds measured values only.
# Needs `ncu` on PATH and a CUDA GPU. Only the measured step is profiled (--profile-from-start off;
# msf.profiling.step brackets it with cudaProfilerStart/Stop), and only the project's Triton kernels.
# Clocks are left as they run (--clock-control none): the cost model assumes the sustained clock.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-profiling/out}; shift || true
mkdir -p "$out"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python   # the project's environment
command -v ncu >/dev/null || { echo "ncu not found: install Nsight Compute" >&2; exit 1; }
regex=$($python -m msf.profiling.ncu_table --regex)
ncu --profile-from-start off --target-processes all --kernel-name "$regex" --launch-count 400 \
    --clock-control none --print-units base \
    --metrics gpu__time_duration.sum,dram__bytes.sum,dram__bytes.sum.per_second,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum \
    --csv --page raw --log-file "$out/ncu.csv" \
    $python -m msf.profiling.step --backend triton --amp bf16 --steps 1 --warmup 1 "$@" > "$out/ncu-app.log" 2>&1
$python -m msf.profiling.ncu_table "$out/ncu.csv" | tee "$out/ncu-table.txt"

cost=${COST_JSON:-$($python -c "from msf.bench.predicted import CURRENT_COST_TABLE as t; print(t if t.exists() else '')")}
if [ -z "$cost" ] && [ -f profiling/cost.py ]; then
  # measured values first, so an overrun of the cost model below still leaves a table
  $python -m msf.profiling.ncu_compare "$out/ncu.csv" --out "$out/ncu-compare" > /dev/null
  timeout "${COST_TIMEOUT:-120}" $python -m msf.profiling.cost --json "$out/cost-model.json" > "$out/cost-model.log" 2>&1 \
    && cost="$out/cost-model.json" || echo "msf.profiling.cost did not finish (see $out/cost-model.log)"
fi
$python -m msf.profiling.ncu_compare "$out/ncu.csv" ${cost:+--cost "$cost"} --out "$out/ncu-compare"
