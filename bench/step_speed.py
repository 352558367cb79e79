"""Forward+backward (model.loss + backward) images/s of MicroSegFormer on this machine.

    python -m bench.step_speed --sizes 256 512 --batch 4 [--backend eager] [--threads N] [--repeats 3]

Prints one long-format JSON row per size (op, provider, pass, metric, unit, size, p20/p50/p80, device,
versions, date). On a CPU this is a reference figure for CPU training, not a GPU claim.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from msf.model import MicroSegFormer


def time_step(model: MicroSegFormer, images: torch.Tensor, masks: torch.Tensor, repeats: int) -> list[float]:
    model.zero_grad(set_to_none=True)
    model.loss(images, masks).backward()  # warm-up
    seconds = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        if images.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.loss(images, masks).backward()
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="eager", choices=["eager", "triton"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MicroSegFormer(backend=args.backend).to(device)
    rows = []
    for size in args.sizes:
        images = torch.randn(args.batch, 3, size, size, device=device)
        masks = torch.randint(0, 19, (args.batch, size, size), device=device)
        seconds = time_step(model, images, masks, args.repeats)
        images_per_s = [args.batch / s for s in seconds]
        row = {"op": "model.loss+backward", "provider": args.backend, "pass": "fwd+bwd", "metric": "throughput",
               "unit": "images/s", "size": f"B={args.batch},{size}x{size}",
               "p20": quantile(images_per_s, 0.2), "p50": quantile(images_per_s, 0.5),
               "p80": quantile(images_per_s, 0.8),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
               "versions": {"torch": torch.__version__, "python": platform.python_version()},
               "date": datetime.date.today().isoformat()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
