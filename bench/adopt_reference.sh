#!/usr/bin/env bash
# Make a gpu_train.sh result folder the committed reference model: same names, formats and commands
# as before (models/README.md), the old files replaced.
#
#   bash bench/adopt_reference.sh bench/results/measured/gpu/gpu-train-<date>
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: bash bench/adopt_reference.sh RESULTS_DIR (a gpu-train-<date> folder)}
for f in reference.safetensors metrics.jsonl curves.png config.json eval-val.json summary.json; do
  [ -f "$src/$f" ] || { echo "$src/$f: missing; not a complete gpu_train.sh result" >&2; exit 2; }
done
cp "$src/reference.safetensors" models/reference.safetensors
cp "$src/metrics.jsonl" models/reference-metrics.jsonl
cp "$src/curves.png" models/reference-curves.png
cp "$src/config.json" models/reference-train-config.json
cp "$src/eval-val.json" models/reference-eval-val-512.json
python3 - "$src" <<'PY'
import json, sys
src = sys.argv[1]
s, e = json.load(open(f"{src}/summary.json")), json.load(open(f"{src}/eval-val.json"))
print(f"adopted {src}: {s['epochs_run']} epochs ({s['ended']}), val F-score {e['f_score']:.4f}, mIoU {e['miou']:.4f}")
print("now rewrite models/README.md's recipe and figures from", f"{src}/summary.md")
PY
