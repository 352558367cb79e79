"""Fused attention half of a transformer block: LayerNorm, the key/value path and the attention sublayer.

    xn   = LN1(x)                                   x, out: B×N×C tokens of an h×w map (N = h·w)
    red  = Conv_{R×R, stride R}(xn) + b_sr          B×M×C, M = (h/R)(w/R)     (R > 1 only)
    kin  = LN_sr(red)        (R > 1);  kin = xn     (R = 1)
    k, v = kin W_kvᵀ + b_kv                         B×M×C each: the halves of one B×M×2C tensor
    out  = x + softmax((xn wqᵀ + bq) kᵀ/√C) v woᵀ + bo

A stage's first block can take the patch embedding's LayerNorm in (`embed_norm`): x is then the
convolution's B×C×h×w map (any dense layout) and the block's input x = LN_pe(map) is formed by the kv
kernels from the map's token rows, its backward taken there too (docs/attention_block.md, "A stage's
first block takes the patch embedding's LayerNorm in").

It computes what the model's eager block computes (`msf.reference.eager_attention_block`), in one
dtype (fp32 / bf16 / fp16) or in autocast's mixed precision: fp32 x and master weights, every
product in bf16 / fp16, each value rounded where autocast's eager ops round it (LN outputs on their
way into the convolution and the Linears, the convolution's and the Linears' outputs, each gradient
a 16-bit op hands back). The R×R stride-R convolution reads non-overlapping patches, so it is a GEMM
over them: each token of the map belongs to exactly one patch, and the kernels visit it once.

Kernels (no atomics; weight gradients through per-chunk fp32 partials and one fixed-order sum):
- `_kv_fwd_kernel`: per tile of patches, for each of the R² window positions: the tokens' LayerNorm
  (statistics on chip), xn stored in the compute dtype (the sublayer's input, kept for the
  backward) and accumulated into the convolution; then + b_sr, LN_sr and the kv Linear: red and kin
  (B×M×C) and kv (B×M×2C) written. R = 1: LN1 and the kv Linear only. PE: each token row first
  normalised from the map (LN_pe), and LN_pe's (mean, rstd) a token written (B·N×2 fp32), not x.
- the attention sublayer's kernels (`msf.kernels.attention_sublayer`) on xn, x (the residual), k, v
  (PE: the residual formed again from the map and those statistics in its epilogue, `MapResidual`):
  forward, and its backward up to ∂L/∂xn from the q path (the sublayer's dx), dK, dV, dWq ... dbo.
- `_kv_bwd_kernel`: per tile of patches, dkin = dK W_k + dV W_v, LN_sr's backward to d red (stored
  for dW_sr), then per window position the convolution's input gradient added to the q path's,
  LN1's backward and the residual's gradient: dx written once (PE: x formed again from the map, and
  LN_pe's backward taken before the store: d map). LN partial sums per program.
- the sublayer's `_sub_wgrad_kernel`, once for every weight of the block (three groups of one launch):
  dWq, dWo (the sublayer's pair), dW_k, dW_v (dK, dV against kin) and dW_sr (d red against the
  patches of xn, gathered from the token tensor in the kernel), each with its bias.

docs/attention_block.md: the backward's math, the rounding points, the bytes against eager.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from msf.kernels import attention as _core
from msf.kernels import attention_sublayer as _sub
from msf.kernels import configs
from msf.kernels._common import (INTERPRET, AotSpec, _ln_grad, _ln_hat, _ln_stats, _round, _vec, products_dtype,
                                row_chunks)
from msf.kernels.attention import _aot_spec, _mm
from msf.kernels.ffn_sublayer import _CDT, _rounded, _to_compute
from msf.kernels.partial_sums import sum_partials
from msf.reference import AttentionBlockParams, EmbedNorm, eager_attention_block, eager_map_layer_norm

# the residual stream's dtype as the kv kernel's XDT constexpr (the rounding of LN_pe's output)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

__all__ = ["attention_block", "AttentionBlockFunction", "AOT_SPECS", "compute_dtype", "embed_fused", "fused_supported"]

# (BLOCK_M patches, num_warps) per kernel, product dtype class ("16": bf16 / fp16, also autocast's
# mix; "fp32": tf32x3 products) and C block: 256 programs at the model's B = 32 (8192 patches every
# stage), about two a SM on an H100; 512 at C = 192. Each built for sm_80 and sm_90 without spills
# (`python -m msf.profiling.report --module msf.kernels.attention_block`). The forward at C 128 takes 4
# warps since 2026-12-06 (cost model v3: H100 19.6 -> 16.0 µs a stage-3 block, A100 34.2 -> 26.9; 232 /
# 255 registers, 2 CTAs an SM, no spill); the backward at C 128 16 patches at 4 warps since later that
# day (model v3.1, a stage-3 block: H100 123.7 -> 122.2 µs, A100 207.9 -> 198.5; 252-255 registers, no
# spill). Left out for spilling: 32 patches at 4 warps at C 128 (backward, 240-256 B)
# and 32 patches at C 192 (forward, 200 B; backward at 8 warps, 8 B on sm_80); fp32 above C = 64 (the C×C
# tf32x3 operands spill kilobytes at every tile tried: those shapes compose the eager pieces around
# the fused sublayer instead). The interpreter runs these same tiles. Both kernels launch with one
# stage, as the report builds them: at the default three Triton pipelined the backward's patch loop
# into an 8 B spill on sm_90 at C = 32, for no predicted gain anywhere (2026-12-05). The fp32 forward at
# C 64 takes 16 patches since W_sr is read in its channels-last order (2026-12-06: 32 patches spilled
# 8 B on sm_80 with the longer row stride; fp32 is not the model's mix).
_CONFIGS: dict[str, dict[str, dict[int, tuple[int, int]]]] = {
    "fwd": {"16": {32: (32, 4), 64: (32, 4), 128: (32, 4), 256: (16, 8)}, "fp32": {32: (32, 4), 64: (16, 4)}},
    "bwd": {"16": {32: (32, 4), 64: (32, 4), 128: (16, 4), 256: (16, 8)}, "fp32": {32: (32, 4), 64: (32, 8)}},
}


# (BLOCK_M, num_warps) of the embedding-norm builds where they differ from `_CONFIGS`' 16-bit entry, by
# C block and device kind ("*": every kind; `configs.device_kind`), from the cost model (v3.1, a stage's
# first block, 2026-12-06): the forward at C 32 takes 16 patches at 4 warps (H100 73.5 -> 56.9 µs; 2 warps
# on sm_80, A100 96.4 -> 91.7, until the forward stored LN_pe's statistics: 4 B of spill), and at C 128
# 8 warps (4 spilled 16 B on sm_90 under autocast); the backward at C 32 takes 64 patches at 16 warps
# on sm_90 (126.1 -> 114.1 µs; (32, 8) 97.0 spilled 8 B there) and 16 patches at 4 warps on sm_80 (A100
# 240.2 -> 188.6), at C 64 16 patches (H100 55.5 -> 47.1, A100 103.6 -> 70.2)
_EMBED_CONFIGS: dict[str, dict[int, dict[str, tuple[int, int]]]] = {
    "fwd": {32: {"*": (16, 4)}, 128: {"*": (32, 8)}},
    "bwd": {32: {"sm_90": (64, 16), "sm_80": (16, 4)}, 64: {"*": (16, 4)}},
}


def _block_c(c: int) -> int:
    return max(32, triton.next_power_of_2(c))


def embed_fused(cdt: torch.dtype) -> bool:
    """Whether the kernels form the block input from the patch embedding's map where they serve the
    block with products in `cdt` (`fused_supported`): 16-bit only, the fp32 builds' tf32x3 operands
    leave no registers for it; every C of a 16-bit block builds without spills (`AOT_SPECS`)."""
    return cdt != torch.float32


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _patch_tokens(offs_m, p, MW, W_TOK, R: tl.constexpr):
    """Token rows (of the B·N×C tensor) at window position p = i·R + j of patches offs_m, the patches
    numbered row by row over the images stacked as one tall map (MW = w/R patches a row)."""
    return ((offs_m // MW) * R + p // R) * W_TOK + (offs_m % MW) * R + p % R


@triton.jit
def _embed_setup(PEW, PEB, offs_m, offs_c, mask_c, MW, MH, stride_b, stride_y, stride_x, R: tl.constexpr,
                 PE: tl.constexpr):
    """With PE: (γ_pe, β_pe, the map offset of each patch's window position 0), the offsets of the patches
    offs_m in the patch embedding's map (patch rows counted over the images stacked, MH an image, MW
    patches a row); the position-p token is (p // R)·stride_y + (p % R)·stride_x further. Without PE
    placeholders the kernels never read."""
    if PE:
        patch_row = offs_m // MW
        base = (patch_row // MH) * stride_b + (patch_row % MH) * R * stride_y + (offs_m % MW) * R * stride_x
        gamma = _vec(PEW, offs_c, mask_c)
        beta = _vec(PEB, offs_c, mask_c)
    else:
        gamma = offs_c
        beta = offs_c
        base = offs_m
    return gamma, beta, base


@triton.jit
def _map_rows(map_base, p, stride_y, stride_x, R: tl.constexpr, PE: tl.constexpr):
    """The map offsets of the window-position-p tokens of the patches whose position-0 offsets are
    `map_base` (with PE; without, the placeholder itself)."""
    if PE:
        rows = map_base + (p // R) * stride_y + (p % R) * stride_x
    else:
        rows = map_base
    return rows


@triton.jit
def _block_input(X, XDT: tl.constexpr, rows, map_rows, offs_c, mask, pe_gamma, pe_beta, C, stride_xc, eps_pe,
                 PE: tl.constexpr):
    """(x, x̂_pe, mean_pe, rstd_pe): the block input x in fp32, zero outside `mask`. Without PE a load of X
    (B·N×C) at element offsets `rows`. With PE, x = LN_pe(map) from the map's rows at offsets `map_rows`,
    rounded to the residual stream's dtype XDT as the patch embedding's norm writes it, and LN_pe's x̂,
    mean and rstd (without PE: x and placeholders)."""
    if PE:
        m = tl.load(X + map_rows[:, None] + offs_c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        xhat_pe, mean_pe, rstd_pe = _ln_stats(m, mask, C, eps_pe)
        x = tl.where(mask, _round(xhat_pe * pe_gamma[None, :] + pe_beta[None, :], XDT).to(tl.float32), 0.0)
    else:
        x = tl.load(X + rows, mask=mask, other=0.0).to(tl.float32)
        xhat_pe = x
        mean_pe = x
        rstd_pe = x
    return x, xhat_pe, mean_pe, rstd_pe


@triton.jit
def _store_stats(STATS, tok, mean, rstd, mask):
    """LN_pe's (mean, rstd) of tokens `tok` into their rows of STATS (B·N×2 fp32)."""
    tl.store(STATS + tok * 2, mean, mask=mask)
    tl.store(STATS + tok * 2 + 1, rstd, mask=mask)


@triton.jit
def _square(W, offs_a, offs_b, mask_a, mask_b, row_stride):
    """W[a, b] of a matrix with unit column stride as an A × B block (compute dtype as stored)."""
    return tl.load(W + offs_a[:, None] * row_stride + offs_b[None, :], mask=mask_a[:, None] & mask_b[None, :],
                   other=0.0)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kv_fwd_kernel(
    X, PEW, PEB, STATS, LNW, LNB, WSR, BSR, SNW, SNB, WKV, BKV, XN, RED, KIN, KV,
    P, MW, MH, W_TOK, C, stride_xb, stride_xc, stride_xy, stride_xx, eps_pe, eps, eps_sr,
    R: tl.constexpr, PE: tl.constexpr, XDT: tl.constexpr, CDT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN: tl.constexpr,
):
    """xn (B·N×C), red, kin (P×C; R > 1) and kv (P×2C) for BLOCK_M of the P = B·M patches. X: B·N×C
    (fp32 or the compute dtype); WSR: C×R²×C (out, window position, in: the channels-last order of
    W_sr, so that a channels-last master is cast without a transposition) and WKV: 2C×C, both in the
    compute dtype (`compute_weights`); BSR, BKV in it or fp32 masters (rounded on load, as autocast's
    cast rounds them); the LayerNorm parameters in any float dtype. PE: X is the patch embedding's
    B×C×h×w map (its strides; MH = h/R patch rows an image), the block input x = LN_pe(X) (γ PEW,
    β PEB; rounded to XDT, the residual stream's dtype) is formed here, and LN_pe's (mean, rstd) of
    every token written to STATS (B·N×2 fp32): the sublayer forms x again from them for its residual."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = (offs_m < P) | EVEN  # EVEN (`_whole_tiles`): constant true, every mask and select folded away
    mask_c = (offs_c < C) | EVEN
    mask = mask_m[:, None] & mask_c[None, :]
    gamma = _vec(LNW, offs_c, mask_c)
    beta = _vec(LNB, offs_c, mask_c)
    pe_gamma, pe_beta, map_base = _embed_setup(PEW, PEB, offs_m, offs_c, mask_c, MW, MH, stride_xb, stride_xy,
                                               stride_xx, R, PE)
    if R == 1:  # patches are tokens
        x, _xhat_pe, mean_pe, rstd_pe = _block_input(X, XDT, offs_m[:, None] * C + offs_c[None, :], map_base,
                                                     offs_c, mask, pe_gamma, pe_beta, C, stride_xc, eps_pe, PE)
        if PE:
            _store_stats(STATS, offs_m, mean_pe, rstd_pe, mask_m)
        xhat, _rstd = _ln_hat(x, mask, C, eps)
        kin = _to_compute(xhat * gamma[None, :] + beta[None, :], CDT)
        tl.store(XN + offs_m[:, None] * C + offs_c[None, :], kin, mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for p in range(0, R * R):
            tok = _patch_tokens(offs_m, p, MW, W_TOK, R)
            x, _xhat_pe, mean_pe, rstd_pe = _block_input(X, XDT, tok[:, None] * C + offs_c[None, :],
                                                         _map_rows(map_base, p, stride_xy, stride_xx, R, PE), offs_c,
                                                         mask, pe_gamma, pe_beta, C, stride_xc, eps_pe, PE)
            if PE:
                _store_stats(STATS, tok, mean_pe, rstd_pe, mask_m)
            xhat, _rstd = _ln_hat(x, mask, C, eps)
            xn = _to_compute(xhat * gamma[None, :] + beta[None, :], CDT)
            tl.store(XN + tok[:, None] * C + offs_c[None, :], xn, mask=mask)
            acc += _mm(xn, _square(WSR + p * C, offs_c, offs_c, mask_c, mask_c, R * R * C).trans(), CDT == 0)
        red = _to_compute(acc + _rounded(_vec(BSR, offs_c, mask_c), CDT)[None, :], CDT)  # the convolution's output
        tl.store(RED + offs_m[:, None] * C + offs_c[None, :], red, mask=mask)
        rhat, _rstd_sr = _ln_hat(tl.where(mask, red.to(tl.float32), 0.0), mask, C, eps_sr)
        kin = _to_compute(rhat * _vec(SNW, offs_c, mask_c)[None, :] + _vec(SNB, offs_c, mask_c)[None, :], CDT)
        tl.store(KIN + offs_m[:, None] * C + offs_c[None, :], kin, mask=mask)
    for half in tl.static_range(2):  # k = kin W_kv[:C]ᵀ + b_kv[:C], then v from the other half
        offs_o = half * C + offs_c
        y = _mm(kin, _square(WKV, offs_o, offs_c, mask_c, mask_c, C).trans(), CDT == 0)
        y = _to_compute(y + _rounded(_vec(BKV, offs_o, mask_c), CDT)[None, :], CDT)
        tl.store(KV + offs_m[:, None] * (2 * C) + offs_o[None, :], y, mask=mask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# Given dK, dV (the attention core's), ∂L/∂xn from the q path (dXNq, the sublayer's dx) and g = ∂L/∂out:
#   dkin = dK W_k + dV W_v                                  (rounded: a 16-bit Linear's input gradient)
#   R > 1:  r̂ = LN_sr's x̂ of red (recomputed from the saved red)
#           dred = rstd_sr (γ_sr∘dkin − mean(γ_sr∘dkin) − r̂ mean(γ_sr∘dkin∘r̂))   (rounded; stored)
#           dγ_sr = Σ dkin∘r̂,  dβ_sr = Σ dkin
#           per window position p:  dXNkv_p = dred W_sr[:, :, p]    (rounded: the conv's input gradient)
#   R = 1:  dXNkv = dkin
#   dxn = dXNq + dXNkv                                      (autograd's sum; rounded in a 16-bit model)
#   x̂ = LN1's x̂ of x (recomputed),  dx = g + rstd (γ∘dxn − mean(γ∘dxn) − x̂ mean(γ∘dxn∘x̂))
#   dγ = Σ dxn∘x̂,  dβ = Σ dxn
# PE (x = LN_pe(map), recomputed from the map with its x̂_pe, rstd_pe): dx rounded to the residual
# stream's dtype (the gradient autograd holds for x), then LN_pe's backward
#   dmap = rstd_pe (γ_pe∘dx − mean(γ_pe∘dx) − x̂_pe mean(γ_pe∘dx∘x̂_pe))   (in the map's dtype and strides)
#   dγ_pe = Σ dx∘x̂_pe,  dβ_pe = Σ dx
# dW_k = dKᵀ kin, db_k = Σ dK (likewise v), dW_sr[:, (i, j, c)] = dredᵀ patches(xn), db_sr = Σ dred:
# `_sub_wgrad_kernel` afterwards. The LN sums: per program into PART ([dγ | dβ | dγ_sr | dβ_sr |
# dγ_pe | dβ_pe], the R > 1 and PE parts where they exist).
@triton.jit
def _kv_bwd_kernel(
    X, PEW, PEB, LNW, WSR, RED, SNW, WKV, DK, DV, DXNQ, G, DX, DRED, PART,
    P, MW, MH, W_TOK, C, stride_xb, stride_xc, stride_xy, stride_xx, eps_pe, eps, eps_sr,
    R: tl.constexpr, PE: tl.constexpr, CDT: tl.constexpr, ROUND_SUMS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN: tl.constexpr,
):
    """dx (B·N×C, X's dtype) and, for R > 1, dred (P×C, compute dtype) for BLOCK_M patches; PART row
    pid: 4·C fp32 (2·C for R = 1; 2·C more with PE). DK, DV: P×C; DXNQ: B·N×C (compute dtype); G:
    B·N×C. WSR, WKV, PE, the map and its strides as in `_kv_fwd_kernel`; with PE, DX is d map in the
    map's dtype and strides. ROUND_SUMS: the sums a 16-bit model's autograd forms in 16 bits (the two
    gradients of xn; LN1's dx plus g)."""
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = (offs_m < P) | EVEN  # EVEN (`_whole_tiles`): constant true, every mask and select folded away
    mask_c = (offs_c < C) | EVEN
    mask = mask_m[:, None] & mask_c[None, :]
    tile = offs_m[:, None] * C + offs_c[None, :]
    dkin = _mm(tl.load(DK + tile, mask=mask, other=0.0), _square(WKV, offs_c, offs_c, mask_c, mask_c, C), CDT == 0)
    dkin += _mm(tl.load(DV + tile, mask=mask, other=0.0), _square(WKV + C * C, offs_c, offs_c, mask_c, mask_c, C),
                CDT == 0)
    dkin = _rounded(dkin, CDT)
    gamma = _vec(LNW, offs_c, mask_c)
    part_pe = 2 * C if R == 1 else 4 * C  # where the PE sums start in a PART row
    if PE:
        part = PART + pid * (part_pe + 2 * C)
    else:
        part = PART + pid * part_pe
    dgamma = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    dbeta = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    pe_gamma, pe_beta, map_base = _embed_setup(PEW, PEB, offs_m, offs_c, mask_c, MW, MH, stride_xb, stride_xy,
                                               stride_xx, R, PE)
    if PE:  # Σ dx∘x̂_pe, Σ dx: per element at C ≤ 32 (64 window positions: a column sum each cost more than
        # the registers, H100 126 against 156 µs a stage-1 block), else a column sum a position (per-element
        # accumulators spilled at C 64 and 128)
        if BLOCK_C <= 32:
            dgamma_pe = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
            dbeta_pe = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        else:
            dgamma_pe = tl.zeros([BLOCK_C], tl.float32)
            dbeta_pe = tl.zeros([BLOCK_C], tl.float32)
    if R > 1:
        rhat, rstd_sr = _ln_hat(tl.load(RED + tile, mask=mask, other=0.0).to(tl.float32), mask, C, eps_sr)
        dred = _to_compute(_ln_grad(dkin, rhat, rstd_sr, _vec(SNW, offs_c, mask_c), mask, C), CDT)
        tl.store(DRED + tile, dred, mask=mask)
        tl.store(part + 2 * C + offs_c, tl.sum(dkin * rhat, 0), mask=mask_c)
        tl.store(part + 3 * C + offs_c, tl.sum(dkin, 0), mask=mask_c)
    for p in range(0, R * R):
        if R == 1:
            tok = offs_m
            dxn = dkin
        else:
            tok = _patch_tokens(offs_m, p, MW, W_TOK, R)
            dxn = _rounded(_mm(dred, _square(WSR + p * C, offs_c, offs_c, mask_c, mask_c, R * R * C), CDT == 0),
                           CDT)
        rows = tok[:, None] * C + offs_c[None, :]
        dxn += tl.load(DXNQ + rows, mask=mask, other=0.0).to(tl.float32)
        if ROUND_SUMS:
            dxn = _rounded(dxn, CDT)
        map_rows = _map_rows(map_base, p, stride_xy, stride_xx, R, PE)
        x, xhat_pe, _mean_pe, rstd_pe = _block_input(X, G.dtype.element_ty, rows, map_rows, offs_c, mask, pe_gamma,
                                                     pe_beta, C, stride_xc, eps_pe, PE)
        xhat, rstd = _ln_hat(x, mask, C, eps)
        dx = _ln_grad(dxn, xhat, rstd, gamma, mask, C)
        if ROUND_SUMS:
            dx = _rounded(dx, CDT)
        dx += tl.load(G + rows, mask=mask, other=0.0).to(tl.float32)
        if PE:  # on through LN_pe, from the gradient of x as the residual stream's dtype holds it
            dx = tl.where(mask, _round(dx, G.dtype.element_ty).to(tl.float32), 0.0)
            dmap = _ln_grad(dx, xhat_pe, rstd_pe, pe_gamma, mask, C)
            tl.store(DX + map_rows[:, None] + offs_c[None, :] * stride_xc, _round(dmap, DX.dtype.element_ty),
                     mask=mask)
            if BLOCK_C <= 32:
                dgamma_pe += dx * xhat_pe
                dbeta_pe += dx
            else:
                dgamma_pe += tl.sum(dx * xhat_pe, 0)
                dbeta_pe += tl.sum(dx, 0)
        else:
            tl.store(DX + rows, _round(dx, DX.dtype.element_ty), mask=mask)
        dgamma += dxn * xhat
        dbeta += tl.where(mask, dxn, 0.0)
    tl.store(part + offs_c, tl.sum(dgamma, 0), mask=mask_c)
    tl.store(part + C + offs_c, tl.sum(dbeta, 0), mask=mask_c)
    if PE:
        if BLOCK_C <= 32:
            dgamma_pe = tl.sum(dgamma_pe, 0)
            dbeta_pe = tl.sum(dbeta_pe, 0)
        tl.store(part + part_pe + offs_c, dgamma_pe, mask=mask_c)
        tl.store(part + part_pe + C + offs_c, dbeta_pe, mask=mask_c)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _new(shape, device, dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _launch(kernel: str, c: int, cdt: torch.dtype, embed_kind: str | None = None) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_M, num_warps) of kv kernel `kernel` ("fwd" / "bwd") at C channels, products in
    `cdt`; `embed_kind`: the build that takes the patch embedding's norm in, on that device kind
    (`_EMBED_CONFIGS`)."""
    block_c = _block_c(c)
    if embed_kind is not None:
        by_kind = _EMBED_CONFIGS[kernel].get(block_c, {})
        chosen = by_kind.get(embed_kind, by_kind.get("*"))
        if chosen is not None:
            return (block_c, *chosen)
    return (block_c, *_CONFIGS[kernel]["fp32" if cdt == torch.float32 else "16"][block_c])


def _whole_tiles(patches: int, c: int, block_m: int, block_c: int) -> bool:
    """The kv kernels' EVEN: every program's BLOCK_M patches exist and C fills the channel block, so
    they need no mask (the model's stages 1-3: 8192 patches, C = 32, 64, 128; the row and channel
    selects were 8-11 % of the issue-bound kernels' instructions)."""
    return patches % block_m == 0 and c == block_c


def compute_weights(sr_w, kv_w, wq, wo, cdt: torch.dtype) -> tuple:
    """The block's weight matrices as its kernels read them, in the compute dtype: W_sr as C×R²×C
    (out, window position, in: its channels-last order, the model's, so a channels-last master needs
    no transposition; None for R = 1), W_kv, wq, wo. Under autocast one launch makes all four
    (`casts.cast_all`; autocast's own casts are a launch each), otherwise a W_sr of another layout
    is the one copy; the forward makes them and saves them for the backward, which makes none. The
    biases are rounded on load."""
    return tuple(_sub.compute_weights(cdt, None if sr_w is None else sr_w.permute(0, 2, 3, 1), kv_w, wq, wo))


def _geometry(x, pe, hw: tuple[int, int], ratio: int) -> tuple:
    """(B, N, C, MW, MH, the map's (image, channel, row, column) strides) of the block input: B×N×C
    tokens, or with `pe` the patch embedding's B×C×h×w map (strides as the tokens', seen as a
    channels-last map, without it: the kernels then never read them)."""
    h, w = hw
    if pe is None:
        b, n, c = x.shape
        strides = (n * c, 1, w * c, c)
    else:
        b, c = x.shape[:2]
        n = h * w
        strides = x.stride()
    return b, n, c, w // ratio, h // ratio, strides


def _forward(x, ln_w, ln_b, sr_w, sr_b, srn_w, srn_b, kv_w, kv_b, wq, bq, wo, bo, hw: tuple[int, int], ratio: int,
             eps: float, eps_sr: float, cdt: torch.dtype, pe: tuple | None = None):
    """x: B×N×C contiguous; parameters contiguous (W_sr: any strides), as given (fp32 masters or `cdt`).
    With `pe` = (γ_pe, β_pe, eps_pe, the residual stream's dtype), x is the patch embedding's dense
    B×C×h×w map and the block's input is LN_pe(x), formed by the kv kernel (`_kv_fwd_kernel`'s PE). Returns out (the
    residual stream's dtype) and what the backward needs: xn (B×N×C), red, kin (B·M×C; None for R =
    1), kv (B×M×2C), all in `cdt`, the sublayer's O, lse, and `compute_weights`' four matrices."""
    weights = wsr, wkv, wq_c, wo_c = compute_weights(sr_w, kv_w, wq, wo, cdt)
    b, n, c, mw, mh, strides = _geometry(x, pe, hw, ratio)
    m = mh * mw
    dev = x.device
    xn = _new((b, n, c), dev, cdt)
    kv = _new((b, m, 2 * c), dev, cdt)
    red = kin = None
    if ratio > 1:
        red, kin = _new((b * m, c), dev, cdt), _new((b * m, c), dev, cdt)
    block_c, block_m, warps = _launch("fwd", c, cdt, None if pe is None else configs.device_kind(dev))
    unused = xn  # pointer arguments a build never reads
    pe_w, pe_b, eps_pe = (unused, unused, 0.0) if pe is None else pe[:3]
    # with PE, LN_pe's per-token statistics: the sublayer forms the residual x = LN_pe(map) from them
    # instead of reading an x this kernel would write (docs/attention_block.md)
    stats = unused if pe is None else _new((b * n, 2), dev, torch.float32)
    _kv_fwd_kernel[(triton.cdiv(b * m, block_m),)](
        x, pe_w, pe_b, stats, ln_w, ln_b, unused if wsr is None else wsr, unused if sr_b is None else sr_b,
        unused if srn_w is None else srn_w, unused if srn_b is None else srn_b, wkv, kv_b, xn,
        unused if red is None else red, unused if kin is None else kin, kv,
        b * m, mw, mh, hw[1], c, *strides, float(eps_pe), float(eps), float(eps_sr),
        R=ratio, PE=pe is not None, XDT=_TL_DTYPE[x.dtype if pe is None else pe[3]], CDT=_CDT[cdt],
        BLOCK_C=block_c, BLOCK_M=block_m, EVEN=_whole_tiles(b * m, c, block_m, block_c), num_warps=warps,
        num_stages=1)
    residual = None if pe is None else _sub.MapResidual(x, pe_w, pe_b, stats, hw[1], pe[3])
    out, o, lse = _sub._forward(xn, x if pe is None else None, kv[..., :c], kv[..., c:], wq_c, bq, wo_c, bo,
                                residual)
    return out, xn, red, kin, kv, o, lse, weights


def _backward(x, ln_w, wsr, srn_w, wkv, wq, bq, wo, xn, red, kin, kv, o, lse, g, hw: tuple[int, int],
              ratio: int, eps: float, eps_sr: float, cdt: torch.dtype, w_dtypes: dict[str, torch.dtype],
              wg_chunk_rows: int | None = None, pe: tuple | None = None):
    """Gradients of x and of every parameter, in the order of `AttentionBlockFunction.forward`'s inputs
    (None for R = 1's absent W_sr, b_sr, LN_sr, and for γ_pe, β_pe without `pe`), each parameter's in
    `w_dtypes[name]`. wsr, wkv, wq, wo: `compute_weights`' matrices; bq as given; `pe` as `_forward`'s
    (then x is the map, and its gradient has its dtype and strides)."""
    b, n, c, mw, mh, strides = _geometry(x, pe, hw, ratio)
    p = b * mh * mw
    dev = x.device
    precise = cdt == torch.float32
    k, v = kv[..., :c], kv[..., c:]
    sums = []  # every parameter gradient's partial buffer, summed in one launch at the end
    wgrads = []  # every weight-gradient product, in one launch once dred exists
    dxnq, dk, dv, dwq, dbq, dwo, dbo = _sub._backward(xn, k, v, wq, bq, wo, o, lse, g, w_dtypes["wq"], None, None,
                                                      sums, wgrads)
    dk, dv = dk.contiguous(), dv.contiguous()
    block_c, block_m, warps = _launch("bwd", c, cdt, None if pe is None else configs.device_kind(dev))
    programs = triton.cdiv(p, block_m)
    ln_width = (2 if ratio == 1 else 4) * c  # [dγ | dβ | (dγ_sr | dβ_sr) | (dγ_pe | dβ_pe)]
    ln_part = _new((programs, ln_width + (0 if pe is None else 2 * c)), dev, torch.float32)
    dx = _new((b, n, c), dev, x.dtype) if pe is None else torch.empty_like(x)  # (a dense map: its strides)
    dred = None if ratio == 1 else _new((p, c), dev, cdt)
    unused = dx
    pe_w, pe_b, eps_pe = (unused, unused, 0.0) if pe is None else pe[:3]
    _kv_bwd_kernel[(programs,)](
        x, pe_w, pe_b, ln_w, unused if wsr is None else wsr, unused if red is None else red,
        unused if srn_w is None else srn_w, wkv, dk, dv, dxnq, g, dx, unused if dred is None else dred, ln_part,
        p, mw, mh, hw[1], c, *strides, float(eps_pe), float(eps), float(eps_sr),
        R=ratio, PE=pe is not None, CDT=_CDT[cdt], ROUND_SUMS=g.dtype == cdt and cdt != torch.float32,
        BLOCK_C=block_c, BLOCK_M=block_m, EVEN=_whole_tiles(p, c, block_m, block_c), num_warps=warps, num_stages=1)
    ln_sum = _new((ln_part.shape[1],), dev, torch.float32)
    sums.append((ln_part, ln_sum))

    # kv Linear: [dW_k | dW_v | db_k | db_v] over row chunks of dK, dV against kin (xn when R = 1):
    # W_kv's and b_kv's gradients are then two slices of the sum (W_kv stacks W_k over W_v)
    sms = _core._sm_count(dev)
    block_i = _sub._wg_block(precise, dev) if sms else 64
    kin_rows = xn.view(p, c) if kin is None else kin
    cc = c * c
    chunk, nc = row_chunks(p, 2 * triton.cdiv(c, block_i) ** 2, 2 * c, sms, wg_chunk_rows)
    kv_part = _new((nc, 2 * cc + 2 * c), dev, torch.float32)
    wgrads.append(_sub.wgrad_group(dk.view(p, c), kin_rows, kv_part, chunk, second=(dv.view(p, c), kin_rows,
                                                                                    kv_part[:, cc:]),
                                   bias_at=(2 * cc, cc + c)))
    kv_sum = _new((2 * cc + 2 * c,), dev, torch.float32)
    sums.append((kv_part, kv_sum))
    grads = {"x": dx, "ln_w": ln_sum[:c], "ln_b": ln_sum[c:2 * c], "wq": dwq, "bq": dbq, "wo": dwo, "bo": dbo}
    if pe is not None:
        grads.update(pe_w=ln_sum[ln_width:ln_width + c], pe_b=ln_sum[ln_width + c:])
    if ratio > 1:  # the convolution: dW_sr[o, (i, j, c)] = Σ_patches dred[o] · xn[patch, (i, j, c)]
        wide = ratio * ratio * c
        chunk, nc = row_chunks(p, triton.cdiv(c, block_i) * triton.cdiv(wide, block_i), 2 * c, sms, wg_chunk_rows)
        sr_part = _new((nc, c * wide + c), dev, torch.float32)
        wgrads.append(_sub.wgrad_group(dred, xn.view(b * n, c), sr_part, chunk, patch=(ratio, hw[1])))
        sr_sum = _new((c * wide + c,), dev, torch.float32)
        sums.append((sr_part, sr_sum))
        grads.update(sr_w=sr_sum[:c * wide].view(c, ratio, ratio, c).permute(0, 3, 1, 2), sr_b=sr_sum[c * wide:],
                     srn_w=ln_sum[2 * c:3 * c], srn_b=ln_sum[3 * c:4 * c])
    _sub.launch_wgrad(wgrads, precise)
    sum_partials(*sums)
    grads.update(kv_w=kv_sum[:2 * cc].view(2 * c, c), kv_b=kv_sum[2 * cc:])
    # (dW_sr as the sum lays it out: a channels-last view, the model's W_sr layout; AccumulateGrad
    # copies it only into a parameter of another layout)
    return [grads["x"]] + [None if grads.get(name) is None else grads[name].to(w_dtypes[name])
                           for name in _PARAM_NAMES]


_PARAM_NAMES = ("ln_w", "ln_b", "sr_w", "sr_b", "srn_w", "srn_b", "kv_w", "kv_b", "wq", "bq", "wo", "bo",
                "pe_w", "pe_b")  # the last two: the patch embedding norm's γ, β (`embed`)
_SR_WEIGHT = _PARAM_NAMES.index("sr_w")


class AttentionBlockFunction(torch.autograd.Function):
    """The fused attention half; saves x (with `embed`: the patch embedding's map) and the LayerNorm
    weights and bq (inputs), the weight matrices in the compute dtype (`compute_weights`), xn, red,
    kin, kv in the compute dtype and the sublayer's O, lse. `embed`: None, or (eps_pe, the residual
    stream's dtype) when x is the map and pe_w, pe_b the patch embedding norm's γ, β."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, sr_w, sr_b, srn_w, srn_b, kv_w, kv_b, wq, bq, wo, bo, pe_w, pe_b, hw, ratio, eps,
                eps_sr, cdt, embed=None, wg_chunk_rows=None):
        params = (ln_w, ln_b, sr_w, sr_b, srn_w, srn_b, kv_w, kv_b, wq, bq, wo, bo)
        pe = None if embed is None else (pe_w, pe_b, *embed)
        out, xn, red, kin, kv, o, lse, (wsr, wkv, wq_c, wo_c) = _forward(x, *params, hw, ratio, eps, eps_sr, cdt, pe)
        ctx.save_for_backward(x, ln_w, wsr, srn_w, wkv, wq_c, bq, wo_c, xn, red, kin, kv, o, lse, pe_w, pe_b)
        ctx.w_dtypes = {name: None if t is None else t.dtype for name, t in zip(_PARAM_NAMES, params + (pe_w, pe_b))}
        ctx.args = (hw, ratio, eps, eps_sr, cdt)
        ctx.embed = embed
        ctx.wg_chunk_rows = wg_chunk_rows
        return out

    @staticmethod
    def backward(ctx, g):
        hw, ratio, eps, eps_sr, cdt = ctx.args
        *saved, pe_w, pe_b = ctx.saved_tensors
        pe = None if ctx.embed is None else (pe_w, pe_b, *ctx.embed)
        grads = _backward(*saved, g.contiguous(), hw, ratio, eps, eps_sr, cdt, ctx.w_dtypes, ctx.wg_chunk_rows, pe)
        return (*grads, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------
def _tensors(p: AttentionBlockParams) -> tuple:
    return (p.ln_weight, p.ln_bias, p.sr_weight, p.sr_bias, p.sr_norm_weight, p.sr_norm_bias, p.kv_weight,
            p.kv_bias, p.q_weight, p.q_bias, p.proj_weight, p.proj_bias)


def compute_dtype(x: torch.Tensor, p: AttentionBlockParams) -> torch.dtype | None:
    """The dtype the products run in, or None when the kernels do not serve the mix: under autocast
    on x's device, autocast's bf16 / fp16 when every tensor is fp32 or that dtype; otherwise the
    dtype all share (fp32, bf16 or fp16)."""
    return products_dtype([x] + [t for t in _tensors(p) if t is not None])


def fused_supported(dtype: torch.dtype, c: int) -> bool:
    """Whether the kernels run with products in `dtype` at C channels: bf16 / fp16 up to C = 256 (the
    model's 32-192), fp32 up to 64 (`_CONFIGS`)."""
    return 0 < c and _block_c(c) in _CONFIGS["fwd"]["fp32" if dtype == torch.float32 else "16"] \
        and _sub.fused_supported(dtype, c)


def _check(x, hw, ratio: int, p: AttentionBlockParams, embed_norm: EmbedNorm | None) -> None:
    h, w = hw
    if embed_norm is None:
        if x.dim() != 3:
            raise ValueError(f"attention_block: x must be B×N×C tokens, got shape {tuple(x.shape)}")
        b, n, c = x.shape
        if h * w != n:
            raise ValueError(f"attention_block: the map is {h}×{w} = {h * w} tokens, x has {n}")
    else:
        if x.dim() != 4 or tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"attention_block: with embed_norm, x must be the patch embedding's B×C×{h}×{w} map, "
                             f"got shape {tuple(x.shape)}")
        c = x.shape[1]
    if ratio < 1:
        raise ValueError(f"attention_block: sr_ratio must be ≥ 1, got {ratio}")
    shapes = {"ln_weight": (c,), "ln_bias": (c,), "kv_weight": (2 * c, c), "kv_bias": (2 * c,), "q_weight": (c, c),
              "q_bias": (c,), "proj_weight": (c, c), "proj_bias": (c,)}
    if ratio > 1:
        shapes.update(sr_weight=(c, c, ratio, ratio), sr_bias=(c,), sr_norm_weight=(c,), sr_norm_bias=(c,))
    named = {name: getattr(p, name) for name in shapes}
    if embed_norm is not None:
        shapes.update(embed_norm_weight=(c,), embed_norm_bias=(c,))
        named.update(embed_norm_weight=embed_norm.weight, embed_norm_bias=embed_norm.bias)
    for name, shape in shapes.items():
        t = named[name]
        if t is None or tuple(t.shape) != shape:
            raise ValueError(f"attention_block: {name} must have shape {shape} (C = {c}, R = {ratio}), got "
                             f"{None if t is None else tuple(t.shape)}")
    if len({t.device for t in named.values()} | {x.device}) != 1:
        raise ValueError("attention_block: tensors on different devices")


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t where its elements fill their storage span without gaps in NCHW or channels-last order, else a
    contiguous copy (so that `empty_like` gives its gradient the same strides)."""
    dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
    return t if dense else t.contiguous()


def dispatch(x, hw, ratio: int, p: AttentionBlockParams, fused, attention_sublayer,
             embed_norm: EmbedNorm | None = None, map_norm=None):
    """What both entries (`attention_block` here and `msf::attention_block` in kernels/ops.py) do:
    check the arguments, then `fused(x, *tensors, γ_pe, β_pe, hw, ratio, eps, eps_sr, compute_dtype,
    embed)` where the kernels serve the dtypes, C and the map (h and w multiples of R, x on CUDA or
    interpreted), else the eager composition around `attention_sublayer`. With `embed_norm` x is the
    patch embedding's B×C×h×w map and the block's input its LayerNorm: fused with the block where the
    kernels serve (`embed` = (eps_pe, the tokens' dtype as that LayerNorm gives them)), else
    `map_norm(x, γ_pe, β_pe, eps_pe)` first (None: the eager one)."""
    _check(x, hw, ratio, p, embed_norm)
    h, w = hw
    tensors = _tensors(p) + ((None, None) if embed_norm is None else (embed_norm.weight, embed_norm.bias))
    cdt = products_dtype([x] + [t for t in tensors if t is not None])
    c = x.shape[-1] if embed_norm is None else x.shape[1]
    serves = not (cdt is None or x.numel() == 0 or not fused_supported(cdt, c) or h % ratio or w % ratio
                  or (x.device.type != "cuda" and not INTERPRET))
    embed = None
    if embed_norm is not None:
        from msf.kernels.map_norm import out_dtype  # (map_norm imports this module's LayerNorm pieces)
        xdt = out_dtype(x, embed_norm.weight, embed_norm.bias)
        if serves and xdt is not None and embed_fused(cdt):
            embed = (float(embed_norm.eps), xdt)
        else:  # the patch embedding's norm on its own, then the block on its tokens
            norm = eager_map_layer_norm if map_norm is None else map_norm
            x = norm(x, embed_norm.weight, embed_norm.bias, embed_norm.eps)
            tensors = tensors[:-2] + (None, None)
            cdt = compute_dtype(x, p)
            serves = serves and cdt is not None
    if not serves:
        return eager_attention_block(x, hw, ratio, p, attention_sublayer=attention_sublayer)
    x = x.contiguous() if embed is None else _dense(x)
    # (W_sr as it comes, channels-last in the model: the kernels read only its transposed copy,
    # `compute_weights`)
    tensors = tuple(None if t is None else t if i == _SR_WEIGHT else t.contiguous() for i, t in enumerate(tensors))
    return fused(x, *tensors, (int(h), int(w)), int(ratio), float(p.ln_eps), float(p.sr_norm_eps), cdt, embed)


def attention_block(x, hw: tuple[int, int], sr_ratio: int, p: AttentionBlockParams, *,
                    embed_norm: EmbedNorm | None = None, wg_chunk_rows: int | None = None) -> torch.Tensor:
    """`x + attention_sublayer(LN1(x), kv path)` (module docstring): fused forward and backward where
    `dispatch` says the kernels serve, else the eager composition (with the fused sublayer where it
    serves). With `embed_norm`, x is the patch embedding's B×C×h×w map and the block's input x =
    LN_pe(x) is formed inside the kernels (`dispatch`). `wg_chunk_rows` overrides the weight
    gradients' row chunk (tests)."""
    from msf.kernels.map_norm import map_layer_norm
    return dispatch(x, hw, sr_ratio, p, lambda *args: AttentionBlockFunction.apply(*args, wg_chunk_rows),
                    _sub.attention_sublayer_for_model, embed_norm, map_layer_norm)


# ----------------------------------------------------------------------------------------------
# ahead-of-time builds: both kernels × the model's (C, R) × dtype class
# ----------------------------------------------------------------------------------------------
_AOT_STAGES = ((32, 8), (64, 4), (128, 2), (192, 1))
_AOT_PATCHES = 32 * 256  # B = 32 images of M = 256 patches at every stage


def _aot_specs() -> list[AotSpec]:
    specs = []
    kernels = {"fwd": (_kv_fwd_kernel, ("X", "XN", "RED", "KIN", "KV", "WSR", "BSR", "WKV", "BKV"),
                       ("LNW", "LNB", "SNW", "SNB", "PEW", "PEB", "STATS")),
               "bwd": (_kv_bwd_kernel, ("X", "WSR", "RED", "WKV", "DK", "DV", "DXNQ", "G", "DX", "DRED"),
                       ("LNW", "SNW", "PART", "PEW", "PEB"))}
    # (name, compute dtype, the dtype of CUDA autocast's fp32 tensors): uniform bf16 / fp32 and autocast's mix
    classes = (("bf16", "bf16", "bf16"), ("amp", "bf16", "fp32"), ("fp32", "fp32", "fp32"))
    wide = {"X", "G", "DX", "BSR", "BKV"}  # fp32 under autocast (the biases: its masters)
    for kname, (kernel, data, f32) in kernels.items():
        for cname, cdt, xdt in classes:
            for c, ratio in _AOT_STAGES:
                if not fused_supported(torch.float32 if cdt == "fp32" else torch.bfloat16, c):
                    continue
                block_c, block_m, warps = _launch(kname, c, torch.float32 if cdt == "fp32" else torch.bfloat16)
                ptrs = {**{a: f"*{xdt if a in wide else cdt}" for a in data}, **{a: "*fp32" for a in f32}}
                const = {"R": ratio, "CDT": _CDT[torch.float32 if cdt == "fp32" else torch.bfloat16],
                         "BLOCK_C": block_c, "BLOCK_M": block_m, "PE": False, "stride_xc": 1,
                         "EVEN": _whole_tiles(_AOT_PATCHES, c, block_m, block_c)}
                if kname == "bwd":
                    const["ROUND_SUMS"] = cname == "bf16"
                else:  # the residual stream's dtype (x's; LN_pe's output with PE)
                    const["XDT"] = tl.float32 if xdt == "fp32" else tl.bfloat16
                tag = f"{cname}_c{c}_r{ratio}_m{block_m}_w{warps}"
                specs.append(_aot_spec(f"attention_block.{kname}_{tag}", kernel, ptrs, const, warps, 1,
                                       floats=("eps", "eps_sr", "eps_pe")))
                if not embed_fused(torch.float32 if cdt == "fp32" else torch.bfloat16):
                    continue
                # a stage's first block: X (and DX) the convolution's map in the compute dtype, NCHW at
                # stage 1 (the images' layout), channels-last after (the stage output's copy is)
                per_arch = {arch: _launch(kname, c, torch.bfloat16, f"sm_{arch}")[1:] for arch in (80, 90)}
                for archs, (block_m, warps) in ([((), per_arch[80])] if per_arch[80] == per_arch[90]
                                                else [((arch,), cfg) for arch, cfg in per_arch.items()]):
                    embed_const = {k: v for k, v in const.items() if k != "stride_xc"}
                    embed_const.update({"PE": True, "BLOCK_M": block_m, "stride_xx" if ratio == 8 else "stride_xc": 1,
                                        "EVEN": _whole_tiles(_AOT_PATCHES, c, block_m, block_c)})
                    spec = _aot_spec(f"attention_block.{kname}_embed_{cname}_c{c}_r{ratio}_m{block_m}_w{warps}",
                                     kernel, {**ptrs, "X": f"*{cdt}", "DX": f"*{cdt}"}, embed_const, warps, 1,
                                     floats=("eps", "eps_sr", "eps_pe"))
                    specs.append(dataclasses.replace(spec, archs=archs))
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()

