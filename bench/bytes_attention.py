"""Bytes through GPU memory of the attention core `softmax(q kᵀ/√d) v`, eager against fused.

    python -m msf.bench.bytes_attention [--batch 32] [--dtype-bytes 2] [--bandwidth 3.0e12] [--sms 132] [--ops]

Shapes are the model's at 512×512 (SPEC §2): N = 16384 / 4096 / 1024 / 256 queries, M = 256 keys
and values, d = 32 / 64 / 128 / 192, one head. Every op is counted as reading its inputs once and
writing its outputs once (L2 reuse inside one kernel is free, between kernels it is not). Elements
are `--dtype-bytes` wide (bf16: 2); logsumexp / D rows and the dK/dV partials are fp32.

Variants:
- eager: `msf.backend.eager_attention` on bf16 tensors, op by op: `q @ kᵀ`, `* scale`, `softmax`,
  `@ v` (each a kernel reading and writing B×N×M score-sized tensors), and autograd's backward of
  those four ops.
- eager+autocast: the same under `torch.autocast(bf16)`, where softmax runs in fp32: a cast
  kernel to fp32 before it, fp32 probabilities, a cast back to bf16 before `@ v`; the backward
  keeps the fp32 probabilities and gradients on the softmax.
- sdpa: `F.scaled_dot_product_attention` when it picks a fused (flash / cuDNN / memory-efficient)
  kernel: inputs and outputs plus a fp32 logsumexp, counted at that floor (its internal scratch,
  e.g. FlashAttention-2's fp32 dQ accumulator, is not counted, so this row flatters it).
- fused: `msf.kernels.attention` (this project): forward reads q, k, v and writes O and lse; backward
  runs the dQ kernel (reads q, dO, O, lse, k, v; writes dQ and D = rowsum(dO∘O)), the dK/dV kernel
  (reads q, dO, lse, D, k, v per chunk; writes fp32 partials B×C×M×d, or dK, dV directly when
  C = 1) and the kernel summing the C partials into dK, dV.
The "µs" columns are bytes / bandwidth (3.0 TB/s: an H100's device copy rate, SPEC §6).
"""
from __future__ import annotations

import argparse

STAGES = [(1, 16384, 256, 32), (2, 4096, 256, 64), (3, 1024, 256, 128), (4, 256, 256, 192)]


def _chunks(batch: int, n: int, m: int, d: int, sms: int) -> int:
    """Query chunks of the fused dK/dV kernel (msf.kernels.attention's rule with the sm_90 pinned tile)."""
    from msf.kernels.attention import _dkdv_chunks
    return _dkdv_chunks(batch, n, m, d, sms)


def ops(variant: str, batch: int, n: int, m: int, d: int, e: int = 2, sms: int = 132):
    """[(pass, op, bytes read, bytes written)] for one attention call."""
    tq = batch * n * d * e  # q, O, dO, dQ
    tkv = batch * m * d * e  # k, v, dK, dV (each)
    s = batch * n * m * e  # a score-sized tensor in the input dtype
    s32 = batch * n * m * 4  # the same in fp32
    row = batch * n * 4  # a fp32 per-row vector (lse, D)
    if variant == "eager":
        return [
            ("fwd", "S = q @ kᵀ", tq + tkv, s),
            ("fwd", "S * scale", s, s),
            ("fwd", "P = softmax(S)", s, s),
            ("fwd", "O = P @ v", s + tkv, tq),
            ("bwd", "dP = dO @ vᵀ", tq + tkv, s),
            ("bwd", "dV = Pᵀ @ dO", s + tq, tkv),
            ("bwd", "dS = softmax_bwd(P, dP)", 2 * s, s),
            ("bwd", "dS * scale", s, s),
            ("bwd", "dQ = dS @ k", s + tkv, tq),
            ("bwd", "dK = dSᵀ @ q", s + tq, tkv),
        ]
    if variant == "eager+autocast":
        return [
            ("fwd", "S = q @ kᵀ", tq + tkv, s),
            ("fwd", "S * scale", s, s),
            ("fwd", "S.float()", s, s32),
            ("fwd", "P = softmax(S) (fp32)", s32, s32),
            ("fwd", "P.to(bf16)", s32, s),
            ("fwd", "O = P @ v", s + tkv, tq),
            ("bwd", "dP = dO @ vᵀ", tq + tkv, s),
            ("bwd", "dV = Pᵀ @ dO", s + tq, tkv),
            ("bwd", "dP.float()", s, s32),
            ("bwd", "dS = softmax_bwd(P, dP) (fp32)", 2 * s32, s32),
            ("bwd", "dS.to(bf16)", s32, s),
            ("bwd", "dS * scale", s, s),
            ("bwd", "dQ = dS @ k", s + tkv, tq),
            ("bwd", "dK = dSᵀ @ q", s + tq, tkv),
        ]
    if variant == "sdpa":
        return [
            ("fwd", "flash fwd", tq + 2 * tkv, tq + row),
            ("bwd", "flash bwd", 3 * tq + 2 * tkv + row, tq + 2 * tkv),
        ]
    if variant == "fused":
        c = _chunks(batch, n, m, d, sms)
        part = batch * c * m * d * 4 if c > 1 else tkv  # one partial buffer (dK or dV)
        rows = [
            ("fwd", "attn fwd kernel", tq + 2 * tkv, tq + row),
            ("bwd", "dQ kernel (+ D = rowsum(dO∘O))", 3 * tq + 2 * tkv + row, tq + row),
            ("bwd", f"dK/dV kernel ({c} query chunk{'s' if c > 1 else ''})", 2 * tq + 2 * tkv + 2 * row, 2 * part),
        ]
        if c > 1:
            rows.append(("bwd", "chunk-sum kernel (fp32 → dtype)", 2 * part, 2 * tkv))
        return rows
    raise ValueError(variant)


