"""Bytes through GPU memory of the segmentation head + CE/Dice loss, eager against fused (SPEC §6).

    python -m msf.bench.bytes_head_loss [--batch 32] [--size 512] [--bandwidth 3.0e12] [--ops]

All three variants compute the same thing, from the decoder's output features f (B×128×h×w, bf16,
h = H/4) to the loss and back to df: a 1×1 conv 128→19, a ×4 bilinear upsample, CE + Dice
(msf.losses.ce_dice_loss), and the backward of all of it. Shapes default to the paper's: B = 32,
H = W = 512, K = 19, 128 features, bf16 activations (AMP), uint8 targets.

Counting rule: every kernel reads each of its inputs once and writes each of its outputs once
(reuse inside one kernel through caches is free; between kernels it is not); views (permute,
expand) are free. Weights, scalars and per-(b, c) statistics are ignored (< 1 MB). Gathers count
only the elements gathered.

- eager, paper order: `up4(f)` materialises U = B×128×H×W bf16 (2.1 GB), the 1×1 conv writes full-res
  logits Z (bf16), then `ce_dice_loss` *as written*: `Z.float()`, `targets.long()` (twice: CE and
  one-hot), `log_softmax` + `nll_loss` (the CE), `softmax`, an int64 `one_hot`, its fp32 cast, the
  product with the probabilities and three sums; autograd's backward of each of those, the cast
  of dZ back to bf16, the conv's dU and dW, and the adjoint upsample of dU.
- paper order, floor: the paper's order with a perfectly fused loss (only U, Z, dZ, dU ever in
  memory, each written once and read once per consumer): what the paper's order costs at best.
- eager, low-res order (`conv1x1(up4(f)) = up4(conv1x1(f))`, SPEC §6): the conv runs on f at H/4
  (low-res logits z, bf16), `up4(z)` writes full-res logits, then the same loss and backward.
- fused: the same low-res conv (eager), then `msf.kernels.head_loss`: the forward kernel reads z and
  the uint8 targets once and writes per-chunk partial sums (B × n_chunks × 3 × 32 fp32; the
  finalize kernel re-reads them); the backward kernel reads z and the targets once more and writes
  dz. Its own bytes are the floor SPEC §6 quotes (20 MB of logits + 8 MB of targets forward).
  Its gathers re-read each low-res logit ~s² times (forward) and ~4s² times (backward) on chip:
  L1/L2 hits, not DRAM traffic, so not counted (an honest caveat: if they missed, the fused
  kernel would be latency-bound, not bandwidth-bound).

"µs" is bytes / bandwidth (3.0 TB/s, an H100's device copy rate): the time floor if the pass were
purely bandwidth-bound.
"""
from __future__ import annotations

import argparse

MB = 1e6


