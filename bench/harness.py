"""Timing, bandwidth and result-writing pieces shared by every benchmark.

Rows are long-format dicts (op, provider, pass, metric, unit, size, p20/p50/p80, device, versions,
date) so runs from different days and cards line up in one table.
"""
from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch


# The one statistic every table and console line reports: the median with linear interpolation
# (numpy's and torch's default quantile), the mean of the two middle values for an even count.
STATISTIC = "median"


def measure_ms(fn: Callable[[], object], device: torch.device, warmup: int = 5, reps: int = 30,
               on_call: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Per-call milliseconds of `reps` calls after `warmup` untimed ones: CUDA events on a GPU,
    perf_counter on the CPU. `on_call(done, warmup + reps, ms)` after every call, warm-up included
    (progress for measurements that take minutes)."""
    total = warmup + reps
    for i in range(warmup):
        started = time.perf_counter()
        fn()
        if on_call:
            on_call(i + 1, total, (time.perf_counter() - started) * 1e3)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for i in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        if on_call:
            on_call(warmup + i + 1, total, times[-1])
    return times


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, reps: int,
                        label: str | None = None, slow_s: float = 2.0) -> dict[str, list[float]]:
    """Per-call ms of every entry of `fns`, one call each per round, the order reversed every other
    round, so that other work on the machine slows them alike. With `label`, a round that takes
    `slow_s` or more prints a progress line."""
    order = list(fns)
    for _ in range(warmup):
        for name in order:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in order}
    for rep in range(reps):
        started = time.perf_counter()
        for name in (order if rep % 2 == 0 else order[::-1]):
            times[name] += measure_ms(fns[name], device, warmup=0, reps=1)
        if label is not None and time.perf_counter() - started >= slow_s:
            print(f"    {label}: round {rep + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1] / 1e3:.1f} s" for n in order),
                  flush=True)
    return times


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting the bytes read plus the bytes written (GB/s)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (median(ms) * 1e-3) / 1e9


def quantiles(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"p20": float(t.quantile(0.2)), "p50": float(t.quantile(0.5)), "p80": float(t.quantile(0.8))}


def median(values: list[float]) -> float:
    """`STATISTIC` of `values`: the p50 every row stores, so console, JSON and Markdown agree."""
    return quantiles(values)["p50"]


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - depends on the installation
        triton_version = None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": name, "versions": {"torch": torch.__version__, "triton": triton_version,
                                         "python": platform.python_version()},
            "date": datetime.date.today().isoformat()}


def row(op: str, provider: str, pass_: str, metric: str, unit: str, size: str, values: list[float] | float,
        env: dict, **extra) -> dict:
    stats = quantiles(values) if isinstance(values, list) else {"p20": values, "p50": values, "p80": values}
    return {"op": op, "provider": provider, "pass": pass_, "metric": metric, "unit": unit, "size": size,
            **stats, **env, **extra}


def write_results(rows: list[dict], out_dir: Path, name: str, notes: list[str] = ()) -> tuple[Path, Path]:
    """`<name>.json` (every row) and `<name>.md` (`notes`, then a table of each row's median) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    env = rows[0] if rows else {}
    lines = [f"# {name}", "", f"device: {env.get('device')}; versions: {env.get('versions')}; date: {env.get('date')}",
             "", *[f"- {note}" for note in notes], *([""] if notes else []),
             f"| op | size | provider | pass | metric | {STATISTIC} | unit |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['size']} | {r['provider']} | {r['pass']} | {r['metric']} | "
                     f"{r['p50']:.4g} | {r['unit']} |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
