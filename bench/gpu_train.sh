#!/usr/bin/env bash
# One command for a lent GPU machine: training throughput per backend and input pipeline, then the
# paper's schedule on the real data inside a time budget, scored and exported as the reference model.
#
#   bash bench/gpu_train.sh [BUDGET_SECONDS (default 330)] [RESULTS_DIR (default bench/results/measured/gpu)]
#
# Data: $MSF_DATA, else data/celebamask-hq-mini (git-ignored; on this machine
#   mkdir -p data && cp -r ../shared/data/celebamask-hq-mini data/
# and name data/celebamask-hq-mini in the device tool's carry). Runs go to $MSF_RUNS (default runs/).
#
# Writes RESULTS_DIR/gpu-train-<date>/: env.json, train-speed.{json,md}, reference.safetensors,
# metrics.jsonl, curves.png, summary.json, config.json, eval-val.json, train.log, summary.md.
# The triton backend trains first; if that run fails, the eager backend trains in the time left.
# Without CUDA (CI) it is a CPU smoke run of fixed size, eager only, that no budget cuts short.
# models/README.md says how these files become the committed reference model.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-330}
results=${2:-bench/results/measured/gpu}
data=${MSF_DATA:-data/celebamask-hq-mini}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
export PYTHONUNBUFFERED=1
started=$(date +%s)
left() { echo $(( budget - ($(date +%s) - started) )); }

if [ ! -d "$data/train/images" ]; then
  echo "no data at $data (expected $data/train/images): copy ../shared/data/celebamask-hq-mini there" >&2
  exit 2
fi
has_cuda=$($python -c "import torch; print(int(torch.cuda.is_available()))")
# On a GPU every stage runs inside the budget. The CPU smoke run (CI) is a fixed amount of work
# instead (a step count, one small epoch): a loaded machine makes it slower, never cut short.
within() { local seconds=$1; shift; if [ "$has_cuda" = 1 ]; then timeout "$seconds" "$@"; else "$@"; fi; }
out="$results/gpu-train-$(date -u +%Y%m%d-%H%M)"
mkdir -p "$out"
runs=${MSF_RUNS:-runs}   # run folders and the uint8 cache (0.94 GB at 512²) stay out of the results
cache=$runs/.cache
$python -c "import json, torch, triton, datetime; print(json.dumps({'date': datetime.datetime.utcnow().isoformat(timespec='seconds') + 'Z', 'torch': torch.__version__, 'triton': triton.__version__, 'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}, indent=2))" | tee "$out/env.json"
status=0

if [ "$has_cuda" = 1 ]; then
  speed_args=(--data "$data" --steps 20 --warmup 5 --cache-dir "$cache")
  train_args=(--data "$data" --device cuda --pipeline device --cache-dir "$cache")
  backends="triton eager"
  reserve=45   # scoring and export after training
else
  echo "no CUDA device: a CPU smoke run at 32² (eager) instead, a fixed number of steps whatever the budget; no timing claim"
  speed_args=(--data "$data" --size 32 --batch 4 --steps 5 --warmup 1 --backends eager --cache-dir "$cache")
  train_args=(--data "$data" --image-size 32 --batch-size 8 --epochs 1 --limit 100 --device cpu --num-workers 0)
  backends="eager"
  reserve=30
fi

speed_budget=$(( $(left) / 4 ))
(( speed_budget > 100 )) && speed_budget=100   # the schedule gets the rest
if (( speed_budget >= 10 )) || [ "$has_cuda" != 1 ]; then
  echo "== 1/3 training throughput, per backend and input pipeline (${speed_budget} s)"
  within "$speed_budget" $python -m msf.bench.train_speed "${speed_args[@]}" --out "$out" 2>&1 | tee "$out/speed.log"
  (( ${PIPESTATUS[0]} == 0 )) || status=1
else
  echo "== 1/3 training throughput skipped: ${speed_budget} s is too little"
fi

echo "== 2/3 the paper's schedule on $data ($(( $(left) - reserve )) s)"
run=""
for backend in $backends; do
  time_limit=()
  if [ "$has_cuda" = 1 ]; then
    (( $(left) - reserve < 30 )) && { echo "too little time left for a $backend run"; break; }
    time_limit=(--max-minutes "$(awk -v s=$(( $(left) - reserve )) 'BEGIN { printf "%.2f", s / 60 }')")
  fi
  name="gpu-reference-$backend-$(date -u +%H%M%S)"
  within $(( $(left) - 15 )) $python -m msf train "${train_args[@]}" --backend "$backend" "${time_limit[@]}" \
      --out "$runs" --run-name "$name" --no-progress 2>&1 | tee -a "$out/train.log"
  code=${PIPESTATUS[0]}
  (( code == 0 )) || { status=1; echo "the $backend run exited with $code; $(left) s left" | tee -a "$out/train.log"; }
  # a run killed or failing late still has its best checkpoint: keep it rather than start over
  if [ -f "$runs/$name/best.pt" ]; then run="$runs/$name"; break; fi
done

echo "== 3/3 score and export"
if [ -n "$run" ]; then
  backend=$($python -c "import json; print(json.load(open('$run/config.json'))['backend'])")
  # scored with the autocast the run validated with (config.json records what it resolved to)
  amp=$($python -c "import json; print(json.load(open('$run/config.json'))['amp'])")
  within 120 $python -m msf eval --data "$data" --checkpoint "$run/best.pt" --backend "$backend" --amp "$amp" \
      --json > "$out/eval-val.json" || status=1
  within 60 $python -m msf export "$run/best.pt" "$out/reference.safetensors" || status=1
  for f in metrics.jsonl curves.png summary.json config.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$out/" || echo "$run/$f missing (the run ended early)"
  done
fi

{
  echo "# GPU training $(date -u +%Y-%m-%d)"
  echo; echo '```'; cat "$out/env.json"; echo '```'; echo
  [ -f "$out/train-speed.md" ] && { echo "## Throughput"; tail -n +4 "$out/train-speed.md"; echo; }
  if [ -f "$out/summary.json" ]; then
    echo "## Reference run ($run)"; echo; echo '```'; cat "$out/summary.json"; echo '```'
    $python -c "import json; s = json.load(open('$out/eval-val.json')); print(f\"\nmsf eval on val: F-score {s['f_score']:.4f}, mIoU {s['miou']:.4f}\")" 2>/dev/null
  fi
  echo; echo "status: $status; $(( $(date +%s) - started )) s of a $budget s budget"
} > "$out/summary.md"
cat "$out/summary.md"
exit $status
