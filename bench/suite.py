"""`msf bench`: fused ops and the whole training step, eager against torch.compile against Triton.

    msf bench [--preset paper|smoke|cpu] [--suite ops|step|all]
              [--providers eager,compile,triton,triton+compile,sdpa] [--interleave]
              [--out bench/results] [--name NAME] [--budget-s 300]

`paper` is SPEC §6's shapes (B=32, 512×512, bf16 AMP) and needs CUDA; `smoke` runs the same code at
a small size on whatever is there (on a CPU the Triton provider needs TRITON_INTERPRET=1): it
proves the commands work, it is no timing claim. `cpu` is the CPU training recipe (B=16, 256²,
bf16 autocast, classifier at H/4) for eager against compile on a CPU. Each row: median ms (CUDA
events), images/s, peak memory, computed bytes moved, achieved GB/s and its share of the
device-to-device copy bandwidth measured in the same run.

Providers: `eager` (plain PyTorch), `compile` (torch.compile of eager), `triton` (the fused
kernels), `triton+compile` (torch.compile around the fused kernels: they enter the graph as the
`msf::` operators of kernels/ops.py), `sdpa` (attention only). A compiled provider's first call
compiles; its time is reported in a `compile_time` row of its own, never in the step times.
`--interleave` times the providers of a case in turns (one call each, the order alternating),
so that a machine shared with other work slows them alike; otherwise each runs its repeats in a row.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.harness import copy_bandwidth_gbs, environment, measure_ms, row, write_results
from msf.backend import LMSAParams, eager_attention, eager_lmsa, eager_upsample_argmax, get_ops
from msf.losses import ce_dice_loss
from msf.nvtx import nvtx_range

PRESETS = {
    "paper": {"batch": 32, "size": 512, "dtype": torch.bfloat16, "reps": 30, "warmup": 5},
    "smoke": {"batch": 2, "size": 64, "dtype": torch.float32, "reps": 2, "warmup": 1},
    "cpu": {"batch": 16, "size": 256, "dtype": torch.bfloat16, "reps": 10, "warmup": 2, "paper_head_order": False},
}
COMPILED = ("compile", "triton+compile")
STAGES = [(1, 32, 8), (2, 64, 4), (3, 128, 2), (4, 192, 1)]  # (stage, channels, SR ratio)


@dataclass
class Case:
    op: str
    size: str
    images: int
    passes: dict[str, dict[str, Callable[[], Callable[[], object]]]]  # pass -> provider -> builder of the call
    bytes_moved: dict[str, int]                          # provider -> bytes of fwd+bwd (or fwd) pass


def _randn(*shape, device, dtype, grad=True):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def call():
        out = fn()
        (out if out.dim() == 0 else out.float().square().mean()).backward()
    return call


def _builders(providers: dict[str, Callable[[], torch.Tensor]], backward: bool) -> dict[str, Callable]:
    """provider -> builder of the timed call; "compile" is torch.compile of the eager function,
    "triton+compile" of the triton one."""
    wrap = _fwd_bwd if backward else (lambda f: f)
    builders = {p: (lambda f=f: wrap(f)) for p, f in providers.items()}
    builders["compile"] = lambda: wrap(torch.compile(providers["eager"], fullgraph=True))
    if "triton" in providers:
        builders["triton+compile"] = lambda: wrap(torch.compile(providers["triton"], fullgraph=True))
    return builders


def head_loss_case(batch, size, device, dtype) -> Case:
    h = size // 4
    feats = _randn(batch, 128, h, h, device=device, dtype=dtype)
    weight = _randn(19, 128, 1, 1, device=device, dtype=dtype)
    bias = _randn(19, device=device, dtype=dtype)
    targets = torch.randint(0, 19, (batch, size, size), device=device, dtype=torch.uint8)

    def paper_order():
        up = F.interpolate(feats, scale_factor=4, mode="bilinear", align_corners=False)
        return ce_dice_loss(F.conv2d(up, weight, bias), targets)

    def fused():
        return get_ops("triton").head_loss(F.conv2d(feats, weight, bias), targets)

    from bench.bytes_head_loss import ops as head_ops, totals as head_totals
    e = dtype.itemsize
    eager_bytes = head_totals(head_ops("eager-paper", B=batch, H=size, W=size, act=e))["total"]
    fused_bytes = head_totals(head_ops("fused", B=batch, H=size, W=size, act=e))["total"]
    providers = {"eager": paper_order, "triton": fused}
    return Case("head+ce_dice", f"B={batch},{size}²", batch,
                {"fwd+bwd": _builders(providers, backward=True)},
                {"eager": eager_bytes, "compile": eager_bytes, "triton": fused_bytes, "triton+compile": fused_bytes})


def attention_cases(batch, size, device, dtype) -> list[Case]:
    from bench.bytes_attention import totals as attn_totals
    cases = []
    for stage, d, ratio in STAGES:
        side = size // (4 * 2 ** (stage - 1))
        n, m = side * side, (side // ratio) ** 2
        q = _randn(batch, n, d, device=device, dtype=dtype)
        kv = _randn(batch, m, 2 * d, device=device, dtype=dtype)
        k, v = kv[..., :d], kv[..., d:]
        providers = {
            "eager": lambda q=q, k=k, v=v: eager_attention(q, k, v),
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "triton": lambda q=q, k=k, v=v: get_ops("triton").attention(q, k, v),
        }
        e = dtype.itemsize
        bytes_moved = {p: sum(attn_totals(v_, batch, n, m, d, e)) for p, v_ in
                       (("eager", "eager"), ("compile", "eager"), ("sdpa", "sdpa"), ("triton", "fused"),
                        ("triton+compile", "fused"))}
        cases.append(Case(f"attention/stage{stage}", f"B={batch},N={n},M={m},d={d}", batch,
                          {"fwd+bwd": _builders(providers, backward=True)}, bytes_moved))
    return cases


def lmsa_case(batch, size, device, dtype) -> Case:
    h, c = size // 4, 128
    x = _randn(batch, c, h, h, device=device, dtype=dtype)
    params = LMSAParams(
        dw_weights=tuple(_randn(c, 1, k, k, device=device, dtype=dtype) for k in (3, 5, 7)),
        pw_weights=tuple(_randn(c, c, device=device, dtype=dtype) for _ in range(3)),
        pw_biases=tuple(_randn(c, device=device, dtype=dtype) for _ in range(3)),
        fc1_weight=_randn(48, 3 * c, device=device, dtype=dtype), fc1_bias=_randn(48, device=device, dtype=dtype),
        fc2_weight=_randn(3 * c, 48, device=device, dtype=dtype), fc2_bias=_randn(3 * c, device=device, dtype=dtype))
    from bench.bytes_lmsa import ops as lmsa_ops, totals as lmsa_totals

    def total(variant: str) -> int:
        return sum(lmsa_totals(lmsa_ops(variant, B=batch, C=c, H=h, W=h, e=dtype.itemsize)).values())

    providers = {"eager": lambda: eager_lmsa(x, params), "triton": lambda: get_ops("triton").lmsa(x, params)}
    return Case("lmsa", f"B={batch},C={c},{h}²", batch, {"fwd+bwd": _builders(providers, backward=True)},
                {"eager": total("eager"), "compile": total("eager"), "triton": total("fused"),
                 "triton+compile": total("fused")})


def upsample_argmax_case(batch, size, device, dtype) -> Case:
    logits = torch.randn(batch, 19, size // 4, size // 4, device=device, dtype=dtype)
    e = dtype.itemsize
    low, full = logits.numel() * e, batch * size * size
    providers = {"eager": lambda: eager_upsample_argmax(logits, (size, size)),
                 "triton": lambda: get_ops("triton").upsample_argmax(logits, (size, size))}
    # eager writes and re-reads full-res logits, then writes int64 ids; fused reads z, writes int64 ids
    return Case("upsample+argmax", f"B={batch},{size}²", batch, {"fwd": _builders(providers, backward=False)},
                {"eager": low + 2 * 19 * full * e + 8 * full, "compile": low + 8 * full, "triton": low + 8 * full,
                 "triton+compile": low + 8 * full})


def train_step_case(batch, size, device, dtype, paper_head_order: bool = True) -> Case:
    """The whole training step of `profiling.step` (forward, loss, backward, clip, AdamW)."""
    from profiling.step import build_step
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")

    def builder(backend, compiled):
        return lambda: build_step(backend, batch, size, amp, device, compiled=compiled,
                                  paper_head_order=paper_head_order)
    builders = {"eager": builder("eager", False), "compile": builder("eager", True),
                "triton": builder("triton", False), "triton+compile": builder("triton", True)}
    return Case("train_step", f"B={batch},{size}²", batch, {"step": builders}, {})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(builders: dict, provider: str, device: torch.device) -> tuple[Callable[[], object], float | None]:
    """The timed call of `provider`, and for a compiled provider its first call's time (the compile)."""
    fn = builders[provider]()
    compile_s = None
    if provider in COMPILED:  # the first call compiles; time it apart from the runs
        started = time.perf_counter()
        fn()
        _sync(device)
        compile_s = time.perf_counter() - started
    return fn, compile_s


