"""Nsight Compute against the cost model: measured ÷ predicted for every fused kernel of one step.

    python -m msf.profiling.ncu_compare NCU_CSV [--cost COST_JSON] [--device auto|h100|a100] [--out PREFIX]

Measured: `ncu --csv --page raw` over one training step (`profiling/ncu.sh`; parsed by
`msf.profiling.ncu_table`), per launch: `smsp__inst_executed.sum` (warp-instructions issued),
`sm__warps_active.avg.pct_of_peak_sustained_active` (achieved occupancy), `dram__bytes.sum`,
`gpu__time_duration.sum`, and the launch's grid.
Predicted: the long-format rows of `python -m msf.profiling.cost --json PATH` (op, kernel
"name[config]", pass, device, metric, unit, value); used here: `grid` (programs), `warps`,
`ctas_per_sm`, `dynamic_total` (warp-instructions), `dram_bytes`, `predicted` (seconds).
Predicted occupancy = resident CTAs × warps ÷ the SM's warp slots, resident CTAs =
min(ctas_per_sm, ⌈programs ÷ SMs⌉), the same rule as the cost model's issue bound.

Matching: a launch takes the prediction of the same Triton function on the same device (compute
capability 9.x → h100, 8.x → a100, or `--device`) with the same number of programs; when no grid
matches and the function has a single prediction, that one ("name only" in the table); else the
launch is listed unmatched. Launches of one kernel and grid are averaged (the attention blocks of
a stage run the same kernels at the same grid). An H200 (9.0) is compared with the H100's
predictions: its bandwidth (4.3 TB/s against 3.0) makes byte-bound kernels faster than predicted.

Writes PREFIX.md (a table) and PREFIX.json (long rows: op, kernel, pass, device, grid, launches,
metric, unit, measured, predicted, ratio, match); without a cost JSON, measured values only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from msf.profiling.ncu_table import base_value, parse_with_units

# (ncu metric, predicted metric, unit, label); occupancy's prediction is derived, see the docstring
COMPARED = (
    ("gpu__time_duration.sum", "predicted", "s", "time"),
    ("smsp__inst_executed.sum", "dynamic_total", "warp-instructions", "warp-inst"),
    ("dram__bytes.sum", "dram_bytes", "bytes", "DRAM bytes"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy", "%", "occupancy"),
)
# SMs and warp slots per SM when msf.profiling.cost (which owns the device constants) is not importable
_FALLBACK_DEVICES = {"h100": (132, 64), "a100": (108, 64)}


def device_of(cc: str) -> str:
    major = cc.split(".")[0].strip()
    return {"9": "h100", "8": "a100"}.get(major, f"cc{cc}")


def grid_programs(text: str) -> int:
    """Programs in a launch from ncu's "Grid Size" cell, e.g. "(256, 4, 1)" → 1024."""
    return math.prod(int(part) for part in text.strip("() ").replace(",", " ").split())


def kernel_base(name: str) -> str:
    """The Triton function name of a cost-model kernel label "name[config]"."""
    return name.split("[", 1)[0]


def _device_shape(device: str) -> tuple[int, int] | None:
    try:
        from msf.profiling.cost import DEVICES
        d = DEVICES[device]
        return d.sms, d.max_warps_per_sm
    except (ImportError, KeyError, AttributeError):
        return _FALLBACK_DEVICES.get(device)


@dataclass
class Prediction:
    op: str
    kernel: str
    pass_: str
    device: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def programs(self) -> int | None:
        g = self.metrics.get("grid")
        return int(g) if g is not None else None

    def value(self, metric: str) -> float | None:
        if metric != "occupancy":
            return self.metrics.get(metric)
        shape = _device_shape(self.device)
        needed = ("ctas_per_sm", "warps", "grid")
        if shape is None or any(self.metrics.get(m) is None for m in needed):
            return None
        sms, warp_slots = shape
        resident = min(self.metrics["ctas_per_sm"], math.ceil(self.metrics["grid"] / sms))
        return 100.0 * resident * self.metrics["warps"] / warp_slots


def load_predictions(rows: list[dict]) -> list[Prediction]:
    """One Prediction per (op, kernel, pass, device) of the cost model's long rows; op-level rows
    (kernel "(op)") and step rows are not kernels and are skipped."""
    groups: dict[tuple, Prediction] = {}
    for r in rows:
        if r["kernel"].startswith("(") or r["op"].startswith("("):
            continue
        key = (r["op"], r["kernel"], r["pass"], r["device"])
        pred = groups.setdefault(key, Prediction(*key))
        if r["value"] is not None:
            pred.metrics[r["metric"]] = float(r["value"])
    return list(groups.values())


