"""Fused bilinear upsample + argmax over classes (inference; SPEC §6), forward only.

`upsample_argmax(logits, size)` equals

    F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)

(B×H×W int64) without materialising the B×K×H×W upsampled logits. Each output pixel's four
low-res taps are interpolated in fp32 (ATen's source-index rule, any output size, up- or
downsampling), rounded to the logits' dtype as eager's upsampled tensor is, and the first maximum
over the classes is taken (ties to the lowest id, like torch.argmax; a NaN class wins, as in
torch.argmax, by an explicit rule so that the GPU and the interpreter agree).

    logits: B×K×h×w fp32 / bf16 / fp16, any strides, K ≤ 128

Kernels:
- `_upsample_argmax_rows_kernel`: power-of-two integer scales and K ≤ head_loss.FAST_MAX_K; one
  output column per lane, the K classes of its pixel in its registers, the band walked cell row by
  cell row as in `msf.kernels.head_loss`'s row kernels; no cross-lane work.
- `_upsample_argmax_kernel`: any other size or K; BLOCK_P×K_PAD tiles, four taps gathered per pixel.

docs/upsample_argmax.md: the NaN and ±inf contract in full, where it can differ from eager, the
instruction counts and the bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from msf.kernels._common import AotSpec, _round
from msf.kernels.configs import PinnedKernel
from msf.kernels import head_loss as _hl
from msf.kernels.head_loss import (LOGIT_DTYPES, MAX_CLASSES, _bands, _check_device, _k_pad, _row_taps, _rows_block,
                               _rows_path, _source_index, _upsampled_logits)

__all__ = ["upsample_argmax", "eager_upsample_argmax", "AOT_SPECS"]


@triton.jit
def _upsample_argmax_kernel(
    logits_ptr, out_ptr,
    K, h, w, H, W, scale_h, scale_w,
    stride_lb, stride_lc, stride_lh, stride_lw,
    K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pb = tl.program_id(0)
    b = tl.program_id(1)
    l_base = logits_ptr + b.to(tl.int64) * stride_lb
    offs_c = tl.arange(0, K_PAD)
    cmask = offs_c < K
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < H * W
    oy = offs_p // W
    ox = offs_p % W
    y0, y1, ly = _source_index(oy, scale_h, h)
    x0, x1, lx = _source_index(ox, scale_w, w)
    z = _upsampled_logits(l_base, offs_c, cmask, pmask, y0, y1, ly, x0, x1, lx,
                          stride_lc, stride_lh, stride_lw)
    # Round like eager's materialised upsample (a no-op for fp32); −inf padding survives the cast.
    z = _round(z, logits_ptr.dtype.element_ty).to(tl.float32)
    label = tl.argmax(z, axis=1, tie_break_left=True)
    # NaN contract (docs/upsample_argmax.md): the lowest class whose value is NaN, as torch.argmax gives.
    # Stated explicitly because the GPU's max comparisons skip NaN while the interpreter's numpy
    # argmax returns the first NaN: without this the two code paths would disagree.
    first_nan = tl.min(tl.where(z != z, offs_c[None, :], K_PAD), axis=1)
    label = tl.where(first_nan < K_PAD, first_nan, label)
    tl.store(out_ptr + b.to(tl.int64) * H * W + offs_p, label.to(tl.int64), mask=pmask)


@triton.jit
def _argmax_row(oy, top, bot, out_b, ox, xmask, H, W, scale_h, h, dtype: tl.constexpr, K: tl.constexpr):
    """Labels of full-res row `oy` from its two horizontally interpolated low-res rows."""
    _, _, ly = _source_index(oy, scale_h, h)
    # ATen's outer term, rounded like eager's materialised upsample (a no-op for fp32)
    best = _round((1.0 - ly) * top[0] + ly * bot[0], dtype).to(tl.float32)
    label = tl.zeros(best.shape, tl.int32)
    for k in tl.static_range(1, K):
        zk = _round((1.0 - ly) * top[k] + ly * bot[k], dtype).to(tl.float32)
        # strictly larger (ties keep the lower class), or the first NaN; a NaN once held stays:
        # the NaN contract (docs/upsample_argmax.md), the same on the GPU and in the interpreter
        take = ~(zk <= best) & (best == best)
        best = tl.where(take, zk, best)
        label = tl.where(take, k, label)
    tl.store(out_b + oy * W + ox, label.to(tl.int64), mask=xmask & (oy < H))


@triton.jit
def _upsample_argmax_rows_kernel(
    logits_ptr, out_ptr,
    h, w, H, W, scale_h, scale_w, cells_per_band,
    stride_lb, stride_lc, stride_lh, stride_lw,
    K: tl.constexpr, S_H: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Row kernel (power-of-two integer scales, K ≤ head_loss.FAST_MAX_K), grid (column strips,
    bands of cell rows, B): one output column per lane, the classes of its pixel in its registers,
    walking down the band cell row by cell row as `msf.kernels.head_loss`'s forward row kernel does."""
    strip = tl.program_id(0)
    band = tl.program_id(1)
    b = tl.program_id(2)
    dtype: tl.constexpr = logits_ptr.dtype.element_ty
    l_base = logits_ptr + b.to(tl.int64) * stride_lb
    out_b = out_ptr + b.to(tl.int64) * H * W
    ox = strip * BLOCK_X + tl.arange(0, BLOCK_X)
    xmask = ox < W
    x0, x1, lx = _source_index(ox, scale_w, w)
    c = band * cells_per_band
    c_stop = tl.minimum(c + cells_per_band, h)
    top = _row_taps(l_base, c, x0, x1, lx, stride_lc, stride_lh, stride_lw, K)
    bot = _row_taps(l_base, tl.minimum(c + 1, h - 1), x0, x1, lx, stride_lc, stride_lh, stride_lw, K)
    if c == 0:  # the S_H/2 clamped rows above the first cell row
        for u in tl.static_range(S_H // 2):
            _argmax_row(c + u, top, bot, out_b, ox, xmask, H, W, scale_h, h, dtype, K)
    while c < c_stop:
        for u in tl.static_range(S_H):
            _argmax_row(c * S_H + S_H // 2 + u, top, bot, out_b, ox, xmask, H, W, scale_h, h, dtype, K)
        top = bot
        bot = _row_taps(l_base, tl.minimum(c + 2, h - 1), x0, x1, lx, stride_lc, stride_lh, stride_lw, K)
        c += 1


# (BLOCK_P, num_warps): 8 classes of a pixel per thread at K_PAD = 32 (see msf.kernels.head_loss).
CONFIGS = [(128, 16), (64, 8)]

_CONFIG_LIST = [triton.Config({"BLOCK_P": bp}, num_warps=nw, num_stages=1) for bp, nw in CONFIGS]
_upsample_argmax_tuned = PinnedKernel(
    "upsample_argmax", _upsample_argmax_kernel, _CONFIG_LIST, key=["K_PAD", "h", "w", "H", "W"],
    shape_class=lambda named: "any", allowed=lambda cls: _CONFIG_LIST, classes=["any"])


def upsample_argmax(logits: torch.Tensor, size) -> torch.Tensor:
    """argmax over classes of `F.interpolate(logits, size, mode="bilinear", align_corners=False)`,
    fused: B×K×h×w logits → B×H×W int64 labels."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError(f"logits must be a B×K×h×w tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    try:
        H, W = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if isinstance(size, (tuple, list, torch.Size)) and len(size) != 2:
            raise TypeError
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"size must be an int or an (H, W) pair, got {size!r}") from None
    B, K, h, w = logits.shape
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"logits must have 1..{MAX_CLASSES} classes, got K={K}")
    if min(H, W) <= 0 or min(B, h, w) == 0:
        raise ValueError(f"size must be positive and logits non-empty, got size {size!r}, logits {tuple(logits.shape)}")
    if max(logits.numel(), B * H * W) >= 2**31:
        raise ValueError("inputs/outputs with 2**31 or more elements are not supported")
    _check_device(logits, "logits")
    out = _hl._empty((B, H, W), torch.int64, logits.device)  # poisoned under head_loss.POISON_OUTPUTS
    block_x, warps, target = _rows_block(B * h * w)
    if H % h == 0 and W % w == 0 and _rows_path(K, H // h, W // w, block_x):
        n_strips = triton.cdiv(W, block_x)
        cells, n_bands = _bands(B, n_strips, h, target)
        _upsample_argmax_rows_kernel[(n_strips, n_bands, B)](
            logits, out, h, w, H, W, h / H, w / W, cells, *logits.stride(),
            K=K, S_H=H // h, BLOCK_X=block_x, num_warps=warps, num_stages=1,
        )
        return out

    def grid(meta):
        return (triton.cdiv(H * W, meta["BLOCK_P"]), B)

    _upsample_argmax_tuned[grid](
        logits, out, K, h, w, H, W, h / H, w / W, *logits.stride(), K_PAD=_k_pad(K),
    )
    return out


def eager_upsample_argmax(logits: torch.Tensor, size) -> torch.Tensor:
    """The plain-PyTorch reference (materialises the upsampled logits)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


AOT_SPECS = [
    AotSpec(
        name=f"upsample_argmax[{dt},BLOCK_P={bp},w{nw}]", fn=_upsample_argmax_kernel,
        signature={"logits_ptr": f"*{dt}", "out_ptr": "*i64",
                   **{k: "i32" for k in ("K", "h", "w", "H", "W")}, "scale_h": "fp32", "scale_w": "fp32",
                   **{k: "i32" for k in ("stride_lb", "stride_lc", "stride_lh", "stride_lw")}},
        constexprs={"K_PAD": 32, "BLOCK_P": bp}, num_warps=nw, num_stages=1)
    for dt in ("bf16", "fp32", "fp16") for bp, nw in CONFIGS
]
AOT_SPECS += [_hl.specialize(AOT_SPECS[0], "nchw", ("stride_lw",)),
              _hl.specialize(AOT_SPECS[0], "nhwc", ("stride_lc",))]
AOT_SPECS += [_hl.at_model_shape(_hl.specialize(AotSpec(
    name=f"upsample_argmax_rows[{dt},K=19,s=4,BLOCK_X=128,w4]", fn=_upsample_argmax_rows_kernel,
    signature={"logits_ptr": f"*{dt}", "out_ptr": "*i64", **{k: "i32" for k in ("h", "w", "H", "W")},
               "scale_h": "fp32", "scale_w": "fp32", "cells_per_band": "i32",
               **{k: "i32" for k in ("stride_lb", "stride_lc", "stride_lh", "stride_lw")}},
    constexprs={"K": 19, "S_H": 4, "BLOCK_X": 128}, num_warps=4, num_stages=1), layout, (unit,)))
    for dt in ("bf16", "fp32", "fp16") for layout, unit in (("nhwc", "stride_lc"), ("nchw", "stride_lw"))]
