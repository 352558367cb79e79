"""Fused feed-forward sublayer: LayerNorm + fc1 + GELU + fc2 + residual, in Triton.

    out = x + GELU(LN(x) w1ᵀ + b1) w2ᵀ + b2        LN(x) = (x − mean) · rstd · γ + β,  GELU exact (erf)

    x, out: B×N×C tokens (any leading shape; rows = tokens, contiguous)   γ, β: C
    w1: H×C, b1: H (fc1, nn.Linear's out×in)   w2: C×H, b2: C (fc2)      saved: mean, rstd (rows fp32)

GELU is exact (erf) to fp32 rounding: Φ and φ from one exponential (`_gelu_parts`). The hidden
activations (rows × H, H = 2C in the model) are never saved: the forward keeps each BLOCK_H-column
slice of them on chip and folds it into fc2's accumulator at once; the backward recomputes them
from x and the saved LayerNorm statistics (above C = 64 it stashes them, with dH, for the weight
gradients' GEMMs: a transient of the backward, freed when it returns). Precision (`compute_dtype`):
- uniform: x and all six parameters share fp32 / bf16 / fp16 and the products run in it (fp32 as
  tf32x3, about fp32 accuracy; fused up to C = 64, the eager composition above);
- mixed (what CUDA autocast hands the block): fp32 x and fp32 master weights, products in bf16 /
  fp16. The autograd Function casts w1 and w2 to the compute dtype once (`compute_weights`, as
  autocast does; the backward reuses the casts); the kernels round the biases on load and every
  value eager autocast rounds (the LayerNorm output before fc1, fc1's output, GELU's, fc2's; in the
  backward fc2's input gradient, dA, dH and fc1's input gradient), so they compute what
  `ffn_sublayer_eager` computes under autocast; LayerNorm and the residual add stay fp32
  (autocast's policy), out is fp32. (The kernels also take fp32 w1, w2 and round them on load;
  every slice of a row tile reads them again, so the casts pay: docs/ffn_sublayer.md.)

A stage's last block (`stage_norm`, `msf.reference.StageNorm`) ends the stage: its out goes to the
stage's final LayerNorm and on to the decoder and the next stage. There the forward kernel also
normalises the out tile it holds and writes the stage's maps (`FFNStageOutputFunction`; what
`map_norm.stage_output` would write from the stored out, without reading it back). In the backward
the dx kernel runs the norm's backward too on the recompute route (C ≤ 64): g = ∂L/∂out is formed
per tile from the saved out and the maps' gradients and never stored; on the stash route `map_norm`'s
kernel writes g first (`_stage_output_backward`). Either way one sum launch takes the norm's partial rows.

Kernels (no atomics: every parameter gradient through per-program fp32 partials and a fixed-order sum):
- `_ffn_fwd_kernel`: one BLOCK_N-row tile a program: LayerNorm (statistics stored), then for each
  hidden slice fc1 → GELU → the slice's share of fc2; bias and residual added, out written once;
  with STAGE_NORM the stage's final LayerNorm of that out written too (and its 16-bit copy, COPY).
- `_ffn_bwd_dx_kernel`: a run of row tiles a program: recomputes LN(x) and, slice by slice, fc1's
  output, then dA = dy w2, dH = dA · GELU'(h), d LN(x) += dH w1; the LayerNorm backward; dx = g +
  that. Writes the program's partial sums of dγ, dβ and db2; with STASH (C > 64, `stash_pays`) it
  also stores LN(x), dH and A = GELU(h) in the compute dtype for the weight gradients; with
  STAGE_NORM it forms g from the stage norm's backward first and stores dy (g in the compute
  dtype) for them, with the norm's partial sums beside its own.
- the weight gradients, one of two routes:
  - recompute (C ≤ 64): `_ffn_bwd_wgrad_kernel`, one (hidden slice, row chunk) a program: the same
    recompute for its slice only, accumulating dW1 = dHᵀ LN(x), dW2ᵀ = Aᵀ dy and db1 = Σ dH over
    the chunk's rows;
  - stash (C > 64): the attention sublayer's `_sub_wgrad_kernel`, two groups of one launch, plain
    GEMMs over the stash: [dW1 | db1] from (dH, LN(x)), dW2 from (g, A). Few rows and wide C make the recompute
    route's per-slice LayerNorm and fc1 the bulk of its work there.
- `partial_sums`: the fixed-order sums of both partial buffers (and of the stage norm's [dγ_s | dβ_s]
  partial rows, where there is one), in one launch.

docs/ffn_sublayer.md: the backward's math, the bytes against eager, the cost-model figures and the
designs not taken.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from msf.kernels import attention as _core
from msf.kernels import attention_sublayer as _sub
from msf.kernels._common import (INTERPRET, AotSpec, _ln_grad, _ln_hat, _ln_stats, _round, _vec, products_dtype,
                                row_chunks)
from msf.kernels.attention import _aot_spec, _mm
from msf.kernels.configs import PinnedKernel, candidate_order
from msf.kernels.partial_sums import sum_partials
from msf.reference import StageNorm, eager_ffn_sublayer, tokens_to_map

__all__ = ["ffn_sublayer", "ffn_sublayer_eager", "FFNSublayerFunction", "FFNStageOutputFunction", "AOT_SPECS",
           "compute_dtype", "fused_supported", "stash_pays"]

ffn_sublayer_eager = eager_ffn_sublayer  # the reference: F.layer_norm → F.linear → F.gelu → F.linear → + x

_MAX_BLOCK_C = 256
_STASH_ABOVE_C = 64  # `stash_pays`
# compute dtype codes of the kernels' CDT constexpr
_CDT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ----------------------------------------------------------------------------------------------
# configurations: (BLOCK_N, BLOCK_H, num_warps, num_stages) per kernel, dtype class and C block.
# The classes: "16" (bf16 / fp16 throughout), "amp" (fp32 x, 16-bit weights (the Function's casts)
# and products: the model under autocast), "fp32" (tf32x3 products). Every entry builds for sm_80
# AND sm_90 without spills at the model's shapes (`AOT_SPECS`, `python -m msf.profiling.report`),
# but those in `_SM90_ONLY`. The amp lists hold the cost model's fastest such configuration for the
# H100 first, then the A100's where it differs; the 16-bit lists share them, fp32 takes small tiles
# (three products a tf32x3 dot). History (docs/ffn_sublayer.md): swept over BLOCK_N 16-128 ×
# BLOCK_H 16-128 × 4/8 warps on 2026-12-04; the forward re-picked after GELU's reciprocal became
# MUFU.RSQ; dx at C 32 and 64 with BLOCK_H = H (the one hidden slice's weights held in registers
# across a program's tiles); every kernel swept again once w1 and w2 came cast to the compute dtype
# (2026-12-05): dx (16, 64, 8) at C 256, which spilled on sm_80 while it rounded fp32 weights, now
# builds clean (H100 95.4 -> 51.0 µs). Allowed on sm_90 only (`_SM90_ONLY`: the AOT spec builds for
# sm_90, the pin never takes a spilling build): wgrad (16, 64, 8) at C 64 (H100 109.2 -> 59.8 µs a
# stage-2 block; 255 registers + 104 B of spill on sm_80). fwd (16, 64, 8) at C 256 (H100 19.7 ->
# 17.1 µs) was sm_90 only too; it builds clean on sm_80 as well since the weights come cast (128
# registers; 2026-12-06, A100 27.9 -> 19.2 µs a stage-4 block). Left out: wgrad (16, 64, 8) at C 256 (spills on
# sm_80); wgrad (32, 16, 8) at C 256 spills 8 B on sm_90: that class takes (16, 16, 8), which the
# model never launches (C 256 takes the stash route, `stash_pays`; tests force it). wgrad (16, 32, 8) at
# C 64, the A100's pin since 2026-12-06 (a `--sweep` under model v3.1: 128.7 -> 116.5 µs a stage-2 block;
# 128 registers on both archs, the H100 keeps (16, 64, 8)). dx at C 128 and 256 swept again once its
# partial sums went row by row there (2026-12-06, model v3.1, H100 / A100 µs a call): C 128 (32, 32, 4)
# 77.2 -> 61.9 on the H100, (16, 64, 4) 103.8 -> 100.1 on the A100, both 2 CTAs an SM, both clean on
# both archs; C 256 (16, 128, 8) 51.0 -> 40.4 on the H100, sm_90 only (80 B of spill on sm_80, where
# (16, 64, 8) stays: 83.9).
# ----------------------------------------------------------------------------------------------
_Cfg = tuple[int, int, int, int]
_AMP: dict[str, dict[int, list[_Cfg]]] = {
    "fwd": {32: [(128, 64, 8, 2), (128, 32, 8, 2)], 64: [(64, 32, 4, 2), (32, 32, 4, 2)],
            128: [(32, 32, 4, 2)], 256: [(16, 64, 8, 2), (16, 32, 4, 2)]},
    "dx": {32: [(16, 64, 4, 2)], 64: [(16, 32, 4, 2)], 128: [(32, 32, 4, 2), (16, 64, 4, 2)],
           256: [(16, 128, 8, 2), (16, 64, 8, 2)]},
    "wgrad": {32: [(32, 64, 8, 2), (64, 64, 4, 2)], 64: [(16, 64, 8, 2), (32, 32, 4, 2), (16, 32, 8, 2)],
              128: [(16, 64, 4, 2)],
              256: [(16, 16, 8, 2)]},
}
# (kernel, C block) → configurations of the lists above that build without spills on sm_90 only
_SM90_ONLY: dict[tuple[str, int], set[_Cfg]] = {("wgrad", 64): {(16, 64, 8, 2)}, ("dx", 256): {(16, 128, 8, 2)}}
# fp32 past C = 64 has no spill-free tiles (the dx kernel spills at C 128 on sm_90 even at 16×16 × 8
# warps): there the op composes the eager pieces (`fused_supported`), as the attention sublayer does.
_FP32: dict[int, list[_Cfg]] = {32: [(16, 32, 4, 2)], 64: [(16, 32, 4, 2)]}
_MAX_FP32_C = 64
_ALLOWED: dict[str, dict[str, dict[int, list[_Cfg]]]] = {
    kernel: {"16": per_c, "amp": per_c, "fp32": _FP32} for kernel, per_c in _AMP.items()}
# the forward with a stage's final norm (STAGE_NORM): its own classes, the norm's tile and second
# store changing what fits (stage 1's (128, 64, 8) pin takes 129 registers with it, one CTA an SM:
# 83 µs of 133 on the H100); chosen by `python -m msf.profiling.cost --sweep --op ffn_stage_output
# --kernel ffn_sublayer.fwd` under model v3.1, 2026-12-06: the H100's fastest spill-free build first
# (pinned for sm_90), then the A100's (sm_80)
_STAGE_FWD: dict[int, list[_Cfg]] = {32: [(128, 32, 8, 2), (128, 16, 8, 2)], 64: [(64, 32, 4, 2), (64, 64, 4, 2)],
                                     128: [(32, 32, 4, 2), (32, 64, 8, 2)], 256: [(16, 64, 8, 2), (16, 32, 4, 2)]}
_ALLOWED_STAGE_FWD: dict[str, dict[int, list[_Cfg]]] = {"16": _STAGE_FWD, "amp": _STAGE_FWD, "fp32": _FP32}
# the dx kernel with the stage norm's backward in it (STAGE_NORM: the recompute route, C ≤ 64), from
# `python -m msf.profiling.cost --sweep --op ffn_stage_output --kernel ffn_sublayer.dx` under model v3.1,
# 2026-12-07: the H100's fastest spill-free build first (pinned for sm_90), then the A100's (sm_80)
_STAGE_DX: dict[int, list[_Cfg]] = {32: [(16, 64, 4, 2), (16, 16, 4, 2)], 64: [(16, 64, 8, 2), (16, 32, 4, 2)]}
_ALLOWED_STAGE_DX: dict[str, dict[int, list[_Cfg]]] = {"16": _STAGE_DX, "amp": _STAGE_DX, "fp32": _FP32}
_STAGE_TABLES = {"fwd": _ALLOWED_STAGE_FWD, "dx": _ALLOWED_STAGE_DX}
# every configuration `python -m msf.profiling.cost --sweep --op ffn_sublayer` predicts (and
# MSF_AUTOTUNE=1 tries, pruned to the allow-lists): the grid the lists above were chosen from
_CANDIDATES: list[_Cfg] = [(bn, bh, w, 2) for bn in (16, 32, 64, 128) for bh in (16, 32, 64, 128) for w in (4, 8)
                           if not (bn == 128 and w == 4)]
# the interpreter's configuration: 16-row tiles and 16-wide hidden slices, so CPU tests at small
# shapes still cover several hidden slices, ragged row tiles and several row chunks
_INTERPRETER_CFG: _Cfg = (16, 16, 4, 2)


def _as_config(c: _Cfg) -> triton.Config:
    return triton.Config({"BLOCK_N": c[0], "BLOCK_H": c[1]}, num_warps=c[2], num_stages=c[3])


def _mode(named_args) -> str:
    """The dtype class of a launch: from the compute dtype and x's width."""
    if named_args["CDT"] == 0:
        return "fp32"
    return "amp" if named_args["X"].element_size() == 4 else "16"


