"""Bytes through GPU memory of the decoder's multi-scale LMSA (SPEC §2, §6), eager against fused.

    python -m msf.bench.bytes_lmsa [--batch 32] [--channels 128] [--size 128] [--dtype-bytes 2]
                               [--bandwidth 3.0e12] [--sms 132] [--ops] [--classes 0]

Shape: the decoder map of a 512×512 image, x = B×C×h×w = 32×128×128×128 in bf16 (AMP), so one
activation-sized tensor T is 134.2 MB. Counting rule (as in the other bench/bytes_* scripts): every
kernel reads each of its inputs once and writes each of its outputs once; reuse inside one kernel
through caches is free, between kernels it is not; views (chunk, narrow, expand) are free; weights
and per-(b, c) vectors under ~1 MB are left out unless listed.

- eager: `msf.backend.eager_lmsa` as written, op by op, and autograd's backward of it:
  3 × (depthwise conv writing DW_k(x), 1×1 conv writing f_k), `torch.cat` (3T copy), the GAP
  `mean` (reads 3T), `stacked * z` (3T), Python's `sum` of the three chunks (`0 + a`, `+ b`, `+ c`)
  and the residual add. Backward: the cat of the three chunk gradients (SplitBackward), the two
  gradients of the gating product (dstacked = dO·z, and dz = Σ dO·stacked as a full-size product then
  a reduction), the mean's expanded gradient, their accumulation, each 1×1 conv's input / weight /
  bias gradients, each depthwise conv's input / weight gradients, and the accumulation of the four
  contributions to dx. Layout copies (e.g. `.contiguous()` of the narrowed gradients inside conv
  backward) and convolution workspaces are not counted: the eager rows are a lower bound.
- fused: `msf.kernels.lmsa`. Forward: the statistics kernel (reads x, writes per-chunk 49-cell sums and
  x̂, x as fp32 with a zero 3-pixel border), their sum, the tiny gate graph (writes the per-sample
  gated weights W̃, B×3×C×C), the main kernel (reads x̂, x and W̃, writes out, D, the three
  depthwise outputs in x's dtype, 3T, saved for the backward instead of x̂, and XW, x in the wgrad
  kernel's word order, T). Backward: one gram kernel for the three scales (reads D, dO, W̃; writes
  fp32 partials of ∂L/∂W̃ and E_k = W̃_kᵀ dO with a zero border, in bf16 channel pairs for bf16
  inputs), one wgrad kernel for the three scales (reads XW and the E_k, writes the depthwise-weight
  gradient partials), their sums, the tiny graph's backward (a few B×3×C×C fp32 tensors), the dx
  kernel (reads dO and the three E_k, writes dx). The 3-pixel halos are re-read from L1/L2, not
  DRAM, and are not counted. x̂ in fp32 trades bytes for instructions in the forward's sweep (no
  bf16 unpacking); D trades 3T written and read for a whole depthwise sweep in the backward; XW
  (T written and read) takes the per-pixel addressing and masks out of the wgrad kernel.
- floor: forward reads x twice (statistics, then the main pass: the gates depend on a global
  reduction over the image) and writes out once: 3T. Backward reads x and dO for the gram / gate
  gradients, then dO again and writes dx: 4T.

`--classes K` (the model's K = 19) counts `lmsa_classifier`, the decoder's 1×1 classifier conv
(C → K, bias) on LMSA's output, whose logits L (K/C · T) are what the step uses:
- eager: `msf.reference.eager_lmsa_classifier`, LMSA as above, then the conv (reads out, writes L);
  its backward is one `convolution_backward` (reads dL and out, writes dO = W_cᵀ dL and the
  weight's and bias's gradients).
- fused: the forward forms V_k = W_c W̃_k on the host and the main kernel's GEMM takes it (N = K):
  it writes L, never out. The gram kernel reads dL, V and x instead of dO (and W̃ a 16-channel block
  at a time for ∂W_c), writes per-chunk N_k = dL D_kᵀ and [∂W_c | ∂b_c] partials; the host forms
  M_k = W_cᵀ N_k (B×3×C×C fp32); the dx kernel reads dL for its residual, forming dO = W_cᵀ dL
  itself (dO is never written; since 2026-12-07: before, the main kernel wrote out, the gram kernel
  read it and wrote dO, 1580 + 2481 MB).
- floor: out is never written: forward 2T + L, backward reads x and dL, then dL again, writes dx.

"µs" = bytes / bandwidth (3.0 TB/s, an H100's device copy rate): the time if the pass were purely
bandwidth-bound. The fused kernels are not: their depthwise taps cost 83 FMAs per element plus
loads and (in the backward) per-tap reductions, so on an H100 they are bound by instruction issue,
not by DRAM; see docs/lmsa.md.

Default output (B = 32, C = 128, 128×128, bf16, H100 with 132 SMs):

    pass        eager MB   fused MB   floor MB |  eager µs   fused µs   floor µs
    forward       5100.4     1560.4      402.7 |    1700.1      520.1      134.2
    backward      9663.9     2364.5      536.9 |    3221.3      788.2      179.0
    total        14764.3     3924.9      939.5 |    4921.4     1308.3      313.2
"""
from __future__ import annotations

