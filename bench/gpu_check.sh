#!/usr/bin/env bash
# One command for a lent GPU machine: GPU parity tests of every kernel (forward and backward,
# fp32/bf16/fp16), the op and training-step benchmarks, and a profiler trace, all inside a time
# budget, with every result written to one folder.
#
#   bash bench/gpu_check.sh [BUDGET_SECONDS (default 480, at most 480)] [RESULTS_DIR (default bench/results/measured/gpu)]
#
# Writes RESULTS_DIR/gpu-check-<date>/: env.json, parity.log + parity.xml, bench-paper-cuda.{json,md},
# profile/ (Chrome trace + top kernels), summary.md. On a machine without CUDA every GPU part is
# skipped with a message and a CPU smoke benchmark runs instead (CI does this): a fixed amount of
# work that the budget does not cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-480}
(( budget > 480 )) && { echo "budget capped at 480 s (was $budget)"; budget=480; }
results=${2:-bench/results/measured/gpu}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
started=$(date +%s)
left() { echo $(( budget - ($(date +%s) - started) )); }
share() { local s=$(( $(left) * $1 / 100 )); (( s < 10 )) && s=10; echo $s; }

has_cuda=$($python -c "import torch; print(int(torch.cuda.is_available()))")
out="$results/gpu-check-$(date -u +%Y%m%d-%H%M)"
mkdir -p "$out"
$python - "$out/env.json" <<'PY'
import json, platform, sys, datetime, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
info = {"date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z", "python": platform.python_version(),
        "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
PY
status=0

echo "== 1/3 parity tests (budget $(share 40) s)"
if [ "$has_cuda" = 1 ]; then
  env -u TRITON_INTERPRET timeout "$(share 40)" $python -m pytest -q -p no:cacheprovider \
      tests/ -k "cuda or backends or test_ops or fullgraph or second_batch" --junitxml "$out/parity.xml" 2>&1 \
      | tee "$out/parity.log"
  (( ${PIPESTATUS[0]} == 0 )) || status=1
else
  echo "no CUDA device: GPU parity tests skipped (CI runs them on CPU under TRITON_INTERPRET=1)" | tee "$out/parity.log"
fi

echo "== 2/3 benchmarks (budget $(share 75) s)"
bench_budget=$(share 75)
if [ "$has_cuda" = 1 ]; then
  # first the training step side by side (eager AMP, compile, triton, triton+compile: issue 15's
  # targets, with peak memory), then every op and the step again with all providers
  step_budget=$(( bench_budget / 3 ))
  env -u TRITON_INTERPRET timeout $(( step_budget + 60 )) $python -m msf.bench.suite --preset paper --suite step \
      --providers eager,compile,triton,triton+compile --budget-s "$step_budget" --out "$out" \
      --name bench-paper-cuda-step 2>&1 | tee "$out/bench-step.log"
  bench_budget=$(( bench_budget - step_budget ))
  env -u TRITON_INTERPRET timeout $(( bench_budget + 60 )) $python -m msf.bench.suite --preset paper \
      --budget-s "$bench_budget" --out "$out" 2>&1 | tee "$out/bench.log"
else
  # a fixed amount of work (eager and sdpa at the smoke size), never cut short by the budget: a
  # loaded machine makes CI slower, not red
  echo "no CUDA device: paper-shape benchmarks skipped; CPU smoke run instead" | tee "$out/bench.log"
  env -u TRITON_INTERPRET $python -m msf.bench.suite --preset smoke --providers eager,sdpa --budget-s 1e9 \
      --out "$out" 2>&1 | tee -a "$out/bench.log"
fi
(( ${PIPESTATUS[0]} == 0 )) || status=1

echo "== 3/3 profiler trace (budget $(share 90) s)"
profile_limit=(timeout "$(share 90)")
[ "$has_cuda" = 1 ] || profile_limit=()   # the CPU run: two small eager steps, whatever the clock says
env -u TRITON_INTERPRET "${profile_limit[@]}" $python -m msf.profiling.torch_profile --steps 2 --warmup 1 \
    --out "$out/profile" > "$out/profile.log" 2>&1 || status=1
tail -n 3 "$out/profile.log"

{
  echo "# GPU check $(date -u +%Y-%m-%d)"
  echo
  echo '```'; cat "$out/env.json"; echo '```'
  echo
  echo "## Parity"; echo; tail -n 3 "$out/parity.log"; echo
  for md in "$out"/bench-*.md; do [ -f "$md" ] && { echo "## Benchmarks"; tail -n +2 "$md"; }; done
  echo; echo "status: $status; $(( $(date +%s) - started )) s of a $budget s budget"
} > "$out/summary.md"
echo "results in $out (status $status)"
exit $status
