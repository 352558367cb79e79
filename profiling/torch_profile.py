"""torch.profiler over a few training steps: a Chrome trace (with the NVTX / record_function
ranges) and a table of the top kernels.

    python -m msf.profiling.torch_profile [--backend triton] [--steps 3] [--out profiling/out]

Open `<out>/trace-<backend>.json` in chrome://tracing or https://ui.perfetto.dev; the ranges
(step, forward+loss, encoder/stageN, decoder/lmsa, triton/<op>, backward, optimizer) sit above the
kernels they launched. `<out>/top-kernels-<backend>.txt` holds the table printed at the end.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from msf.profiling.step import add_arguments, warmed_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--out", default="profiling/out")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    prepared = warmed_step(args, "msf.profiling.torch_profile")
    if prepared is None:
        return 2
    device, step = prepared
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"trace-{args.backend}.json"
    prof.export_chrome_trace(str(trace))
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=args.top)
    (out / f"top-kernels-{args.backend}.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {trace} ({trace.stat().st_size / 1e6:.1f} MB) and {out / f'top-kernels-{args.backend}.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
