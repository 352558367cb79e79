"""Nsight Compute helpers: the project's kernel-name filter, and a short table from ncu's CSV.

    python -m msf.profiling.ncu_table --regex          # prints a regex matching every project kernel
    python -m msf.profiling.ncu_table ncu.csv          # time, DRAM bandwidth, occupancy per kernel

`profiling/ncu.sh` runs both around one profiled training step.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

METRICS = {
    "gpu__time_duration.sum": "time",
    "dram__bytes.sum.per_second": "dram_bw",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_%peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_%",
    # what the cost model predicts (msf.profiling.ncu_compare): warp-instructions issued, DRAM bytes
    "smsp__inst_executed.sum": "warp_inst",
    "dram__bytes.sum": "dram_bytes",
}


def kernel_names() -> list[str]:
    """Names of every Triton kernel the project declares (from the kernels' AOT specs)."""
    from msf.profiling.report import _unwrap, collect_specs
    specs, _ = collect_specs()
    return sorted({_unwrap(spec.fn).__name__ for _, spec in specs})


def parse_with_units(text: str) -> tuple[list[dict], dict[str, str]]:
    """(one dict per profiled launch, {column: unit}) from `ncu --csv --page raw` output.

    Lines before the header (`==PROF==` progress, the application's own prints) and after the
    table are skipped; the line under the header holds each metric column's unit."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV table found (no line starting with \"ID\"): was --csv --page raw used?")
    table_lines = [line for line in lines[start:] if line.startswith('"')]
    rows = list(csv.DictReader(io.StringIO("\n".join(table_lines))))
    units: dict[str, str] = {}
    if rows and rows[0].get("ID", "") == "":  # the units line
        units = {k: v for k, v in rows[0].items() if v}
        rows = rows[1:]
    return rows, units


def parse(text: str) -> list[dict]:
    return parse_with_units(text)[0]


def to_float(value: str) -> float:
    return float(value.replace(",", "")) if value not in ("", "n/a") else float("nan")


# ncu's unit names (auto-scaled unless --print-units base) → factor to the base unit
_UNIT_SCALE = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6, "ms": 1e-3,
               "s": 1.0, "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
               "byte/second": 1.0, "Kbyte/second": 1e3, "Mbyte/second": 1e6, "Gbyte/second": 1e9,
               "Tbyte/second": 1e12, "inst": 1.0, "Kinst": 1e3, "Minst": 1e6, "Ginst": 1e9, "%": 1.0, "": 1.0}


def base_value(row: dict, metric: str, units: dict[str, str]) -> float:
    """`metric` of one launch in base units: seconds, bytes, bytes/s, instructions, percent."""
    unit = units.get(metric, "")
    if unit not in _UNIT_SCALE:
        raise ValueError(f"ncu column {metric!r} has unit {unit!r}, which msf.profiling.ncu_table does not know")
    return to_float(row.get(metric, "")) * _UNIT_SCALE[unit]


def table(rows: list[dict], units: dict[str, str]) -> str:
    per_kernel: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        per_kernel[r["Kernel Name"]].append(r)

    def average(rs: list[dict], metric: str) -> float:
        return sum(base_value(r, metric, units) for r in rs) / len(rs)
    time = "gpu__time_duration.sum"
    out = [f"{'kernel':48s} {'calls':>5s} {'time µs':>10s} {'DRAM GB/s':>10s} {'DRAM %':>7s} {'occup %':>8s}"]
    for name, rs in sorted(per_kernel.items(), key=lambda kv: -sum(base_value(r, time, units) for r in kv[1])):
        mean = {m: average(rs, m) if m in rs[0] else float("nan") for m in METRICS}
        out.append(f"{name[:48]:48s} {len(rs):5d} {mean['gpu__time_duration.sum'] * 1e6:10.1f} "
                   f"{mean['dram__bytes.sum.per_second'] / 1e9:10.1f} "
                   f"{mean['dram__throughput.avg.pct_of_peak_sustained_elapsed']:7.1f} "
                   f"{mean['sm__warps_active.avg.pct_of_peak_sustained_active']:8.1f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="?")
    parser.add_argument("--regex", action="store_true")
    args = parser.parse_args(argv)
    if args.regex:
        print("regex:" + "|".join(kernel_names()))
        return 0
    if not args.csv:
        parser.error("give ncu's CSV file, or --regex")
    path = Path(args.csv)
    if not path.is_file():
        parser.error(f"ncu CSV not found: {path}")
    try:
        print(table(*parse_with_units(path.read_text())))
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
