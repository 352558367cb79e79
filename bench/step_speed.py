"""Forward+backward (model.loss + backward) images/s of MicroSegFormer on this machine.

    python -m msf.bench.step_speed --sizes 256 512 --batch 4 [--backend eager] [--threads N] [--repeats 3]

Prints one long-format JSON row per size (op, provider, pass, metric, unit, size, p20/p50/p80, device,
versions, date). On a CPU this is a reference figure for CPU training, not a GPU claim.
"""
from __future__ import annotations

import argparse
import json

import torch

from msf.bench.harness import environment, measure_ms, row
from msf.model import MicroSegFormer


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
    env = environment(device)
    rows = []
    for size in args.sizes:
        images = torch.randn(args.batch, 3, size, size, device=device)
        masks = torch.randint(0, 19, (args.batch, size, size), device=device)

        def step():
            model.zero_grad(set_to_none=True)
            model.loss(images, masks).backward()

        ms = measure_ms(step, device, warmup=1, reps=args.repeats)
        rows.append(row("model.loss+backward", args.backend, "fwd+bwd", "throughput", "images/s",
                        f"B={args.batch},{size}x{size}", [args.batch / (t * 1e-3) for t in ms], env))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
