"""Fused bilinear upsample + softmax + CE + Dice loss (SPEC §4, §6), forward and backward in Triton.

`head_loss(logits, targets, eps=1.0)` equals

    msf.losses.ce_dice_loss(F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False),
                            targets, eps)                       (= msf.backend.eager_head_loss)

without ever holding the full-resolution logits or probabilities in memory.

    logits: B×K×h×w, fp32 / bf16 / fp16, any strides (NCHW, channels-last, views), K ≤ 128
    targets: B×H×W, uint8 / int16 / int32 / int64, any strides, H = s_h·h, W = s_w·w (s = 4 here)
    result: a 0-dim fp32 loss; the gradient in the logits' dtype and memory format

Kernels (no atomics; fixed-order sums):
- row kernels, the fast path (K ≤ FAST_MAX_K = 24, power-of-two scales; the model's K = 19, s = 4):
  `_head_loss_fwd_rows_kernel` (one full-res column per lane, the K classes in its registers,
  per-chunk Σp, Σp·y, Σy and CE partials), `_head_loss_finalize_kernel` and
  `_head_loss_total_kernel` (the per-image Dice coefficients, the loss),
  `_head_loss_bwd_rows_kernel` (each pixel's gradient once, its vertical adjoint in registers,
  the horizontal one through per-program scratch rows) and `_head_loss_bwd_halo_kernel`;
- generic kernels for any other K or scale: `_head_loss_fwd_kernel`, `_head_loss_bwd_kernel`.
Bad targets (ids outside 0..K−1) are rejected where data enters (`msf.losses.check_targets`),
not inside forward or backward (no host sync there).

docs/head_loss.md: the math of both passes, the bands and scratch protocol of the row kernels,
the bytes and memory held, the instruction counts and the designs tried and dropped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import dataclasses

from msf.kernels._common import INTERPRET, AotSpec, _round, divisibility_attrs
from msf.kernels import configs
from msf.kernels.configs import PinnedKernel
from msf.losses import DEFAULT_DICE_EPS

__all__ = ["head_loss", "HeadLossFunction", "eager_head_loss", "AOT_SPECS"]

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
MAX_CLASSES = 128
# Forward grid: about this many programs in all (B × chunks), each sweeping its chunk in tiles. A
# fixed number (not the GPU's SM count) so the summation order, hence the result, never changes.
_TARGET_PROGRAMS = 1024


# ----------------------------------------------------------------------------------------------
# Device helpers shared by the forward, the backward and upsample_argmax.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _source_index(dst, scale, in_size):
    """ATen's bilinear align_corners=False source taps for integer output coordinates `dst`:
    src = max((dst + ½)·scale − ½, 0), i0 = ⌊src⌋ (≤ in−1), i1 = min(i0+1, in−1), λ1 = src − i0."""
    src = (dst.to(tl.float32) + 0.5) * scale - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src ≥ 0, so truncation is the floor
    i1 = tl.minimum(i0 + 1, in_size - 1)
    lam1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, lam1


@triton.jit
def _upsampled_logits(base_ptr, offs_c, cmask, pmask, y0, y1, ly, x0, x1, lx,
                      stride_c, stride_h, stride_w):
    """fp32 K_PAD×BLOCK tile of bilinearly upsampled logits at the pixels whose taps are given;
    padded classes come back as −inf so they vanish from the softmax."""
    c_off = offs_c[None, :] * stride_c
    m = cmask[None, :] & pmask[:, None]
    r0 = y0 * stride_h
    r1 = y1 * stride_h
    q0 = x0 * stride_w
    q1 = x1 * stride_w
    v00 = tl.load(base_ptr + c_off + (r0 + q0)[:, None], mask=m, other=0.0).to(tl.float32)
    v01 = tl.load(base_ptr + c_off + (r0 + q1)[:, None], mask=m, other=0.0).to(tl.float32)
    v10 = tl.load(base_ptr + c_off + (r1 + q0)[:, None], mask=m, other=0.0).to(tl.float32)
    v11 = tl.load(base_ptr + c_off + (r1 + q1)[:, None], mask=m, other=0.0).to(tl.float32)
    wx1 = lx[:, None]
    wx0 = 1.0 - wx1
    wy1 = ly[:, None]
    wy0 = 1.0 - wy1
    # ATen's order: h0λ·(w0λ·v00 + w1λ·v01) + h1λ·(w0λ·v10 + w1λ·v11)
    z = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
    return tl.where(cmask[None, :], z, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _head_loss_fwd_kernel(
    logits_ptr, targets_ptr, part_ptr,
    K, h, w, H, W, scale_h, scale_w, pix_per_chunk, n_chunks,
    stride_lb, stride_lc, stride_lh, stride_lw,
    stride_tb, stride_th, stride_tw,
    K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    l_base = logits_ptr + b.to(tl.int64) * stride_lb
    t_base = targets_ptr + b.to(tl.int64) * stride_tb

    offs_c = tl.arange(0, K_PAD)
    cmask = offs_c < K
    acc_py = tl.zeros((BLOCK_P, K_PAD), tl.float32)   # Σ p·y
    acc_s = tl.zeros((BLOCK_P, K_PAD), tl.float32)    # Σ p + Σ y (only their sum is needed)
    acc_ce = tl.zeros((BLOCK_P,), tl.float32)         # Σ logsumexp − z_t

    n_pix = H * W
    start = chunk * pix_per_chunk
    # `while`, not `for … in range(runtime bound)`: Triton 3.6's interpreter converts a runtime range
    # bound with int(1-element array), which numpy ≥ 2.4 rejects (triton-lang/triton#9171).
    # Only an image's last chunk has masked-off tail tiles.
    done = 0
    while done < pix_per_chunk:
        offs_p = start + done + tl.arange(0, BLOCK_P)
        pmask = offs_p < n_pix
        oy = offs_p // W
        ox = offs_p % W
        y0, y1, ly = _source_index(oy, scale_h, h)
        x0, x1, lx = _source_index(ox, scale_w, w)
        z = _upsampled_logits(l_base, offs_c, cmask, pmask, y0, y1, ly, x0, x1, lx,
                              stride_lc, stride_lh, stride_lw)
        t = tl.load(t_base + oy * stride_th + ox * stride_tw, mask=pmask, other=0).to(tl.int32)

        zmax = tl.max(z, axis=1)
        e = tl.exp(z - zmax[:, None])
        esum = tl.sum(e, axis=1)
        p = e * (1.0 / esum)[:, None]
        onehot = (offs_c[None, :] == t[:, None]) & pmask[:, None]
        z_t = tl.sum(tl.where(onehot, z, 0.0), axis=1)
        lse = zmax + tl.log(esum)

        acc_ce += tl.where(pmask, lse - z_t, 0.0)
        acc_s += tl.where(pmask[:, None], p, 0.0) + onehot.to(tl.float32)
        acc_py += tl.where(onehot, p, 0.0)
        done += BLOCK_P

    out = part_ptr + (b * n_chunks + chunk).to(tl.int64) * (3 * K_PAD) + offs_c
    tl.store(out, tl.sum(acc_py, axis=0))
    tl.store(out + K_PAD, tl.sum(acc_s, axis=0))
    ce = tl.sum(acc_ce, axis=0)
    tl.store(out + 2 * K_PAD, tl.where(offs_c == 0, ce, 0.0))


@triton.jit
def _head_loss_finalize_kernel(
    part_ptr, coef_ptr, img_ptr,
    K, n_chunks, inv_bk, eps,
    K_PAD: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
):
    """grid (B,): fixed-order reduction of image b's n_chunks×3×K_PAD partials into its Dice
    backward coefficients (α, β) of the comment above `_head_loss_bwd_kernel` and its two loss
    terms (Σ CE, Σ_c d_bc), img[b] = (ce, dice, 0, …)."""
    b = tl.program_id(0)
    offs_c = tl.arange(0, K_PAD)
    cmask = offs_c < K
    offs_k = tl.arange(0, CHUNK_BLOCK)
    s_py = tl.zeros((K_PAD,), tl.float32)
    s_s = tl.zeros((K_PAD,), tl.float32)
    s_ce = tl.zeros((K_PAD,), tl.float32)
    k0 = 0
    while k0 < n_chunks:  # `while`: see the forward's note
        kk = k0 + offs_k
        rows = part_ptr + ((b * n_chunks + kk).to(tl.int64) * (3 * K_PAD))[:, None] + offs_c[None, :]
        m = (kk < n_chunks)[:, None]
        s_py += tl.sum(tl.load(rows, mask=m, other=0.0), axis=0)
        s_s += tl.sum(tl.load(rows + K_PAD, mask=m, other=0.0), axis=0)
        s_ce += tl.sum(tl.load(rows + 2 * K_PAD, mask=m, other=0.0), axis=0)
        k0 += CHUNK_BLOCK
    s_eps = s_s + eps
    dice = tl.where(cmask, (2.0 * s_py + eps) / s_eps, 0.0)
    alpha = -2.0 * inv_bk / s_eps
    beta = (2.0 * s_py + eps) * inv_bk / (s_eps * s_eps)
    tl.store(coef_ptr + b * (2 * K_PAD) + offs_c, tl.where(cmask, alpha, 0.0))
    tl.store(coef_ptr + b * (2 * K_PAD) + K_PAD + offs_c, tl.where(cmask, beta, 0.0))
    terms = tl.where(offs_c == 0, tl.sum(s_ce, axis=0), tl.where(offs_c == 1, tl.sum(dice, axis=0), 0.0))
    tl.store(img_ptr + b * K_PAD + offs_c, terms)


@triton.jit
def _head_loss_total_kernel(img_ptr, loss_ptr, B, inv_n_pix, inv_bk, K_PAD: tl.constexpr, B_PAD: tl.constexpr):
    """One program: loss = Σ_b CE_b / N + 1 − Σ_b Σ_c d_bc / (B·K), in a fixed order."""
    offs_b = tl.arange(0, B_PAD)
    m = offs_b < B
    ce = tl.sum(tl.load(img_ptr + offs_b * K_PAD, mask=m, other=0.0), axis=0)
    dice = tl.sum(tl.load(img_ptr + offs_b * K_PAD + 1, mask=m, other=0.0), axis=0)
    loss = ce * inv_n_pix + 1.0 - dice * inv_bk
    tl.store(loss_ptr + offs_b, tl.where(offs_b == 0, loss, 0.0), mask=offs_b == 0)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
# Gradient of loss = CE + 1 − (1/(B·K)) Σ_bc d_bc with respect to the full-res logits z_c(x) of
# image b (g0 = dloss_out, the upstream gradient; N = B·H·W; S_bc = Σp + Σy; I_bc = Σp·y):
#
#   ∂CE/∂z_c           = (p_c − y_c) / N
#   ∂Dice-loss/∂p_c    = −(1/(B·K)) · (2 y_c (S+ε) − (2I+ε)) / (S+ε)²
#                      = α_bc y_c + β_bc,   α_bc = −2/(B·K·(S+ε)),  β_bc = (2I+ε)/(B·K·(S+ε)²)
#   softmax Jacobian   : with q_c = g0·(α_bc y_c + β_bc),
#                        ∂/∂z_c = p_c (q_c − Σ_j p_j q_j)
#   G_c(x)             = g0 (p_c − y_c)/N + p_c (q_c − Σ_j p_j q_j)
#
# The upsample is linear, z(x) = Σ_(i,j) A_h[x_y, i] A_w[x_x, j] L[i, j], so its adjoint is
#
#   dL_c[i, j] = Σ_x A_h[x_y, i] · A_w[x_x, j] · G_c(x),
#
# A_h[xy, i] = (1−λ)[i0(xy) = i] + λ[i1(xy) = i] (both taps land on i at the clamped border). With
# integer scale s and align_corners=False, full-res row xy touches low-res row i only if
# src(xy) ∈ (i−1, i+1), i.e. xy ∈ (s·i − (s+1)/2, s·i + (3s−1)/2): at most 2s rows starting at
# s·i − ⌊s/2⌋ (also covering the clamped rows above 0 and below the last row). The kernel walks that
# win_h × win_w window (win = 2s, or 1 for s = 1: see `_window`) for each low-res pixel, recomputes
# p from the four low-res taps, and weighs G by the very same (i0, i1, λ) the forward used, so the
# result is the exact adjoint.
@triton.jit
def _head_loss_bwd_kernel(
    logits_ptr, targets_ptr, coef_ptr, gout_ptr, grad_ptr,
    K, h, w, H, W, scale_h, scale_w, s_h, s_w, win_h, win_w, inv_n_pix,
    stride_lb, stride_lc, stride_lh, stride_lw,
    stride_tb, stride_th, stride_tw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    K_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    qb = tl.program_id(0)
    b = tl.program_id(1)
    l_base = logits_ptr + b.to(tl.int64) * stride_lb
    t_base = targets_ptr + b.to(tl.int64) * stride_tb

    offs_c = tl.arange(0, K_PAD)
    cmask = offs_c < K
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = offs_q < h * w
    qi = offs_q // w
    qj = offs_q % w

    g0 = tl.load(gout_ptr).to(tl.float32)
    alpha = tl.load(coef_ptr + b * (2 * K_PAD) + offs_c) * g0
    beta = tl.load(coef_ptr + b * (2 * K_PAD) + K_PAD + offs_c) * g0
    ce_scale = g0 * inv_n_pix

    acc = tl.zeros((BLOCK_Q, K_PAD), tl.float32)
    y_first = qi * s_h - s_h // 2
    x_first = qj * s_w - s_w // 2
    # One flat `while` over the window (see the forward's note on the interpreter and runtime range
    # bounds); nested while loops here trip Triton 3.6's layout-conversion pass on sm_90.
    it = 0
    while it < win_h * win_w:
        dy = it // win_w
        dx = it - dy * win_w
        oy = y_first + dy
        ox = x_first + dx
        y0, y1, ly = _source_index(oy, scale_h, h)
        x0, x1, lx = _source_index(ox, scale_w, w)
        wy = tl.where(y0 == qi, 1.0 - ly, 0.0) + tl.where(y1 == qi, ly, 0.0)
        wx = tl.where(x0 == qj, 1.0 - lx, 0.0) + tl.where(x1 == qj, lx, 0.0)
        wgt = wy * wx
        valid = qmask & (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
        wgt = tl.where(valid, wgt, 0.0)

        z = _upsampled_logits(l_base, offs_c, cmask, valid, y0, y1, ly, x0, x1, lx,
                              stride_lc, stride_lh, stride_lw)
        t = tl.load(t_base + oy * stride_th + ox * stride_tw, mask=valid, other=0).to(tl.int32)
        zmax = tl.max(z, axis=1)
        e = tl.exp(z - zmax[:, None])
        p = e * (1.0 / tl.sum(e, axis=1))[:, None]
        onehot = offs_c[None, :] == t[:, None]
        yf = onehot.to(tl.float32)
        q = alpha[None, :] * yf + beta[None, :]
        pq = tl.sum(p * q, axis=1)
        g = ce_scale * (p - yf) + p * (q - pq[:, None])
        acc += wgt[:, None] * g
        it += 1

    g_base = grad_ptr + b.to(tl.int64) * stride_gb
    g_ptrs = g_base + offs_c[None, :] * stride_gc + (qi * stride_gh + qj * stride_gw)[:, None]
    tl.store(g_ptrs, _round(acc, grad_ptr.dtype.element_ty), mask=cmask[None, :] & qmask[:, None])


# ----------------------------------------------------------------------------------------------
# Row kernels: whole pixels per thread (the fast path; "Kernels" in docs/head_loss.md)
# ----------------------------------------------------------------------------------------------
# One full-resolution column per lane; the K classes of its pixel are K separate 1-D tensors (a
# tuple, K a compile-time constant), so the softmax over classes is per-thread arithmetic: no
# padding to a power of two, no cross-lane reduction. A program walks down its band cell row by
# cell row (cell row c: the S_H full-res rows whose upper tap is low-res row c), holding the two
# horizontally interpolated low-res rows it needs; moving down one cell row loads one new row.
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _row_taps(base, row, x0, x1, lx, stride_c, stride_h, stride_w, K: tl.constexpr):
    """Low-res row `row` interpolated horizontally at the lanes' columns, one fp32 vector per
    class: ATen's inner term w0λ·v0 + w1λ·v1. The taps are clamped indices: no mask needed."""
    p0 = base + row * stride_h + x0 * stride_w
    p1 = base + row * stride_h + x1 * stride_w
    out = ()
    for k in tl.static_range(K):
        v0 = tl.load(p0 + k * stride_c).to(tl.float32)
        v1 = tl.load(p1 + k * stride_c).to(tl.float32)
        out = out + ((1.0 - lx) * v0 + lx * v1,)
    return out