def _measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                         reps: int) -> dict[str, list[float]]:
    """Per-call ms of every provider, one call each in turn (the order reversed every other round)."""
    order = list(fns)
    for _ in range(warmup):
        for p in order:
            fns[p]()
    times = {p: [] for p in order}
    for rep in range(reps):
        for p in (order if rep % 2 == 0 else order[::-1]):
            times[p] += measure_ms(fns[p], device, warmup=0, reps=1)
    return times


def _rows(case: Case, provider: str, pass_: str, ms: list[float], compile_s: float | None, device, env: dict,
          copy_gbs: float, **notes) -> list[dict]:
    median = sorted(ms)[len(ms) // 2]
    extra = dict(notes)
    if device.type == "cuda":
        extra["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    rows = [row(case.op, provider, pass_, "time", "ms", case.size, ms, env, **extra),
            row(case.op, provider, pass_, "throughput", "images/s", case.size,
                [case.images / (t * 1e-3) for t in ms], env, **notes)]
    if "peak_memory_mb" in extra:
        rows.append(row(case.op, provider, pass_, "peak_memory", "MB", case.size, extra["peak_memory_mb"], env))
    if compile_s is not None:
        rows.append(row(case.op, provider, pass_, "compile_time", "s", case.size, compile_s, env, **notes))
    nbytes = case.bytes_moved.get(provider)
    if nbytes:
        gbs = nbytes / (median * 1e-3) / 1e9
        rows.append(row(case.op, provider, pass_, "bytes_moved", "MB", case.size, nbytes / 1e6, env))
        rows.append(row(case.op, provider, pass_, "achieved_bandwidth", "GB/s", case.size, gbs, env,
                        copy_bandwidth_gbs=copy_gbs, percent_of_copy=100 * gbs / copy_gbs))
    print(f"  {case.op:22s} {provider:14s} {pass_:8s} {median:10.3f} ms"
          + (f"  compile {compile_s:.1f} s" if compile_s is not None else ""), flush=True)
    return rows


def _failed(case: Case, provider: str, pass_: str, exc: Exception, env: dict) -> dict:
    print(f"  {case.op} {provider}: failed ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
    return row(case.op, provider, pass_, "error", "", case.size, 0.0, env, error=str(exc)[:500])


def run_case(case: Case, providers: list[str], device: torch.device, preset: dict, env: dict, copy_gbs: float,
             deadline: float) -> list[dict]:
    rows = []
    for pass_, builders in case.passes.items():
        for provider in [p for p in providers if p in builders]:
            if time.monotonic() > deadline:
                print(f"  {case.op} {provider}: skipped (time budget spent)", flush=True)
                continue
            # on a terminal, say what is being measured (one measurement takes minutes in the interpreter)
            with tqdm(total=1, desc=f"  measuring {case.op} {provider}", leave=False, file=sys.stderr,
                      disable=not sys.stderr.isatty(), bar_format="{desc} ..."):
                try:
                    fn, compile_s = _prepare(builders, provider, device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    with nvtx_range(f"bench/{case.op}/{provider}"):
                        ms = measure_ms(fn, device, preset["warmup"], preset["reps"])
                except Exception as exc:  # one broken provider must not hide the others' figures
                    rows.append(_failed(case, provider, pass_, exc, env))
                    continue
            rows += _rows(case, provider, pass_, ms, compile_s, device, env, copy_gbs)
    return rows


def run_case_interleaved(case: Case, providers: list[str], device: torch.device, preset: dict, env: dict,
                         copy_gbs: float) -> list[dict]:
    """`run_case` with the providers timed in turns (`--interleave`); peak memory is not split by
    provider here, so it is left out."""
    rows = []
    for pass_, builders in case.passes.items():
        fns, compile_s = {}, {}
        for provider in [p for p in providers if p in builders]:
            try:
                fns[provider], compile_s[provider] = _prepare(builders, provider, device)
            except Exception as exc:  # one broken provider must not hide the others' figures
                rows.append(_failed(case, provider, pass_, exc, env))
        times = _measure_interleaved(fns, device, preset["warmup"], preset["reps"])
        for provider, ms in times.items():
            rows += _rows(case, provider, pass_, ms, compile_s[provider], torch.device("cpu"), env, copy_gbs,
                          timing="interleaved")
        # each round's calls ran back to back: the per-round ratio to the first provider cancels most
        # of what other work on the machine does to both
        first = next(iter(times), None)
        for provider in list(times)[1:]:
            ratios = [a / b for a, b in zip(times[first], times[provider])]
            rows.append(row(case.op, provider, pass_, f"speedup_vs_{first}", "x", case.size, ratios, env,
                            timing="interleaved", per_round=ratios))
            print(f"  {case.op:22s} {provider:14s} {pass_:8s} {sorted(ratios)[len(ratios) // 2]:10.3f} x {first} "
                  "(median of the per-round ratios)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msf bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper (CUDA) or smoke (default on a CPU)")
    parser.add_argument("--suite", choices=["ops", "step", "all"], default="all")
    parser.add_argument("--providers", default=None, help="comma list of eager,compile,triton,triton+compile,sdpa")
    parser.add_argument("--interleave", action="store_true",
                        help="time a case's providers in turns, one call each (fair on a shared machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default=None, help="results file stem (default: bench-<preset>-<device>)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new measurements after this")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per provider (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: the preset's)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    preset_name = args.preset or ("paper" if device.type == "cuda" else "smoke")
    preset = dict(PRESETS[preset_name])
    preset.update({k: getattr(args, k) for k in ("reps", "warmup") if getattr(args, k) is not None})
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if args.providers:
        providers = args.providers.split(",")
    elif device.type == "cuda":
        providers = ["eager", "sdpa", "compile", "triton", "triton+compile"]
    else:
        providers = ["eager", "sdpa"] + (["triton"] if interpreter else [])
        print("CPU smoke run: torch.compile skipped (ask with --providers), "
              + ("triton through the interpreter (slow)" if interpreter else "triton skipped (no TRITON_INTERPRET=1)"),
              flush=True)
    env = environment(device)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"{env['device']}: device copy {copy_gbs:.0f} GB/s; preset {preset_name}", flush=True)
    deadline = time.monotonic() + args.budget_s
    batch, size, dtype = preset["batch"], preset["size"], preset["dtype"]
    rows = [row("device_copy", "torch", "copy", "bandwidth", "GB/s", "1 GiB" if device.type == "cuda" else "64 MiB",
                copy_gbs, env)]

    def run(case: Case, case_providers: list[str]) -> list[dict]:
        if args.interleave:
            return run_case_interleaved(case, case_providers, device, preset, env, copy_gbs)
        return run_case(case, case_providers, device, preset, env, copy_gbs, deadline)

    if args.suite in ("ops", "all"):
        cases = [head_loss_case(batch, size, device, dtype), *attention_cases(batch, size, device, dtype),
                 lmsa_case(batch, size, device, dtype), upsample_argmax_case(batch, size, device, dtype)]
        for case in cases:
            rows += run(case, providers)
    if args.suite in ("step", "all"):
        step_providers = [p for p in providers if p != "sdpa"]
        rows += run(train_step_case(batch, size, device, dtype, preset.get("paper_head_order", True)), step_providers)
    name = args.name or f"bench-{preset_name}-{device.type}"
    json_path, md_path = write_results(rows, Path(args.out), name)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
