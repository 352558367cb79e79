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

python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python

# The GPU tests of the input pipeline and training first: quick, no Triton compilation, and never
# reached if the kernel parity tests below use up their share.
timeout 120 $python -m pytest -q -p no:cacheprovider tests/test_pipeline.py tests/test_distributed.py -k cuda \
    2>&1 | tee "$work/pipeline-cuda-tests.log"
pipeline_status=${PIPESTATUS[0]}

bash bench/gpu_check.sh "$check_budget" "$work"
check_status=$?
# Pack what exists now, so a later overrun still returns these.
for trace in "$work"/gpu-check-*/profile/trace-*.json; do  # large: each travels gzipped on its own
  [ -f "$trace" ] && gzip -c "$trace" > "$pack/$(basename "$trace").gz" && rm "$trace"
done
tar czf "$pack/gpu-check-results.tgz" -C "$work" .

train_budget=$(( total - ($(date +%s) - started) - 10 ))
bash bench/gpu_train.sh "$train_budget" "$work"
train_status=$?
tar czf "$pack/gpu-results.tgz" -C "$work" . && rm -f "$pack/gpu-check-results.tgz"
ls -la "$pack"
echo "pipeline CUDA tests $pipeline_status, gpu_check $check_status, gpu_train $train_status;" \
     "$(( $(date +%s) - started )) s of $total s"
exit $(( pipeline_status || check_status || train_status ))
