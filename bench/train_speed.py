"""Training throughput (images/s) of the real training step fed by each input pipeline.

    python -m msf.bench.train_speed [--data DIR] [--backends eager triton] [--pipelines loader device]
                                [--size 512] [--batch 32] [--steps 30] [--warmup 5] [--inputs-only] [--out DIR]
                                [--amp auto off ...] [--channels-last auto on off] [--head-order auto paper h4]
                                [--threads 1 2] [--num-workers 0 1]

For every backend × pipeline: the run's own batches (`msf.train.inputs.build_inputs`: the per-sample
DataLoader, or the uint8 cache on the device augmented there) feed the run's own step
(`msf.train.loop.train_step`: AMP forward+loss, backward, clip, AdamW, schedule); after `--warmup`
steps, `--steps` steps are timed in chunks of 5 (a device sync closes each chunk). A second row per
pipeline times the batches alone (no model), which is the rate that pipeline can feed at most.

The recipe options that set the CPU's speed (autocast dtype, memory format, classifier before or
after the upsample, compute threads, loader processes) take several values each and are swept as a
product, so one command compares the CPU defaults with fp32 in the paper's order; each row names its
settings. Rows are long-format (`msf.bench.harness.row`); `--out` writes train-speed.json and .md.
Without CUDA the default is a smoke run at a reduced size (eager only): no timing claim.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import torch

from msf.bench.harness import environment, row, write_results
from msf.train.config import TrainConfig
from msf.train.inputs import build_inputs, default_workers
from msf.train.loop import LossObjective, make_model, make_optimisation, train_step

CHUNK = 5
ON_OFF = {"auto": None, "on": True, "off": False}
HEAD_ORDERS = {"auto": None, "paper": True, "h4": False}


def batches_forever(pipeline):
    for epoch in itertools.count():
        yield from pipeline.epoch(epoch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chunks(step, device: torch.device, warmup: int, steps: int, batch: int) -> list[float]:
    """images/s of each chunk of CHUNK calls of `step`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(max(steps // CHUNK, 1)):
        sync(device)
        started = time.perf_counter()
        for _ in range(CHUNK):
            step()
        sync(device)
        rates.append(CHUNK * batch / (time.perf_counter() - started))
    return rates


def measure(cfg: TrainConfig, device: torch.device, warmup: int, steps: int, env: dict, time_inputs: bool = True,
            train: bool = True) -> list[dict]:
    """Rows for the pipeline alone (`time_inputs`) and for the training step it feeds (`train`)."""
    inputs = build_inputs(cfg, device)
    size = f"B={cfg.batch_size},{cfg.image_size}x{cfg.image_size}"
    feed = batches_forever(inputs.train)
    rows = []
    if time_inputs:
        rows.append(row("input pipeline", inputs.pipeline, "batches only", "throughput", "images/s", size,
                        time_chunks(lambda: next(feed), device, warmup, steps, cfg.batch_size), env))
    if not train:
        return rows

    torch.manual_seed(cfg.seed)
    model = make_model(cfg, device)
    objective = LossObjective(model).train()
    optimizer, scheduler, scaler = make_optimisation(model, cfg, device, inputs.steps_per_epoch)

    def step():
        images, masks = next(feed)
        train_step(objective, optimizer, scheduler, scaler, images, masks, cfg, device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = time_chunks(step, device, warmup, steps, cfg.batch_size)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    settings = (f"amp {cfg.amp}, {'channels-last' if cfg.channels_last else 'contiguous'}, "
                f"{'paper order' if cfg.paper_head_order else 'classifier at H/4'}, "
                f"{torch.get_num_threads()} threads, "
                + (f"{workers} loader workers" if inputs.pipeline == "loader" else "in-process batches"))
    rows.append(row("train step", f"{cfg.backend}/{inputs.pipeline}", "fwd+bwd+opt", "throughput", "images/s", size,
                    rates, env, amp=cfg.amp, channels_last=cfg.channels_last, paper_head_order=cfg.paper_head_order,
                    threads=torch.get_num_threads(), num_workers=workers, settings=settings, peak_mib=peak))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="data folder (default: the synthetic faces)")
    parser.add_argument("--backends", nargs="+", default=["triton", "eager"] if on_gpu else ["eager"],
                        choices=["eager", "triton"])
    parser.add_argument("--pipelines", nargs="+", default=["device", "loader"], choices=["loader", "device"])
    parser.add_argument("--size", type=int, default=512 if on_gpu else 64)
    parser.add_argument("--batch", type=int, default=32 if on_gpu else 4)
    parser.add_argument("--steps", type=int, default=30 if on_gpu else 5)
    parser.add_argument("--warmup", type=int, default=5 if on_gpu else 1)
    parser.add_argument("--amp", nargs="+", default=["auto"], choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--channels-last", nargs="+", default=["auto"], choices=list(ON_OFF))
    parser.add_argument("--head-order", nargs="+", default=["auto"], choices=list(HEAD_ORDERS))
    parser.add_argument("--threads", nargs="+", type=int, default=[None], help="torch compute threads")
    parser.add_argument("--num-workers", nargs="+", type=int, default=[None], help="loader processes")
    parser.add_argument("--cache-dir", default=None, help="uint8 cache folder (default: a temporary one)")
    parser.add_argument("--inputs-only", action="store_true", help="time the pipelines alone, no training step")
    parser.add_argument("--out", default=None, help="write train-speed.json and .md here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if on_gpu else "cpu")
    env = environment(device)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        base = TrainConfig(data=args.data, image_size=args.size, batch_size=args.batch,
                           cache_dir=args.cache_dir or scratch, progress=False,
                           synthetic_train_images=max(4 * args.batch, 64), out=scratch).resolve()
        failed = []
        threads_before = torch.get_num_threads()
        for backend, pipeline, amp, layout, order, threads, workers in itertools.product(
                args.backends, args.pipelines, args.amp, args.channels_last, args.head_order, args.threads,
                args.num_workers):
            torch.set_num_threads(threads or threads_before)
            cfg = dataclasses.replace(base, backend=backend, pipeline=pipeline, amp=amp, channels_last=ON_OFF[layout],
                                      paper_head_order=HEAD_ORDERS[order], num_workers=workers).for_device(device)
            timed_inputs = any(r["op"] == "input pipeline" and r["provider"] == pipeline for r in rows)
            try:
                measured = measure(cfg, device, args.warmup, args.steps, env, time_inputs=not timed_inputs,
                                   train=not args.inputs_only)
            except Exception as exc:  # one provider failing must not lose the others' rows
                failed.append(f"{backend}/{pipeline}")
                print(f"{backend}/{pipeline} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            for r in measured:  # (a pipeline's batches-only rate does not depend on the backend: timed once)
                rows.append(r)
                print(f"{r['op']:>15s} {r['provider']:>16s} {r['size']}: {r['p50']:8.1f} images/s "
                      f"(p20 {r['p20']:.1f}, p80 {r['p80']:.1f})" + (f"  [{r['settings']}]" if "settings" in r else ""),
                      flush=True)
            if args.out and rows:  # after every provider, so a timeout keeps what was measured
                write_results(rows, Path(args.out), "train-speed")
    torch.set_num_threads(threads_before)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    main()