import argparse

MB = 1e6
KERNEL_SIZES = (3, 5, 7)
N_TAPS = sum(k * k for k in KERNEL_SIZES)  # 83


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _window_width(classes: int) -> tuple[int, int]:
    """(S, width): the classes a pixel of dL's copy and the packed window row's width (same rule as
    msf.kernels.lmsa._window_pack: 7·S as a power of two, or half of one plus a tail ≥ 16 when
    narrower; 19 classes → (20, 144))."""
    stride = _cdiv(classes, 4) * 4
    need = 7 * stride
    lead = max(16, 1 << (need - 1).bit_length())
    half = lead // 2
    if 16 <= half < need:
        tail = max(16, 1 << (need - half - 1).bit_length())
        if half + tail < lead:
            return stride, half + tail
    return stride, lead


def _chunk_pix(hw: int, batch: int, per_chunk_programs: int, sms: int, max_chunks: int) -> int:
    """Pixels per chunk of the stats / gram kernels (same rule as msf.kernels.lmsa._chunk_pix)."""
    want = max(1, min(max_chunks, _cdiv(4 * sms, batch * per_chunk_programs)))
    return _cdiv(_cdiv(hw, want), 256) * 256


def ops(variant: str, B: int = 32, C: int = 128, H: int = 128, W: int = 128, e: int = 2, sms: int = 132,
        classes: int = 0):
    """[(pass, op, bytes read, bytes written)] for one LMSA forward + backward of `variant`; with
    `classes` > 0, of `lmsa_classifier` (LMSA, then the C → `classes` 1×1 classifier conv)."""
    if classes < 0:
        raise ValueError(f"classes must be >= 0 (0: LMSA alone), got {classes}")
    T = B * C * H * W * e  # one activation-sized tensor
    L = T * classes // C  # the classifier's logits (0 without one)
    head = classes > 0
    small = B * 3 * C * 4  # a B×3C fp32 vector (pooled stats, gates): counted where it is the output
    rows: list[tuple[str, str, int, int]] = []

    def op(pass_: str, name: str, read: int, written: int) -> None:
        rows.append((pass_, name, read, written))

    if variant == "eager":
        for k in KERNEL_SIZES:
            op("fwd", f"DW_{k}(x)  depthwise conv", T, T)
            op("fwd", f"f_{k} = PW_{k}(DW_{k})  1×1 conv + bias", T, T)
        op("fwd", "stacked = cat([f_3, f_5, f_7])", 3 * T, 3 * T)
        op("fwd", "s = stacked.mean((2, 3))", 3 * T, small)
        op("fwd", "SE MLP (FC1, ReLU, FC2, sigmoid)", small, small)
        op("fwd", "gated = stacked * z", 3 * T, 3 * T)
        op("fwd", "0 + gated_3   (Python sum)", T, T)
        op("fwd", "+ gated_5", 2 * T, T)
        op("fwd", "+ gated_7", 2 * T, T)
        op("fwd", "out = x + Σ", 2 * T, T)
        op("bwd", "d(gated) = cat of the 3 chunk grads (SplitBackward)", 3 * T, 3 * T)
        op("bwd", "d(stacked) = d(gated) * z", 3 * T, 3 * T)
        op("bwd", "d(gated) * stacked  (for dz)", 6 * T, 3 * T)
        op("bwd", "dz = sum over pixels", 3 * T, small)
        op("bwd", "SE MLP backward", small, small)
        op("bwd", "mean backward: expand(ds) / hw", small, 3 * T)
        op("bwd", "accumulate the two d(stacked)", 6 * T, 3 * T)
        for k in KERNEL_SIZES:
            op("bwd", f"PW_{k} backward: d(DW_{k}) = W_kᵀ df_k", T, T)
            op("bwd", f"PW_{k} backward: dW_{k} (reads df_k, DW_{k}(x))", 2 * T, 0)
            op("bwd", f"PW_{k} backward: db_{k}", T, 0)
            op("bwd", f"DW_{k} backward: dx_{k}", T, T)
            op("bwd", f"DW_{k} backward: dw_{k} (reads d(DW_{k}), x)", 2 * T, 0)
        op("bwd", "dx = dO + dx_3 + dx_5 + dx_7  (3 accumulations)", 6 * T, 3 * T)
        if head:
            op("fwd", "logits = classifier 1×1 conv + bias", T, L)
            op("bwd", "classifier backward (one convolution_backward): dL, out → dO, dW_c, db_c", L + T, T)
        return rows

    if variant == "fused":
        wg = B * 3 * C * C * e  # W̃ in the activation dtype
        wg32 = B * 3 * C * C * 4  # W̃ (or its gradient) in fp32
        stats_chunks = _cdiv(H * W, _chunk_pix(H * W, B, 1, sms, 8))
        gram_chunks = _cdiv(H * W, _chunk_pix(H * W, B, max(1, C // 64), sms, 4))
        strips = H * _cdiv(W, 16)  # the wgrad kernel's 16-pixel strips; 5 row groups × C/16 word blocks
        wgrad_chunks = _cdiv(strips, _chunk_pix(strips, B, 5 * max(1, C // 16), sms, 4))
        sp = B * stats_chunks * 49 * C * 4
        mp = B * gram_chunks * 3 * C * C * 4
        dwp = B * wgrad_chunks * N_TAPS * C * 4
        cells = B * C * 49 * 4
        tp = B * (H + 6) * (W + 6) * C * 4  # x̂: a zero-bordered fp32 copy of x (the plain forward's sweeps)
        border = tp - B * H * W * C * 4  # its border, zeroed by the host
        ep = B * (H + 6) * (W + 6) * C * (2 if e == 2 else 4)  # one bordered E_k: bf16 pairs for bf16
        e_border = ep - B * H * W * C * (2 if e == 2 else 4)
        if not head:
            op("fwd", "stats kernel: x → per-chunk cell sums, bordered fp32 x̂", T, sp + (tp - border))
            op("fwd", "zero x̂'s border", 0, border)
        else:  # the classifier's forward reads x itself
            op("fwd", "stats kernel: x → per-chunk cell sums", T, sp)
        op("fwd", "sum the cell-sum partials", sp, cells)
        op("fwd", "gate graph: W̃ = z ⊙ W in fp32, then cast", wg32, wg32 + wg)
        v = B * 3 * classes * C * e  # V_k = W_c W̃_k (0 without the classifier)
        stride, width = _window_width(max(classes, 1))  # dL's copy: S values a pixel; a packed window row
        a = (B * 7 * C + 1) * width * e  # the classifier's window weights A, packed by window rows (x's dtype)
        if not head:
            op("fwd", "main kernel: x̂ (sweeps), x (residual), W̃ → out, D = DW_k(x) (3T), XW (T)", tp + T + wg,
               T + 3 * T + T)
        else:  # out is never formed: logits = Σ_k V_k D_k + W_c x + W_c β + b_c
            op("fwd", "V = W_c W̃ (host matmul)", wg, v)
            op("fwd", "A = Σ_k w_k V_k + W_c at δ = 0 (host: window product, einsum, packed copy)", v + a,
               a + B * 49 * C * classes * 4)
            slots = 2 * sms * 128 * width * 4  # the persistent programs' Z slots (fp32)
            op("fwd", "forward kernel: x (7 window rows, from L1/L2), A → Z slots → logits (no D, no XW)",
               T + a + slots, L + slots)
        if not head:
            op("bwd", "zero the three E_k borders", 0, 3 * e_border)
        else:
            op("bwd", "zero dL's copy's border", 0, B * ((H + 6) * (W + 6) - H * W) * stride * e)
        if not head:
            op("bwd", "gram kernel (three scales): D, dO, W̃ → ∂W̃ partials, E_3, E_5, E_7", 3 * T + T + wg,
               mp + 3 * (ep - e_border))
            op("bwd", "wgrad kernel (three scales): XW, E_3, E_5, E_7 → ∂w partials", T + 3 * ep, dwp)
            op("bwd", "sum the gram / wgrad partials", mp + dwp, mp // gram_chunks + N_TAPS * C * 4)
        else:  # the correlation G of x and dL gives N_k, ∂w_k's main path and Σ dL xᵀ (docs/lmsa.md)
            dlp = B * (H + 6) * (W + 6) * stride * e  # dL bordered, S values a pixel
            dl_chunks = _cdiv(H * W, _chunk_pix(H * W, B, 1, sms, 16))
            spart = dl_chunks * B * classes * 4  # Σ dL per chunk
            op("bwd", "dL kernel: dL → Σ dL partials, dL's bordered copy", L, spart + B * H * W * stride * e)
            corr_rows = _cdiv(H, max(1, min(4, _cdiv(4 * sms, B * 7 * max(1, C // 64)))))
            corr_chunks = _cdiv(H, corr_rows)
            npart = corr_chunks * 7 * B * 3 * classes * C * 4  # N_k's share of each window row
            dwp = B * corr_chunks * N_TAPS * C * 4
            xpart = corr_chunks * B * classes * C * 4
            gslot = corr_chunks * B * 7 * C * width * 4  # each program's packed G, stored and read back
            op("bwd", "correlation kernel: x, dL's copy (windows from L1/L2), V → N, ∂w, Σ dL xᵀ partials",
               T + dlp + v + gslot, npart + dwp + xpart + gslot)
            op("bwd", "sum the partials", npart + spart + dwp + xpart,
               npart // (corr_chunks * 7) + B * classes * 4 + N_TAPS * C * 4 + classes * C * 4)
            op("bwd", "M = W_cᵀ N, ∂W_c = Σ_k N_k W̃_kᵀ + … (host matmuls)", npart // (corr_chunks * 7) + wg, wg32)
        op("bwd", "gate graph re-run + autograd (B×3×C×C fp32 tensors)", 3 * wg32, 3 * wg32)
        if not head:
            op("bwd", "dx kernel: dO, E_3, E_5, E_7, T → dx", T + 3 * ep + cells, T)
        else:  # 49 products A_δ · dL shifted (DLP from L1/L2), dO = W_cᵀ dL: no E_k
            op("bwd", "dx kernel: dL's copy, A (the forward's), T → dx", dlp + a + cells, T)
        return rows

    if variant == "floor":
        op("fwd", "read x (statistics)", T, 0)
        if not head:
            op("fwd", "read x, write out", T, T)
            op("bwd", "read x, dO (gate and weight gradients)", 2 * T, 0)
            op("bwd", "read dO, write dx", T, T)
        else:
            op("fwd", "read x, write the logits", T, L)
            op("bwd", "read x, dL (gate and weight gradients)", T + L, 0)
            op("bwd", "read dL, write dx", L, T)
        return rows
    raise ValueError(variant)


def totals(rows) -> dict[str, int]:
    out = {"fwd": 0, "bwd": 0}
    for pass_, _, r, w in rows:
        out[pass_] += r + w
    return out


def table(batch=32, channels=128, size=128, e=2, bandwidth=3.0e12, sms=132, show_ops=False, classes=0) -> str:
    variants = ("eager", "fused", "floor")
    tot = {v: totals(ops(v, batch, channels, size, size, e, sms, classes)) for v in variants}
    what = f"LMSA + a {channels} → {classes} classifier" if classes else "LMSA"
    lines = [f"{what} bytes, x = {batch}×{channels}×{size}×{size}, {e}-byte activations "
             f"(one tensor = {batch * channels * size * size * e / MB:.1f} MB), {bandwidth / 1e12:.1f} TB/s",
             f"{'pass':9} {'eager MB':>10} {'fused MB':>10} {'floor MB':>10} | "
             f"{'eager µs':>9} {'fused µs':>10} {'floor µs':>10}"]
    for label, keys in (("forward", ("fwd",)), ("backward", ("bwd",)), ("total", ("fwd", "bwd"))):
        b = {v: sum(tot[v][k] for k in keys) for v in variants}
        lines.append(f"{label:9} {b['eager'] / MB:10.1f} {b['fused'] / MB:10.1f} {b['floor'] / MB:10.1f} | "
                     f"{b['eager'] / bandwidth * 1e6:9.1f} {b['fused'] / bandwidth * 1e6:10.1f} "
                     f"{b['floor'] / bandwidth * 1e6:10.1f}")
    if show_ops:
        for v in variants:
            lines.append(f"\n{v}:")
            for pass_, name, r, w in ops(v, batch, channels, size, size, e, sms, classes):
                lines.append(f"  {pass_}  {name:58} read {r / MB:9.1f} MB  write {w / MB:9.1f} MB")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m msf.bench.bytes_lmsa", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--size", type=int, default=128, help="h = w of the decoder map (image size / 4)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="activation element size (bf16: 2)")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s for the time floor")
    p.add_argument("--sms", type=int, default=132, help="SM count (sets the fused kernels' chunking)")
    p.add_argument("--ops", action="store_true", help="list every counted op")
    p.add_argument("--classes", type=int, default=0,
                   help="count lmsa_classifier with this many classes (the model's 19); 0: LMSA alone")
    a = p.parse_args(argv)
    if a.classes < 0:
        p.error(f"--classes must be >= 0, got {a.classes}")
    print(table(a.batch, a.channels, a.size, a.dtype_bytes, a.bandwidth, a.sms, a.ops, a.classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