@triton.jit
def _tap_of_class(base, t, i0, i1, ly, x0, x1, lx, stride_c, stride_h, stride_w, K: tl.constexpr):
    """z_t: the upsampled logit of each lane's target class, gathered from the four taps (the same
    formula as the per-class vectors, so no compare-and-select over the K classes). Target ids
    outside 0..K−1 (masked lanes read −1) give 0 and are never used as an address."""
    ok = (t >= 0) & (t < K)
    pc = base + tl.where(ok, t, 0) * stride_c
    v00 = tl.load(pc + i0 * stride_h + x0 * stride_w).to(tl.float32)
    v01 = tl.load(pc + i0 * stride_h + x1 * stride_w).to(tl.float32)
    v10 = tl.load(pc + i1 * stride_h + x0 * stride_w).to(tl.float32)
    v11 = tl.load(pc + i1 * stride_h + x1 * stride_w).to(tl.float32)
    z = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
    return tl.where(ok, z, 0.0)


@triton.jit
def _zeros_like_taps(ref, K: tl.constexpr):
    out = ()
    for k in tl.static_range(K):
        out = out + (tl.zeros_like(ref),)
    return out


@triton.jit
def _softmax_row(top, bot, ly, K: tl.constexpr):
    """(e, m2, s): e_k = 2^(z_k·log2e − m2) with z = (1−λ)·top + λ·bot (ATen's outer term),
    m2 = max_k z_k · log2e, s = Σ_k e_k."""
    z = ()
    m = tl.full(top[0].shape, float("-inf"), tl.float32)
    for k in tl.static_range(K):
        zk = (1.0 - ly) * top[k] + ly * bot[k]
        z = z + (zk,)
        m = tl.maximum(m, zk)
    m2 = m * _LOG2E
    s = tl.zeros_like(m)
    e = ()
    for k in tl.static_range(K):
        ek = tl.exp2(z[k] * _LOG2E - m2)
        s += ek
        e = e + (ek,)
    return e, m2, s


