"""A few MicroSegFormer training steps with NVTX ranges: the workload every profiler here wraps.

    python -m msf.profiling.step [--backend triton] [--batch 32] [--size 512] [--steps 5] [--warmup 2] [--amp bf16]

Warm-up steps run first; the measured steps are bracketed by cudaProfilerStart/Stop, so
`nsys --capture-range=cudaProfilerApi` and `ncu --profile-from-start off` see only them.
NVTX ranges: step, data, forward+loss, encoder/stage1..4, decoder, decoder/lmsa, loss (or
triton/head_loss), eager|triton/<op> for every backend op, backward, optimizer.
"""
from __future__ import annotations

import argparse
import sys

import torch

from msf.backend import require_runnable
from msf.model import MicroSegFormer
from msf.nvtx import nvtx_range
from msf.train.evaluate import amp_dtype, autocast_for


def build_step(backend: str, batch: int, size: int, amp: str, device: torch.device, compiled: bool = False,
               paper_head_order: bool = True):
    """A closure running one training step (forward+loss, backward, clip, AdamW) on fixed random data;
    `compiled` puts the forward+loss under torch.compile (one graph: fullgraph=True, on either
    backend); `paper_head_order=False` classifies at H/4 on the eager backend too (the CPU default)."""
    torch.manual_seed(0)
    model = MicroSegFormer(backend=backend, paper_head_order=paper_head_order).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=8e-4, weight_decay=1e-4)
    loss_fn = torch.compile(model.loss, fullgraph=True) if compiled else model.loss
    # in autocast's dtype when it is on, as the device pipeline hands training batches (`DeviceBatches`)
    images = torch.randn(batch, 3, size, size, device=device).to(amp_dtype(device, amp) or torch.float32)
    masks = torch.randint(0, 19, (batch, size, size), device=device, dtype=torch.uint8)

    def step():
        with nvtx_range("step"):
            with nvtx_range("data"):
                x, y = images.clone(), masks.clone()  # stands in for the loader's host-to-device copy
            with nvtx_range("forward+loss"), autocast_for(device, amp):
                loss = loss_fn(x, y)
            with nvtx_range("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with nvtx_range("optimizer"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
        return loss
    return step


def warmed_step(args: argparse.Namespace, prog: str):
    """(device, step) for a profiler's parsed `add_arguments` options, the warm-up steps already run;
    None after printing the one error line a profiler exits 2 on when the backend cannot run on this
    machine (the triton backend on a CPU without TRITON_INTERPRET=1), as train, eval and predict do."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        require_runnable(args.backend, device)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None
    step = build_step(args.backend, args.batch, args.size, args.amp, device)
    for _ in range(args.warmup):
        step()
    return device, step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--backend", default="triton" if on_gpu else "eager", choices=["eager", "triton"])
    parser.add_argument("--batch", type=int, default=32 if on_gpu else 2)
    parser.add_argument("--size", type=int, default=512 if on_gpu else 64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    prepared = warmed_step(args, "msf.profiling.step")
    if prepared is None:
        return 2
    device, step = prepared
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"{args.steps} steps of {args.backend} at B={args.batch}, {args.size}²: last loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
