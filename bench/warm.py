"""Compile every Triton kernel the paper-shape benchmarks launch, in parallel processes, before
anything is timed.

    python -m msf.bench.warm [--jobs 8] [--preset paper]

Why: Triton compiles a kernel on its first launch, one at a time in a process, and some of this
project's kernels take minutes to build (the head loss's backward spends ~95 s in Triton's
TritonGPUCoalesce pass for sm_90, measured on this project's CPU machine, 2026-12-04). A benchmark's
first triton call would pay all of that serially. Here each fused op's forward+backward and the
triton training step run once in a process of their own, all at once; their kernels land in
Triton's on-disk cache (TRITON_CACHE_DIR), which every later process reads.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time


def _cases(preset_name: str, device: str = "cuda"):
    """Every case `msf bench --suite all` times at the preset."""
    import torch
    from msf.bench import suite
    return suite.build_cases("all", suite.PRESETS[preset_name], torch.device(device))


def _job_list(preset_name: str, device: str = "cuda") -> list[tuple[int, str, str]]:
    """(case index, pass, provider) of every triton call the benchmarks make."""
    return [(i, pass_, provider) for i, case in enumerate(_cases(preset_name, device))
            for pass_, builders in case.passes.items() for provider in builders if provider == "triton"]


def _run(work: tuple[tuple[int, str, str], str]) -> tuple[str, float, str]:
    import torch
    (index, pass_, provider), preset_name = work
    case = _cases(preset_name)[index]
    label = f"{case.op} {pass_} {provider}"
    started = time.perf_counter()
    try:
        fn = case.passes[pass_][provider]()
        fn()
        torch.cuda.synchronize()
        return label, time.perf_counter() - started, "ok"
    except Exception as exc:  # noqa: BLE001 - reported, the other jobs go on
        return label, time.perf_counter() - started, f"{type(exc).__name__}: {str(exc)[:200]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="processes at once")
    parser.add_argument("--preset", default="paper")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compile for (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    jobs = _job_list(args.preset)
    print(f"compiling the kernels of {len(jobs)} triton calls in {min(args.jobs, len(jobs))} processes", flush=True)
    started = time.perf_counter()
    failed = 0
    with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
        for label, seconds, status in pool.imap_unordered(_run, [(job, args.preset) for job in jobs]):
            failed += status != "ok"
            print(f"  {label}: {seconds:.1f} s {status}", flush=True)
    print(f"done in {time.perf_counter() - started:.1f} s ({failed} failed)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