@triton.jit
def _recip(s):
    """1/s for a softmax denominator (s ≥ 1: its largest term is 2⁰): rsqrt(s)², MUFU.RSQ and a multiply
    (≤ 2^-22.9 relative each, so within ~3 ulp), where a division's range handling costs 9 more."""
    r = tl.math.rsqrt(s)
    return r * r


@triton.jit
def _log2_carry(prod, ex, s):
    """Σ log2 s over a lane's rows without a logarithm a row (libdevice's log2f: ~28 instructions):
    the running product of the s (each in [1, K]) is brought back into [1, 2) after each multiply and
    its exponent added to the integer `ex`; the sum is ex + log2(prod), taken once at the end."""
    bits = (prod * s).to(tl.int32, bitcast=True)
    ex += (bits >> 23) - 127
    prod = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    return prod, ex


@triton.jit
def _zero_slots(ptr, lane, N: tl.constexpr, BLOCK_X: tl.constexpr):
    """Zeroes N rows of per-lane scratch slots; returns a zero lane vector. The barrier: the slots
    are then read and written by whichever thread holds the lane in the next access's layout."""
    zero = tl.zeros((BLOCK_X,), tl.float32)
    for k in tl.static_range(N):
        tl.store(ptr + k * BLOCK_X + lane, zero)
    tl.debug_barrier()
    return zero


@triton.jit
def _fwd_row(oy, acc_p, acc_ce, lg_prod, lg_ex, tgt, top, bot, i0, i1, l_base, t_base, ox, xmask, x0, x1, lx,
             H, scale_h, h, stride_lc, stride_lh, stride_lw, stride_th, stride_tw,
             K: tl.constexpr, BLOCK_X: tl.constexpr):
    """Adds full-res row `oy` (its taps `top`, `bot`) to the per-class Σp (registers), to the
    lane's target-class slots Σp·y and Σy (scratch `tgt`) and to Σ logsumexp − z_t: Σ (max − z_t) in
    acc_ce, Σ log2 s in (lg_prod, lg_ex) (`_log2_carry`)."""
    _, _, ly = _source_index(oy, scale_h, h)
    m = xmask & (oy < H)
    t = tl.load(t_base + oy * stride_th + ox * stride_tw, mask=m, other=-1).to(tl.int32)
    e, m2, s = _softmax_row(top, bot, ly, K)
    z_t = _tap_of_class(l_base, t, i0, i1, ly, x0, x1, lx, stride_lc, stride_lh, stride_lw, K)
    r = tl.where(m, _recip(s), 0.0)
    acc_ce += tl.where(m, m2 / _LOG2E - z_t, 0.0)
    lg_prod, lg_ex = _log2_carry(lg_prod, lg_ex, tl.where(m, s, 1.0))
    new_p = ()
    for k in tl.static_range(K):
        new_p = new_p + (acc_p[k] + e[k] * r,)
    # p_t and the count go to the lane's own slot of class t: one read-modify-write per pixel
    # instead of a compare-and-select per class (an out-of-range id writes nothing)
    ok = m & (t >= 0) & (t < K)
    slot = tgt + tl.where(ok, t, 0) * (2 * BLOCK_X) + tl.arange(0, BLOCK_X)
    p_t = tl.exp2(z_t * _LOG2E - m2) * r
    tl.store(slot, tl.load(slot, mask=ok, other=0.0) + p_t, mask=ok)
    tl.store(slot + BLOCK_X, tl.load(slot + BLOCK_X, mask=ok, other=0.0) + 1.0, mask=ok)
    return new_p, acc_ce, lg_prod, lg_ex


