"""Write the pinned-configuration table `kernels/configs.json` (see kernels/configs.py).

    python -m msf.profiling.tune --from-lists [--out PATH]
        the table from the kernels' allow-lists: for every kernel and shape class, the class's first
        allowed configuration that builds clean there (`PinnedKernel.first_allowed`) for "sm_90" and
        "sm_80", and for "default" the first clean on both (any other GPU falls back to it); the
        interpreter's configuration (each kernel's list head) under shape class "*". Entries already
        in the table (the cost model's picks, `python -m msf.profiling.cost --pin`; defaults chosen
        by hand, some smaller tiles than their list heads: the safer guess for an unknown GPU) are
        kept unless --reset: run on the committed table it writes that table again
        (tests/test_pinned_configs.py).
    python -m msf.profiling.tune [--batch 32 --size 512] [--out PATH]        (on a GPU)
        autotune: runs one bf16-autocast training step of the model with the triton backend with
        MSF_AUTOTUNE=1 (each kernel benchmarks its class's allowed configurations) and writes what
        was picked, for this GPU's kind, into the table (other entries kept).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _kernels():
    from msf import kernels  # noqa: F401  (imports every kernel module, registering its PinnedKernels)
    from msf.kernels import configs
    return configs


def table_from_lists(old: dict | None = None, reset: bool = False) -> dict:
    configs = _kernels()
    table: dict = {}
    for name, pk in sorted(configs.REGISTRY.items()):
        per_class = table.setdefault(name, {})
        for cls in pk.classes:
            kept = {} if reset or old is None else old.get(name, {}).get(cls, {})
            per_class[cls] = {kind: kept.get(kind, configs.to_entry(pk.first_allowed(cls, arch)))
                              for kind, arch in (("sm_90", 90), ("sm_80", 80), (configs.DEFAULT_KIND, None))}
        per_class[configs.ANY_CLASS] = {"interpreter": configs.to_entry(pk.configs[0])}
    return table


def merge(table: dict, picks: dict) -> dict:
    """`table` with {(kernel, class, kind): triton.Config} entries set."""
    configs = _kernels()
    for (name, cls, kind), cfg in picks.items():
        table.setdefault(name, {}).setdefault(cls, {})[kind] = configs.to_entry(cfg)
    return table


def write(table: dict, path: Path) -> None:
    """One line per (kernel, class, kind) entry, sorted, so a re-pin shows as a one-line diff."""
    lines = []
    for name in sorted(table):
        classes = []
        for cls in sorted(table[name]):
            kinds = [f'   {json.dumps(kind)}: {json.dumps(entry, sort_keys=True)}'
                     for kind, entry in sorted(table[name][cls].items())]
            classes.append(f'  {json.dumps(cls)}: {{\n' + ",\n".join(kinds) + "\n  }")
        lines.append(f' {json.dumps(name)}: {{\n' + ",\n".join(classes) + "\n }")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def autotune_step(batch: int, size: int) -> dict:
    """One training step with MSF_AUTOTUNE=1; returns msf.kernels.configs.TUNED."""
    import torch
    from msf.model import MicroSegFormer
    configs = _kernels()
    if not configs.AUTOTUNE:
        raise RuntimeError("MSF_AUTOTUNE=1 must be set before kernels is imported (main() sets it)")
    model = MicroSegFormer(backend="triton").cuda()
    # (in bf16, as `DeviceBatches` hands training batches under autocast)
    images = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
    masks = torch.randint(0, model.config.num_classes, (batch, size, size), device="cuda", dtype=torch.uint8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(images, masks)
    loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.predict(images)  # the upsample-argmax kernel (inference)
    torch.cuda.synchronize()
    return dict(configs.TUNED)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msf.profiling.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--from-lists", action="store_true", help="build the table from the allow-lists (no GPU)")
    parser.add_argument("--reset", action="store_true", help="with --from-lists: drop existing sm_90 / sm_80 picks")
    parser.add_argument("--out", type=Path, default=None, help="table to write (default kernels/configs.json)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    if not args.from_lists:
        os.environ["MSF_AUTOTUNE"] = "1"
        os.environ.pop("TRITON_INTERPRET", None)
    configs = _kernels()
    out = args.out or configs.TABLE_PATH
    old = json.loads(out.read_text()) if out.is_file() else None
    if args.from_lists:
        table = table_from_lists(old, args.reset)
    else:
        import torch
        if not torch.cuda.is_available():
            print("python -m msf.profiling.tune: autotuning needs a CUDA GPU (use --from-lists here)", file=sys.stderr)
            return 2
        table = merge(old or table_from_lists(), autotune_step(args.batch, args.size))
    write(table, out)
    print(f"wrote {out} ({sum(len(v) for v in table.values())} kernel × class rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
