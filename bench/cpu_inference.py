"""CPU inference of the predict path: latency at batch 1 and throughput at batch 8, per engine.

    python -m msf.bench.cpu_inference [--checkpoint CKPT] [--size 512] [--rounds 15] [--out bench/out] [--name NAME]

What is timed is `FaceParser.parse_arrays` on size×size uint8 photos (the default: the committed
reference model, which sees them at its training size, 256²): normalise, resize, the model,
upsample of the logits to the photo's size, argmax. That is what `msf predict` and
`parser(images)` run, minus the file reading. Variants:

    eager fp32      torch engine, float32 (the baseline)
    bf16            torch engine, bfloat16 autocast
    channels-last   torch engine, float32, model and input in channels-last memory format
    compile         torch engine, float32, torch.compile (dynamic shapes; compile time reported apart)
    onnxruntime     the model exported to ONNX, ONNX Runtime's CPU execution provider

Each round calls every variant once, the order reversed every other round, so that other work on
the machine slows them alike; each figure is the median over rounds (`msf.bench.harness.STATISTIC`),
each ratio eager fp32's median ÷ the variant's. Writes <name>.json (long-format rows), <name>.md
and <name>.png (a bar chart) in --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from msf.bench.harness import STATISTIC, environment, measure_interleaved, median, row, write_results
from msf.bench.plots import plot_inference
from msf.data import SyntheticFaces
from msf.parser import FaceParser

VARIANTS: dict[str, dict] = {
    "eager fp32": dict(engine="torch", dtype="float32"),
    "bf16": dict(engine="torch", dtype="bfloat16"),
    "channels-last": dict(engine="torch", dtype="float32", channels_last=True),
    "compile": dict(engine="torch", dtype="float32", compile=True),
    "onnxruntime": dict(engine="onnxruntime"),
}
BASELINE = "eager fp32"
PASSES = {"latency, batch 1": 1, "throughput, batch 8": 8}


def photos(n: int, size: int) -> list[np.ndarray]:
    """`n` synthetic size×size faces (uint8 HWC), the same on every run."""
    faces = SyntheticFaces(n, size, seed=2026)
    return [faces.load_pair(i)[0] for i in range(n)]


def variant_of(parser: FaceParser) -> str:
    """The VARIANTS name of what a parser runs."""
    if parser.engine == "onnxruntime":
        return "onnxruntime"
    if parser.compile_seconds is not None:
        return "compile"
    if parser.channels_last:
        return "channels-last"
    return "bf16" if parser.dtype == "bfloat16" else "eager fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: models/reference.safetensors")
    parser.add_argument("--size", type=int, default=512, help="the photos' side (the model resizes them)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--name", default="cpu-inference")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    env = environment(torch.device("cpu"))
    images = photos(8, args.size)
    parsers = {}
    rows = []
    for name in names:
        started = time.perf_counter()
        parsers[name] = FaceParser.from_pretrained(args.checkpoint, device="cpu", batch_size=8, **VARIANTS[name])
        setup_s = time.perf_counter() - started
        print(f"{name}: {parsers[name]} ready in {setup_s:.1f} s", flush=True)
        if parsers[name].compile_seconds is not None:
            rows.append(row("predict", name, "setup", "compile_time", "s", f"{args.size}²",
                            parsers[name].compile_seconds, env))
    auto = FaceParser.from_pretrained(args.checkpoint, device="cpu")
    default = variant_of(auto)
    print(f"the default path here (engine auto): {auto} = {default}", flush=True)
    for pass_, batch in PASSES.items():
        chunk = images[:batch]
        calls = {name: (lambda p=p: p.parse_arrays(chunk, "none")) for name, p in parsers.items()}
        times = measure_interleaved(calls, torch.device("cpu"), warmup=2, reps=args.rounds)
        base = median(times[BASELINE]) if BASELINE in times else None
        for name, ms in times.items():
            extra = dict(timing="interleaved", default=name == default, batch=batch)
            rows.append(row("predict", name, pass_, "time", "ms", f"{args.size}², batch {batch}", ms, env, **extra))
            rows.append(row("predict", name, pass_, "throughput", "images/s", f"{args.size}², batch {batch}",
                            [batch / (t * 1e-3) for t in ms], env, **extra))
            line = f"{pass_:20s} {name:14s} {median(ms):9.1f} ms {STATISTIC} of {len(ms)}"
            if base is not None and name != BASELINE:
                ratio = base / median(ms)
                rows.append(row("predict", name, pass_, f"speedup_vs_{BASELINE.replace(' ', '_')}", "x",
                                f"{args.size}², batch {batch}", ratio, env,
                                computed_as=f"{STATISTIC} {BASELINE} ms / {STATISTIC} {name} ms", **extra))
                line += f"  {ratio:5.2f}x {BASELINE}"
            print(line + ("  (default)" if name == default else ""), flush=True)
    notes = [f"`python -m msf.bench.cpu_inference --size {args.size} --rounds {args.rounds}`: `FaceParser.parse_arrays` on "
             f"{args.size}² uint8 photos (normalise, resize to the model's {auto.input_size}², the model, upsample of "
             "the logits, argmax); each round calls every variant once, the order reversed every other round; each "
             f"time the {STATISTIC} over rounds, each ratio {BASELINE}'s median ÷ the variant's.",
             f"The default path here (`FaceParser.from_pretrained()`, engine auto): {auto} = **{default}**."]
    json_path, md_path = write_results(rows, Path(args.out), args.name, notes)
    plot_path = Path(args.out) / f"{args.name}.png"
    plot_inference(rows, plot_path, f"predict path, {args.size}² photos, {env['device']}, {env['date']}")
    print(f"wrote {json_path}, {md_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