def match(name: str, programs: int, device: str, predictions: list[Prediction]) -> tuple[Prediction | None, str]:
    same = [p for p in predictions if kernel_base(p.kernel) == name and p.device == device]
    by_grid = [p for p in same if p.programs == programs]
    if by_grid:
        distinct = {tuple(sorted(p.metrics.items())) for p in by_grid}
        return by_grid[0], "grid" if len(distinct) == 1 else f"grid, {len(by_grid)} candidates"
    if len(same) == 1:
        return same[0], "name only"
    return None, "unmatched"


def compare(csv_text: str, cost_rows: list[dict] | None, device: str = "auto") -> list[dict]:
    """Long rows, one per (kernel, grid, metric): measured mean per launch, predicted, ratio."""
    launches, units = parse_with_units(csv_text)
    predictions = load_predictions(cost_rows) if cost_rows else []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for launch in launches:
        dev = device if device != "auto" else device_of(launch.get("CC", ""))
        groups[(launch["Kernel Name"], grid_programs(launch["Grid Size"]), dev)].append(launch)
    out = []
    for (name, programs, dev), members in groups.items():
        pred, how = match(name, programs, dev, predictions) if predictions else (None, "no cost model")
        for ncu_metric, pred_metric, unit, _ in COMPARED:
            if ncu_metric not in members[0]:
                continue
            measured = sum(base_value(m, ncu_metric, units) for m in members) / len(members)
            predicted = pred.value(pred_metric) if pred else None
            out.append({"op": pred.op if pred else None, "kernel": name, "pass": pred.pass_ if pred else None,
                        "device": dev, "grid": programs, "launches": len(members), "metric": ncu_metric,
                        "unit": unit, "measured": measured, "predicted": predicted,
                        "ratio": measured / predicted if predicted else None, "match": how})
    return out


def _cell(row: dict | None, scale: float, digits: int) -> str:
    if row is None:
        return "–"
    fmt = lambda v: "n/a" if v is None or v != v else f"{v * scale:.{digits}f}"  # noqa: E731
    ratio = "" if row["ratio"] is None else f" (×{row['ratio']:.2f})"
    return f"{fmt(row['measured'])} / {fmt(row['predicted'])}{ratio}"


def markdown(rows: list[dict], note: str = "") -> str:
    scales = {"gpu__time_duration.sum": (1e6, 1), "smsp__inst_executed.sum": (1e-6, 2),
              "dram__bytes.sum": (1e-6, 1), "sm__warps_active.avg.pct_of_peak_sustained_active": (1.0, 1)}
    heads = {"gpu__time_duration.sum": "time µs", "smsp__inst_executed.sum": "warp-inst M",
             "dram__bytes.sum": "DRAM MB", "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %"}
    by_launch: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_launch[(r["kernel"], r["grid"], r["device"], r["op"], r["pass"], r["launches"], r["match"])][r["metric"]] = r
    lines = ["Per launch (mean over the step's launches of that kernel and grid): measured / predicted (× ratio)", ""]
    if note:
        lines += [note, ""]
    lines.append("| kernel | op | pass | device | programs | launches | " + " | ".join(heads.values()) + " | match |")
    lines.append("|" + "---|" * (7 + len(heads)))
    time = "gpu__time_duration.sum"
    for key, metrics in sorted(by_launch.items(), key=lambda kv: -(kv[1].get(time, {}).get("measured") or 0)):
        kernel, grid, dev, op, pass_, launches, how = key
        cells = [_cell(metrics.get(m), *scales[m]) for m in heads]
        lines.append(f"| {kernel} | {op or '–'} | {pass_ or '–'} | {dev} | {grid} | {launches} | "
                     + " | ".join(cells) + f" | {how} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msf.profiling.ncu_compare", description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="ncu --csv --page raw output")
    parser.add_argument("--cost", type=Path, help="python -m msf.profiling.cost --json output (omit: measured only)")
    parser.add_argument("--device", default="auto", help="cost-model device key (default: from the CSV's CC)")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"ncu CSV not found: {args.csv}")
    cost_rows, note = None, ""
    if args.cost is not None:
        if not args.cost.is_file():
            parser.error(f"cost-model JSON not found: {args.cost}")
        try:
            cost_rows = json.loads(args.cost.read_text())
        except json.JSONDecodeError as exc:
            parser.error(f"{args.cost} is not JSON: {exc}")
    else:
        note = "No cost-model JSON given (msf.profiling.cost absent?): measured values only."
    try:
        rows = compare(args.csv.read_text(), cost_rows, args.device)
    except ValueError as exc:
        print(f"{args.csv}: {exc}", file=sys.stderr)
        return 1
    if not rows:
        note = (note + " " if note else "") + "The CSV holds no profiled launch."
    text = markdown(rows, note)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"# Nsight Compute vs the cost model\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