def ops(variant: str, B: int = 32, H: int = 512, W: int = 512, K: int = 19, C: int = 128, s: int = 4,
        act: int = 2, tgt: int = 1, n_chunks: int = 32, k_pad: int = 32):
    """[(pass, op, bytes read, bytes written)] for one head + loss step of `variant`."""
    h, w = H // s, W // s
    P = B * H * W                 # full-res pixels
    f_lo = B * C * h * w * act    # decoder features, low res
    u_hi = B * C * H * W * act    # upsampled features (paper order only)
    z_lo = B * K * h * w * act    # low-res logits
    z_hi = B * K * H * W * act    # full-res logits in the activation dtype
    f32 = B * K * H * W * 4       # a full-res K-channel fp32 tensor
    i64 = B * K * H * W * 8       # the int64 one-hot
    t = P * tgt                   # targets as stored
    t64 = P * 8                   # targets.long()
    rows: list[tuple[str, str, int, int]] = []

    def op(pass_: str, name: str, read: int, written: int) -> None:
        rows.append((pass_, name, read, written))

    def loss_as_written() -> None:
        """msf.losses.ce_dice_loss on bf16 full-res logits, forward and autograd backward."""
        op("fwd", "Z.float()", z_hi, f32)
        op("fwd", "targets.long() for CE", t, t64)
        op("fwd", "log_softmax (CE)", f32, f32)
        op("fwd", "nll_loss: gather logP[target] + mean", P * 4 + t64, 0)
        op("fwd", "softmax (Dice)", f32, f32)
        op("fwd", "targets.long() for one_hot", t, t64)
        op("fwd", "one_hot (int64)", t64, i64)
        op("fwd", "one_hot .to(fp32)", i64, f32)
        op("fwd", "probs * onehot", 2 * f32, f32)
        op("fwd", "3 sums over pixels", 3 * f32, 0)
        op("bwd", "d(Σ p·y)/dp = grad ⊗ onehot", f32, f32)
        op("bwd", "+ d(Σ p)/dp (expanded grad) accumulate", f32, f32)
        op("bwd", "softmax backward", 2 * f32, f32)
        op("bwd", "nll_loss backward (dense dlogP)", t64, f32)
        op("bwd", "log_softmax backward", 2 * f32, f32)
        op("bwd", "sum the two dZ", 2 * f32, f32)
        op("bwd", "dZ .to(bf16) (backward of .float())", f32, z_hi)

    def conv_low_res() -> None:
        op("fwd", "conv1x1 128→19 at H/4 (eager)", f_lo, z_lo)
        op("bwd", "conv1x1 backward: df_lo = Wᵀ dz", z_lo, f_lo)
        op("bwd", "conv1x1 backward: dW = dz fᵀ", z_lo + f_lo, 0)

    if variant == "paper-floor":
        op("fwd", "up4(f): 128-ch upsample", f_lo, u_hi)
        op("fwd", "conv1x1 128→19 at H×W", u_hi, z_hi)
        op("fwd", "loss, ideally fused: read Z and targets once", z_hi + t, 0)
        op("bwd", "loss backward, ideally fused: Z, targets → dZ (bf16)", z_hi + t, z_hi)
        op("bwd", "conv1x1 backward: dU = Wᵀ dZ", z_hi, u_hi)
        op("bwd", "conv1x1 backward: dW = dZ Uᵀ", z_hi + u_hi, 0)
        op("bwd", "up4 backward (adjoint) of dU", u_hi, f_lo)
    elif variant == "eager-paper":
        op("fwd", "up4(f): 128-ch upsample", f_lo, u_hi)
        op("fwd", "conv1x1 128→19 at H×W", u_hi, z_hi)
        loss_as_written()
        op("bwd", "conv1x1 backward: dU = Wᵀ dZ", z_hi, u_hi)
        op("bwd", "conv1x1 backward: dW = dZ Uᵀ", z_hi + u_hi, 0)
        op("bwd", "up4 backward (adjoint) of dU", u_hi, f_lo)
    elif variant == "eager-lowres":
        conv_low_res()
        op("fwd", "up4(z): 19-ch upsample", z_lo, z_hi)
        loss_as_written()
        op("bwd", "up4 backward (adjoint) of dZ", z_hi, z_lo)
    elif variant == "fused":
        conv_low_res()
        part = B * n_chunks * 3 * k_pad * 4
        op("fwd", "head_loss forward kernel: z, targets → partials", z_lo + t, part)
        op("fwd", "head_loss finalize kernel: partials → loss, coef", part, 0)
        op("bwd", "head_loss backward kernel: z, targets → dz", z_lo + t, z_lo)
    else:
        raise ValueError(variant)
    return rows


VARIANTS = ("eager-paper", "paper-floor", "eager-lowres", "fused")


def totals(rows) -> dict[str, int]:
    out = {"fwd": 0, "bwd": 0}
    for pass_, _, r, wr in rows:
        out[pass_] += r + wr
    out["total"] = out["fwd"] + out["bwd"]
    return out


def table(batch: int = 32, size: int = 512, bandwidth: float = 3.0e12, show_ops: bool = False) -> str:
    kw = dict(B=batch, H=size, W=size)
    lines = [f"Head + CE/Dice loss, B={batch}, {size}×{size}, K=19, 128 features, bf16, uint8 targets; "
             f"floor at {bandwidth / 1e12:.1f} TB/s",
             f"{'variant':14} {'fwd MB':>10} {'bwd MB':>10} {'total MB':>10} {'fwd µs':>9} {'bwd µs':>9} "
             f"{'total µs':>9} {'× fused':>8}"]
    fused_total = totals(ops("fused", **kw))["total"]
    for v in VARIANTS:
        rows = ops(v, **kw)
        t = totals(rows)
        lines.append(f"{v:14} {t['fwd'] / MB:10.1f} {t['bwd'] / MB:10.1f} {t['total'] / MB:10.1f} "
                     f"{t['fwd'] / bandwidth * 1e6:9.1f} {t['bwd'] / bandwidth * 1e6:9.1f} "
                     f"{t['total'] / bandwidth * 1e6:9.1f} {t['total'] / fused_total:8.1f}")
        if show_ops:
            for pass_, name, r, wr in rows:
                lines.append(f"    {pass_} {name:48} read {r / MB:9.1f} MB  write {wr / MB:9.1f} MB")
    kernel = [r for r in ops("fused", **kw) if r[1].startswith("head_loss")]
    kf = sum(r + wr for p, _, r, wr in kernel if p == "fwd")
    kb = sum(r + wr for p, _, r, wr in kernel if p == "bwd")
    lines.append(f"{'fused kernels':14} {kf / MB:10.1f} {kb / MB:10.1f} {(kf + kb) / MB:10.1f} "
                 f"{kf / bandwidth * 1e6:9.1f} {kb / bandwidth * 1e6:9.1f} {(kf + kb) / bandwidth * 1e6:9.1f}"
                 "   (head_loss alone, without the low-res conv)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m msf.bench.bytes_head_loss", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=512, help="H = W of the image and targets")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s for the time floor")
    p.add_argument("--ops", action="store_true", help="list every counted op")
    a = p.parse_args(argv)
    print(table(a.batch, a.size, a.bandwidth, a.ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
