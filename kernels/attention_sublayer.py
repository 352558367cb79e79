"""Fused attention sublayer: q projection + attention core + output projection + residual, in Triton.

    out = residual + (softmax((x wqᵀ + bq) kᵀ / √C) v) woᵀ + bo

    x (normalised tokens), residual, out: B×N×C      k, v: B×M×C (any strides: halves of packed kv)
    wq, wo: C×C (nn.Linear's out×in), bq, bo: C      saved: O (B×N×C) and lse (B×N fp32)

It computes what the eager composition computes (`msf.reference.composed_attention_sublayer`),
in one dtype (fp32 / bf16 / fp16) or in autocast's mixed precision (`_precision`): bf16 or fp16 k
and v, fp32 or compute-dtype x / residual, fp32 master weights rounded to it as autocast's casts
round them (wq, wo once on the host, bq, bo on load). The key/value side (spatial reduction,
LayerNorm, kv Linear) stays outside: the model runs this sublayer inside
`msf.kernels.attention_block`, which fuses that side and the LayerNorm around it. fp32 at C > 128
composes the eager pieces instead (no spill-free tf32x3 tile there).

Kernels (no atomics; weight gradients through per-chunk fp32 partials and one fixed-order sum):
- `_sub_fwd_kernel`: q formed on chip from x, the core's online-softmax sweep, then the output
  projection slice by slice with bo and the residual added: x and residual read once, out written once.
  With PE (a stage's first block, `MapResidual`) the residual is the patch embedding's LayerNorm of
  its map, formed slice by slice from the map and the per-token (mean, rstd) the block's kv kernel
  wrote: the block input is never written as B×N×C tokens.
- `_sub_bwd_dq_kernel`: recomputes q, forms dO = g wo, sweeps K/V for dQ, writes dx = dQ wq and
  the q, dO, dQ scratch the next steps read.
- the core's `_attn_bwd_dkdv_kernel` (+ `_attn_bwd_reduce_kernel`): dK, dV from q and dO.
- `_sub_wgrad_kernel` (one launch, both products) and one `partial_sums` launch: dWq, dbq, dWo, dbo (in the attention
  block's backward, both are shared: its one weight-gradient launch takes up to three groups of
  products of any shapes, `wgrad_group` / `launch_wgrad`, and its one sum all its parameters).

docs/attention_sublayer.md: the mixed-precision rules in full, the backward's math, the bytes
against eager and eager+sdpa per stage, the cost-model figures and the cuts not made.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from msf.kernels import attention as _core
from msf.kernels._common import INTERPRET, AotSpec, _round, _vec, row_chunks
from msf.kernels.configs import PinnedKernel, candidate_order
from msf.kernels.attention import _aot_spec, _attn_dq_sweep, _attn_fwd_sweep, _mm, _row_block
from msf.kernels.partial_sums import sum_partials

__all__ = ["attention_sublayer", "attention_sublayer_eager", "AttentionSublayerFunction", "AOT_SPECS",
           "bytes_table", "fused_supported"]

_LOG2E = 1.4426950408889634
_BLOCK_K = 32  # column slice of the projections (q = Σ_slices x[:, s] wqᵀ[s, :]; out by woᵀ column slices)


def _d_ceil(c: int) -> int:
    """C rounded up to whole BLOCK_K slices: the projection loops' constexpr bound. Below BLOCK_D only
    when C is not a power of two: at C = 192 (a 256 block) they take 6 slices, not 8 (the last two
    would be all-masked: loads of nothing and dots with zeros)."""
    return triton.cdiv(c, _BLOCK_K) * _BLOCK_K


def attention_sublayer_eager(x_norm, residual, k, v, wq, bq, wo, bo):
    """Reference: plain Linear → matmul/softmax/matmul → Linear → + residual."""
    q = F.linear(x_norm, wq, bq)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return residual + F.linear(scores.softmax(dim=-1) @ v, wo, bo)


def _composed(x_norm, residual, k, v, wq, bq, wo, bo):
    """The fallback: the core attention between eager projections (autograd does the backward)."""
    return residual + F.linear(_core.attention(F.linear(x_norm, wq, bq), k, v), wo, bo)


# ----------------------------------------------------------------------------------------------
# configurations: (BLOCK_N, BLOCK_M, num_warps, num_stages) per kernel, dtype class, d block; each
# built for sm_80 and sm_90 without spills both with the launch specialisation of the model's shapes
# (AOT_SPECS' `attrs`, what `python -m msf.profiling.report` builds) and without it (scalar loads; the
# core's rule). Left out for spilling: dq fp32 (32, 32, 8, 2) at d 32 and (16, 16, 4, x) at d 128
# (with attrs), dq bf16 (64, 64, 4, 2) at d 32/64, (32, 32, 8, 2) at d 256, fp32 (32, 32, 4, 2) at
# d 64 (plain build only). The dq kernel carries the q and dO projections and the dx projection on
# top of the core's dq work, hence smaller row blocks than the core at d 256. Added 2026-12-06 from
# `python -m msf.profiling.cost --sweep --op attention_block` (model v3; the earlier lists predate its
# latency and whole-program wave terms, under which the 8-warp tiles at one or two CTAs an SM lose):
# amp fwd (32, 32, 4, 2) at d 64, 128 and 256, (16, 32, 4, 2) at d 256 ((64, 64, 4, 2) at d 64, predicted
# 57.2 -> 48.9 us on the H100, spills 8 B on sm_80, as noted above; (32, 32, 4, 2) there is the A100's,
# 207 -> 95 us); amp dq
# (16, 32, 4, 2) at d 32 and 128, (32, 32, 4, 2) at d 256 (251 / 255 registers with the launch
# specialisation; the plain build was not checked). Then under model v3.1: amp dq (32, 32, 4, 2) and
# (16, 16, 4, 2) at d 128 (H100 34.5 -> 31.1 us, A100 63.4 -> 58.0 a stage-3 block) and the amp
# forward's (64, 64, 4, 2) at d 64 for sm_90 only (`_SM90_ONLY`). The pins choose among them per
# architecture.
# ----------------------------------------------------------------------------------------------
_Cfg = tuple[int, int, int, int]
_ALLOWED: dict[str, dict[str, dict[int, list[_Cfg]]]] = {
    "fwd": {
        "16": {32: [(64, 64, 4, 2)], 64: [(64, 64, 4, 2)], 128: [(64, 64, 8, 2)], 256: [(32, 32, 8, 2)]},
        "tf32x3": {32: [(32, 32, 4, 2)], 64: [(32, 32, 4, 2)], 128: [(16, 32, 4, 2)]},
        # mixed precision (fp32 x / residual / out beside bf16 / fp16 k, v): "16" spills 8 B at d 64 on sm_80
        "amp": {32: [(64, 64, 4, 2)], 64: [(64, 64, 8, 2), (32, 32, 4, 2), (64, 64, 4, 2)],
                128: [(64, 64, 8, 2), (32, 32, 4, 2)],
                256: [(32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)]},
    },
    "dq": {
        "16": {32: [(64, 64, 8, 2), (32, 64, 4, 2)], 64: [(64, 64, 8, 2), (32, 32, 4, 2)], 128: [(32, 32, 8, 2)],
               256: [(16, 16, 8, 2), (16, 16, 8, 1)]},
        "tf32x3": {32: [(16, 32, 4, 2), (16, 16, 4, 2)], 64: [(16, 32, 4, 2), (16, 16, 4, 2)],
                   128: [(16, 16, 8, 1)]},
        "amp": {32: [(64, 64, 8, 2), (32, 64, 4, 2), (16, 32, 4, 2)], 64: [(64, 64, 8, 2), (32, 32, 4, 2)],
                128: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 2)],
                256: [(16, 16, 8, 2), (16, 16, 8, 1), (32, 32, 4, 2)]},
    },
}
# (kernel, dtype class, d block) → configurations of the lists above that build without spills on sm_90
# only: their AOT specs build for sm_90 alone and the pin never takes them for sm_80 (it skips a spilling
# build). Added 2026-12-06 from a sweep under cost model v3.1: the amp forward's (64, 64, 4) at d 64,
# H100 51.7 -> 45.3 us a stage-2 block (8 B of spill on sm_80; the A100 keeps (32, 32, 4)).
_SM90_ONLY: dict[tuple[str, str, int], set[_Cfg]] = {("fwd", "amp", 64): {(64, 64, 4, 2)}}
# weight-gradient kernel: (BLOCK_I, BLOCK_J, BLOCK_R, num_warps) per dtype class (tiles the C×C output)
_WG_ALLOWED: dict[str, list[tuple[int, int, int, int]]] = {"16": [(64, 64, 64, 4)], "tf32x3": [(32, 32, 32, 4)]}
# the interpreter's single configuration: small tiles so CPU tests see several rescalings / chunks
_INTERPRETER_CFG: dict[str, _Cfg] = {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2)}
_INTERPRETER_WG = (32, 32, 32, 4)


def _config_list(kernel: str) -> list[triton.Config]:
    lists = [cfgs for per_d in _ALLOWED[kernel].values() for cfgs in per_d.values()]
    return [triton.Config({"BLOCK_N": c[0], "BLOCK_M": c[1]}, num_warps=c[2], num_stages=c[3])
            for c in candidate_order(_INTERPRETER_CFG[kernel], *lists)]


def _as_wg_config(c: tuple[int, int, int, int]) -> triton.Config:
    return triton.Config({"BLOCK_I": c[0], "BLOCK_J": c[1], "BLOCK_R": c[2]}, num_warps=c[3], num_stages=2)


def _wg_config_list() -> list[triton.Config]:
    seen = [_INTERPRETER_WG] + [c for cfgs in _WG_ALLOWED.values() for c in cfgs if c != _INTERPRETER_WG]
    return [_as_wg_config(c) for c in seen]


def _mode(elem_bytes: int) -> str:
    return "16" if elem_bytes == 2 else "tf32x3"


# token tensors that are fp32 in mixed precision (the forward's R is the patch embedding's 16-bit map
# when it forms the residual from it: OUT is fp32 then)
_WIDE_ARGS = {"fwd": ("X", "R", "OUT"), "dq": ("X", "G")}


def _kernel_mode(kernel: str, named_args) -> str:
    """The dtype class of a launch: that of the compute dtype (K's), or "amp" for 16-bit k, v beside
    fp32 token tensors."""
    mode = _mode(named_args["K"].element_size())
    if mode == "16" and any(named_args[a].element_size() == 4 for a in _WIDE_ARGS[kernel]):
        return "amp"
    return mode


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        allowed = _ALLOWED[kernel][_kernel_mode(kernel, named_args)].get(kwargs["BLOCK_D"], [])
        kept = [c for c in configs
                if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) in allowed]
        return kept or configs[:1]
    return prune


def _shape_class(kernel: str):
    def shape_class(named_args) -> str:
        return f"{_kernel_mode(kernel, named_args)}_d{named_args['BLOCK_D']}"
    return shape_class


def _pinned(kernel: str, fn) -> PinnedKernel:
    """`fn` launched with its configuration from kernels/configs.json ("attention_sublayer.<kernel>";
    shape class = dtype class and d block, e.g. "amp_d64")."""
    def allowed(cls: str) -> list[triton.Config]:
        mode, d = cls.rsplit("_d", 1)
        return [triton.Config({"BLOCK_N": c[0], "BLOCK_M": c[1]}, num_warps=c[2], num_stages=c[3])
                for c in _ALLOWED[kernel][mode][int(d)]]
    classes = [f"{mode}_d{d}" for mode, per_d in _ALLOWED[kernel].items() for d in per_d]
    return PinnedKernel(f"attention_sublayer.{kernel}", fn, _config_list(kernel), ["N", "M", "BLOCK_D", "PRECISE"],
                        _shape_class(kernel), allowed, classes, _prune(kernel), lambda c, t: _archs(kernel, c, t))


def _wg_prune(configs, named_args, **kwargs):
    allowed = _WG_ALLOWED[_mode(min(named_args["A"].element_size(), named_args["B"].element_size()))]
    kept = [c for c in configs if (c.kwargs["BLOCK_I"], c.kwargs["BLOCK_J"], c.kwargs["BLOCK_R"], c.num_warps) in allowed]
    return kept or configs[:1]


def fused_supported(dtype: torch.dtype, c: int) -> bool:
    """Whether the Triton kernels run (else `_composed`): bf16/fp16 at C ≤ 256, fp32 at C ≤ 128."""
    return _core.fused_supported(dtype, c, allow_tf32=False)


# ----------------------------------------------------------------------------------------------
# forward (all loops have constexpr trip counts: see msf.kernels.attention's note on loops)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _project_rows(X, W, row, mask_n, offs_d, mask_d, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_K: tl.constexpr, D_CEIL: tl.constexpr, PRECISE: tl.constexpr, DT: tl.constexpr):
    """Σ_s X[rows, s] W[:, s]ᵀ (= X Wᵀ for the rows; W is D×D row-major), fp32, reading X in
    BLOCK_K-column slices (each element once). W is in DT, the compute dtype; X tiles are rounded to
    it on load: a no-op when they share it, bf16(x) / fp16(x) in the mixed-precision path."""
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for kc in range(0, D_CEIL, BLOCK_K):
        offs_k = kc + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        xk = tl.load(X + row[:, None] * D + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        xk = _round(xk, DT)
        wt = tl.load(W + offs_d[None, :] * D + offs_k[:, None], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc += _mm(xk, wt, PRECISE)  # BLOCK_N × BLOCK_K @ BLOCK_K × BLOCK_D
    return acc


@triton.jit
def _bias(B, offs, mask, DT: tl.constexpr):
    """A bias vector rounded to the compute dtype DT (autocast's cast of an fp32 master), as fp32: biases
    are read once a program, so the rounding costs a few instructions where a host cast costs a launch."""
    return _round(tl.load(B + offs, mask=mask, other=0.0), DT).to(tl.float32)


@triton.jit
def _project_q(X, WQ, BQ, row, mask_n, offs_d, mask_d, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_K: tl.constexpr, D_CEIL: tl.constexpr, PRECISE: tl.constexpr, DT: tl.constexpr):
    """q = x wqᵀ + bq for the rows, rounded to the compute dtype DT (as eager's Linear output is;
    bq rounded to DT first, as autocast casts it)."""
    q = _project_rows(X, WQ, row, mask_n, offs_d, mask_d, D, BLOCK_N, BLOCK_D, BLOCK_K, D_CEIL, PRECISE, DT)
    return _round(q + _bias(BQ, offs_d, mask_d, DT)[None, :], DT)


@triton.jit
def _sub_fwd_kernel(
    X, R, K, V, WQ, BQ, WO, BO, OUT, O, LSE, PEW, PEB, STATS,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    stride_rb, stride_rc, stride_ry, stride_rx,
    N, D, W_TOK, qk_scale,
    M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, D_CEIL: tl.constexpr, PRECISE: tl.constexpr,
    PE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out, O, lse for BLOCK_N rows of image b (X, OUT, O contiguous B×N×D). qk_scale = log2(e)/√D.
    K, V and O are in the compute dtype; X, OUT either share it or (the mixed path) are fp32, and
    then y = O woᵀ + bo is rounded to the compute dtype before the fp32 add. WQ, WO in the compute
    dtype; BQ, BO in it or fp32 masters (rounded on load). The residual: R (B×N×D contiguous, OUT's
    dtype), or with PE the patch embedding's LayerNorm of the B×D×h×w map R (strides stride_r*, W_TOK
    = w), from the per-token (mean, rstd) in STATS (B·N×2 fp32) and γ PEW, β PEB, rounded to OUT's
    dtype: the block input exactly as `msf.kernels.attention_block`'s kv kernel formed it."""
    b, offs_n, offs_d, mask_n, mask_d = _row_block(N, D, BLOCK_N, BLOCK_D)
    row = b * N + offs_n
    dt = K.dtype.element_ty  # the compute dtype

    q = _project_q(X, WQ, BQ, row, mask_n, offs_d, mask_d, D, BLOCK_N, BLOCK_D, BLOCK_K, D_CEIL, PRECISE, dt)
    # the core's online-softmax sweep over all K / V tiles
    acc, m_i, l_i = _attn_fwd_sweep(q, K + b * stride_kb, V + b * stride_vb, stride_km, stride_kd,
                                    stride_vm, stride_vd, offs_d, mask_d, qk_scale,
                                    M, BLOCK_D, PRECISE, BLOCK_N, BLOCK_M)
    o = _round(acc / l_i[:, None], O.dtype.element_ty)
    tl.store(O + row[:, None] * D + offs_d[None, :], o, mask=mask_n[:, None] & mask_d[None, :])
    tl.store(LSE + row, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_n)

    if PE:  # the tokens' offsets in the map and their LN_pe statistics
        map_rows = b * stride_rb + (offs_n // W_TOK) * stride_ry + (offs_n % W_TOK) * stride_rx
        mean_pe = tl.load(STATS + row * 2, mask=mask_n, other=0.0)
        rstd_pe = tl.load(STATS + row * 2 + 1, mask=mask_n, other=0.0)
    # out[:, s] = residual[:, s] + O woᵀ[:, s] + bo[s], one BLOCK_K-column slice s at a time
    for jc in range(0, D_CEIL, BLOCK_K):
        offs_j = jc + tl.arange(0, BLOCK_K)
        mask_j = offs_j < D
        mask_nj = mask_n[:, None] & mask_j[None, :]
        wot = tl.load(WO + offs_j[None, :] * D + offs_d[:, None], mask=mask_d[:, None] & mask_j[None, :], other=0.0)
        y = _mm(o, wot, PRECISE) + _bias(BO, offs_j, mask_j, dt)[None, :]
        if OUT.dtype.element_ty != dt:  # mixed: y is a Linear output, rounded (autocast)
            y = _round(y, dt).to(tl.float32)
        if PE:  # x = LN_pe(map) on the slice: (m − mean)·rstd·γ + β, rounded to the residual stream's dtype
            m = tl.load(R + map_rows[:, None] + offs_j[None, :] * stride_rc, mask=mask_nj, other=0.0).to(tl.float32)
            xhat = tl.where(mask_nj, m - mean_pe[:, None], 0.0) * rstd_pe[:, None]
            y += _round(xhat * _vec(PEW, offs_j, mask_j)[None, :] + _vec(PEB, offs_j, mask_j)[None, :],
                        OUT.dtype.element_ty).to(tl.float32)
        else:
            y += tl.load(R + row[:, None] * D + offs_j[None, :], mask=mask_nj, other=0.0).to(tl.float32)
        tl.store(OUT + row[:, None] * D + offs_j[None, :], _round(y, OUT.dtype.element_ty), mask=mask_nj)


_sub_fwd_kernel = _pinned("fwd", _sub_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# g = ∂L/∂out (B×N×C). With q = x wqᵀ + bq, S = q kᵀ/√C, P = softmax_rows(S), O = P v,
# out = residual + O woᵀ + bo:
#   d residual = g
#   dbo  = Σ_rows g                     dWo = gᵀ O          (C×C, sums over all B·N rows)
#   dO   = g wo                         (B×N×C; on chip, stored as scratch for the dK/dV kernel)
#   D_i  = rowsum(dO_i ∘ O_i)
#   P    = exp(S − lse)                 (recomputed from q — itself recomputed from x — and lse)
#   dP   = dO vᵀ,  dS = P ∘ (dP − D)
#   dQ   = dS k / √C                    (per row block: sums over the M keys, on chip)
#   dK   = dSᵀ q / √C,  dV = Pᵀ dO      (the core's chunked dK/dV kernel on the q, dO scratch)
#   dx   = dQ wq                        (on chip, from dQ rounded to the input dtype)
#   dbq  = Σ_rows dQ                    dWq = dQᵀ x         (C×C)
# dWq, dbq, dWo, dbo: `_sub_wgrad_kernel` writes fp32 partials per (output tile, row chunk), the
# core's reduce kernel sums the chunks in order (deterministic; no atomics).
@triton.jit
def _sub_bwd_dq_kernel(
    X, G, K, V, WQ, BQ, WO, O, LSE, QS, DOS, DELTA, DQ, DX,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    N, D, qk_scale, sm_scale,
    M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, D_CEIL: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """q, dO (scratch), D, dQ (scratch) and dx for BLOCK_N rows of image b (token tensors contiguous).
    QS, DOS, DQ, O, WQ and WO are in the compute dtype (K's), BQ in it or fp32 (rounded on load);
    X, G, DX share it or (mixed path) are fp32: g is then rounded to the compute dtype on load
    (autocast's dy) and dx is stored in fp32 straight from its fp32 accumulator."""
    b, offs_n, offs_d, mask_n, mask_d = _row_block(N, D, BLOCK_N, BLOCK_D)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    row = b * N + offs_n
    tok = row[:, None] * D + offs_d[None, :]
    dt = K.dtype.element_ty  # the compute dtype

    q = _project_q(X, WQ, BQ, row, mask_n, offs_d, mask_d, D, BLOCK_N, BLOCK_D, BLOCK_K, D_CEIL, PRECISE, dt)
    tl.store(QS + tok, q, mask=mask_nd)
    # dO = g wo: Σ over BLOCK_K-column slices s of g[:, s] wo[s, :]
    do = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for jc in range(0, D_CEIL, BLOCK_K):
        offs_j = jc + tl.arange(0, BLOCK_K)
        mask_j = offs_j < D
        gj = tl.load(G + row[:, None] * D + offs_j[None, :], mask=mask_n[:, None] & mask_j[None, :], other=0.0)
        gj = _round(gj, dt)
        woj = tl.load(WO + offs_j[:, None] * D + offs_d[None, :], mask=mask_j[:, None] & mask_d[None, :], other=0.0)
        do += _mm(gj, woj, PRECISE)
    do = _round(do, dt)
    tl.store(DOS + tok, do, mask=mask_nd)
    o = tl.load(O + tok, mask=mask_nd, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row, delta, mask=mask_n)
    lse2 = tl.load(LSE + row, mask=mask_n, other=0.0) * 1.4426950408889634
    # the core's dQ sweep over all K / V tiles (P, dP, dS recomputed per tile)
    dq = _attn_dq_sweep(q, do, lse2, delta, K + b * stride_kb, V + b * stride_vb, stride_km, stride_kd,
                        stride_vm, stride_vd, offs_d, mask_d, qk_scale, M, BLOCK_D, PRECISE, BLOCK_N, BLOCK_M)
    dq = _round(dq * sm_scale, dt)
    tl.store(DQ + tok, dq, mask=mask_nd)
    # dx = dQ wq, one BLOCK_K-column slice at a time
    for jc in range(0, D_CEIL, BLOCK_K):
        offs_j = jc + tl.arange(0, BLOCK_K)
        mask_j = offs_j < D
        wqj = tl.load(WQ + offs_d[:, None] * D + offs_j[None, :], mask=mask_d[:, None] & mask_j[None, :], other=0.0)
        dx = _mm(dq, wqj, PRECISE)
        tl.store(DX + row[:, None] * D + offs_j[None, :], _round(dx, DX.dtype.element_ty),
                 mask=mask_n[:, None] & mask_j[None, :])


_sub_bwd_dq_kernel = _pinned("dq", _sub_bwd_dq_kernel)


@triton.jit
def _wgrad_chunk(
    A, B, PART, pid_i, pid_j, pid_c, stride_pc, ROWS, DA, DB, B_W, BIAS_AT,
    CHUNK_ROWS: tl.constexpr, PRECISE: tl.constexpr, B_PATCH: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Output tile (pid_i, pid_j) of the fp32 partials over row chunk pid_c, at PART + pid_c·stride_pc:
    the weight part PART[c, i·DB + j] = Σ_r A[r, i] B[r, j] (DA×DB) and (tiles with pid_j = 0) the bias
    part PART[c, BIAS_AT + i] = Σ_r A[r, i] (BIAS_AT ≥ DA·DB; DA·DB puts it right after the weight),
    so one sum of the partial rows reduces both. A: ROWS×DA, B: ROWS×DB, contiguous. Every element
    of the DA·DB + DA values a chunk owns is written; a larger stride_pc lets several products share
    one partial buffer, side by side in its columns.
    When A and B differ in dtype (the mixed path: fp32 x or g beside the compute-dtype dQ or O) the
    wider one is cast to the narrower on load, as autocast's bf16 copies of x and dy are.
    B_PATCH = R > 1: B is not stored ROWS×DB but gathered: row r is the R×R patch r of a token map
    (B_W tokens a map row, C = DB/R² channels, patches numbered row by row over the images stacked
    as one tall map), its columns in (i, j, c) order: the input of a stride-R R×R convolution as a
    GEMM operand, read straight from the B·N×C tokens (msf.kernels.attention_block's dW_sr)."""
    pid_c = pid_c.to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < DA
    mask_j = offs_j < DB
    if B_PATCH > 1:  # column j = (i, j', c) of a patch: token row i of the patch, then (j', c) contiguous
        patch_c = DB // (B_PATCH * B_PATCH)
        cols_b = (offs_j // (B_PATCH * patch_c)) * (B_W * patch_c) + offs_j % (B_PATCH * patch_c)
    else:
        cols_b = offs_j
    acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    bsum = tl.zeros([BLOCK_I], tl.float32)
    row_start = pid_c * CHUNK_ROWS
    for r in range(0, CHUNK_ROWS, BLOCK_R):
        offs_r = row_start + r + tl.arange(0, BLOCK_R)
        # stop at the chunk's end too: a chunk that is not a multiple of BLOCK_R would otherwise
        # add the next chunk's first rows a second time (found by tests/test_fuzz_parity.py)
        mask_r = (offs_r < ROWS) & (offs_r < row_start + CHUNK_ROWS)
        at = tl.load(A + offs_r[None, :] * DA + offs_i[:, None], mask=mask_i[:, None] & mask_r[None, :], other=0.0)
        if B_PATCH > 1:  # patch r = (image row of patches, patch column): its top-left token's offset
            rows_b = (offs_r // (B_W // B_PATCH)) * (B_PATCH * B_W * patch_c) + (offs_r % (B_W // B_PATCH)) * (
                B_PATCH * patch_c)
        else:
            rows_b = offs_r * DB
        bt = tl.load(B + rows_b[:, None] + cols_b[None, :], mask=mask_r[:, None] & mask_j[None, :], other=0.0)
        if A.dtype.element_ty.primitive_bitwidth > B.dtype.element_ty.primitive_bitwidth:
            at = _round(at, B.dtype.element_ty)
        if B.dtype.element_ty.primitive_bitwidth > A.dtype.element_ty.primitive_bitwidth:
            bt = _round(bt, A.dtype.element_ty)
        acc += _mm(at, bt, PRECISE)
        bsum += tl.sum(at.to(tl.float32), 1)
    part = PART + pid_c * stride_pc
    tl.store(part + offs_i[:, None] * DB + offs_j[None, :], acc, mask=mask_i[:, None] & mask_j[None, :])
    tl.store(part + BIAS_AT + offs_i, bsum, mask=mask_i & (pid_j == 0))


@triton.jit
def _group_programs(DA, DB, N_CHUNKS, PAIRS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Programs of one group of `_sub_wgrad_kernel`: its output tiles × PAIRS products × chunks."""
    return tl.cdiv(DA, BLOCK_I) * tl.cdiv(DB, BLOCK_J) * PAIRS * N_CHUNKS


@triton.jit
def _wgrad_group(
    A, B, PART, A2, B2, PART2, stride_pc, ROWS, DA, DB, B_W, N_CHUNKS, BIAS_AT, BIAS_AT2, local,
    CHUNK_ROWS: tl.constexpr, PRECISE: tl.constexpr, B_PATCH: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program `local` of a group (output tile fastest, then the chunks of its first product, then
    with PAIRS = 2 those of the second): `_wgrad_chunk` of (A, B) into PART or of (A2, B2) into PART2."""
    tiles_i = tl.cdiv(DA, BLOCK_I)
    tiles = tiles_i * tl.cdiv(DB, BLOCK_J)
    pid_i = local % tiles_i
    pid_j = local % tiles // tiles_i
    pid_c = local // tiles
    if PAIRS == 2:
        if pid_c < N_CHUNKS:
            _wgrad_chunk(A, B, PART, pid_i, pid_j, pid_c, stride_pc, ROWS, DA, DB, B_W, BIAS_AT,
                         CHUNK_ROWS, PRECISE, B_PATCH, BLOCK_I, BLOCK_J, BLOCK_R)
        else:
            _wgrad_chunk(A2, B2, PART2, pid_i, pid_j, pid_c - N_CHUNKS, stride_pc, ROWS, DA, DB, B_W, BIAS_AT2,
                         CHUNK_ROWS, PRECISE, B_PATCH, BLOCK_I, BLOCK_J, BLOCK_R)
    else:
        _wgrad_chunk(A, B, PART, pid_i, pid_j, pid_c, stride_pc, ROWS, DA, DB, B_W, BIAS_AT,
                     CHUNK_ROWS, PRECISE, B_PATCH, BLOCK_I, BLOCK_J, BLOCK_R)


@triton.jit
def _sub_wgrad_kernel(
    A, B, PART, A2, B2, PART2, stride_pc, ROWS, DA, DB, B_W, N_CHUNKS, BIAS_AT, BIAS_AT2,
    A_1, B_1, PART_1, A2_1, B2_1, PART2_1, stride_pc_1, ROWS_1, DA_1, DB_1, B_W_1, N_CHUNKS_1, BIAS_AT_1, BIAS_AT2_1,
    A_2, B_2, PART_2, A2_2, B2_2, PART2_2, stride_pc_2, ROWS_2, DA_2, DB_2, B_W_2, N_CHUNKS_2, BIAS_AT_2, BIAS_AT2_2,
    CHUNK_ROWS: tl.constexpr, PRECISE: tl.constexpr, B_PATCH: tl.constexpr, PAIRS: tl.constexpr,
    CHUNK_ROWS_1: tl.constexpr, B_PATCH_1: tl.constexpr, PAIRS_1: tl.constexpr,
    CHUNK_ROWS_2: tl.constexpr, B_PATCH_2: tl.constexpr, PAIRS_2: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Up to three weight-gradient groups in one launch (a 1-D grid, group after group, as
    `partial_sums` takes its buffers): group g is `_wgrad_chunk` of (A, B) into PART over its
    N_CHUNKS row chunks and, with PAIRS = 2, of a second product of the same shapes, (A2, B2) into
    PART2 (the attention sublayer's dWq and dWo, the block's dW_k and dW_v); its arguments carry
    the suffix _g (none for group 0). The groups may differ in every shape, dtype, chunking and
    patch gather; each pair is its own inlined copy of the chunk code, selected by a uniform branch.
    The attention block's backward launches its three groups (q and output projections; the kv
    Linear; the spatial-reduction convolution) at once: one launch instead of three, and the small
    groups' programs fill SMs beside the large one's instead of running in waves of their own."""
    local = tl.program_id(0)
    n0 = _group_programs(DA, DB, N_CHUNKS, PAIRS, BLOCK_I, BLOCK_J)
    if local < n0:
        _wgrad_group(A, B, PART, A2, B2, PART2, stride_pc, ROWS, DA, DB, B_W, N_CHUNKS, BIAS_AT, BIAS_AT2, local,
                     CHUNK_ROWS, PRECISE, B_PATCH, PAIRS, BLOCK_I, BLOCK_J, BLOCK_R)
    else:
        if GROUPS > 1:
            local = local - n0
            n1 = _group_programs(DA_1, DB_1, N_CHUNKS_1, PAIRS_1, BLOCK_I, BLOCK_J)
            if local < n1:
                _wgrad_group(A_1, B_1, PART_1, A2_1, B2_1, PART2_1, stride_pc_1, ROWS_1, DA_1, DB_1, B_W_1,
                             N_CHUNKS_1, BIAS_AT_1, BIAS_AT2_1, local,
                             CHUNK_ROWS_1, PRECISE, B_PATCH_1, PAIRS_1, BLOCK_I, BLOCK_J, BLOCK_R)
            else:
                if GROUPS > 2:
                    _wgrad_group(A_2, B_2, PART_2, A2_2, B2_2, PART2_2, stride_pc_2, ROWS_2, DA_2, DB_2, B_W_2,
                                 N_CHUNKS_2, BIAS_AT_2, BIAS_AT2_2, local - n1,
                                 CHUNK_ROWS_2, PRECISE, B_PATCH_2, PAIRS_2, BLOCK_I, BLOCK_J, BLOCK_R)


_sub_wgrad_kernel = PinnedKernel(
    "attention_sublayer.wgrad", _sub_wgrad_kernel, _wg_config_list(), ["DA", "DB", "CHUNK_ROWS", "PRECISE"],
    shape_class=lambda named: _mode(min(named["A"].element_size(), named["B"].element_size())),
    allowed=lambda cls: [_as_wg_config(c) for c in _WG_ALLOWED[cls]], classes=list(_WG_ALLOWED),
    prune=_wg_prune)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _new(shape, device, dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _wg_chunking(rows: int, c: int, sms: int | None, chunk_rows: int | None = None,
                 block_i: int = 64) -> tuple[int, int]:
    """(chunk_rows, n_chunks) of the weight-gradient kernel: enough chunks for about 2 programs per SM
    over the ⌈C/block_i⌉² output tiles (a 4-warp program alone on its SM issues at a quarter of the
    rate), in chunks of at least 2·C rows (the C×C fp32 partial of a chunk then costs at most a third
    of what the chunk reads in bf16 + fp32), multiples of 128 rows. At B = 32 on 132 SMs (64-wide
    tiles): 256, 256, 64, 22 chunks for the four stages. Stages 1-2 (C = 32, 64: one output tile)
    need that many to fill the machine; `_attn_bwd_reduce_kernel` sums them 64 at a time, in 2-D
    tiles. 64-row chunks under the interpreter so tests cover several (`row_chunks`)."""
    return row_chunks(rows, triton.cdiv(c, block_i) ** 2, 2 * c, sms, chunk_rows, interpreter_rows=64)


def _wg_block(precise: bool, device: torch.device, key: str = "BLOCK_I") -> int:
    """A block size (BLOCK_I, BLOCK_J) of the weight-gradient kernel's pinned configuration (64 if
    none is pinned)."""
    try:
        return _sub_wgrad_kernel.pinned_kwarg("tf32x3" if precise else "16", key, device)
    except KeyError:
        return 64


@dataclasses.dataclass(frozen=True)
class WgradGroup:
    """One group of `_sub_wgrad_kernel`'s launch: its runtime arguments (A … BIAS_AT2), its constexprs
    (CHUNK_ROWS, B_PATCH, PAIRS) and the sizes that set its program count. Made by `wgrad_group`."""
    args: tuple
    chunk_rows: int
    patch: int
    pairs: int
    da: int
    db: int
    n_chunks: int

    def programs(self, block_i: int, block_j: int) -> int:
        return triton.cdiv(self.da, block_i) * triton.cdiv(self.db, block_j) * self.pairs * self.n_chunks


_MAX_WGRAD_GROUPS = 3


def _slots(groups: list) -> list:
    """`_sub_wgrad_kernel`'s group slots for `groups`: the slots past them repeat the first group,
    which a build for fewer groups (GROUPS) never reads."""
    return list(groups) + [groups[0]] * (_MAX_WGRAD_GROUPS - len(groups))


def _slot_constexprs(groups: list[tuple[int, int, int]]) -> dict:
    """The per-group constexprs (CHUNK_ROWS, B_PATCH, PAIRS: unsuffixed for slot 0, then _1, _2) of a
    launch or build of `groups`, each given as (chunk_rows, patch, pairs), and GROUPS."""
    const = {"GROUPS": len(groups)}
    for i, (chunk_rows, patch, pairs) in enumerate(_slots(groups)):
        tag = f"_{i}" if i else ""
        const.update({f"CHUNK_ROWS{tag}": chunk_rows, f"B_PATCH{tag}": patch, f"PAIRS{tag}": pairs})
    return const


def wgrad_group(a, b, part, chunk_rows: int, patch: tuple[int, int] | None = None, second: tuple | None = None,
                bias_at: tuple[int, int] | None = None) -> WgradGroup:
    """part[c, :DA·DB] = Σ aᵀ b and part[c, bias_at[0] + (0..DA)] = Σ a over the rows of chunk c of a
    (ROWS×DA) and b (ROWS×DB), fp32; by default the bias right after the weight (bias_at DA·DB).
    `part` is n_chunks rows (a column slice of a wider buffer is fine: rows are found by part's
    row stride). `patch` = (R, w): b is a map's tokens (…×C) and its rows the R×R patches of an
    h×w map, DB = R²·C (see `_sub_wgrad_kernel`). `second` = (a2, b2, part2): a second product of
    the same shapes (dtypes may differ) into part2 (same rows and row stride; its bias at
    bias_at[1]). `launch_wgrad` runs one or more such groups in one launch."""
    rows, da = a.shape
    ratio, width = patch if patch is not None else (1, 0)
    db = b.shape[-1] * ratio * ratio
    n_chunks = part.shape[0]
    bias_at = bias_at or (da * db, da * db)
    if second is not None:
        a2, b2, part2 = second
        if a2.shape != a.shape or b2.shape != b.shape or part2.shape[0] != n_chunks or part2.stride() != part.stride():
            raise ValueError(f"attention_sublayer.wgrad_group: the second product's shapes {tuple(a2.shape)}, "
                             f"{tuple(b2.shape)}, {tuple(part2.shape)} differ from the first's")
    else:
        a2, b2, part2 = a, b, part  # (PAIRS = 1 never reads them)
    for t, at in ((part, bias_at[0]), (part2, bias_at[1])):
        if at < da * db or t.shape[1] < at + da:
            raise ValueError(f"attention_sublayer.wgrad_group: a partial buffer of {t.shape[1]} columns cannot hold "
                             f"a {da}×{db} weight and its bias at column {at}")
    return WgradGroup((a, b, part, a2, b2, part2, part.stride(0), rows, da, db, width, n_chunks, *bias_at),
                      chunk_rows, ratio, 1 if second is None else 2, da, db, n_chunks)


def launch_wgrad(groups: list[WgradGroup], precise: bool) -> None:
    """Every group of `groups` (1 to 3, `wgrad_group`) in one `_sub_wgrad_kernel` launch; the slots
    past len(groups) repeat the first group's arguments, which a build for fewer groups never reads."""
    if not 1 <= len(groups) <= _MAX_WGRAD_GROUPS:
        raise ValueError(f"attention_sublayer.launch_wgrad: 1 to {_MAX_WGRAD_GROUPS} groups a launch, "
                         f"got {len(groups)}")
    const = _slot_constexprs([(g.chunk_rows, g.patch, g.pairs) for g in groups])
    grid = lambda meta: (sum(g.programs(meta["BLOCK_I"], meta["BLOCK_J"]) for g in groups),)  # noqa: E731
    _sub_wgrad_kernel[grid](*(arg for g in _slots(groups) for arg in g.args), PRECISE=precise, **const)


@dataclasses.dataclass(frozen=True)
class MapResidual:
    """The residual as the patch embedding's LayerNorm of its map (`msf.kernels.attention_block`):
    the B×C×h×w map (any dense layout), LN_pe's γ, β, the per-token (mean, rstd) (B·N×2 fp32) its
    kv kernel wrote, the map width and the residual stream's dtype."""
    map: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    stats: torch.Tensor
    width: int
    dtype: torch.dtype


def _forward(x, r, k, v, wq, bq, wo, bo, pe: MapResidual | None = None):
    """wq, wo in the compute dtype (k's), bq, bo in it or fp32 masters (the kernels round them on
    load); out in the residual's dtype, O in k's. With `pe` the residual is formed from the map
    (r is then not read: None)."""
    batch, n, c = x.shape
    m = k.shape[1]
    out = _new((batch, n, c), x.device, r.dtype if pe is None else pe.dtype)
    o = _new((batch, n, c), x.device, k.dtype)
    lse = _new((batch, n), x.device, torch.float32)
    if pe is None:  # (placeholders the build never reads)
        r_arg, pe_args, r_strides, width = r, (lse, lse, lse), (0, 0, 0, 0), 1
    else:
        r_arg, pe_args, r_strides, width = pe.map, (pe.weight, pe.bias, pe.stats), pe.map.stride(), pe.width
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), batch)  # noqa: E731
    _sub_fwd_kernel[grid](
        x, r_arg, k, v, wq, bq, wo, bo, out, o, lse, *pe_args,
        *k.stride(), *v.stride(), *r_strides,
        n, c, width, _LOG2E / math.sqrt(c),
        M=m, BLOCK_D=_core._block_d(c), BLOCK_K=_BLOCK_K, D_CEIL=_d_ceil(c), PRECISE=k.dtype == torch.float32,
        PE=pe is not None,
    )
    return out, o, lse


def _backward(x, k, v, wq, bq, wo, o, lse, g, w_dtype, chunk_rows: int | None, wg_chunk_rows: int | None,
              sums: list | None = None, wgrads: list | None = None):
    """wq, wo in the compute dtype (k's), bq in it or fp32; dx in x's dtype, dK, dV in k's, weight gradients in w_dtype.
    With `sums` (a list), the weight gradients' partial buffer is appended to it as a (part, out) pair
    instead of summed, and they are returned as fp32 views of `out`, valid once the caller has run
    `sum_partials` over the list (which lets a caller sum its own buffers in the same launch). With
    `wgrads` (a list) too, the weight-gradient kernel is not launched either: its group is appended
    (`wgrad_group`) for the caller's `launch_wgrad`, which must run before that sum."""
    batch, n, c = x.shape
    m = k.shape[1]
    dev, dt = x.device, k.dtype
    precise = dt == torch.float32
    block_d = _core._block_d(c)
    sm_scale = 1.0 / math.sqrt(c)
    qk_scale = _LOG2E * sm_scale
    qs = _new((batch, n, c), dev, dt)
    dos = _new((batch, n, c), dev, dt)
    dq = _new((batch, n, c), dev, dt)
    dx = _new((batch, n, c), dev, x.dtype)
    delta = _new((batch, n), dev, torch.float32)
    grid_q = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), batch)  # noqa: E731
    _sub_bwd_dq_kernel[grid_q](
        x, g, k, v, wq, bq, wo, o, lse, qs, dos, delta, dq, dx,
        *k.stride(), *v.stride(),
        n, c, qk_scale, sm_scale,
        M=m, BLOCK_D=block_d, BLOCK_K=_BLOCK_K, D_CEIL=_d_ceil(c), PRECISE=precise,
    )

    # dK, dV: the core's chunked kernel (+ its chunk-sum kernel) on the q, dO scratch, unchanged
    sms = _core._sm_count(dev)
    dk, dv = _core._dkdv(qs, k, v, dos, lse, delta, qk_scale, sm_scale, block_d, precise, chunk_rows, sms, _new)

    # weight / bias gradients: fp32 partials per row chunk ([dW_q | db_q | dW_o | db_o] per chunk
    # row), then one fixed-order sum (deterministic: fixed tiles and order for fixed shapes)
    rows, size = batch * n, c * c + c
    chunk, nc = _wg_chunking(rows, c, sms, wg_chunk_rows, _wg_block(precise, dev) if sms else 64)
    part = _new((nc, 2 * size), dev, torch.float32)
    group = wgrad_group(dq.view(rows, c), x.view(rows, c), part[:, :size], chunk,
                        second=(g.view(rows, c), o.view(rows, c), part[:, size:]))
    if wgrads is None:
        launch_wgrad([group], precise)
    else:
        wgrads.append(group)
    total = _new((2 * size,), dev, torch.float32)
    if sums is None:
        sum_partials((part, total))
    else:
        sums.append((part, total))
    # views: each weight's gradient and its bias's share one buffer
    grads = (total[:c * c].view(c, c), total[c * c:size], total[size:size + c * c].view(c, c), total[size + c * c:])
    return dx, dk, dv, *(t if sums is not None else t.to(w_dtype) for t in grads)


def compute_weights(cdt: torch.dtype, *weights: torch.Tensor) -> list[torch.Tensor]:
    """The C×C weight matrices in the compute dtype: for fp32 masters under autocast one launch casts
    them all (`casts.cast_all`; autocast's own casts are a launch each), none otherwise. The kernels
    read every weight tile once per program, so rounding them there instead costs more than the
    launch: on the cost model it took the dQ kernel at C = 128 and 192 from 128 to 166-193
    registers, one CTA an SM, 52 → 142 µs and 42 → 125 µs on the H100 (2026-12-05). Biases are
    rounded on load (`_bias`)."""
    from msf.kernels.casts import cast_all  # (casts imports this module's rounding)
    return cast_all(cdt, *weights)


class AttentionSublayerFunction(torch.autograd.Function):
    """The fused sublayer; saves x, k, v (inputs), wq, wo in the compute dtype (the inputs themselves
    unless mixed: then their casts, made once for both passes), bq (as given) and O, lse
    (docs/attention_sublayer.md)."""

    @staticmethod
    def forward(ctx, x, r, k, v, wq, bq, wo, bo, bwd_chunk_rows=None, wg_chunk_rows=None):
        wq_c, wo_c = compute_weights(k.dtype, wq, wo)
        out, o, lse = _forward(x, r, k, v, wq_c, bq, wo_c, bo)
        ctx.save_for_backward(x, k, v, wq_c, bq, wo_c, o, lse)
        ctx.w_dtype = wq.dtype
        ctx.chunks = (bwd_chunk_rows, wg_chunk_rows)
        return out

    @staticmethod
    def backward(ctx, g):
        x, k, v, wq, bq, wo, o, lse = ctx.saved_tensors
        g = g.contiguous()
        dx, dk, dv, dwq, dbq, dwo, dbo = _backward(x, k, v, wq, bq, wo, o, lse, g, ctx.w_dtype, *ctx.chunks)
        return dx, g, dk, dv, dwq, dbq, dwo, dbo, None, None


def _precision(x, r, k, v, wq, bq, wo, bo) -> str | None:
    """"uniform" (all eight tensors share fp32 / fp16 / bf16), "mixed" (autocast's dtypes: k, v share
    bf16 / fp16, the compute dtype; x and the residual each fp32 or that dtype; wq, bq, wo, bo share
    fp32 or that dtype; on CUDA autocast hands the block fp32 x, residual and weights, CPU autocast
    bf16 x and residual) or None (anything else)."""
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if len({t.dtype for t in (x, r, k, v, wq, bq, wo, bo)}) == 1 and x.dtype in floats:
        return "uniform"
    cdt = k.dtype
    allowed = (torch.float32, cdt)
    if (cdt in (torch.float16, torch.bfloat16) and v.dtype == cdt and x.dtype in allowed and r.dtype in allowed
            and len({wq.dtype, bq.dtype, wo.dtype, bo.dtype}) == 1 and wq.dtype in allowed):
        return "mixed"
    return None


def _check(x, r, k, v, wq, bq, wo, bo) -> None:
    if x.dim() != 3 or r.shape != x.shape or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"attention_sublayer: x, residual B×N×C and k, v B×M×C; got {tuple(x.shape)}, "
                         f"{tuple(r.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, c = x.shape
    if k.shape[0] != b or k.shape[2] != c or k.shape[1] == 0:
        raise ValueError(f"attention_sublayer: k, v {tuple(k.shape)} do not match x {tuple(x.shape)}")
    if wq.shape != (c, c) or wo.shape != (c, c) or bq.shape != (c,) or bo.shape != (c,):
        raise ValueError("attention_sublayer: wq, wo must be C×C and bq, bo of length C")
    ts = (x, r, k, v, wq, bq, wo, bo)
    if _precision(*ts) is None:
        raise TypeError("attention_sublayer: all tensors must share one of fp32/fp16/bf16, or (mixed precision) "
                        "k, v share bf16/fp16 and x, residual and the (shared) weight dtype are each fp32 or "
                        f"k's dtype; got {[t.dtype for t in ts]}")
    if len({t.device for t in ts}) != 1:
        raise ValueError("attention_sublayer: tensors on different devices")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("attention_sublayer: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo, *, bwd_chunk_rows: int | None = None,
                       wg_chunk_rows: int | None = None) -> torch.Tensor:
    """`residual + (softmax((x_norm wqᵀ + bq) kᵀ/√C) v) woᵀ + bo` (shapes in the module docstring).

    Either all eight tensors share a dtype, or (mixed precision, what autocast hands the block)
    k, v are bf16 / fp16 and the rest fp32: then the result is what autocast computes for the
    composition (bf16 projections of bf16-cast x and weights, fp32 residual add), fp32 out.
    Fused Triton forward and backward; fp32 at C > 128 composes the pieces instead (`_composed`).
    `bwd_chunk_rows` / `wg_chunk_rows` override the row chunks of the dK/dV and weight-gradient
    kernels (tests use them; by default they are sized to the GPU).
    """
    _check(x_norm, residual, k, v, wq, bq, wo, bo)
    if x_norm.shape[1] == 0 or not fused_supported(k.dtype, x_norm.shape[-1]):
        return _composed(x_norm, residual, k, v, wq, bq, wo, bo)
    return AttentionSublayerFunction.apply(
        x_norm.contiguous(), residual.contiguous(), k, v, wq.contiguous(), bq.contiguous(),
        wo.contiguous(), bo.contiguous(), bwd_chunk_rows, wg_chunk_rows)


def attention_sublayer_for_model(x_norm, residual, k, v, wq, bq, wo, bo) -> torch.Tensor:
    """The model's entry (`TRITON_OPS["attention_sublayer"]`): fused when all eight tensors share a
    dtype, and fused in mixed precision under autocast's dtypes (fp32 LayerNorm output, residual and
    master weights beside bf16 / fp16 k, v: bf16 projections, fp32 residual add and out, as eager
    AMP computes them); any other mix composes the core attention between (autocast) projections."""
    if _precision(x_norm, residual, k, v, wq, bq, wo, bo) is not None:
        return attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo)
    return _composed(x_norm, residual, k, v, wq, bq, wo, bo)


# ----------------------------------------------------------------------------------------------
# bytes per stage (B = 32, 512×512)
# ----------------------------------------------------------------------------------------------
STAGES = [(1, 16384, 256, 32), (2, 4096, 256, 64), (3, 1024, 256, 128), (4, 256, 256, 192)]
VARIANTS = ("eager", "eager+sdpa", "fused")


def _wg_chunks(rows: int, c: int, sms: int) -> int:
    return _wg_chunking(rows, c, sms)[1]


def ops(variant: str, batch: int, n: int, m: int, c: int, e: int = 2, sms: int = 132):
    """[(pass, op, bytes read, bytes written)] of one sublayer call (each op reads its inputs and
    writes its outputs once; the key/value side is outside and not counted beyond k, v, dk, dv)."""
    from msf.bench.bytes_attention import ops as core_ops
    t = batch * n * c * e  # one token tensor (x, residual, q, O, out, g, dO, dQ, dx)
    w = c * c * e
    bias = c * e
    row = batch * n * 4
    proj_fwd = [("fwd", "q = x wqᵀ + bq", t + w + bias, t)]
    proj_out = [("fwd", "y = O woᵀ + bo", t + w + bias, t), ("fwd", "out = residual + y", 2 * t, t)]
    proj_bwd = [("bwd", "dO = g wo", t + w, t), ("bwd", "dWo = gᵀ O", 2 * t, w), ("bwd", "dbo = Σ g", t, bias),
                ("bwd", "dx = dQ wq", t + w, t), ("bwd", "dWq = dQᵀ x", 2 * t, w), ("bwd", "dbq = Σ dQ", t, bias)]
    if variant in ("eager", "eager+sdpa"):
        core = core_ops("eager" if variant == "eager" else "sdpa", batch, n, m, c, e, sms)
        core_f = [r for r in core if r[0] == "fwd"]
        core_b = [r for r in core if r[0] == "bwd"]
        return proj_fwd + core_f + proj_out + proj_bwd[:3] + core_b + proj_bwd[3:]
    if variant == "fused":
        tkv = batch * m * c * e
        kc = _core._dkdv_chunks(batch, n, m, c, sms)
        part = batch * kc * m * c * 4 if kc > 1 else tkv
        nc = _wg_chunks(batch * n, c, sms)
        wpart = nc * (c * c + c) * 4
        rows = [
            ("fwd", "sublayer fwd kernel (q proj + attn + out proj + residual)", 2 * t + 2 * tkv + 2 * (w + bias), 2 * t + row),
            ("bwd", "dQ kernel (reads x, g, O; writes q, dO, dQ, dx, D)", 3 * t + 2 * tkv + 2 * w + bias + row, 4 * t + row),
            ("bwd", f"core dK/dV kernel ({kc} chunk{'s' if kc > 1 else ''})", 2 * t + 2 * tkv + 2 * row, 2 * part),
        ]
        if kc > 1:
            rows.append(("bwd", "core chunk-sum (dK, dV)", 2 * part, 2 * tkv))
        rows += [
            ("bwd", f"wgrad kernel dQ, x ({nc} chunks)", 2 * t, wpart),
            ("bwd", f"wgrad kernel g, O ({nc} chunks)", 2 * t, wpart),
            ("bwd", "chunk-sum dWq, dWo, dbq, dbo", 2 * wpart, 2 * (w + bias)),
        ]
        return rows
    raise ValueError(variant)


def totals(variant: str, batch: int, n: int, m: int, c: int, e: int = 2, sms: int = 132) -> tuple[int, int]:
    rows = ops(variant, batch, n, m, c, e, sms)
    return (sum(r + w for p, _, r, w in rows if p == "fwd"), sum(r + w for p, _, r, w in rows if p == "bwd"))


def bytes_table(batch: int = 32, e: int = 2, bandwidth: float = 3.0e12, sms: int = 132) -> str:
    """Bytes per stage: eager sublayer, eager projections around sdpa, the fused sublayer."""
    head = f"{'stage':>5} {'N':>6} {'C':>4} | " + " | ".join(f"{v:^26}" for v in VARIANTS)
    sub = f"{'':>5} {'':>6} {'':>4} | " + " | ".join(f"{'fwd MB':>7} {'bwd MB':>7} {'f+b µs':>8} " for _ in VARIANTS)
    lines = [head, sub, "-" * len(sub)]
    for stage, n, m, c in STAGES:
        cells = []
        for v in VARIANTS:
            f, b = totals(v, batch, n, m, c, e, sms)
            cells.append(f"{f / 1e6:7.1f} {b / 1e6:7.1f} {(f + b) / bandwidth * 1e6:8.1f} ")
        lines.append(f"{stage:>5} {n:>6} {c:>4} | " + " | ".join(cells))
    lines.append("")
    lines.append(f"B={batch}, {e}-byte elements, {bandwidth / 1e12:.1f} TB/s, M=256; eager rows = the core's "
                 "msf.bench.bytes_attention ops plus Linear / add / weight-gradient ops; sdpa at its floor.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ahead-of-time builds: every kernel × d block × dtype × configuration
# ----------------------------------------------------------------------------------------------
_AOT_M = 256
_AOT_C = {256: 192}  # the model's C per d block where they differ (stage 4)
_AOT_DTYPES = {"16": "bf16", "tf32x3": "fp32", "amp": "bf16"}
_AOT_KERNELS = {
    "fwd": (_sub_fwd_kernel, ("X", "R", "K", "V", "WQ", "BQ", "WO", "BO", "OUT", "O"), ("LSE", "PEW", "PEB", "STATS")),
    "dq": (_sub_bwd_dq_kernel, ("X", "G", "K", "V", "WQ", "BQ", "WO", "O", "QS", "DOS", "DQ", "DX"), ("LSE", "DELTA")),
}
# the mixed-precision variant ("amp": CUDA autocast's dtypes): these token tensors and the master biases
# are fp32, the rest bf16
_AOT_AMP_F32 = {"fwd": ("X", "R", "OUT", "BQ", "BO"), "dq": ("X", "G", "DX", "BQ")}
_AOT_WG_CHUNK = 1024


def _one_arch(kernel: str, mode: str, block_d: int, tile: _Cfg) -> tuple[int, ...] | None:
    """The one architecture a tile is allowed on, where it is not both: (90,) for the `_SM90_ONLY` tiles,
    else None. The AOT specs and the pins (`_archs`) both ask here. (Below the kernels: Triton's cache
    key holds their line numbers, and lines added above them rebuild every AOT spec.)"""
    return (90,) if tile in _SM90_ONLY.get((kernel, mode, block_d), ()) else None


def _archs(kernel: str, cls: str, cfg: triton.Config) -> tuple[int, ...] | None:
    """`PinnedKernel.archs` of the sublayer kernels: `_one_arch` of a configuration of shape class `cls`."""
    mode, d = cls.rsplit("_d", 1)
    return _one_arch(kernel, mode, int(d),
                     (cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"], cfg.num_warps, cfg.num_stages))


def _aot_specs() -> list[AotSpec]:
    specs = []
    for kname, (kernel, data_ptrs, f32_ptrs) in _AOT_KERNELS.items():
        for mode, per_d in _ALLOWED[kname].items():
            dname = _AOT_DTYPES[mode]
            ptrs = {**{a: f"*{dname}" for a in data_ptrs}, **{a: "*fp32" for a in f32_ptrs}}
            if mode == "amp":  # mixed precision: these token tensors fp32, the rest bf16
                ptrs.update({a: "*fp32" for a in _AOT_AMP_F32[kname]})
            prefix = "amp_" if mode == "amp" else ""
            builds = [(prefix + dname, ptrs, block_d, cfg) for block_d, cfgs in per_d.items() for cfg in cfgs]
            if mode in ("16", "amp"):  # fp16: one spot check per kernel (largest d block, first config), as in the core
                builds.append((prefix + "fp16", {a: t.replace("bf16", "fp16") for a, t in ptrs.items()}, 256,
                               per_d[256][0]))
            if kname == "fwd" and mode == "amp":  # a stage's first block: the residual from the bf16 map
                # (NCHW at stage 1, channels-last after), xn in bf16, out fp32
                builds += [(prefix + dname + "_pe", {**ptrs, "X": "*bf16", "R": "*bf16"}, block_d, cfg)
                           for block_d, cfgs in per_d.items() for cfg in cfgs]
            for dn, pt, block_d, (bn, bm, w, st) in builds:
                const = {"M": _AOT_M, "BLOCK_D": block_d, "BLOCK_K": _BLOCK_K, "PRECISE": mode == "tf32x3",
                         "D_CEIL": _d_ceil(_AOT_C.get(block_d, block_d)),
                         "BLOCK_N": bn, "BLOCK_M": bm}
                if kname == "fwd":
                    const["PE"] = dn.endswith("_pe")
                    if const["PE"]:
                        const["stride_rx" if block_d == 32 else "stride_rc"] = 1
                tag = f"{kname}_{dn}_d{block_d}_n{bn}_m{bm}_w{w}_s{st}"
                spec = _aot_spec(f"attention_sublayer.{tag}", kernel.fn, pt, const, w, st)
                spec = dataclasses.replace(spec, archs=_one_arch(kname, mode, block_d, (bn, bm, w, st)) or ())
                specs.append(spec)
    for mode, cfgs in _WG_ALLOWED.items():  # mixed precision uses the "16" configurations
        # (name, A, B, A2, B2), built with both products (PAIRS = 2: its registers are the larger of the
        # two copies', so it covers the single product too): one dtype, plus the mixed path's bf16 dQ
        # beside fp32 x and fp32 g beside bf16 O
        pairs = [(d, d, d, d, d) for d in (_AOT_DTYPES[mode],) + (("fp16",) if mode == "16" else ())]
        if mode == "16":
            pairs += [("amp_bf16", "bf16", "fp32", "fp32", "bf16")]
        for dname, a_t, b_t, a2_t, b2_t in pairs:
            ptrs = {"A": f"*{a_t}", "B": f"*{b_t}", "A2": f"*{a2_t}", "B2": f"*{b2_t}", "PART": "*fp32",
                    "PART2": "*fp32"}
            for bi, bj, br, w in cfgs:
                const = {"PRECISE": mode == "tf32x3", "BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_R": br,
                         **_slot_constexprs([(_AOT_WG_CHUNK, 1, 2)])}
                specs.append(_aot_spec(f"attention_sublayer.wgrad_{dname}_i{bi}_j{bj}_r{br}_w{w}",
                                       _sub_wgrad_kernel.fn, _wgrad_slots([ptrs]), const, w, 2))
        specs += _grouped_wgrad_specs(mode, cfgs)
    return specs


def _wgrad_slots(groups: list[dict[str, str]]) -> dict[str, str]:
    """The pointer types of every slot of `_sub_wgrad_kernel` (unsuffixed, _1, _2) from those of the
    groups a build launches (A, B, PART, A2, B2, PART2 each); the slots past them repeat group 0's."""
    return {name + (f"_{i}" if i else ""): t for i, g in enumerate(_slots(groups)) for name, t in g.items()}


def _grouped_wgrad_specs(mode: str, cfgs) -> list[AotSpec]:
    """The grouped launches a training step makes: the attention block's (q and output projections;
    the kv Linear; at R > 1 the convolution with its patch gather, R = 8, 4, 2) and the FFN stash
    route's two products, in autocast's mix ("16": fp32 g beside bf16 tensors) or in fp32."""
    cd, wide = ("bf16", "fp32") if mode == "16" else ("fp32", "fp32")

    def group(a, b, a2=None, b2=None):
        return {"A": f"*{a}", "B": f"*{b}", "PART": "*fp32", "A2": f"*{a2 or a}", "B2": f"*{b2 or b}",
                "PART2": "*fp32"}
    proj, kv = group(cd, cd, wide, cd), group(cd, cd, cd, cd)  # (dQ, xn | g, O), (dK, kin | dV, kin)
    launches = [(f"block_r{r}", [proj, kv, group(cd, cd)], (2, 2, 1), (1, 1, r)) for r in (8, 4, 2)]
    launches += [("block_r1", [proj, kv], (2, 2), (1, 1)),
                 ("ffn_stash", [group(cd, cd), group(wide, cd)], (1, 1), (1, 1))]  # (dH, LN(x)), (g, A)
    specs = []
    for tag, groups, pairs, patches in launches:
        const = {"PRECISE": mode == "tf32x3",
                 **_slot_constexprs([(_AOT_WG_CHUNK, r, p) for p, r in zip(pairs, patches)])}
        for bi, bj, br, w in cfgs:
            specs.append(_aot_spec(f"attention_sublayer.wgrad_{tag}_{'amp' if mode == '16' else 'fp32'}_i{bi}_j{bj}"
                                   f"_r{br}_w{w}", _sub_wgrad_kernel.fn, _wgrad_slots(groups),
                                   {**const, "BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_R": br}, w, 2))
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()


if __name__ == "__main__":
    print(bytes_table())