def _pinned(kernel: str, fn) -> PinnedKernel:
    """`fn` launched with its configuration from kernels/configs.json ("ffn_sublayer.<kernel>"; shape
    class = dtype class and C block, e.g. "amp_c64"; the forward and the dx kernel with a stage's final
    norm have classes of their own, e.g. "amp_c32_stage", whose lists are `_STAGE_FWD`'s and `_STAGE_DX`'s)."""
    tables = {"": _ALLOWED[kernel]} | ({"_stage": _STAGE_TABLES[kernel]} if kernel in _STAGE_TABLES else {})
    seen = candidate_order(_INTERPRETER_CFG, *(cfgs for table in tables.values() for per_c in table.values()
                                               for cfgs in per_c.values()), _CANDIDATES)

    def allowed(cls: str) -> list[triton.Config]:
        base, stage, _ = cls.partition("_stage")
        mode, c = base.rsplit("_c", 1)
        return [_as_config(c) for c in tables["_stage" if stage else ""][mode][int(c)]]

    def shape_class(named) -> str:
        return f"{_mode(named)}_c{named['BLOCK_C']}" + ("_stage" if named.get("STAGE_NORM") else "")

    def prune(configs, named_args, **kwargs):
        named = {**named_args, **kwargs}
        ok = tables["_stage" if named.get("STAGE_NORM") else ""][_mode(named)].get(kwargs["BLOCK_C"], [])
        kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages) in ok]
        return kept or configs[:1]

    classes = [f"{mode}_c{c}{tag}" for tag, table in tables.items() for mode, per_c in table.items() for c in per_c]
    key = ["C", "HID", "CDT"] + (["STAGE_NORM"] if kernel in _STAGE_TABLES else [])
    return PinnedKernel(f"ffn_sublayer.{kernel}", fn, [_as_config(c) for c in seen], key,
                        shape_class, allowed, classes, prune=prune, archs=lambda c, t: _archs(kernel, c, t))


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _to_compute(x, CDT: tl.constexpr):
    """x in the compute dtype (CDT 0 fp32, 1 bf16, 2 fp16), rounded to nearest even as on a GPU."""
    if CDT == 1:
        y = _round(x, tl.bfloat16)
    elif CDT == 2:
        y = _round(x, tl.float16)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _rounded(x, CDT: tl.constexpr):
    """x rounded to the compute dtype and back to fp32 (what a 16-bit eager output holds)."""
    return _to_compute(x, CDT).to(tl.float32)


@triton.jit
def _gelu_parts(h):
    """(Φ(h), φ(h)) with GELU(h) = h Φ(h) and GELU'(h) = Φ(h) + h φ(h), Φ the standard normal CDF, φ its
    density. Φ from erfc(|h|/√2) ≈ t·P(t)·exp(−h²/2), t = 1/(1 + p|h|/√2) (Abramowitz & Stegun 7.1.26:
    absolute error ≤ 1.5e-7, under half an fp32 ulp of Φ near 0.5), so the one exponential serves Φ
    and φ alike: about 15 instructions for both, where libdevice's erff alone took ~35 (its two
    polynomial branches, selected per element). t is rsqrt(·)², MUFU.RSQ and a multiply: the
    argument is ≥ 1, so a division's range handling (9 instructions for div.full) buys nothing.
    Φ(h) for h < 0 comes from erfc directly, without the cancellation of 1 + erf.
    docs/ffn_sublayer.md has the numbers."""
    y = tl.abs(h) * 0.8493218002880191  # |h|·√(log2(e)/2): y² = h²/2 in log2 units, one multiply
    r = tl.math.rsqrt(1.0 + 0.2727374808792225 * y)  # 0.3275911·|h|/√2; rsqrt.approx: ≤ 2^-22.9, t ~3 ulp
    t = r * r
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    e = tl.math.exp2(-(y * y))  # exp(−h²/2)
    half_erfc = 0.5 * poly * e
    cdf = tl.where(h >= 0, 1.0 - half_erfc, half_erfc)
    return cdf, 0.3989422804014327 * e


