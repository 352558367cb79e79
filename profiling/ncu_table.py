"""Nsight Compute helpers: the project's kernel-name filter, and a short table from ncu's CSV.

    python -m profiling.ncu_table --regex          # prints a regex matching every project kernel
    python -m profiling.ncu_table ncu.csv          # time, DRAM bandwidth, occupancy per kernel

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
}


def kernel_names() -> list[str]:
    """Names of every Triton kernel the project declares (from the kernels' AOT specs)."""
    from kernels.report import _unwrap, collect_specs
    specs, _ = collect_specs()
    return sorted({_unwrap(spec.fn).__name__ for _, spec in specs})


def parse(text: str) -> list[dict]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    reader = csv.DictReader(io.StringIO("\n".join(lines[start:])))
    rows = list(reader)
    return rows[1:] if rows and rows[0].get("ID", "") == "" else rows  # second line holds the units


def to_float(value: str) -> float:
    return float(value.replace(",", "")) if value not in ("", "n/a") else float("nan")


def table(rows: list[dict]) -> str:
    per_kernel: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        per_kernel[r["Kernel Name"]].append(r)
    out = [f"{'kernel':48s} {'calls':>5s} {'time µs':>10s} {'DRAM GB/s':>10s} {'DRAM %':>7s} {'occup %':>8s}"]
    for name, rs in sorted(per_kernel.items(), key=lambda kv: -sum(to_float(r["gpu__time_duration.sum"]) for r in kv[1])):
        mean = {m: sum(to_float(r.get(m, "")) for r in rs) / len(rs) for m in METRICS}
        out.append(f"{name[:48]:48s} {len(rs):5d} {mean['gpu__time_duration.sum'] / 1e3:10.1f} "
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
    print(table(parse(Path(args.csv).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
