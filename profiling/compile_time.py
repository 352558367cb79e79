"""How long each fused-op kernel takes to compile for the GPU, measured on this CPU.

    python -m msf.profiling.compile_time [--op head_loss lmsa ...] [--arch 90] [--passes] [--json PATH] [--md PATH]

Triton compiles a kernel at its first launch, in the process that launches it: a kernel that takes
a minute to build stalls the first training step by a minute (on the first lent H200 the triton
step could not finish its first call in 150 s; bench/results/measured/gpu/2026-12-04-h200). This
captures every launch of the op at the paper's shapes (`msf.profiling.cost.capture`, no kernel runs),
compiles each distinct kernel for the target with an empty Triton cache, and prints the seconds
per kernel, the slowest first. `--passes` adds, per kernel, the MLIR pass that took longest
(Triton's MLIR_ENABLE_TIMING report, read from the compiler's stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time


def _slowest_pass(stderr_text: str) -> str:
    """The largest pass line of an MLIR timing report: '94.4 s TritonGPUCoalesce'."""
    best = (0.0, "")
    for wall, name in re.findall(r"^\s+([0-9.]+) \(\s*[0-9.]+%\)\s+(\S.*?)\s*$", stderr_text, re.M):
        if name != "Total" and float(wall) > best[0]:
            best = (float(wall), name)
    return f"{best[0]:.1f} s {best[1]}" if best[1] else ""


def measure(ops: list[str], arch: int, passes: bool) -> list[dict]:
    from msf.profiling import cost
    from msf.profiling.report import build
    device = cost.H100 if arch == 90 else cost.A100
    rows, seen = [], set()
    for op, stage in cost.op_instances():
        if ops and op not in ops:
            continue
        for launch in cost.capture(op, device, stage):
            name = launch.fn.fn.__name__
            key = cost.build_key(launch, arch)   # one row per compile the launcher would make
            if key in seen:
                continue
            seen.add(key)
            slowest = ""
            with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryFile("w+") as err:
                os.environ["TRITON_CACHE_DIR"] = cache          # a fresh cache: a real compile
                saved = os.dup(2)
                if passes:
                    os.environ["MLIR_ENABLE_TIMING"] = "1"
                    os.dup2(err.fileno(), 2)                      # the MLIR report goes to fd 2
                started = time.perf_counter()
                try:
                    build(launch.fn, launch.signature, launch.constexprs, launch.attrs, arch, launch.options)
                finally:
                    seconds = time.perf_counter() - started
                    os.dup2(saved, 2)
                    os.close(saved)
                    os.environ.pop("MLIR_ENABLE_TIMING", None)
                if passes:
                    err.seek(0)
                    slowest = _slowest_pass(err.read())
            rows.append({"op": cost.op_label(op, stage), "kernel": name, "arch": f"sm_{arch}",
                         "compile_s": round(seconds, 2), "slowest_pass": slowest})
            print(f"  {rows[-1]['op']:<22} {name:<34} {seconds:7.1f} s  {slowest}", flush=True)
    return sorted(rows, key=lambda r: -r["compile_s"])


def markdown(rows: list[dict], arch: int) -> str:
    """The rows as the committed table (bench/results/measured/cpu/compile-times.md)."""
    import datetime
    import triton
    lines = [f"# Kernel compile times for sm_{arch} (this CPU)", "",
             f"`python -m msf.profiling.compile_time --passes --json … --md …`, {datetime.date.today().isoformat()}, "
             f"Triton {triton.__version__}: each distinct compile of the fused ops' launches at the paper's shapes "
             "(B = 32, 512², bf16 autocast), one at a time into an empty Triton cache, on the machine that ran it "
             "(the project's 2-vCPU CPU machine for the committed table; the first H200 machine compiled about "
             "2.5× slower, bench/results/measured/gpu/2026-12-04-h200). `_head_loss_bwd_rows_kernel` took 95.9 s "
             "before its restructuring (docs/head_loss.md, \"Compile time\").", "",
             "| seconds | kernel | op | slowest MLIR pass |", "|---|---|---|---|"]
    lines += [f"| {r['compile_s']:.1f} | `{r['kernel']}` | {r['op']} | {r['slowest_pass']} |" for r in rows]
    lines.append(f"| **{sum(r['compile_s'] for r in rows):.1f}** | all {len(rows)} compiles, one process | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", nargs="*", default=[], help="ops to compile (default: every fused op)")
    parser.add_argument("--arch", type=int, choices=(80, 90), default=90)
    parser.add_argument("--passes", action="store_true", help="name each kernel's slowest MLIR pass")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--md", help="write the table here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: this compiles for the GPU", file=sys.stderr)
        return 2
    rows = measure(args.op, args.arch, args.passes)
    print(f"\n{'seconds':>8}  kernel (slowest first; {len(rows)} distinct compiles, sm_{args.arch}, this CPU)")
    for r in rows:
        print(f"{r['compile_s']:8.1f}  {r['kernel']} ({r['op']})  {r['slowest_pass']}")
    print(f"{sum(r['compile_s'] for r in rows):8.1f}  in all, one process")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows, args.arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