@triton.jit
def _tile(pid, ROWS, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows and channels of row tile `pid`: (rows int64, offs_c, mask_n, mask_c, token offsets, mask)."""
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = rows < ROWS
    mask_c = offs_c < C
    return rows, offs_c, mask_n, mask_c, rows[:, None] * C + offs_c[None, :], mask_n[:, None] & mask_c[None, :]


@triton.jit
def _normalised(x, mean, rstd, LNW, LNB, offs_c, mask_c, mask_nc):
    """(x̂, LN(x)) of a tile of x (fp32) from its row statistics; zero outside the tile's rows and C."""
    xhat = tl.where(mask_nc, (x - mean[:, None]) * rstd[:, None], 0.0)
    gamma = tl.load(LNW + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    beta = tl.load(LNB + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return xhat, tl.where(mask_nc, xhat * gamma[None, :] + beta[None, :], 0.0)


@triton.jit
def _slice_w1(W1, B1, h0, offs_c, mask_c, C, HID: tl.constexpr, CDT: tl.constexpr, BLOCK_H: tl.constexpr):
    """(w1 slice BLOCK_H × BLOCK_C in the compute dtype, b1 slice (fp32, rounded as fc1's bias is),
    offs_h, mask_h) of the hidden slice starting at h0."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    w1 = _to_compute(tl.load(W1 + offs_h[:, None] * C + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :],
                             other=0.0), CDT)
    return w1, _rounded(tl.load(B1 + offs_h, mask=mask_h, other=0.0), CDT), offs_h, mask_h


@triton.jit
def _fc1(xn, w1, b1, CDT: tl.constexpr):
    """h = LN(x) w1ᵀ + b1 of one hidden slice (fp32, rounded as fc1's output is)."""
    return _rounded(_mm(xn, tl.trans(w1), CDT == 0) + b1[None, :], CDT)


@triton.jit
def _hidden(xn, W1, B1, h0, offs_c, mask_c, C, HID: tl.constexpr, CDT: tl.constexpr, BLOCK_H: tl.constexpr):
    """(h, w1 slice, offs_h, mask_h) of the hidden slice starting at h0: h = LN(x) w1ᵀ + b1 (`_fc1`)
    and the slice's rows of w1 (BLOCK_H × BLOCK_C, compute dtype; the backward reuses them for dH w1)."""
    w1, b1, offs_h, mask_h = _slice_w1(W1, B1, h0, offs_c, mask_c, C, HID, CDT, BLOCK_H)
    return _fc1(xn, w1, b1, CDT), w1, offs_h, mask_h


@triton.jit
def _w2_slice(W2, offs_h, mask_h, offs_c, mask_c, HID: tl.constexpr, CDT: tl.constexpr):
    """w2[:, slice] as a BLOCK_C × BLOCK_H block (compute dtype)."""
    return _to_compute(tl.load(W2 + offs_c[:, None] * HID + offs_h[None, :], mask=mask_c[:, None] & mask_h[None, :],
                               other=0.0), CDT)


@triton.jit
def _slice_dn(xn, dy, w1, b1, w2s, W2, offs_c, mask_c, offs_h, mask_h, rows, mask_n, DH_ST, A_ST,
              HID: tl.constexpr, CDT: tl.constexpr, STASH: tl.constexpr, W2_GIVEN: tl.constexpr):
    """One hidden slice's share of dn = dH w1 for a row tile: h = LN(x) w1ᵀ + b1 recomputed,
    dH = (dy w2[:, slice]) ∘ GELU'(h) (each rounded as eager rounds it), and with STASH dH and
    A = GELU(h) stored for the weight gradients. The w2 slice is `w2s` if W2_GIVEN, else loaded here,
    after h's product (loading it before lengthened its live range: 64 B of spills at C = 256)."""
    h = _fc1(xn, w1, b1, CDT)
    if not W2_GIVEN:
        w2s = _w2_slice(W2, offs_h, mask_h, offs_c, mask_c, HID, CDT)
    da = _rounded(_mm(dy, w2s, CDT == 0), CDT)
    cdf, pdf = _gelu_parts(h)
    dh = _to_compute(da * (cdf + h * pdf), CDT)
    if STASH:
        hid_tok = rows[:, None] * HID + offs_h[None, :]
        mask_nh = mask_n[:, None] & mask_h[None, :]
        tl.store(DH_ST + hid_tok, dh, mask=mask_nh)
        tl.store(A_ST + hid_tok, _to_compute(h * cdf, CDT), mask=mask_nh)
    return _mm(dh, w1, CDT == 0)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _ffn_fwd_kernel(
    X, LNW, LNB, W1, B1, W2, B2, OUT, MEAN, RSTD, SNW, SNB, Y, Y2,
    ROWS, eps, stage_eps,
    C: tl.constexpr, HID: tl.constexpr, CDT: tl.constexpr, BLOCK_C: tl.constexpr, STAGE_NORM: tl.constexpr,
    COPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out, mean, rstd of BLOCK_N rows (X, OUT contiguous ROWS×C; MEAN, RSTD fp32 ROWS). STAGE_NORM:
    also the stage's final LayerNorm of out (SNW, SNB, `stage_eps`) into Y (ROWS×C, Y's dtype) and
    with COPY the same values again in Y2's dtype, as `map_norm`'s forward kernel writes them from
    the stored out; otherwise SNW .. Y2 are placeholders, never read."""
    rows, offs_c, mask_n, mask_c, tok, mask_nc = _tile(tl.program_id(0), ROWS, C, BLOCK_N, BLOCK_C)
    x = tl.load(X + tok, mask=mask_nc, other=0.0).to(tl.float32)
    _xhat, mean, rstd = _ln_stats(x, mask_nc, C, eps)
    tl.store(MEAN + rows, mean, mask=mask_n)
    tl.store(RSTD + rows, rstd, mask=mask_n)
    _xhat, xn = _normalised(x, mean, rstd, LNW, LNB, offs_c, mask_c, mask_nc)
    xn = _to_compute(xn, CDT)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        h, _w1, offs_h, mask_h = _hidden(xn, W1, B1, h0, offs_c, mask_c, C, HID, CDT, BLOCK_H)
        cdf, _pdf = _gelu_parts(h)
        a = _to_compute(h * cdf, CDT)
        acc += _mm(a, tl.trans(_w2_slice(W2, offs_h, mask_h, offs_c, mask_c, HID, CDT)), CDT == 0)
    y = _rounded(acc + _rounded(tl.load(B2 + offs_c, mask=mask_c, other=0.0), CDT)[None, :], CDT)
    out = _round(x + y, OUT.dtype.element_ty)
    tl.store(OUT + tok, out, mask=mask_nc)
    if STAGE_NORM:  # the stored value normalised, as `map_norm` would read it back
        ohat, _rstd = _ln_hat(tl.where(mask_nc, out.to(tl.float32), 0.0), mask_nc, C, stage_eps)
        normed = _round(ohat * _vec(SNW, offs_c, mask_c)[None, :] + _vec(SNB, offs_c, mask_c)[None, :],
                        Y.dtype.element_ty)
        tl.store(Y + tok, normed, mask=mask_nc)
        if COPY:
            tl.store(Y2 + tok, _round(normed.to(tl.float32), Y2.dtype.element_ty), mask=mask_nc)


_ffn_fwd_kernel = _pinned("fwd", _ffn_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _store_ln_partials(part, offs_c, mask_c, dgamma, dbeta, db2, C: tl.constexpr, WITH_DB2: tl.constexpr):
    """[Σ dn∘x̂ | Σ dn (| Σ dy)] (2·C or 3·C fp32 at `part`) from their sums over the program's rows."""
    tl.store(part + offs_c, dgamma, mask=mask_c)
    tl.store(part + C + offs_c, dbeta, mask=mask_c)
    if WITH_DB2:
        tl.store(part + 2 * C + offs_c, db2, mask=mask_c)


@triton.jit
def _store_dx(DX, tok, mask_nc, dn, xhat, g, gamma, rstd, C: tl.constexpr):
    """dx = g + the LayerNorm backward of dn (fp32 tiles; dx rounded to DX's dtype, as eager rounds
    the LayerNorm's gradient before adding the residual's)."""
    dxhat = dn * gamma[None, :]
    c1 = tl.sum(dxhat * xhat, 1) / C
    c2 = tl.sum(dxhat, 1) / C
    dx_ln = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    dx = g + _round(dx_ln, DX.dtype.element_ty).to(tl.float32)
    tl.store(DX + tok, _round(dx, DX.dtype.element_ty), mask=mask_nc)



@triton.jit
def _stage_norm_grad(OUT, G, G2, SNW, tok, mask_nc, offs_c, mask_c, C, stage_eps, HAS_G2: tl.constexpr):
    """(g, dy_s, ô) of a row tile, g = ∂L/∂out through the stage's final LayerNorm, as `map_norm`'s
    backward kernel forms and stores it: ô and rstd_s recomputed from the saved out, dy_s = G (+ G2,
    added in fp32) the gradients of the stage's maps, g rounded to out's dtype (returned in fp32)."""
    ohat, rstd_s = _ln_hat(tl.load(OUT + tok, mask=mask_nc, other=0.0).to(tl.float32), mask_nc, C, stage_eps)
    dys = tl.load(G + tok, mask=mask_nc, other=0.0).to(tl.float32)
    if HAS_G2:
        dys += tl.load(G2 + tok, mask=mask_nc, other=0.0).to(tl.float32)
    g = _ln_grad(dys, ohat, rstd_s, _vec(SNW, offs_c, mask_c), mask_nc, C)
    return _round(g, OUT.dtype.element_ty).to(tl.float32), dys, ohat


# g = ∂L/∂out (rows × C). With x̂ = (x − mean)·rstd, n = x̂γ + β, h = n w1ᵀ + b1, A = GELU(h),
# y = A w2ᵀ + b2, out = x + y (every product in the compute dtype, rounded as eager rounds it):
#   dy  = g (rounded to the compute dtype: autocast's gradient of fc2's bf16 output)
#   db2 = Σ_rows dy                      dW2 = dyᵀ A          (C×H)
#   dA  = dy w2                          dH  = dA ∘ GELU'(h)   (rows × H: on chip, slice by slice)
#   db1 = Σ_rows dH                      dW1 = dHᵀ n           (H×C)
#   dn  = dH w1                          (summed over the hidden slices, then rounded)
#   dγ  = Σ_rows dn ∘ x̂                  dβ  = Σ_rows dn
#   dx  = g + rstd · (dn γ − x̂ · mean_C(dn γ ∘ x̂) − mean_C(dn γ))
# With the stage's final norm ahead (STAGE_NORM; y_s = LN_s(out), dy_s its maps' gradients):
#   g   = rstd_s · (γ_s∘dy_s − mean_C(γ_s∘dy_s) − ô · mean_C(γ_s∘dy_s∘ô))     ô = LN_s's x̂ of out
#   dγ_s = Σ_rows dy_s ∘ ô               dβ_s = Σ_rows dy_s
# `_ffn_bwd_dx_kernel` needs every hidden slice of a row for dn, `_ffn_bwd_wgrad_kernel` every row
# of a slice for dW1, dW2: two passes over the recompute, each with a grid that suits its sums.
@triton.jit
def _ffn_bwd_dx_kernel(
    X, G, LNW, LNB, W1, B1, W2, MEAN, RSTD, DX, PART, N_ST, DH_ST, A_ST, OUT, SNW, G2, DY_ST,
    ROWS, N_TILES, TILES, stage_eps,
    C: tl.constexpr, HID: tl.constexpr, CDT: tl.constexpr, BLOCK_C: tl.constexpr, STASH: tl.constexpr,
    STAGE_NORM: tl.constexpr, HAS_G2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dx of row tiles [pid·TILES, (pid+1)·TILES) ∩ [0, N_TILES) (BLOCK_N rows each), and the program's
    partial sums PART[pid] = [Σ dn∘x̂ | Σ dn | Σ dy] (3·C fp32) over them. A few tiles a program keep
    the partial buffer (and its sum) small: a program per tile left 8192 partial rows at stage 1.
    STASH: also store what the weight gradients need, in the compute dtype: n = LN(x) to N_ST
    (ROWS×C), dH and A = GELU(h) to DH_ST and A_ST (ROWS×HID); the weight gradients are then two
    plain GEMMs over them (`_backward`) instead of a second recompute, and the one for dW2 = dyᵀ A
    sums dy too: PART[pid] is then [Σ dn∘x̂ | Σ dn] (2·C).
    STAGE_NORM (not with STASH): the stage's final LayerNorm of out comes after the sublayer, and
    `map_norm`'s backward is done here (`_stage_norm_grad`): G (and with HAS_G2, G2) holds the
    gradients of the stage's maps, OUT the saved out, SNW γ_s, `stage_eps` its eps; g is formed per
    tile and never stored, dy (g in the compute dtype) is stored to DY_ST (ROWS×C) for the weight
    gradients, and PART[pid] grows to [.. | Σ dy_s∘ô | Σ dy_s] (5·C). Otherwise OUT .. DY_ST and
    `stage_eps` are placeholders, never read."""
    tl.static_assert(not (STAGE_NORM and (STASH or BLOCK_C >= 128)),
                     "the stage norm's backward rides the recompute route only (C ≤ 64: tile-shaped sums)")
    pid = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    gamma = tl.load(LNW + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    # The partial sums: with many tiles a program (C ≤ 64: 8 to 62) tile-shaped, one cross-row
    # reduction a program instead of one a tile; with few (C ≥ 128: 1 or 2) reduced tile by tile, so
    # that the hidden-slice loop does not carry three BLOCK_N × BLOCK_C fp32 tiles (48 registers a
    # thread at 8 warps: docs/ffn_sublayer.md, "The dx kernel's partial sums at stages 3-4").
    ROW_SUMS: tl.constexpr = BLOCK_C >= 128
    acc_shape: tl.constexpr = [BLOCK_C] if ROW_SUMS else [BLOCK_N, BLOCK_C]
    dgamma = tl.zeros(acc_shape, tl.float32)
    dbeta = tl.zeros(acc_shape, tl.float32)
    db2 = tl.zeros(acc_shape, tl.float32)
    dgamma_s = tl.zeros(acc_shape, tl.float32)  # the stage norm's (STAGE_NORM only; else never touched)
    dbeta_s = tl.zeros(acc_shape, tl.float32)
    if HID <= BLOCK_H:  # one hidden slice: its weights loaded and laid out as MMA operands once a program
        w1, b1, offs_h, mask_h = _slice_w1(W1, B1, 0, offs_c, mask_c, C, HID, CDT, BLOCK_H)
        w2s = _w2_slice(W2, offs_h, mask_h, offs_c, mask_c, HID, CDT)
    tile = pid * TILES
    stop = tl.minimum(tile + TILES, N_TILES)
    while tile < stop:  # (a while loop: the interpreter takes no tensor bounds in range())
        rows, offs_c, mask_n, mask_c, tok, mask_nc = _tile(tile, ROWS, C, BLOCK_N, BLOCK_C)
        mean = tl.load(MEAN + rows, mask=mask_n, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_n, other=0.0)
        x = tl.load(X + tok, mask=mask_nc, other=0.0).to(tl.float32)
        xhat, xn = _normalised(x, mean, rstd, LNW, LNB, offs_c, mask_c, mask_nc)
        xn = _to_compute(xn, CDT)
        if STASH:
            tl.store(N_ST + tok, xn, mask=mask_nc)
        if STAGE_NORM:
            g, dys, ohat = _stage_norm_grad(OUT, G, G2, SNW, tok, mask_nc, offs_c, mask_c, C, stage_eps, HAS_G2)
            dgamma_s += dys * ohat  # (tile-shaped: no ROW_SUMS at C ≤ 64)
            dbeta_s += dys
            dy = _to_compute(g, CDT)
            tl.store(DY_ST + tok, dy, mask=mask_nc)
        else:
            g = tl.load(G + tok, mask=mask_nc, other=0.0).to(tl.float32)
            dy = _to_compute(g, CDT)
        if HID <= BLOCK_H:
            dn = _slice_dn(xn, dy, w1, b1, w2s, W2, offs_c, mask_c, offs_h, mask_h, rows, mask_n, DH_ST, A_ST,
                           HID, CDT, STASH, True)
        else:
            dn = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            for h0 in range(0, HID, BLOCK_H):
                w1_h, b1_h, offs_hh, mask_hh = _slice_w1(W1, B1, h0, offs_c, mask_c, C, HID, CDT, BLOCK_H)
                dn += _slice_dn(xn, dy, w1_h, b1_h, w1_h, W2, offs_c, mask_c, offs_hh, mask_hh, rows, mask_n,
                                DH_ST, A_ST, HID, CDT, STASH, False)  # (w1_h stands in for the unused w2s)
        dn = _rounded(dn, CDT)
        _store_dx(DX, tok, mask_nc, dn, xhat, g, gamma, rstd, C)
        if ROW_SUMS:
            dgamma += tl.sum(dn * xhat, 0)
            dbeta += tl.sum(dn, 0)
            if not STASH:
                db2 += tl.sum(dy.to(tl.float32), 0)
        else:
            dgamma += dn * xhat
            dbeta += dn
            if not STASH:
                db2 += dy.to(tl.float32)
        tile += 1
    part = PART + pid.to(tl.int64) * (2 if STASH else (5 if STAGE_NORM else 3)) * C
    if not ROW_SUMS:
        dgamma, dbeta, db2 = tl.sum(dgamma, 0), tl.sum(dbeta, 0), tl.sum(db2, 0)
        if STAGE_NORM:
            dgamma_s, dbeta_s = tl.sum(dgamma_s, 0), tl.sum(dbeta_s, 0)
    _store_ln_partials(part, offs_c, mask_c, dgamma, dbeta, db2, C, not STASH)
    if STAGE_NORM:
        _store_ln_partials(part + 3 * C, offs_c, mask_c, dgamma_s, dbeta_s, db2, C, False)


_ffn_bwd_dx_kernel = _pinned("dx", _ffn_bwd_dx_kernel)


@triton.jit
def _ffn_bwd_wgrad_kernel(
    X, G, LNW, LNB, W1, B1, W2, MEAN, RSTD, PART,
    ROWS,
    C: tl.constexpr, HID: tl.constexpr, CDT: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """fp32 partials of hidden slice pid_h over row chunk pid_c, in row pid_c of PART (n_chunks ×
    (2·H·C + H)): dW1[slice, :] at [0, H·C), db1[slice] at [H·C, H·C + H), dW2[:, slice] after."""
    h0 = tl.program_id(0) * BLOCK_H
    pid_c = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dw1 = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    dw2t = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)  # dW2[:, slice]ᵀ
    db1 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)  # summed over rows after the loop (one reduction)
    row_start = pid_c * CHUNK_ROWS
    for r in range(0, CHUNK_ROWS, BLOCK_N):
        rows = row_start + r + tl.arange(0, BLOCK_N)
        mask_n = (rows < ROWS) & (rows < row_start + CHUNK_ROWS)
        mask_nc = mask_n[:, None] & mask_c[None, :]
        tok = rows[:, None] * C + offs_c[None, :]
        mean = tl.load(MEAN + rows, mask=mask_n, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_n, other=0.0)
        x = tl.load(X + tok, mask=mask_nc, other=0.0).to(tl.float32)
        _xhat, xn = _normalised(x, mean, rstd, LNW, LNB, offs_c, mask_c, mask_nc)
        xn = _to_compute(xn, CDT)
        dy = _to_compute(tl.load(G + tok, mask=mask_nc, other=0.0), CDT)
        h, w1, offs_h, mask_h = _hidden(xn, W1, B1, h0, offs_c, mask_c, C, HID, CDT, BLOCK_H)
        cdf, pdf = _gelu_parts(h)
        a = _to_compute(h * cdf, CDT)  # rows past the end: h = b1, but their dy rows are zero
        w2 = _w2_slice(W2, offs_h, mask_h, offs_c, mask_c, HID, CDT)  # loop-invariant: hoisted by the compiler
        dh = _to_compute(_rounded(_mm(dy, w2, CDT == 0), CDT) * (cdf + h * pdf), CDT)
        dw1 += _mm(tl.trans(dh), xn, CDT == 0)
        dw2t += _mm(tl.trans(a), dy, CDT == 0)
        db1 += dh.to(tl.float32)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    part = PART + pid_c * (2 * HID * C + HID)
    mask_hc = mask_h[:, None] & mask_c[None, :]
    tl.store(part + offs_h[:, None] * C + offs_c[None, :], dw1, mask=mask_hc)
    tl.store(part + HID * C + offs_h, tl.sum(db1, 0), mask=mask_h)
    tl.store(part + HID * C + HID + offs_c[None, :] * HID + offs_h[:, None], dw2t, mask=mask_hc)


_ffn_bwd_wgrad_kernel = _pinned("wgrad", _ffn_bwd_wgrad_kernel)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
compute_weights = _sub.compute_weights  # (cdt, *weights): the weights in the compute dtype


def _new(shape, device, dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _block_c(c: int) -> int:
    if c > _MAX_BLOCK_C:
        raise ValueError(f"ffn_sublayer: C = {c} > {_MAX_BLOCK_C} is not supported by the fused kernels")
    return max(32, triton.next_power_of_2(c))


def stash_pays(c: int, hid: int) -> bool:
    """Whether the backward stashes n, dH and A for GEMM weight gradients (else the recompute
    kernel): above C = 64 (the model's stages 3 and 4, C = 128 and 192), where the recompute
    kernel's per-slice LayerNorm and fc1 dominate (stage 3 since its two GEMMs share one launch,
    2026-12-06); below it the stash loses (its bytes, and the dx kernel's registers); the cost
    model's figures: docs/ffn_sublayer.md, "Weight gradients: two routes". `hid` is not consulted
    yet: every figure behind the rule is at the model's H = 2C."""
    return c > _STASH_ABOVE_C


def _tile_runs(n_tiles: int, sms: int | None, per_sm: int) -> tuple[int, int]:
    """(tiles a program, programs) of a kernel whose programs each take a run of tiles: about `per_sm`
    programs an SM, the tiles split evenly; 3 programs under the interpreter, so tests run several
    tiles in one program and a short last one. The FFN's dx kernel takes 4 an SM (two waves at its 2
    CTAs an SM), the decoder MLP's backward 2."""
    want = per_sm * sms if sms is not None else 3
    tiles = triton.cdiv(n_tiles, min(n_tiles, want))
    return tiles, triton.cdiv(n_tiles, tiles)


@dataclasses.dataclass(frozen=True)
class _StageNormArgs:
    """A stage's final LayerNorm as the forward kernel takes it: γ, β (contiguous), eps, and the dtypes
    of the maps it writes (`map_norm.output_dtypes`): the decoder's and the next convolution's copy
    (None: no copy)."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    y_dtype: torch.dtype
    copy_dtype: torch.dtype | None


def _forward(x2, lnw, lnb, w1, b1, w2, b2, eps: float, cdt: torch.dtype, stage: _StageNormArgs | None = None):
    """x2: rows × C contiguous; parameters as given (rounded to `cdt` on load). out in
    promote(x, cdt), mean and rstd fp32. With `stage`, also the stage's final LayerNorm of out:
    (out, mean, rstd, y, y2), y and y2 rows × C in the dtypes `stage` names (y2 None without a copy)."""
    rows, c = x2.shape
    dev = x2.device
    out = _new((rows, c), dev, torch.promote_types(x2.dtype, cdt))
    mean = _new((rows,), dev, torch.float32)
    rstd = _new((rows,), dev, torch.float32)
    y = y2 = None
    if stage is not None:
        y = _new((rows, c), dev, stage.y_dtype)
        y2 = None if stage.copy_dtype is None else _new((rows, c), dev, stage.copy_dtype)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]),)  # noqa: E731
    _ffn_fwd_kernel[grid](x2, lnw, lnb, w1, b1, w2, b2, out, mean, rstd,
                          *((stage.weight, stage.bias, y, y if y2 is None else y2) if stage else (lnw, lnb, out, out)),
                          rows, float(eps), float(stage.eps) if stage else 1.0,
                          C=c, HID=w1.shape[0], CDT=_CDT[cdt], BLOCK_C=_block_c(c), STAGE_NORM=stage is not None,
                          COPY=y2 is not None)
    return (out, mean, rstd) if stage is None else (out, mean, rstd, y, y2)


@dataclasses.dataclass(frozen=True)
class _StageGrad:
    """A stage's final LayerNorm whose backward the dx kernel runs first (STAGE_NORM): the saved out
    (rows × C), γ_s, eps, and the gradients of the maps it wrote, dy and the copy's dy2 (or None),
    rows × C contiguous."""

    out: torch.Tensor
    weight: torch.Tensor
    eps: float
    dy: torch.Tensor
    dy2: torch.Tensor | None


def _backward(x2, lnw, lnb, w1, b1, w2, mean, rstd, g, cdt: torch.dtype, b2_dtype: torch.dtype,
              wg_chunk_rows: int | None = None, stash: bool | None = None, w_dtype: torch.dtype | None = None,
              more_partials: tuple = (), stage: _StageGrad | None = None):
    """(dx, dγ, dβ, dW1, db1, dW2, db2): dx in x's dtype, each parameter's gradient in its dtype (b2's
    is `b2_dtype`: b2 itself is not needed; w1's and w2's is `w_dtype` when they are given as casts,
    `compute_weights`). `stash` picks the weight gradients' route (default
    `stash_pays`): the dx kernel stores n, dH, A and two GEMM launches sum dW1 = dHᵀ n, dW2 = dyᵀ A,
    or the recompute kernel derives them again from x and g. `more_partials`: (part, out) pairs of
    another backward's partial rows (at most two), summed in the same `sum_partials` launch.
    `stage` (recompute route only; g is then None): g comes from the stage norm's backward inside the
    dx kernel, which stores dy for the weight-gradient kernel; returns (the seven, [dγ_s | dβ_s] fp32)."""
    rows, c = x2.shape
    hid = w1.shape[0]
    dev = x2.device
    block_c = _block_c(c)
    code = _CDT[cdt]
    stash = stash_pays(c, hid) if stash is None else bool(stash)
    if stage is not None and stash:
        raise ValueError("ffn_sublayer: the stage norm's backward runs in the recompute route only")
    shape_class = f"{_mode({'CDT': code, 'X': x2})}_c{block_c}"  # the class both kernels launch with
    dx_class = shape_class + ("_stage" if stage is not None else "")
    dx = _new((rows, c), dev, x2.dtype)
    # the stash (n, dH, A in the compute dtype; never touched when STASH is off: dx stands in)
    n_st, dh_st, a_st = ((_new((rows, c), dev, cdt), _new((rows, hid), dev, cdt), _new((rows, hid), dev, cdt))
                         if stash else (dx, dx, dx))

    # the host sizes both grids by the pinned blocks: one dx program per run of row tiles
    sms = _core._sm_count(dev)
    n_tiles = triton.cdiv(rows, _ffn_bwd_dx_kernel.pinned_kwarg(dx_class, "BLOCK_N", dev))
    tiles, n_progs = _tile_runs(n_tiles, sms, per_sm=4)
    # [dγ | dβ (| db2 (| dγ_s | dβ_s))]
    ln_part = _new((n_progs, (2 if stash else (5 if stage is not None else 3)) * c), dev, torch.float32)
    if stage is None:
        grad_in, out, snw, grad2, dy_st, stage_eps = g, dx, dx, dx, dx, 0.0  # (the stage's: placeholders)
    else:  # the maps' gradients in g's place; the kernel stores dy, g in the compute dtype
        dy_st = _new((rows, c), dev, cdt)
        grad_in, out, snw, stage_eps = stage.dy, stage.out, stage.weight, stage.eps
        grad2 = stage.dy if stage.dy2 is None else stage.dy2
        g = dy_st  # what the weight gradients read as g: they round it to the compute dtype, a no-op here
    _ffn_bwd_dx_kernel[(n_progs,)](x2, grad_in, lnw, lnb, w1, b1, w2, mean, rstd, dx, ln_part, n_st, dh_st, a_st,
                                   out, snw, grad2, dy_st, rows, n_tiles, tiles, stage_eps, C=c, HID=hid, CDT=code,
                                   BLOCK_C=block_c, STASH=stash, STAGE_NORM=stage is not None,
                                   HAS_G2=stage is not None and stage.dy2 is not None)

    # weight gradients as fp32 partials a row chunk, [dW1 | db1 | dW2 (| db2 = Σ dy, with the stash)] a row
    if stash:
        block_i, block_j = (_sub._wg_block(code == 0, dev, k) for k in ("BLOCK_I", "BLOCK_J"))
        # chunks of ≥ 2·H rows: a chunk's 2·H·C fp32 partial then costs under a third of what it reads
        chunk, n_chunks = row_chunks(rows, triton.cdiv(hid, block_i) * triton.cdiv(c, block_j), 2 * hid, sms,
                                     wg_chunk_rows, interpreter_rows=32)
        w_part = _new((n_chunks, 2 * hid * c + hid + c), dev, torch.float32)
        _sub.launch_wgrad([_sub.wgrad_group(dh_st, n_st, w_part[:, :hid * c + hid], chunk),
                           _sub.wgrad_group(g, a_st, w_part[:, hid * c + hid:], chunk)], code == 0)
    else:
        block_h = _ffn_bwd_wgrad_kernel.pinned_kwarg(shape_class, "BLOCK_H", dev)
        # chunks of ≥ 256 rows: the (2·H·C + H) fp32 partial then costs under a tenth of what it reads
        chunk, n_chunks = row_chunks(rows, triton.cdiv(hid, block_h), 256, sms, wg_chunk_rows, interpreter_rows=32)
        w_part = _new((n_chunks, 2 * hid * c + hid), dev, torch.float32)
        _ffn_bwd_wgrad_kernel[(triton.cdiv(hid, block_h), n_chunks)](
            x2, g, lnw, lnb, w1, b1, w2, mean, rstd, w_part, rows,
            C=c, HID=hid, CDT=code, BLOCK_C=block_c, CHUNK_ROWS=chunk)

    ln_sum = _new((ln_part.shape[1],), dev, torch.float32)
    w_sum = _new((w_part.shape[1],), dev, torch.float32)
    sum_partials((ln_part, ln_sum), (w_part, w_sum), *more_partials)
    # each gradient in its parameter's dtype (fp32 masters under autocast: no rounding)
    dlnw, dlnb = ln_sum[:c].to(lnw.dtype), ln_sum[c:2 * c].to(lnb.dtype)
    db2 = (w_sum[2 * hid * c + hid:] if stash else ln_sum[2 * c:3 * c]).to(b2_dtype)
    w_dtype = w1.dtype if w_dtype is None else w_dtype
    dw1 = w_sum[:hid * c].view(hid, c).to(w_dtype)
    db1 = w_sum[hid * c:hid * c + hid].to(b1.dtype)
    dw2 = w_sum[hid * c + hid:2 * hid * c + hid].view(c, hid).to(w_dtype)
    grads = (dx, dlnw, dlnb, dw1, db1, dw2, db2)
    return grads if stage is None else (grads, ln_sum[3 * c:])


class FFNSublayerFunction(torch.autograd.Function):
    """The fused sublayer; saves x, the LayerNorm parameters and the biases (inputs), w1 and w2 in
    the compute dtype (the inputs themselves unless mixed: then their casts, made once for both
    passes) and the LayerNorm statistics."""

    @staticmethod
    def forward(ctx, x2, lnw, lnb, w1, b1, w2, b2, eps, cdt, wg_chunk_rows=None, stash=None):
        w1c, w2c = compute_weights(cdt, w1, w2)
        out, mean, rstd = _forward(x2, lnw, lnb, w1c, b1, w2c, b2, eps, cdt)
        ctx.save_for_backward(x2, lnw, lnb, w1c, b1, w2c, mean, rstd)
        ctx.cdt, ctx.wg_chunk_rows, ctx.stash = cdt, wg_chunk_rows, stash
        ctx.b2_dtype = b2.dtype
        ctx.w_dtype = w1.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x2, lnw, lnb, w1, b1, w2, mean, rstd = ctx.saved_tensors
        grads = _backward(x2, lnw, lnb, w1, b1, w2, mean, rstd, g.contiguous(), ctx.cdt, ctx.b2_dtype,
                          ctx.wg_chunk_rows, ctx.stash, ctx.w_dtype)
        return (*grads, None, None, None, None)


def rows_as_map(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Rows × C tokens of B images of h×w as the channels-last B×C×h×w map they are (a view)."""
    rows, c = t.shape
    h, w = hw
    return t.view(rows // (h * w), h, w, c).permute(0, 3, 1, 2)


def map_as_rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last B×C×h×w map as its rows × C tokens (a view), `rows_as_map`'s inverse."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _stage_norm_backward(out, snw, dy, dy2, eps: float, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂out rows × C, the partial rows [dγ_s | dβ_s] to sum) of the stage's final LayerNorm, by
    `map_norm`'s backward kernel on out seen as the channels-last map it normalised (its statistics
    recomputed from out). The FFN's backward sums the partial rows with its own, in one launch."""
    from msf.kernels import map_norm as _mn  # (it imports attention_block, which imports this module)
    g_map, part = _mn.backward_partials(rows_as_map(out, hw), snw, dy.contiguous(), eps,
                                        None if dy2 is None else dy2.contiguous())
    return map_as_rows(g_map), part  # (channels-last, as out: a view)


def _stage_output_backward(x2, lnw, lnb, w1, b1, w2, mean, rstd, out, snw, dy, dy2, cdt: torch.dtype,
                           b2_dtype: torch.dtype, w_dtype: torch.dtype, stage_eps: float, hw: tuple[int, int]):
    """(`_backward`'s seven gradients, [dγ_s | dβ_s] fp32) of a stage's last FFN sublayer and its final
    LayerNorm, from dy (and the copy's dy2, or None), rows × C: on the recompute route (C ≤ 64) the
    norm's backward runs inside the FFN's dx kernel, ∂L/∂out never in memory; on the stash route
    `map_norm`'s kernel writes ∂L/∂out first (the dx kernel there has no registers to spare)."""
    if stash_pays(snw.shape[0], w1.shape[0]):
        g, sn_part = _stage_norm_backward(out, snw, dy, dy2, stage_eps, hw)
        sn_sum = _new((sn_part.shape[1],), sn_part.device, torch.float32)
        grads = _backward(x2, lnw, lnb, w1, b1, w2, mean, rstd, g, cdt, b2_dtype, w_dtype=w_dtype,
                          more_partials=((sn_part, sn_sum),))
        return grads, sn_sum
    stage = _StageGrad(out, snw, stage_eps, dy.contiguous(), None if dy2 is None else dy2.contiguous())
    return _backward(x2, lnw, lnb, w1, b1, w2, mean, rstd, None, cdt, b2_dtype, w_dtype=w_dtype, stage=stage)


class FFNStageOutputFunction(torch.autograd.Function):
    """A stage's last FFN sublayer with the stage's final LayerNorm in its forward kernel (out is not
    read back for it). Returns y (rows × C), or (y, y2) with the copy. Saves what
    FFNSublayerFunction saves, out (the norm's input) and γ_s; the backward runs the norm's backward
    inside the FFN's dx kernel, or before it (`_stage_output_backward`)."""

    @staticmethod
    def forward(ctx, x2, lnw, lnb, w1, b1, w2, b2, eps, cdt, snw, snb, stage_eps, hw, y_dtype, copy_dtype):
        w1c, w2c = compute_weights(cdt, w1, w2)
        out, mean, rstd, y, y2 = _forward(x2, lnw, lnb, w1c, b1, w2c, b2, eps, cdt,
                                          _StageNormArgs(snw, snb, stage_eps, y_dtype, copy_dtype))
        ctx.save_for_backward(x2, lnw, lnb, w1c, b1, w2c, mean, rstd, out, snw)
        ctx.cdt, ctx.b2_dtype, ctx.w_dtype, ctx.sn_dtype = cdt, b2.dtype, w1.dtype, snb.dtype
        ctx.stage_eps, ctx.hw = stage_eps, hw
        ctx.set_materialize_grads(False)
        return y if y2 is None else (y, y2)

    @staticmethod
    def backward(ctx, dy, dy2=None):
        x2, lnw, lnb, w1, b1, w2, mean, rstd, out, snw = ctx.saved_tensors
        if dy is None:  # only the copy was used
            dy, dy2 = dy2, None
        grads, sn_sum = _stage_output_backward(x2, lnw, lnb, w1, b1, w2, mean, rstd, out, snw, dy, dy2, ctx.cdt,
                                               ctx.b2_dtype, ctx.w_dtype, ctx.stage_eps, ctx.hw)
        c = snw.shape[0]
        return (*grads, None, None, sn_sum[:c].to(snw.dtype), sn_sum[c:].to(ctx.sn_dtype), None, None, None, None)


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------
def compute_dtype(x, lnw, lnb, w1, b1, w2, b2) -> torch.dtype | None:
    """The dtype the products run in, or None when the kernels do not serve the mix:
    under autocast on x's device, autocast's bf16 / fp16 when every tensor is fp32 or that dtype
    (the model under CUDA autocast: fp32 x and master weights); otherwise the dtype all seven share
    (fp32, bf16 or fp16)."""
    return products_dtype((x, lnw, lnb, w1, b1, w2, b2))


def fused_supported(dtype: torch.dtype, c: int) -> bool:
    """Whether the kernels run for products in `dtype` at C channels (any hidden width): bf16 / fp16
    up to C = 256 (the model's 32-192), fp32 up to 64."""
    return 0 < c <= (_MAX_FP32_C if dtype == torch.float32 else _MAX_BLOCK_C)


def _check(x, lnw, lnb, w1, b1, w2, b2, eps) -> None:
    if x.dim() < 1:
        raise ValueError("ffn_sublayer: x must have a channel dimension")
    c = x.shape[-1]
    if lnw.shape != (c,) or lnb.shape != (c,):
        raise ValueError(f"ffn_sublayer: LayerNorm weight and bias must have C = {c} elements, got "
                         f"{tuple(lnw.shape)}, {tuple(lnb.shape)}")
    if w1.dim() != 2 or w1.shape[1] != c or b1.shape != (w1.shape[0],) or w2.shape != (c, w1.shape[0]) \
            or b2.shape != (c,):
        raise ValueError(f"ffn_sublayer: fc1 must be H×C ({c} inputs) with bias H and fc2 C×H with bias C; got "
                         f"w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    if not eps > 0:
        raise ValueError(f"ffn_sublayer: eps must be positive, got {eps}")
    ts = (x, lnw, lnb, w1, b1, w2, b2)
    if len({t.device for t in ts}) != 1:
        raise ValueError("ffn_sublayer: tensors on different devices")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("ffn_sublayer: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def dispatch(x, lnw, lnb, w1, b1, w2, b2, eps: float, fused):
    """What both entries (this module's `ffn_sublayer` and `msf::ffn_sublayer`'s in kernels/ops.py) do:
    check the arguments, then `fused(x2, γ, β, w1, b1, w2, b2, eps, compute_dtype)` on rows × C where the
    kernels serve the dtypes and C, else the eager composition."""
    _check(x, lnw, lnb, w1, b1, w2, b2, eps)
    cdt = compute_dtype(x, lnw, lnb, w1, b1, w2, b2)
    if cdt is None or x.numel() == 0 or not fused_supported(cdt, x.shape[-1]):
        return ffn_sublayer_eager(x, lnw, lnb, w1, b1, w2, b2, eps)
    c = x.shape[-1]
    params = (t.contiguous() for t in (lnw, lnb, w1, b1, w2, b2))
    return fused(x.reshape(-1, c).contiguous(), *params, float(eps), cdt).view(*x.shape[:-1], c)


def dispatch_stage_norm(x, lnw, lnb, w1, b1, w2, b2, eps: float, stage_norm: StageNorm, fused, sublayer,
                        stage_output):
    """What both entries do with a stage's final norm (`ffn_sublayer`'s `stage_norm`): on B×(h·w)×C
    tokens x, where the FFN's kernels and `map_norm`'s serve, `fused(x2, γ, β, w1, b1, w2, b2, eps,
    compute_dtype, γ_s, β_s, eps_s, hw, the maps' dtype, the copy's)` (y, or (y, y2) with a copy,
    rows × C); else `stage_output(sublayer(x, ...), ...)`, the two ops one after the other (either
    may then be eager). Returns `eager_stage_output`'s pair of B×C×h×w maps."""
    from msf.kernels import map_norm as _mn  # (it imports attention_block, which imports this module)
    _check(x, lnw, lnb, w1, b1, w2, b2, eps)
    sn = stage_norm
    h, w = sn.hw
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"ffn_sublayer: with a stage norm x must be B×(h·w)×C tokens for hw = {tuple(sn.hw)}, "
                         f"got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if sn.weight.shape != (c,) or sn.bias.shape != (c,):
        raise ValueError(f"ffn_sublayer: the stage norm's weight and bias must have C = {c} elements, got "
                         f"{tuple(sn.weight.shape)}, {tuple(sn.bias.shape)}")
    if not sn.eps > 0:
        raise ValueError(f"ffn_sublayer: the stage norm's eps must be positive, got {sn.eps}")
    cdt = compute_dtype(x, lnw, lnb, w1, b1, w2, b2)
    dtypes = None
    if cdt is not None and x.numel() > 0 and fused_supported(cdt, c) and c <= _mn._MAX_C:
        dtypes = _mn.output_dtypes(torch.promote_types(x.dtype, cdt), x.device.type, sn.weight, sn.bias,
                                   sn.feeds_next, sn.decoder_linear)
    if dtypes is None or sn.weight.device != x.device or sn.bias.device != x.device:
        return sn.applied(sublayer(x, lnw, lnb, w1, b1, w2, b2, eps), stage_output)
    y_dtype, copy_dtype = dtypes
    params = (t.contiguous() for t in (lnw, lnb, w1, b1, w2, b2))
    ys = fused(x.reshape(-1, c).contiguous(), *params, float(eps), cdt, sn.weight.contiguous(), sn.bias.contiguous(),
               float(sn.eps), (int(h), int(w)), y_dtype, copy_dtype)
    y, y2 = (ys, ys) if copy_dtype is None else ys
    return tuple(tokens_to_map(t.view(x.shape), h, w) for t in (y, y2))


def ffn_sublayer(x, lnw, lnb, w1, b1, w2, b2, eps: float = 1e-5, stage_norm: StageNorm | None = None, *,
                 wg_chunk_rows: int | None = None, stash: bool | None = None):
    """`x + fc2(GELU(fc1(LayerNorm(x))))` (shapes in the module docstring): fused forward and backward
    where `compute_dtype` says the kernels serve the dtypes and C ≤ 256, else the eager composition.
    With `stage_norm` (a stage's last block; x then B×(h·w)×C) the stage's output maps instead, as
    `msf.reference.eager_ffn_sublayer` gives them: the norm inside the forward kernel where it
    serves (`dispatch_stage_norm`). `wg_chunk_rows` overrides the weight gradients' row chunk and
    `stash` their route (default `stash_pays`); tests use both (not with `stage_norm`)."""
    if stage_norm is not None:
        from msf.kernels.map_norm import stage_output
        return dispatch_stage_norm(x, lnw, lnb, w1, b1, w2, b2, eps, stage_norm,
                                   lambda *args: FFNStageOutputFunction.apply(*args), ffn_sublayer, stage_output)
    return dispatch(x, lnw, lnb, w1, b1, w2, b2, eps,
                    lambda *args: FFNSublayerFunction.apply(*args, wg_chunk_rows, stash))


# ----------------------------------------------------------------------------------------------
# ahead-of-time builds: every kernel × C block × dtype class × configuration, at the model's
# hidden width 2C (C = 192 for the 256 block)
# ----------------------------------------------------------------------------------------------
_AOT_C = {32: 32, 64: 64, 128: 128, 256: 192}
_AOT_PTRS = {
    "fwd": ("X", "LNW", "LNB", "W1", "B1", "W2", "B2", "OUT"),
    # (the dx kernel's last four: the stage norm's, dx itself as their placeholder without it)
    "dx": ("X", "G", "LNW", "LNB", "W1", "B1", "W2", "DX", "OUT", "SNW", "G2", "DY_ST"),
    "wgrad": ("X", "G", "LNW", "LNB", "W1", "B1", "W2"),
}
_AOT_WEIGHT_PTRS = ("W1", "W2")
_AOT_STASH_PTRS = ("N_ST", "DH_ST", "A_ST")  # the dx kernel's stash: in the compute dtype
_AOT_F32 = {"fwd": ("MEAN", "RSTD"), "dx": ("MEAN", "RSTD", "PART"), "wgrad": ("MEAN", "RSTD", "PART")}
_AOT_KERNELS = {"fwd": _ffn_fwd_kernel, "dx": _ffn_bwd_dx_kernel, "wgrad": _ffn_bwd_wgrad_kernel}
_AOT_DTYPE = {"16": ("bf16", 1), "amp": ("fp32", 1), "fp32": ("fp32", 0)}
_AOT_CHUNK = 1024
# the forward with a stage's final norm as the model runs it under autocast: fp32 γ_s, β_s, the
# decoder's map in bf16 and (stages 1-3, C ≤ 128) the next convolution's bf16 copy; stage 4 (the 256
# block) has no next stage
_AOT_STAGE_PTRS = {"SNW": "*fp32", "SNB": "*fp32", "Y": "*bf16", "Y2": "*bf16"}
# the dx kernel with that norm's backward (C ≤ 64): the two maps' bf16 gradients, the saved fp32 out, fp32
# γ_s, and dy stored in the compute dtype
_AOT_STAGE_DX_PTRS = {"G": "*bf16", "G2": "*bf16", "OUT": "*fp32", "SNW": "*fp32", "DY_ST": "*bf16"}


def _one_arch(kernel: str, block_c: int, tile: _Cfg, stage: bool) -> tuple[int, ...] | None:
    """The one architecture a tile is allowed on, where it is not both: (90,) for the `_SM90_ONLY` tiles
    of the classes without the stage norm, else None. The AOT specs and the pins (`_archs`) both ask
    here. (Below the kernels: Triton's cache key holds their line numbers, and lines added above them
    rebuild every AOT spec.)"""
    return (90,) if not stage and tile in _SM90_ONLY.get((kernel, block_c), ()) else None


def _archs(kernel: str, cls: str, cfg: triton.Config) -> tuple[int, ...] | None:
    """`PinnedKernel.archs` of the FFN kernels: `_one_arch` of a configuration of shape class `cls`."""
    base, stage, _ = cls.partition("_stage")
    return _one_arch(kernel, int(base.rsplit("_c", 1)[1]),
                     (cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_H"], cfg.num_warps, cfg.num_stages), bool(stage))


def _aot_specs() -> list[AotSpec]:
    specs = []
    # (kernel, its allow-lists, variant tag, extra pointer types, extra constexprs (a function of the C block));
    # the forward and the dx kernel also with a stage's final norm, in the model's dtypes (`_AOT_STAGE_PTRS`,
    # `_AOT_STAGE_DX_PTRS`), amp only
    builds = [("fwd", _ALLOWED["fwd"], "", {}, lambda _bc: {"STAGE_NORM": False, "COPY": False}),
              ("fwd", {"amp": _ALLOWED_STAGE_FWD["amp"]}, "_stage", _AOT_STAGE_PTRS,
               lambda bc: {"STAGE_NORM": True, "COPY": bc < 256}),
              ("dx", _ALLOWED["dx"], "", {}, lambda _bc: {"STAGE_NORM": False, "HAS_G2": False}),
              ("dx", {"amp": _ALLOWED_STAGE_DX["amp"]}, "_stage", _AOT_STAGE_DX_PTRS,
               lambda _bc: {"STAGE_NORM": True, "HAS_G2": True}),
              ("wgrad", _ALLOWED["wgrad"], "", {}, lambda _bc: {})]
    for kname, lists, tag, extra_ptrs, extra_const in builds:
        kernel = _AOT_KERNELS[kname]
        for mode, per_c in lists.items():
            dname, code = _AOT_DTYPE[mode]
            ptrs = {**{a: f"*{dname}" for a in _AOT_PTRS[kname]}, **{a: "*fp32" for a in _AOT_F32[kname]}}
            # in the compute dtype: the C×H weights (`compute_weights`) and the dx kernel's stash
            ptrs.update({a: "*fp32" if code == 0 else "*bf16"
                         for a in _AOT_WEIGHT_PTRS + (_AOT_STASH_PTRS if kname == "dx" else ())}, **extra_ptrs)
            for block_c, cfgs in per_c.items():
                for bn, bh, w, st in cfgs:
                    const = {"C": _AOT_C[block_c], "HID": 2 * _AOT_C[block_c], "CDT": code, "BLOCK_C": block_c,
                             "BLOCK_N": bn, "BLOCK_H": bh, **extra_const(block_c)}
                    if kname == "wgrad":
                        const["CHUNK_ROWS"] = _AOT_CHUNK
                    # the dx kernel in the route the model takes at this C (`stash_pays`)
                    stash = kname == "dx" and stash_pays(_AOT_C[block_c], 2 * _AOT_C[block_c])
                    if kname == "dx":
                        const["STASH"] = stash
                    spec = _aot_spec(f"ffn_sublayer.{kname}_{mode}_c{block_c}_n{bn}_h{bh}_w{w}_s{st}"
                                     + ("_stash" if stash else "") + tag, kernel.fn, ptrs, const, w, st,
                                     floats=("eps", "stage_eps"))
                    spec = dataclasses.replace(spec, archs=_one_arch(kname, block_c, (bn, bh, w, st), bool(tag)) or ())
                    specs.append(spec)
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