VARIANTS = ("eager", "eager+autocast", "sdpa", "fused")


def totals(variant: str, batch: int, n: int, m: int, d: int, e: int = 2, sms: int = 132) -> tuple[int, int]:
    fwd = sum(r + w for p, _, r, w in ops(variant, batch, n, m, d, e, sms) if p == "fwd")
    bwd = sum(r + w for p, _, r, w in ops(variant, batch, n, m, d, e, sms) if p == "bwd")
    return fwd, bwd


def table(batch: int = 32, e: int = 2, bandwidth: float = 3.0e12, sms: int = 132) -> str:
    head = (f"{'stage':>5} {'N':>6} {'M':>4} {'d':>4} | "
            + " | ".join(f"{v:^26}" for v in VARIANTS))
    sub = f"{'':>5} {'':>6} {'':>4} {'':>4} | " + " | ".join(
        f"{'fwd MB':>7} {'bwd MB':>7} {'f+b µs':>8}" + " " * 1 for _ in VARIANTS)
    lines = [head, sub, "-" * len(sub)]
    for stage, n, m, d in STAGES:
        cells = []
        for v in VARIANTS:
            f, b = totals(v, batch, n, m, d, e, sms)
            cells.append(f"{f / 1e6:7.1f} {b / 1e6:7.1f} {(f + b) / bandwidth * 1e6:8.1f} ")
        lines.append(f"{stage:>5} {n:>6} {m:>4} {d:>4} | " + " | ".join(cells))
    score = batch * STAGES[0][1] * STAGES[0][2] * e
    lines.append("")
    lines.append(f"B={batch}, {e}-byte elements, {bandwidth / 1e12:.1f} TB/s; one B×N×M score tensor at stage 1 = "
                 f"{score / 1e6:.1f} MB. fused dK/dV query chunks at {sms} SMs: "
                 + ", ".join(f"stage {s}: {_chunks(batch, n, m, d, sms)}" for s, n, m, d in STAGES))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m msf.bench.bytes_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype-bytes", type=int, default=2)
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes per second (H100: 3.0e12)")
    parser.add_argument("--sms", type=int, default=132, help="SM count for the fused dK/dV chunking (H100: 132)")
    parser.add_argument("--ops", action="store_true", help="also list every op's bytes")
    args = parser.parse_args(argv)
    print(table(args.batch, args.dtype_bytes, args.bandwidth, args.sms))
    if args.ops:
        for stage, n, m, d in STAGES:
            print(f"\nstage {stage} (N={n}, M={m}, d={d})")
            for v in VARIANTS:
                for p, name, r, w in ops(v, args.batch, n, m, d, args.dtype_bytes, args.sms):
                    print(f"  {v:15} {p} {name:36} read {r / 1e6:9.2f} MB  write {w / 1e6:9.2f} MB")


if __name__ == "__main__":
    main()
