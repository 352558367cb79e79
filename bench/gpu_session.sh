#!/usr/bin/env bash
# Everything a lent GPU session should run, in one call of the device tool:
#   1. bench/gpu_check.sh  - GPU parity tests of every kernel and pipeline, op and step benchmarks, profiler trace
#   2. bench/gpu_train.sh  - training throughput per backend and input pipeline, then the paper's schedule on
#                            the real data within the time left, scored (msf eval) and exported
# and packs the results into at most three files (the device tool returns at most 8, 16 MiB each).
#
#   bash bench/gpu_session.sh [TOTAL_BUDGET_S (default 500)] [PACK_DIR (default $OUT, else bench/results)]
#
# Device-tool call (after `mkdir -p data && cp -r ../shared/data/celebamask-hq-mini data/` here):
#   run(command="bash bench/gpu_session.sh 500", carry=["data/celebamask-hq-mini"], timeout_s=570)
# then, here:  tar xzf <files_at>/gpu-results.tgz -C bench/results/   and commit bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
total=${1:-500}
pack=${2:-${OUT:-bench/results}}
export PYTHONUNBUFFERED=1
work=$(mktemp -d)/results
mkdir -p "$work" "$pack"
check_budget=$(( total * 2 / 5 ))
(( check_budget > 480 )) && check_budget=480
started=$(date +%s)

bash bench/gpu_check.sh "$check_budget" "$work"
check_status=$?
train_budget=$(( total - ($(date +%s) - started) - 10 ))
bash bench/gpu_train.sh "$train_budget" "$work"
train_status=$?

# Chrome traces can be large: each travels gzipped on its own, outside the tarball.
for trace in "$work"/gpu-check-*/profile/trace-*.json; do
  [ -f "$trace" ] && gzip -c "$trace" > "$pack/$(basename "$trace").gz" && rm "$trace"
done
tar czf "$pack/gpu-results.tgz" -C "$work" .
ls -la "$pack"
echo "gpu_check status $check_status, gpu_train status $train_status, $(( $(date +%s) - started )) s of $total s"
exit $(( check_status || train_status ))