@triton.jit
def _head_loss_fwd_rows_kernel(
    logits_ptr, targets_ptr, part_ptr, scratch_ptr,
    h, w, H, W, scale_h, scale_w, cells_per_band, n_chunks,
    stride_lb, stride_lc, stride_lh, stride_lw,
    stride_tb, stride_th, stride_tw,
    K: tl.constexpr, K_PAD: tl.constexpr, S_H: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """grid (column strips, bands of cell rows, B): the CE and Dice partial sums of the pixels of
    one strip × band. `scratch`: 2·K·BLOCK_X fp32 per program (the target-class slots)."""
    strip = tl.program_id(0)
    band = tl.program_id(1)
    b = tl.program_id(2)
    l_base = logits_ptr + b.to(tl.int64) * stride_lb
    t_base = targets_ptr + b.to(tl.int64) * stride_tb
    lane = tl.arange(0, BLOCK_X)
    ox = strip * BLOCK_X + lane
    xmask = ox < W
    x0, x1, lx = _source_index(ox, scale_w, w)
    chunk = band * tl.num_programs(0) + strip
    tgt = scratch_ptr + (b * n_chunks + chunk).to(tl.int64) * (2 * K * BLOCK_X)
    zero = _zero_slots(tgt, lane, 2 * K, BLOCK_X)

    c = band * cells_per_band
    c_stop = tl.minimum(c + cells_per_band, h)
    i1 = tl.minimum(c + 1, h - 1)
    top = _row_taps(l_base, c, x0, x1, lx, stride_lc, stride_lh, stride_lw, K)
    bot = _row_taps(l_base, i1, x0, x1, lx, stride_lc, stride_lh, stride_lw, K)
    acc_p = _zeros_like_taps(zero, K)     # Σ p per class
    acc_ce = zero                         # Σ max − z_t
    lg_prod = zero + 1.0                  # Σ log2 s = lg_ex + log2(lg_prod)
    lg_ex = tl.zeros((BLOCK_X,), tl.int32)
    # band 0: the S_H/2 clamped rows above the first cell row have its taps (λ = 0). A run-time
    # loop, not an unrolled copy of `_fwd_row` per row (compile time: see the backward's note).
    u = 0
    n_above = tl.where(c == 0, S_H // 2, 0)
    while u < n_above:
        acc_p, acc_ce, lg_prod, lg_ex = _fwd_row(c + u, acc_p, acc_ce, lg_prod, lg_ex, tgt, top, bot, c, i1,
                                                 l_base, t_base, ox, xmask, x0, x1, lx, H, scale_h, h,
                                                 stride_lc, stride_lh, stride_lw, stride_th, stride_tw, K, BLOCK_X)
        u += 1
    while c < c_stop:
        i1 = tl.minimum(c + 1, h - 1)
        for u in tl.range(0, S_H, loop_unroll_factor=1):
            oy = c * S_H + S_H // 2 + u
            acc_p, acc_ce, lg_prod, lg_ex = _fwd_row(oy, acc_p, acc_ce, lg_prod, lg_ex, tgt, top, bot, c, i1,
                                                     l_base, t_base, ox, xmask, x0, x1, lx, H, scale_h, h,
                                                     stride_lc, stride_lh, stride_lw, stride_th, stride_tw, K, BLOCK_X)
        top = bot
        bot = _row_taps(l_base, tl.minimum(c + 2, h - 1), x0, x1, lx, stride_lc, stride_lh, stride_lw, K)
        c += 1

    # One reduction over the lanes per class and program, into the generic kernel's
    # B×n_chunks×3×K_PAD partials layout (the finalize kernel reads either).
    tl.debug_barrier()
    offs_c = tl.arange(0, K_PAD)
    row_i = tl.zeros((K_PAD,), tl.float32)
    row_s = tl.zeros((K_PAD,), tl.float32)
    for k in tl.static_range(K):
        s_i = tl.sum(tl.load(tgt + 2 * k * BLOCK_X + lane), axis=0)
        s_y = tl.sum(tl.load(tgt + (2 * k + 1) * BLOCK_X + lane), axis=0)
        row_i = tl.where(offs_c == k, s_i, row_i)
        row_s = tl.where(offs_c == k, tl.sum(acc_p[k], axis=0) + s_y, row_s)
    out = part_ptr + (b * n_chunks + chunk).to(tl.int64) * (3 * K_PAD) + offs_c
    tl.store(out, row_i)
    tl.store(out + K_PAD, row_s)
    ce = acc_ce + (lg_ex.to(tl.float32) + tl.log2(lg_prod)) / _LOG2E
    tl.store(out + 2 * K_PAD, tl.where(offs_c == 0, tl.sum(ce, axis=0), 0.0))


@triton.jit
def _bwd_row(oy, c, acc_cur, acc_nxt, dsc, cur_on, up, lo, coef_b, g0, c_ce, t_base, ox, valid_x, H, scale_h, h,
             stride_th, stride_tw, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_X: tl.constexpr):
    """Adds G(x) of full-res row `oy` (cell row c) to low-res rows c (acc_cur) and c + 1 (acc_nxt),
    weighted by the row's A_h (zero for a row outside the image). `up`, `lo`: the lanes' entries of
    the scratch rows holding the horizontally interpolated low-res rows c and c + 1 (class k at
    + k·BLOCK_X). The target class's extra term goes to the lane's slot of class t in the scratch
    `dsc` (rows of parity 0 and 1) instead of a compare-and-select per class; `cur_on` = 0 leaves
    row c's slot alone."""
    y_ok = (oy >= 0) & (oy < H)
    y0, y1, ly = _source_index(oy, scale_h, h)
    w_cur = tl.where(y_ok, tl.where(y0 == c, 1.0 - ly, 0.0) + tl.where(y1 == c, ly, 0.0), 0.0)
    w_nxt = tl.where(y_ok, tl.where(y0 == c + 1, 1.0 - ly, 0.0) + tl.where(y1 == c + 1, ly, 0.0), 0.0)
    t = tl.load(t_base + oy * stride_th + ox * stride_tw, mask=valid_x & y_ok, other=-1).to(tl.int32)
    z = ()
    m = tl.full(ly.shape, float("-inf"), tl.float32)
    for k in tl.static_range(K):
        zk = (1.0 - ly) * tl.load(up + k * BLOCK_X) + ly * tl.load(lo + k * BLOCK_X)
        z = z + (zk,)
        m = tl.maximum(m, zk)
    m2 = m * _LOG2E
    s = tl.zeros_like(m)
    # β_k is read where it is used (an L1 hit, the same address in every lane), not held in K
    # registers across the row loop: registers decide how many warps an SM holds
    pe = tl.zeros_like(m)                  # Σ_j β_j·e_j
    e = ()
    for k in tl.static_range(K):
        ek = tl.exp2(z[k] * _LOG2E - m2)
        s += ek
        pe += tl.load(coef_b + K_PAD + k) * ek
        e = e + (ek,)
    ok = (t >= 0) & (t < K)                # an out-of-range id matches no class: no extra terms
    tc = tl.where(ok, t, 0)
    # z_t from the same scratch rows, by the same formula as z_k: p_t is exactly the softmax's
    z_t = (1.0 - ly) * tl.load(up + tc * BLOCK_X) + ly * tl.load(lo + tc * BLOCK_X)
    e_t = tl.where(ok, tl.exp2(z_t * _LOG2E - m2), 0.0)
    a_t = tl.load(coef_b + tc) * g0        # g0·α_t
    r = _recip(s)
    pq = r * (a_t * e_t + g0 * pe)         # Σ_j p_j q_j
    base = r * (c_ce - pq)
    rg = r * g0
    delta = a_t * e_t * r - c_ce           # y_t·(g0·α_t·p_t − c), the target class's extra term
    new_cur = ()
    new_nxt = ()
    for k in tl.static_range(K):
        gk = e[k] * tl.fma(rg, tl.load(coef_b + K_PAD + k), base)  # explicit: LLVM would fuse base's product
        new_cur = new_cur + (acc_cur[k] + w_cur * gk,)
        new_nxt = new_nxt + (acc_nxt[k] + w_nxt * gk,)
    par = (c + 2) % 2
    slot = dsc + (par * K + tc) * BLOCK_X + tl.arange(0, BLOCK_X)
    on = ok & (cur_on != 0)
    tl.store(slot, tl.load(slot, mask=on, other=0.0) + w_cur * delta, mask=on)
    slot = dsc + ((1 - par) * K + tc) * BLOCK_X + tl.arange(0, BLOCK_X)
    tl.store(slot, tl.load(slot, mask=ok, other=0.0) + w_nxt * delta, mask=ok)
    return new_cur, new_nxt


@triton.jit
def _store_taps(dst, base, row, x0, x1, lx, stride_c, stride_h, stride_w, K: tl.constexpr, BLOCK_X: tl.constexpr):
    """Low-res row `row` interpolated horizontally at the lanes' columns (`_row_taps`), stored to
    the lanes' entries `dst` of a scratch row (class k at + k·BLOCK_X) instead of K registers."""
    p0 = base + row * stride_h + x0 * stride_w
    p1 = base + row * stride_h + x1 * stride_w
    for k in tl.static_range(K):
        v0 = tl.load(p0).to(tl.float32)
        v1 = tl.load(p1).to(tl.float32)
        tl.store(dst + k * BLOCK_X, (1.0 - lx) * v0 + lx * v1)
        # a pointer stepped class by class: with a run-time class stride (NCHW), K precomputed
        # offsets k·stride_c would otherwise stay live across the whole band loop
        p0 += stride_c
        p1 += stride_c


@triton.jit
def _strip_columns(lane, strip, W, w, scale_w, S_W: tl.constexpr, G: tl.constexpr):
    """Column geometry of the lanes `lane` (any shape) of a backward strip: (full-res column,
    in-image cell, its taps, A_w toward its cell's low-res column, A_w toward the next one)."""
    cell = strip * G + lane // S_W
    ox = cell * S_W + S_W // 2 + lane % S_W
    valid = (cell >= 0) & (cell < w)
    wrapped = ox >= W                      # the left border's clamped columns, carried by cell w−1
    ox = tl.where(valid, tl.where(wrapped, ox - W, ox), 0)
    x0, x1, lx = _source_index(ox, scale_w, w)
    to_b = tl.where(wrapped, 0, cell + 1)
    wa = tl.where(x0 == cell, 1.0 - lx, 0.0) + tl.where(x1 == cell, lx, 0.0)
    wa = tl.where(valid, tl.where(wrapped, 0.0, wa), 0.0)
    wb = tl.where(x0 == to_b, 1.0 - lx, 0.0) + tl.where(x1 == to_b, lx, 0.0)
    wb = tl.where(valid, wb, 0.0)
    return ox, valid, x0, x1, lx, wa, wb


@triton.jit
def _bwd_cell_row(c, taps, acc_cur, acc_nxt, dsc, coef_b, g0, c_ce, t_base, ox, valid_x, H, scale_h, h,
                  stride_th, stride_tw, K: tl.constexpr, K_PAD: tl.constexpr, S_H: tl.constexpr,
                  BLOCK_X: tl.constexpr):
    """The S_H full-res rows of cell row c ≥ 0 (taps: low-res rows c and c + 1 in the scratch tap
    rows `taps` of parity c % 2 and (c + 1) % 2) added to the sums of low-res rows c (`acc_cur`) and
    c + 1 (`acc_nxt`)."""
    up = taps + (c % 2) * (K * BLOCK_X)
    lo = taps + ((c + 1) % 2) * (K * BLOCK_X)
    for u in tl.range(0, S_H, loop_unroll_factor=1):
        oy = c * S_H + S_H // 2 + u
        acc_cur, acc_nxt = _bwd_row(oy, c, acc_cur, acc_nxt, dsc, 1, up, lo, coef_b, g0, c_ce, t_base, ox, valid_x,
                                    H, scale_h, h, stride_th, stride_tw, K, K_PAD, BLOCK_X)
    return acc_cur, acc_nxt


@triton.jit
def _bwd_flush(c, acc, dsc, geo, zero, lane, kb, gi, strip, b, h, w, n_strips, g_base,
               halo_a_ptr, halo_b_ptr, stride_gc, stride_gh, stride_gw,
               K: tl.constexpr, S_W: tl.constexpr, BLOCK_X: tl.constexpr, KB: tl.constexpr, G: tl.constexpr):
    """Low-res row c is complete at the strip's columns (`acc` + the lanes' target-class slots): its
    horizontal adjoint. Each lane leaves A_w·v toward its cell's column and A_w·v toward the next
    one in the flush rows; after a barrier, KB × G tiles (a class and a cell per thread) add up
    each cell's S_W own lanes and the previous cell's S_W lanes in a fixed order. Every flush
    address is a base plus an immediate: no per-class address arithmetic, no cross-lane
    reduction, no layout conversion through shared memory. The barriers: the slots and flush rows
    are written and read by different threads."""
    tl.debug_barrier()
    # the lanes' column weights, read from the scratch, not held in registers across the row loop
    wa = tl.load(geo + lane)
    wb = tl.load(geo + BLOCK_X + lane)
    at_last = tl.load(geo + 2 * BLOCK_X + lane) != 0.0
    halo_row = ((b * h + c) * n_strips + strip) * K
    flush = dsc + (2 + 2 * (c % 2)) * (K * BLOCK_X)   # a moving base: per-class offsets stay immediates
    to_halo = halo_b_ptr + halo_row * S_W + lane % S_W
    for k in tl.static_range(K):
        dslot = dsc + ((c % 2) * K + k) * BLOCK_X + lane
        v = acc[k] + tl.load(dslot)
        tl.store(dslot, zero)           # reused by row c + 2
        tl.store(flush + k * BLOCK_X + lane, wa * v)
        tb = wb * v
        tl.store(flush + (K + k) * BLOCK_X + lane, tb)
        # the last cell's next-column part belongs to the next strip's first column: to the halo
        # kernel, one value per lane
        tl.store(to_halo + k * S_W, tb, mask=at_last)
    tl.debug_barrier()
    j = strip * G + gi
    row_out = g_base + c * stride_gh + j * stride_gw
    for k0 in tl.static_range(0, K, KB):
        kk = k0 + kb
        k_ok = kk < K
        own = flush + kk * BLOCK_X + gi * S_W
        col = tl.zeros((KB, G), tl.float32)
        for u in tl.static_range(S_W):
            col += tl.load(own + u, mask=k_ok, other=0.0)
            col += tl.load(own + (K * BLOCK_X - S_W) + u, mask=k_ok & (gi >= 1), other=0.0)
        tl.store(row_out + kk * stride_gc, _round(col, g_base.dtype.element_ty),
                 mask=k_ok & (gi >= 1) & (j < w))
        # the strip's first column still lacks the previous strip's part: to the halo
        tl.store(halo_a_ptr + halo_row + kk + gi * 0, col, mask=k_ok & (gi == 0))


@triton.jit
def _bwd_cell_step(c, acc_c, acc_n, taps, dsc, geo, zero, lane, kb, gi, strip, b, h, w, H, n_strips, scale_h,
                   coef_b, g0, c_ce, l_base, t_base, g_base, halo_a_ptr, halo_b_ptr, ox, valid_x, x0, x1, lx,
                   stride_lc, stride_lh, stride_lw, stride_th, stride_tw, stride_gc, stride_gh, stride_gw,
                   K: tl.constexpr, K_PAD: tl.constexpr, S_H: tl.constexpr, S_W: tl.constexpr,
                   BLOCK_X: tl.constexpr, KB: tl.constexpr, G: tl.constexpr):
    """Cell row c of the band loop: its rows into the sums of low-res rows c (`acc_c`) and c + 1
    (`acc_n`), the flush of row c, and low-res row c + 2's taps into row c's tap row. Returns
    (zeroed sums for row c + 2, row c + 1's sums)."""
    acc_c, acc_n = _bwd_cell_row(c, taps, acc_c, acc_n, dsc, coef_b, g0, c_ce, t_base, ox, valid_x, H, scale_h, h,
                                 stride_th, stride_tw, K, K_PAD, S_H, BLOCK_X)
    _bwd_flush(c, acc_c, dsc, geo, zero, lane, kb, gi, strip, b, h, w, n_strips, g_base,
               halo_a_ptr, halo_b_ptr, stride_gc, stride_gh, stride_gw, K, S_W, BLOCK_X, KB, G)
    _store_taps(taps + (c % 2) * (K * BLOCK_X), l_base, tl.minimum(c + 2, h - 1), x0, x1, lx,
                stride_lc, stride_lh, stride_lw, K, BLOCK_X)
    return _zeros_like_taps(zero, K), acc_n


@triton.jit
def _head_loss_bwd_rows_kernel(
    logits_ptr, targets_ptr, coef_ptr, gout_ptr, grad_ptr, scratch_ptr, halo_a_ptr, halo_b_ptr,
    h, w, H, W, scale_h, scale_w, cells_per_band, inv_n_pix,
    stride_lb, stride_lc, stride_lh, stride_lw,
    stride_tb, stride_th, stride_tw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    K: tl.constexpr, K_PAD: tl.constexpr, S_H: tl.constexpr, S_W: tl.constexpr, BLOCK_X: tl.constexpr,
    KB: tl.constexpr,
):
    """grid (column strips, bands of low-res rows, B). The strip's lanes are the full-res columns of
    G = BLOCK_X / S_W low-res cells (cell c: the S_W columns whose left tap is c; the last cell also
    carries the two clamped columns of the left border, cyclically); the band walks its low-res
    rows cell row by cell row, starting one cell row above (recomputed: it only feeds the first).
    `scratch`: (8·K + 3)·BLOCK_X fp32 per program: two rows of target-class slots (2K rows), two
    flush rows (2 × 2K), the lanes' column weights (3), two tap rows (2K)."""
    strip = tl.program_id(0)
    band = tl.program_id(1)
    b = tl.program_id(2)
    n_strips = tl.num_programs(0)
    G: tl.constexpr = BLOCK_X // S_W
    l_base = logits_ptr + b.to(tl.int64) * stride_lb
    t_base = targets_ptr + b.to(tl.int64) * stride_tb
    g_base = grad_ptr + b.to(tl.int64) * stride_gb

    lane = tl.arange(0, BLOCK_X)
    grp = lane // S_W
    ox, valid_x, x0, x1, lx, wa, wb = _strip_columns(lane, strip, W, w, scale_w, S_W, G)
    kb = tl.arange(0, KB)[:, None]                            # the flush's class × cell tiles
    gi = tl.arange(0, G)[None, :]

    g0 = tl.load(gout_ptr).to(tl.float32)
    c_ce = g0 * inv_n_pix
    coef_b = coef_ptr + b * (2 * K_PAD)
    pid = (b * tl.num_programs(1) + band) * n_strips + strip
    dsc = scratch_ptr + pid.to(tl.int64) * ((8 * K + 3) * BLOCK_X)
    geo = dsc + 6 * K * BLOCK_X
    taps = dsc + (6 * K + 3) * BLOCK_X + lane
    last = tl.minimum(w - strip * G, G) - 1                    # the strip's last valid cell
    tl.store(geo + lane, wa)
    tl.store(geo + BLOCK_X + lane, wb)
    tl.store(geo + 2 * BLOCK_X + lane, tl.where(grp == last, 1.0, 0.0))
    zero = _zero_slots(dsc, lane, 2 * K, BLOCK_X)

    r_first = band * cells_per_band
    r_stop = tl.minimum(r_first + cells_per_band, h)
    c = r_first - 1
    # The horizontally interpolated low-res rows live in two scratch rows (row r in the one of
    # parity r % 2), not in 2·K registers: the registers go to the sums, and 4 CTAs fit an SM.
    i0 = tl.maximum(c, 0)
    up = taps + (i0 % 2) * (K * BLOCK_X)
    lo = taps + ((i0 + 1) % 2) * (K * BLOCK_X)
    _store_taps(up, l_base, i0, x0, x1, lx, stride_lc, stride_lh, stride_lw, K, BLOCK_X)
    _store_taps(lo, l_base, tl.minimum(i0 + 1, h - 1), x0, x1, lx, stride_lc, stride_lh, stride_lw, K, BLOCK_X)
    acc_cur = _zeros_like_taps(zero, K)
    acc_nxt = _zeros_like_taps(zero, K)
    # The band's first low-res row also takes the lower part of the cell row above (only that):
    # band 0 the S_H/2 clamped rows above the first cell row (taps of rows 0 and 1), any other band
    # the S_H rows of cell row c. One run-time loop for both: every inlined copy of `_bwd_row` adds
    # ~3K memory operations, and Triton's coalescing pass compiles in time ∝ memory operations ×
    # operations (docs/head_loss.md, "Compile time"). `while`: see the forward's note.
    u = 0
    first_row = tl.where(c < 0, 0, c * S_H + S_H // 2)
    n_rows = tl.where(c < 0, S_H // 2, S_H)
    while u < n_rows:
        acc_cur, acc_nxt = _bwd_row(first_row + u, c, acc_cur, acc_nxt, dsc, 0, up, lo, coef_b, g0, c_ce, t_base,
                                    ox, valid_x, H, scale_h, h, stride_th, stride_tw, K, K_PAD, BLOCK_X)
        u += 1
    if c >= 0:
        _store_taps(up, l_base, tl.minimum(c + 2, h - 1), x0, x1, lx, stride_lc, stride_lh, stride_lw, K, BLOCK_X)
    acc_cur = acc_nxt
    acc_nxt = _zeros_like_taps(zero, K)
    c += 1

    # One cell row per iteration; the step returns (zeroed sums for row c + 2, row c + 1's sums),
    # which trade places for the next row. The trade costs K register moves per cell row (a
    # loop-carried value keeps its registers); unrolling by two with the roles swapped avoided
    # them but doubled the code, and the compile time with it (~95 s → see docs/head_loss.md).
    while c < r_stop:
        acc_cur, acc_nxt = _bwd_cell_step(c, acc_cur, acc_nxt, taps, dsc, geo, zero, lane, kb, gi, strip, b, h, w,
                                          H, n_strips, scale_h, coef_b, g0, c_ce, l_base, t_base, g_base,
                                          halo_a_ptr, halo_b_ptr, ox, valid_x, x0, x1, lx,
                                          stride_lc, stride_lh, stride_lw, stride_th, stride_tw,
                                          stride_gc, stride_gh, stride_gw, K, K_PAD, S_H, S_W, BLOCK_X, KB, G)
        acc_cur, acc_nxt = acc_nxt, acc_cur
        c += 1


@triton.jit
def _head_loss_bwd_halo_kernel(
    halo_a_ptr, halo_b_ptr, grad_ptr,
    total, h, n_strips, cells_per_strip,
    stride_gb, stride_gc, stride_gh, stride_gw,
    K: tl.constexpr, S_W: tl.constexpr, BLOCK: tl.constexpr,
):
    """The first low-res column of every strip: its own part plus the previous strip's last-cell
    part (cyclically: strip 0 takes the last strip's, which carries the left border's columns)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)     # over B × h × n_strips × K
    mask = offs < total
    k = offs % K
    rest = offs // K
    strip = rest % n_strips
    row = rest // n_strips            # b·h + i
    i = row % h
    b = row // h
    prev = (row * n_strips + (strip + n_strips - 1) % n_strips) * K + k
    v = tl.load(halo_a_ptr + offs, mask=mask, other=0.0)
    for u in tl.static_range(S_W):
        v += tl.load(halo_b_ptr + prev * S_W + u, mask=mask, other=0.0)
    ptr = grad_ptr + b.to(tl.int64) * stride_gb + k * stride_gc + i * stride_gh + strip * cells_per_strip * stride_gw
    tl.store(ptr, _round(v, grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Configurations (the report builds every one; kernels/configs.json pins the one that runs).
# ----------------------------------------------------------------------------------------------
# (BLOCK, num_warps). Triton lays a BLOCK×K_PAD gather tile out with 32 consecutive pixels per warp
# and the warps splitting the classes, so at K_PAD = 32 each thread holds K_PAD·BLOCK/(32·num_warps)
# = 8 classes of one pixel with every config below: ≈100–130 registers, no spill on sm_80/sm_90
# (`python -m msf.profiling.report`). 16 per thread reaches 250–255 registers with channels-last logits;
# 32 per thread spills. Which one runs is pinned in kernels/configs.json.
FWD_CONFIGS = [(64, 8), (32, 4), (128, 16)]
BWD_CONFIGS = [(64, 8), (32, 4), (128, 16)]
_FINALIZE_CHUNK_BLOCK = 16
_HALO_BLOCK = 256


def _fwd_kernel():
    return _head_loss_fwd_tuned


def _bwd_kernel():
    return _head_loss_bwd_tuned


_FWD_LIST = [triton.Config({"BLOCK_P": bp}, num_warps=nw, num_stages=1) for bp, nw in FWD_CONFIGS]
_BWD_LIST = [triton.Config({"BLOCK_Q": bq}, num_warps=nw, num_stages=1) for bq, nw in BWD_CONFIGS]
# One shape class: every config suits every K ≤ 128 and any image size (kernels/configs.py).
_head_loss_fwd_tuned = PinnedKernel(
    "head_loss.fwd", _head_loss_fwd_kernel, _FWD_LIST, key=["K_PAD", "h", "w", "H", "W"],
    shape_class=lambda named: "any", allowed=lambda cls: _FWD_LIST, classes=["any"])
_head_loss_bwd_tuned = PinnedKernel(
    "head_loss.bwd", _head_loss_bwd_kernel, _BWD_LIST, key=["K_PAD", "h", "w", "H", "W"],
    shape_class=lambda named: "any", allowed=lambda cls: _BWD_LIST, classes=["any"])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
# Tests set this to fill every buffer the kernels write with NaN (−1 for integers) before a launch,
# so an element a kernel fails to write shows up instead of passing as stale memory.
POISON_OUTPUTS = False


def _empty(shape, dtype: torch.dtype, device, like: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(like) if like is not None else torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if out.dtype.is_floating_point else -1)
    return out


def _k_pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type in ("cpu", "meta") and INTERPRET:  # (meta: the cost model's trace, which runs no kernel)
        return
    raise ValueError(f"{name} is on {t.device}; the Triton kernels need a CUDA tensor "
                     "(or a CPU tensor with TRITON_INTERPRET=1 set before importing kernels)")


def _validate(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> tuple[int, int]:
    """Shape/dtype/device checks (no device sync); returns the integer scales (s_h, s_w)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError(f"logits must be a B×K×h×w tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 3:
        raise ValueError(f"targets must be a B×H×W tensor, got {getattr(targets, 'shape', type(targets))}")
    if targets.dtype not in TARGET_DTYPES:
        raise ValueError(f"targets must hold integer class ids (uint8/int16/int32/int64), got {targets.dtype}")
    B, K, h, w = logits.shape
    if targets.shape[0] != B:
        raise ValueError(f"targets batch {targets.shape[0]} != logits batch {B}")
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"logits must have 1..{MAX_CLASSES} classes, got K={K}")
    H, W = targets.shape[1:]
    if min(B, h, w, H, W) == 0:
        raise ValueError(f"empty input: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")
    if H % h or W % w:
        raise ValueError(f"targets size {H}×{W} must be an integer multiple of the logits size {h}×{w}")
    if logits.device != targets.device:
        raise ValueError(f"logits on {logits.device} but targets on {targets.device}")
    _check_device(logits, "logits")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if max(logits.numel(), targets.numel()) >= 2**31:
        raise ValueError("logits/targets with 2**31 or more elements are not supported")
    return H // h, W // w


def _window(s: int) -> int:
    """Full-res rows (columns) that can touch one low-res row: 2s, or exactly 1 when s = 1 (scale 1.0 is
    exact in fp32, so src = x). For odd s the exact count is 2s−1; the 2s-th absorbs a last-bit
    rounding of src = (x+½)·(1/s) − ½ (such a row then carries a weight of ~1e-7)."""
    return 1 if s == 1 else 2 * s


# A chunk is a whole number of this many pixels, so every BLOCK_P in the config list divides it and
# the partials layout does not depend on the config that runs.
_CHUNK_QUANTUM = max(bp for bp, _ in FWD_CONFIGS)


def _n_chunks(B: int, n_pix: int) -> tuple[int, int]:
    """(pixels per chunk, chunks per image) for the forward grid: a fixed function of the shape."""
    quanta = triton.cdiv(n_pix, _CHUNK_QUANTUM)
    want = max(1, min(quanta, _TARGET_PROGRAMS // B))
    per = triton.cdiv(quanta, want)
    return per * _CHUNK_QUANTUM, triton.cdiv(quanta, per)


# Row kernels (the fast path): K up to this many classes, as separate per-lane vectors.
FAST_MAX_K = 24
# Row-kernel programs in all (B × bands × strips), about; like _TARGET_PROGRAMS a fixed number, so
# the summation order is a function of the shape only.
_ROWS_TARGET_PROGRAMS = 512


def _rows_block(low_res_pixels: int) -> tuple[int, int, int]:
    """(BLOCK_X lanes, num_warps, target programs) of the row kernels for B·h·w low-res pixels.
    Under the interpreter a narrow strip and short bands, so that small test images still cover
    several bands. On a GPU up to _ROWS_TARGET_PROGRAMS, about one per 1024 low-res pixels: the
    per-program scratch (tens of KB) then stays a small fraction of the full-res logits a small
    input would need (tests/test_head_loss.py checks the peak memory)."""
    if configs.device_kind() == "interpreter":
        return 32, 1, 16
    return 128, 4, max(1, min(_ROWS_TARGET_PROGRAMS, low_res_pixels // 1024))


def _flush_classes(K: int, cells: int, warps: int) -> int:
    """KB: classes per KB × cells tile of the backward's flush, so that a tile holds one element per
    thread (a power of two, at most K rounded up). The flush relies on it: a thread reads and
    writes only its own element of the scratch between barriers; a tile wider than the threads
    would put several elements in one thread and more registers in the row loop. Checked here, at
    launch, so a new BLOCK_X or warp count cannot break it silently."""
    kb = max(1, min(triton.next_power_of_2(K), 32 * warps // cells))
    if cells & (cells - 1) or kb * cells > 32 * warps:
        raise RuntimeError(f"head_loss flush tile {kb}×{cells} does not fit one element per thread of {warps} "
                           "warps (BLOCK_X / S_W must be a power of two ≤ 32·num_warps)")
    return kb


def _bands(B: int, n_strips: int, n_rows: int, target: int) -> tuple[int, int]:
    """(rows per band, bands) splitting `n_rows` so that B × n_strips × bands ≈ target."""
    want = max(1, min(n_rows, target // (B * n_strips)))
    per = triton.cdiv(n_rows, want)
    return per, triton.cdiv(n_rows, per)


def _rows_path(K: int, s_h: int, s_w: int, block_x: int) -> bool:
    """Whether the row kernels take this shape: K ≤ FAST_MAX_K and power-of-two integer scales (the
    cell rows and columns then hold exactly the pixels whose taps they are; fp32 src is exact)."""
    return K <= FAST_MAX_K and _is_pow2(s_h) and _is_pow2(s_w) and 2 * s_w <= block_x


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _forward(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch forward + finalize; returns (loss 0-dim fp32, coef B×2×K_PAD fp32)."""
    B, K, h, w = logits.shape
    H, W = targets.shape[1:]
    K_PAD = _k_pad(K)
    dev = logits.device
    block_x, warps, target = _rows_block(B * h * w)
    if _rows_path(K, H // h, W // w, block_x):
        n_strips = triton.cdiv(W, block_x)
        cells, n_bands = _bands(B, n_strips, h, target)
        n_chunks = n_strips * n_bands
        part = _empty((B, n_chunks, 3, K_PAD), torch.float32, dev)
        scratch = torch.empty(B * n_chunks * 2 * K * block_x, dtype=torch.float32, device=dev)
        _head_loss_fwd_rows_kernel[(n_strips, n_bands, B)](
            logits, targets, part, scratch, h, w, H, W, h / H, w / W, cells, n_chunks,
            *logits.stride(), *targets.stride(),
            K=K, K_PAD=K_PAD, S_H=H // h, BLOCK_X=block_x, num_warps=warps, num_stages=1,
        )
    else:
        pix_per_chunk, n_chunks = _n_chunks(B, H * W)
        part = _empty((B, n_chunks, 3, K_PAD), torch.float32, dev)
        _fwd_kernel()[(n_chunks, B)](
            logits, targets, part,
            K, h, w, H, W, h / H, w / W, pix_per_chunk, n_chunks,
            *logits.stride(), *targets.stride(),
            K_PAD=K_PAD,
        )
    coef = _empty((B, 2, K_PAD), torch.float32, dev)
    loss = _empty((1,), torch.float32, dev)
    img = _empty((B, K_PAD), torch.float32, dev)
    _head_loss_finalize_kernel[(B,)](
        part, coef, img, K, n_chunks, 1.0 / (B * K), float(eps),
        K_PAD=K_PAD, CHUNK_BLOCK=_FINALIZE_CHUNK_BLOCK, num_warps=4, num_stages=1,
    )
    _head_loss_total_kernel[(1,)](
        img, loss, B, 1.0 / (B * H * W), 1.0 / (B * K), K_PAD=K_PAD, B_PAD=max(16, triton.next_power_of_2(B)),
        num_warps=1, num_stages=1,
    )
    return loss.view(()), coef


def _backward(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
              grad_out: torch.Tensor) -> torch.Tensor:
    B, K, h, w = logits.shape
    H, W = targets.shape[1:]
    s_h, s_w = H // h, W // w
    K_PAD = _k_pad(K)
    grad = _empty(None, None, None, like=logits)  # empty_like keeps channels-last; strides passed anyway
    gout = grad_out.detach().to(device=logits.device, dtype=torch.float32).reshape(1)
    block_x, warps, target = _rows_block(B * h * w)
    if _rows_path(K, s_h, s_w, block_x):
        cells = block_x // s_w
        n_strips = triton.cdiv(w, cells)
        rows, n_bands = _bands(B, n_strips, h, target)
        f32 = torch.float32
        scratch = torch.empty(B * n_bands * n_strips * (8 * K + 3) * block_x, dtype=f32, device=logits.device)
        halo_a = _empty((B, h, n_strips, K), f32, logits.device)
        halo_b = _empty((B, h, n_strips, K, s_w), f32, logits.device)
        _head_loss_bwd_rows_kernel[(n_strips, n_bands, B)](
            logits, targets, coef, gout, grad, scratch, halo_a, halo_b,
            h, w, H, W, h / H, w / W, rows, 1.0 / (B * H * W),
            *logits.stride(), *targets.stride(), *grad.stride(),
            K=K, K_PAD=K_PAD, S_H=s_h, S_W=s_w, BLOCK_X=block_x, KB=_flush_classes(K, cells, warps),
            num_warps=warps, num_stages=1,
        )
        total = B * K * h * n_strips
        _head_loss_bwd_halo_kernel[(triton.cdiv(total, _HALO_BLOCK),)](
            halo_a, halo_b, grad, total, h, n_strips, cells, *grad.stride(),
            K=K, S_W=s_w, BLOCK=_HALO_BLOCK, num_warps=4, num_stages=1,
        )
        return grad

    def grid(meta):
        return (triton.cdiv(h * w, meta["BLOCK_Q"]), B)

    _bwd_kernel()[grid](
        logits, targets, coef, gout, grad,
        K, h, w, H, W, h / H, w / W, s_h, s_w, _window(s_h), _window(s_w), 1.0 / (B * H * W),
        *logits.stride(), *targets.stride(), *grad.stride(),
        K_PAD=K_PAD,
    )
    return grad


class HeadLossFunction(torch.autograd.Function):
    """CE + Dice of bilinearly upsampled low-res logits; gradient w.r.t. the low-res logits only."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, eps: float = DEFAULT_DICE_EPS):
        _validate(logits, targets, eps)
        loss, coef = _forward(logits, targets, eps)
        ctx.save_for_backward(logits, targets, coef)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, coef = ctx.saved_tensors
        grad = _backward(logits, targets, coef, grad_out) if ctx.needs_input_grad[0] else None
        return grad, None, None


def head_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = DEFAULT_DICE_EPS) -> torch.Tensor:
    """Fused `eager_head_loss`: CE + Dice (SPEC §4) of B×K×h×w logits upsampled bilinearly
    (align_corners=False) to the B×H×W targets' size, H = s_h·h, W = s_w·w. Returns a 0-dim fp32
    loss; differentiable w.r.t. `logits`. Target ids must lie in 0..K−1 (check with
    `msf.losses.check_targets` where data enters; docs/head_loss.md)."""
    return HeadLossFunction.apply(logits, targets, float(eps) if isinstance(eps, (int, float)) else eps)


def eager_head_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = DEFAULT_DICE_EPS) -> torch.Tensor:
    """The same math in plain PyTorch (materialises the full-res logits): the reference."""
    from msf.reference import eager_head_loss as _eager
    return _eager(logits, targets, eps)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time builds for `python -m msf.profiling.report`
# ----------------------------------------------------------------------------------------------
def specialize(spec: AotSpec, tag: str, unit_strides) -> AotSpec:
    """`spec` with the named stride arguments fixed to 1, as Triton specialises them at launch."""
    ones = [k for k in unit_strides if k in spec.signature]
    return AotSpec(name=spec.name.replace("[", f"[{tag},", 1), fn=spec.fn,
                   signature={k: v for k, v in spec.signature.items() if k not in ones},
                   constexprs={**spec.constexprs, **{k: 1 for k in ones}},
                   num_warps=spec.num_warps, num_stages=spec.num_stages)


# the integer arguments of the row kernels that are not multiples of 16 at the model's shape (19
# classes channels-last: the logits' and their gradient's pixel strides; the halo kernel's strip
# count); every other pointer and integer is, and the launcher marks it so
_MODEL_NOT_DIVISIBLE = frozenset({"stride_lw", "stride_gw", "n_strips"})


def at_model_shape(spec: AotSpec) -> AotSpec:
    """`spec` with the divisibility Triton's launcher gives a launch at the model's shape (K = 19,
    4× upsampling, 128² logits): the row kernels', which serve only that shape's kind."""
    return dataclasses.replace(spec, attrs=divisibility_attrs(spec.fn, spec.signature, _MODEL_NOT_DIVISIBLE))


def _aot_specs() -> tuple[list[AotSpec], list[AotSpec]]:
    """(AOT_SPECS, AOT_SPECS_SLOW): what `msf.profiling.report` builds, in CI and beyond."""
    specs, slow = [], []
    # Every config for bf16 (the model's AMP dtype), the first config for fp32 and fp16.
    for ldt, lname in (("bf16", "bf16"), ("fp32", "fp32"), ("fp16", "fp16")):
        n_cfg = None if ldt == "bf16" else 1
        for bp, nw in FWD_CONFIGS[:n_cfg]:
            specs.append(AotSpec(
                name=f"head_loss_fwd[{lname},u8,BLOCK_P={bp},w{nw}]", fn=_head_loss_fwd_kernel,
                signature={"logits_ptr": f"*{ldt}", "targets_ptr": "*u8", "part_ptr": "*fp32",
                           **{k: "i32" for k in ("K", "h", "w", "H", "W")},
                           "scale_h": "fp32", "scale_w": "fp32", "pix_per_chunk": "i32",
                           "n_chunks": "i32",
                           **{k: "i32" for k in ("stride_lb", "stride_lc", "stride_lh", "stride_lw",
                                                 "stride_tb", "stride_th", "stride_tw")}},
                constexprs={"K_PAD": 32, "BLOCK_P": bp}, num_warps=nw, num_stages=1))
        for bq, nw in BWD_CONFIGS[:n_cfg]:
            specs.append(AotSpec(
                name=f"head_loss_bwd[{lname},u8,BLOCK_Q={bq},w{nw}]", fn=_head_loss_bwd_kernel,
                signature={"logits_ptr": f"*{ldt}", "targets_ptr": "*u8", "coef_ptr": "*fp32",
                           "gout_ptr": "*fp32", "grad_ptr": f"*{ldt}",
                           **{k: "i32" for k in ("K", "h", "w", "H", "W")},
                           "scale_h": "fp32", "scale_w": "fp32", "s_h": "i32", "s_w": "i32", "win_h": "i32", "win_w": "i32",
                           "inv_n_pix": "fp32",
                           **{k: "i32" for k in ("stride_lb", "stride_lc", "stride_lh", "stride_lw",
                                                 "stride_tb", "stride_th", "stride_tw",
                                                 "stride_gb", "stride_gc", "stride_gh", "stride_gw")}},
                constexprs={"K_PAD": 32, "BLOCK_Q": bq}, num_warps=nw, num_stages=1))
    # int64 targets (the other supported layout the model may feed)
    specs.append(AotSpec(
        name=f"head_loss_fwd[bf16,i64,BLOCK_P={FWD_CONFIGS[0][0]},w{FWD_CONFIGS[0][1]}]", fn=_head_loss_fwd_kernel,
        signature={**specs[0].signature, "targets_ptr": "*i64"},
        constexprs={"K_PAD": 32, "BLOCK_P": FWD_CONFIGS[0][0]}, num_warps=FWD_CONFIGS[0][1], num_stages=1))
    specs.append(AotSpec(
        name=f"head_loss_bwd[bf16,i64,BLOCK_Q={BWD_CONFIGS[0][0]},w{BWD_CONFIGS[0][1]}]", fn=_head_loss_bwd_kernel,
        signature={**[s for s in specs if s.fn is _head_loss_bwd_kernel][0].signature, "targets_ptr": "*i64"},
        constexprs={"K_PAD": 32, "BLOCK_Q": BWD_CONFIGS[0][0]}, num_warps=BWD_CONFIGS[0][1], num_stages=1))
    # The first bf16 configs again as Triton specialises them at launch for contiguous NCHW and for
    # channels-last logits (a stride equal to 1 becomes a compile-time constant).
    firsts = [next(sp for sp in specs if sp.name.startswith(prefix))
              for prefix in ("head_loss_fwd[bf16,u8", "head_loss_bwd[bf16,u8")]
    for spec in firsts:
        for layout, ones in (("nchw", ("stride_lw", "stride_tw", "stride_gw")),
                             ("nhwc", ("stride_lc", "stride_tw", "stride_gc"))):
            specs.append(specialize(spec, layout, ones))
    specs.append(AotSpec(
        name="head_loss_finalize[K_PAD=32]", fn=_head_loss_finalize_kernel,
        signature={"part_ptr": "*fp32", "coef_ptr": "*fp32", "img_ptr": "*fp32", "K": "i32", "n_chunks": "i32",
                   "inv_bk": "fp32", "eps": "fp32"},
        constexprs={"K_PAD": 32, "CHUNK_BLOCK": _FINALIZE_CHUNK_BLOCK}, num_warps=4, num_stages=1))
    specs.append(AotSpec(
        name="head_loss_total[K_PAD=32,B_PAD=32]", fn=_head_loss_total_kernel,
        signature={"img_ptr": "*fp32", "loss_ptr": "*fp32", "B": "i32", "inv_n_pix": "fp32", "inv_bk": "fp32"},
        constexprs={"K_PAD": 32, "B_PAD": 32}, num_warps=1, num_stages=1))
    # Row kernels at the model's K = 19, s = 4, for each logits dtype, channels-last (the model's
    # layout: unit class and target-column strides become constants) and NCHW.
    i32 = "i32"
    fwd_sig = {"logits_ptr": None, "targets_ptr": "*u8", "part_ptr": "*fp32", "scratch_ptr": "*fp32",
               **{k: i32 for k in ("h", "w", "H", "W")}, "scale_h": "fp32", "scale_w": "fp32",
               "cells_per_band": i32, "n_chunks": i32,
               **{k: i32 for k in ("stride_lb", "stride_lc", "stride_lh", "stride_lw", "stride_tb", "stride_th",
                                   "stride_tw")}}
    bwd_sig = {"logits_ptr": None, "targets_ptr": "*u8", "coef_ptr": "*fp32", "gout_ptr": "*fp32",
               "grad_ptr": None, "scratch_ptr": "*fp32", "halo_a_ptr": "*fp32", "halo_b_ptr": "*fp32",
               **{k: i32 for k in ("h", "w", "H", "W")}, "scale_h": "fp32", "scale_w": "fp32",
               "cells_per_band": i32, "inv_n_pix": "fp32",
               **{k: i32 for k in ("stride_lb", "stride_lc", "stride_lh", "stride_lw", "stride_tb", "stride_th",
                                   "stride_tw", "stride_gb", "stride_gc", "stride_gh", "stride_gw")}}
    rows = dict(K=19, K_PAD=32, S_H=4, BLOCK_X=128)
    for ldt in ("bf16", "fp32", "fp16"):
        for layout, ones in (("nhwc", ("stride_lc", "stride_tw", "stride_gc")),
                             ("nchw", ("stride_lw", "stride_tw", "stride_gw"))):
            specs.append(at_model_shape(specialize(AotSpec(
                name=f"head_loss_fwd_rows[{ldt},u8,K=19,s=4,BLOCK_X=128,w4]", fn=_head_loss_fwd_rows_kernel,
                signature={**fwd_sig, "logits_ptr": f"*{ldt}"}, constexprs=rows, num_warps=4, num_stages=1),
                layout, ones)))
            bwd_rows = at_model_shape(specialize(AotSpec(
                name=f"head_loss_bwd_rows[{ldt},u8,K=19,s=4,BLOCK_X=128,w4]", fn=_head_loss_bwd_rows_kernel,
                signature={**bwd_sig, "logits_ptr": f"*{ldt}", "grad_ptr": f"*{ldt}"},
                constexprs={**rows, "S_W": 4, "KB": _flush_classes(19, 128 // 4, 4)}, num_warps=4,
                num_stages=1), layout, ones))
            # ptxas needs about a minute for each backward row kernel: CI builds the model's one
            # (bf16, channels-last), `python -m msf.profiling.report` all of them
            (specs if (ldt, layout) == ("bf16", "nhwc") else slow).append(bwd_rows)
        specs.append(at_model_shape(AotSpec(
            name=f"head_loss_bwd_halo[{ldt},K=19,s=4]", fn=_head_loss_bwd_halo_kernel,
            signature={"halo_a_ptr": "*fp32", "halo_b_ptr": "*fp32", "grad_ptr": f"*{ldt}",
                       **{k: i32 for k in ("total", "h", "n_strips", "cells_per_strip", "stride_gb", "stride_gc",
                                           "stride_gh", "stride_gw")}},
            constexprs={"K": 19, "S_W": 4, "BLOCK": _HALO_BLOCK}, num_warps=4, num_stages=1)))
    return specs, slow


AOT_SPECS, AOT_SPECS_SLOW = _aot_specs()
