"""Fused spatial-reduction attention core: `softmax(q kᵀ / √d) v`, forward and backward in Triton.

    q: B×N×d, k, v: B×M×d (any strides: k and v are usually the column halves of one B×M×2d tensor)
    S = q kᵀ / √d, P = softmax_rows(S)   B×N×M, never written to memory
    O = P v                             B×N×d, in the input dtype
    lse = logsumexp_rows(S)             B×N fp32, saved for the backward

It computes exactly `msf.backend.eager_attention` (one head; M = 256 at every stage of the model,
a compile-time constant; any M ≥ 1). Dtypes: fp32 (tf32x3 dots, about fp32 accuracy), bf16, fp16,
fp32 accumulation everywhere. Head dims up to 256 run as one power-of-two d block with masked
loads (the model's d = 192 as 256); fp32 at d > 128 runs the eager formula (`fused_supported`).

Kernels (no atomics; deterministic):
- `_attn_fwd_kernel`: BLOCK_N query rows of one image sweep all of K and V with an online softmax.
- `_attn_bwd_dq_kernel`: D = rowsum(dO∘O), then dQ from a sweep recomputing S, P, dP, dS.
- `_attn_bwd_dkdv_kernel`: dK, dV of one KV tile over one chunk of the queries (fp32 partials
  when the queries are split into chunks, `_chunking`).
- `_attn_bwd_reduce_kernel`: the fixed-order 2-D sum of those partials (the attention sublayer's
  weight gradients reuse it).

Configurations: one pinned per (kernel, dtype class, d block) in configs.json, each built ahead of
time for sm_80 and sm_90 without spills (`AOT_SPECS`, `python -m msf.profiling.report`).

docs/attention.md: the backward's math, why the queries are chunked, the bytes against eager and
sdpa, the instruction counts, and the designs tried and dropped (ieee fp32 dots, tiling d = 192).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from msf.kernels._common import INTERPRET, AotSpec, _round, divisibility_attrs, dot, dot_tf32x3
from msf.kernels.configs import PinnedKernel, candidate_order, sm_count as _sm_count

__all__ = ["attention", "attention_eager", "AttentionFunction", "AOT_SPECS"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_BLOCK_D = 256
_CHUNK_ALIGN = 128  # query chunks of the dK/dV kernel are multiples of this many rows


def attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: plain matmul → softmax → matmul (what `msf.backend.eager_attention` computes)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
# (BLOCK_N, BLOCK_M, num_warps, num_stages) allowed per kernel, dot mode and d block: each entry
# was built ahead of time for sm_80 and sm_90 (`AOT_SPECS`, `python -m msf.profiling.report`) with no
# register spills (no local memory, no stack frame) and ≤ 163 KB of shared memory (sm_80's limit),
# both with the launch specialisation of the model's shapes (`AotSpec.attrs`, `_aot_spec`) and without
# it (the report's plain build, scalar loads: up to twice the registers). A few faster-looking
# configurations are clean only with it (e.g. the dK/dV kernel at BLOCK_N = 64 for d = 32/64, the
# forward at 64 rows for d = 192) and are left out until the report builds with `attrs`.
# Modes: "16" = bf16/fp16 inputs; "tf32x3" = fp32 inputs at fp32 accuracy; "tf32" = fp32 inputs
# through plain tf32 dots (allow_tf32=True). Added 2026-12-06 from the cost model v3's sweep of the
# model's launches (`python -m msf.profiling.cost --sweep --op attention_block`), built clean with the
# launch specialisation on both archs (the plain build not checked): dK/dV "16" (32, 32, 4, 2) at d
# 64 and 128, (32, 16, 4, 2) at d 128 and 256. Then from the same sweep under model v3.1 (pipelined
# loops no longer charged a load wave a trip): dK/dV (32, 32, 4, 2) at d 256 (H100 14.3 -> 13.7 us a
# stage-4 block). Not (32, 128, 8, 2) at d 128 (the kernel alone 19.8 -> 17.2 at stage 3): its
# 128-key tiles leave the kernel fewer programs, the chunking then splits the queries in two and
# the chunk-sum launch that adds (11.3 us) makes the block slower; `--pin` judges a kernel alone.
_Cfg = tuple[int, int, int, int]
_ALLOWED: dict[str, dict[str, dict[int, list[_Cfg]]]] = {
    "fwd": {
        "16": {32: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
               64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
               128: [(64, 64, 8, 2), (128, 64, 8, 3), (32, 64, 4, 2)],
               256: [(32, 32, 8, 2), (32, 32, 4, 2)]},
        "tf32x3": {32: [(64, 32, 4, 2), (32, 32, 8, 2)],
                   64: [(32, 32, 8, 2), (32, 64, 4, 2)],
                   128: [(16, 32, 4, 2), (32, 32, 8, 2)]},
        "tf32": {32: [(64, 32, 4, 2), (32, 32, 8, 2)],
                 64: [(32, 32, 8, 2), (32, 64, 4, 2)],
                 128: [(32, 32, 8, 2), (32, 32, 4, 2)],
                 256: [(32, 32, 8, 2), (32, 16, 4, 2)]},
    },
    "dq": {
        "16": {32: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 8, 2)],
               64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
               128: [(64, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
               256: [(32, 32, 8, 2), (32, 32, 4, 2)]},
        "tf32x3": {32: [(64, 32, 8, 2), (32, 32, 8, 2)],
                   64: [(32, 32, 8, 2), (32, 32, 4, 2)],
                   128: [(16, 16, 4, 2), (16, 32, 4, 2)]},
        "tf32": {32: [(64, 32, 8, 2), (32, 32, 8, 2)],
                 64: [(32, 32, 8, 2), (32, 32, 4, 2)],
                 128: [(32, 32, 8, 2), (32, 32, 4, 2)],
                 256: [(32, 32, 8, 2), (16, 32, 4, 2)]},
    },
    "dkdv": {
        "16": {32: [(32, 64, 8, 2), (32, 128, 8, 2), (32, 32, 4, 2)],
               64: [(32, 64, 8, 2), (32, 128, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
               128: [(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 8, 2), (32, 16, 4, 2), (32, 32, 4, 2)],
               256: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 4, 2)]},
        "tf32x3": {32: [(32, 64, 8, 2), (16, 32, 4, 2)],
                   64: [(32, 32, 8, 2), (16, 32, 4, 2)],
                   128: [(16, 16, 4, 2), (16, 16, 8, 1)]},
        "tf32": {32: [(32, 64, 8, 2), (16, 32, 4, 2)],
                 64: [(32, 32, 8, 2), (16, 32, 4, 2)],
                 128: [(32, 32, 8, 2), (32, 16, 4, 2)],
                 256: [(16, 16, 8, 1)]},
    },
}
# The configuration the interpreter runs (pinned in kernels/configs.json for the "interpreter"): small KV
# tiles so CPU tests see several online-softmax rescalings, a masked tail tile and, in the dK/dV
# kernel, several query blocks per chunk.
_INTERPRETER_CFG: dict[str, _Cfg] = {"fwd": (64, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 4, 2)}
_PRECISE_MAX_BLOCK_D = 128  # largest d block with a spill-free tf32x3 configuration in every kernel


def _as_config(c: _Cfg) -> triton.Config:
    return triton.Config({"BLOCK_N": c[0], "BLOCK_M": c[1]}, num_warps=c[2], num_stages=c[3])


def _config_list(kernel: str) -> list[triton.Config]:
    lists = [cfgs for per_d in _ALLOWED[kernel].values() for cfgs in per_d.values()]
    return [_as_config(c) for c in candidate_order(_INTERPRETER_CFG[kernel], *lists)]


def _mode(elem_bytes: int, precise: bool) -> str:
    return "16" if elem_bytes == 2 else ("tf32x3" if precise else "tf32")


def _precise(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Whether the dots take tf32x3 (fp32 accuracy): fp32 inputs with tf32 not allowed."""
    return dtype == torch.float32 and not allow_tf32


def fused_supported(dtype: torch.dtype, d: int, allow_tf32: bool = False) -> bool:
    """Whether `attention` runs the Triton kernels for this dtype / head dim (else the eager
    reference): bf16 / fp16 at any d ≤ 256; fp32 at d ≤ 128, or at any d ≤ 256 with `allow_tf32`.
    d > 256 always runs eager (the kernels hold a whole d row of a tile on chip).

    fp32 at fp32 accuracy needs tf32x3 dots, and at d > 128 (the model's d = 192 runs as a 256
    block) every tf32x3 configuration spills registers (its hi/lo operand split needs about twice
    tf32's registers; "ieee" and "bf16x6" spill too). Plain tf32 fits there but is ~3e-4 off, which
    would silently break fp32 parity, so without `allow_tf32` fp32 at d > 128 runs the exact eager
    formula: stage 4 only (N = 256, the cheapest stage), and only off the AMP training path.
    """
    if d > _MAX_BLOCK_D:
        return False
    return dtype != torch.float32 or allow_tf32 or _block_d(d) <= _PRECISE_MAX_BLOCK_D


def _shape_class(named_args) -> str:
    """The pinned-config class of a launch: dot mode and d block, e.g. "16_d64"."""
    return f"{_mode(named_args['Q'].element_size(), bool(named_args['PRECISE']))}_d{named_args['BLOCK_D']}"


def _pinned(kernel: str, fn, key: list[str]) -> PinnedKernel:
    """`fn` launched with its configuration from kernels/configs.json (kernel name "attention.<kernel>")."""
    def allowed(cls: str) -> list[triton.Config]:
        mode, d = cls.rsplit("_d", 1)
        return [_as_config(c) for c in _ALLOWED[kernel][mode][int(d)]]
    classes = [f"{mode}_d{d}" for mode, per_d in _ALLOWED[kernel].items() for d in per_d]
    return PinnedKernel(f"attention.{kernel}", fn, _config_list(kernel), key, _shape_class, allowed, classes,
                        prune=_prune(kernel))


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        mode = _mode(named_args["Q"].element_size(), bool(kwargs["PRECISE"]))
        allowed = _ALLOWED[kernel][mode].get(kwargs["BLOCK_D"], [])
        kept = [c for c in configs
                if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) in allowed]
        return kept or configs[:1]
    return prune


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
# A note on loops: every loop has a constexpr trip count (M, the KV length, and CHUNK_ROWS are
# `tl.constexpr`; masks handle the tails). Under TRITON_INTERPRET=1 with numpy ≥ 2.4 (pinned here)
# a `range()` bound that is a runtime kernel argument fails: the interpreter holds scalars as
# 1-element arrays and `int()` of those is an error since numpy 2.4. Constexpr bounds also let the
# compiler pipeline the loops; M is 256 at every stage of the model, so one specialisation serves all.
@triton.jit
def _mm(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return dot_tf32x3(a, b)
    else:
        return dot(a, b)


@triton.jit
def _row_block(N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The query rows of a program on the grid (row block, image), as every row-block kernel here and
    in `msf.kernels.attention_sublayer` is launched: (b as int64, offs_n, offs_d, mask_n, mask_d)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    return b, offs_n, offs_d, offs_n < N, offs_d < D


@triton.jit
def _attn_fwd_sweep(q, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, offs_d, mask_d, qk_scale,
                    M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The online-softmax sweep over all M keys / values of one image for a BLOCK_N × BLOCK_D block
    of queries q (input dtype; rows and d columns past the end loaded as zeros), shared by the core's
    forward and `msf.kernels.attention_sublayer`'s. k_base, v_base point at the image's K, V (M × D,
    any strides); qk_scale = log2(e)/√d, so scores are in log2 units. Returns (acc, m_i, l_i), all
    fp32: m_i the running row max of the scores, l_i = Σ_j exp2(s_j − m_i) and acc = Σ_j exp2(s_j − m_i) v_j,
    so O = acc / l_i and lse = (m_i + log2(l_i))·ln 2."""
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        kt = tl.load(k_base + offs_m[None, :] * stride_km + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)  # BLOCK_D × BLOCK_M
        s = _mm(q, kt, PRECISE)  # unscaled: the max scales one value a row (x·c is monotone, same bits)
        s = tl.where(mask_m[None, :], s, float("-inf"))  # the masked tail tile: no weight
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf, m_new finite)
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one FFMA a score
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_m[:, None] * stride_vm + offs_d[None, :] * stride_vd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # BLOCK_M × BLOCK_D
        # P is rounded to the input dtype before `P v` (as in FlashAttention); fp32 accumulation
        acc = acc * alpha[:, None] + _mm(_round(p, v.dtype), v, PRECISE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    stride_ob, stride_on, stride_od,
    N, D, qk_scale,
    M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """O[b, rows] and lse[b, rows] for BLOCK_N query rows of image b. qk_scale = log2(e)/√d."""
    b, offs_n, offs_d, mask_n, mask_d = _row_block(N, D, BLOCK_N, BLOCK_D)

    q = tl.load(Q + b * stride_qb + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    acc, m_i, l_i = _attn_fwd_sweep(q, K + b * stride_kb, V + b * stride_vb, stride_km, stride_kd,
                                    stride_vm, stride_vd, offs_d, mask_d, qk_scale,
                                    M, BLOCK_D, PRECISE, BLOCK_N, BLOCK_M)
    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
             _round(acc, O.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of S = q kᵀ/√d
    tl.store(LSE + b * N + offs_n, lse, mask=mask_n)


_attn_fwd_kernel = _pinned("fwd", _attn_fwd_kernel, ["N", "M", "BLOCK_D", "PRECISE"])


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# With S = q kᵀ/√d, P = softmax_rows(S) = exp(S − lse), O = P v and dO = ∂L/∂O:
#   D_i  = Σ_j P_ij dP_ij = rowsum(dO_i ∘ O_i)      (since O_i = Σ_j P_ij v_j)
#   P    = exp(S − lse)                              (recomputed from q, k and the saved lse)
#   dV   = Pᵀ dO                                     (M×d, sums over all N query rows)
#   dP   = dO vᵀ                                     (N×M)
#   dS   = P ∘ (dP − D)                              (softmax backward, D broadcast over columns)
#   dQ   = dS k / √d
#   dK   = dSᵀ q / √d                                (M×d, sums over all N query rows)
# In the kernels S is kept in log2 units: s2 = (q kᵀ)·log2(e)/√d, P = exp2(s2 − lse·log2(e)).
# dQ needs a sum over the M keys (one program owns its rows: on-chip accumulation); dK and dV need
# sums over all N queries: per-(KV tile, query chunk) fp32 partials, summed afterwards (no atomics).
@triton.jit
def _attn_dq_sweep(q, do, lse2, delta, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, offs_d,
                   mask_d, qk_scale, M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Σ_j dS_ij k_j over all M keys of one image for a BLOCK_N-row block (fp32, not yet scaled by
    1/√d: the caller multiplies by sm_scale), shared by the core's dQ kernel and
    `msf.kernels.attention_sublayer`'s. q, do: the block's queries and output gradients (input dtype);
    lse2 = lse·log2(e) and delta = D = rowsum(dO∘O) per row (fp32); k_base, v_base: the image's
    K, V (any strides); qk_scale = log2(e)/√d. Recomputes P = exp2(s2 − lse2) tile by tile (0 on
    the masked tail keys), dP = dO vᵀ and dS = P ∘ (dP − D)."""
    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k = tl.load(k_base + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # BLOCK_M × BLOCK_D
        vt = tl.load(v_base + offs_m[None, :] * stride_vm + offs_d[:, None] * stride_vd,
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)  # BLOCK_D × BLOCK_M
        s2 = _mm(q, tl.trans(k), PRECISE) * qk_scale
        p = tl.exp2(s2 - lse2[:, None])
        p = tl.where(mask_m[None, :], p, 0.0)
        dp = _mm(do, vt, PRECISE)
        ds = p * (dp - delta[:, None])
        dq += _mm(_round(ds, k.dtype), k, PRECISE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    stride_ob, stride_on, stride_od,
    stride_dob, stride_don, stride_dod,
    stride_dqb, stride_dqn, stride_dqd,
    N, D, qk_scale, sm_scale,
    M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ and D = rowsum(dO∘O) for BLOCK_N query rows of image b (sweeping all KV tiles)."""
    b, offs_n, offs_d, mask_n, mask_d = _row_block(N, D, BLOCK_N, BLOCK_D)
    mask_nd = mask_n[:, None] & mask_d[None, :]

    q = tl.load(Q + b * stride_qb + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_nd, other=0.0)
    do = tl.load(DO + b * stride_dob + offs_n[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask_nd, other=0.0)
    o = tl.load(O + b * stride_ob + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask_nd, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * N + offs_n, delta, mask=mask_n)
    lse2 = tl.load(LSE + b * N + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634

    dq = _attn_dq_sweep(q, do, lse2, delta, K + b * stride_kb, V + b * stride_vb, stride_km, stride_kd,
                        stride_vm, stride_vd, offs_d, mask_d, qk_scale, M, BLOCK_D, PRECISE, BLOCK_N, BLOCK_M)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             _round(dq, DQ.dtype.element_ty), mask=mask_nd)


_attn_bwd_dq_kernel = _pinned("dq", _attn_bwd_dq_kernel, ["N", "M", "BLOCK_D", "PRECISE"])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_PART, DV_PART,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    stride_dob, stride_don, stride_dod,
    N, D, n_chunks, qk_scale, sm_scale,
    M: tl.constexpr, CHUNK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PRECISE: tl.constexpr,
    EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial dK, dV of KV tile `pid_m` from the query rows of chunk `pid_c` of image b. EVEN_N: every
    chunk holds CHUNK_ROWS rows (N a multiple of it); with whole BLOCK_N tiles a chunk then needs no row
    mask (the model's shapes: 46 of a trip's 245 SASS instructions at stage 1 were the mask's).

    Partials are laid out B × n_chunks × M × D (contiguous), fp32 when several chunks are summed
    afterwards, the input dtype when n_chunks = 1 (then they are dK, dV); every element of the
    program's BLOCK_M × D slice is written, so no buffer needs clearing.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    k = tl.load(K + b * stride_kb + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd,
                mask=mask_md, other=0.0)  # BLOCK_M × BLOCK_D
    v = tl.load(V + b * stride_vb + offs_m[:, None] * stride_vm + offs_d[None, :] * stride_vd,
                mask=mask_md, other=0.0)

    q_base = Q + b * stride_qb
    do_base = DO + b * stride_dob
    row_start = pid_c * CHUNK_ROWS
    row_end = tl.minimum(row_start + CHUNK_ROWS, N)
    FULL: tl.constexpr = EVEN_N and CHUNK_ROWS % BLOCK_N == 0
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(0, CHUNK_ROWS, BLOCK_N):  # constexpr trip count (see the note on loops above)
        offs_n = row_start + i + tl.arange(0, BLOCK_N)
        mask_n = (offs_n < row_end) | FULL  # FULL: a constant true, folded away
        mask_nd = mask_n[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=mask_nd, other=0.0)  # BLOCK_N × BLOCK_D
        do = tl.load(do_base + offs_n[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=mask_nd, other=0.0)
        lse2 = tl.load(LSE + b * N + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b * N + offs_n, mask=mask_n, other=0.0)
        st = _mm(k, tl.trans(q), PRECISE) * qk_scale  # BLOCK_M × BLOCK_N, log2 units
        pt = tl.exp2(st - lse2[None, :])
        pt = tl.where(mask_n[None, :], pt, 0.0)
        dv += _mm(_round(pt, do.dtype), do, PRECISE)
        dpt = _mm(v, tl.trans(do), PRECISE)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(_round(dst, q.dtype), q, PRECISE)

    dk = dk * sm_scale
    part = (b * n_chunks + pid_c) * M * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DK_PART + part, _round(dk, DK_PART.dtype.element_ty), mask=mask_md)
    tl.store(DV_PART + part, _round(dv, DV_PART.dtype.element_ty), mask=mask_md)


_attn_bwd_dkdv_kernel = _pinned("dkdv", _attn_bwd_dkdv_kernel, ["N", "M", "CHUNK_ROWS", "BLOCK_D", "PRECISE"])


@triton.jit
def _attn_bwd_reduce_kernel(PART1, PART2, OUT1, OUT2, SIZE, N_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK: tl.constexpr):
    """OUT[g] = Σ_c PART[g, c] for two fp32 partial buffers laid out G × N_CHUNKS × SIZE (contiguous),
    summed in fp32 and stored in OUT's dtype; one program per (BLOCK elements, group g).

    2-D tiles: each step loads BLOCK_C chunks × BLOCK elements of both buffers and adds them to fp32
    tile accumulators element-wise; the chunk axis of the tiles is reduced once, after the loop
    (`tl.sum`, a fixed tree for a fixed BLOCK_C). So N_CHUNKS chunks cost ⌈N_CHUNKS / BLOCK_C⌉
    serial steps instead of N_CHUNKS, and the summation order depends only on the configuration:
    deterministic, no atomics. Masked chunk rows load zeros (exact in a sum)."""
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    acc1 = tl.zeros([BLOCK_C, BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK], tl.float32)
    for c0 in range(0, N_CHUNKS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        idx = (g * N_CHUNKS + offs_c)[:, None] * SIZE + offs[None, :]
        mask_t = (offs_c < N_CHUNKS)[:, None] & mask[None, :]
        acc1 += tl.load(PART1 + idx, mask=mask_t, other=0.0)
        acc2 += tl.load(PART2 + idx, mask=mask_t, other=0.0)
    tl.store(OUT1 + g * SIZE + offs, _round(tl.sum(acc1, 0), OUT1.dtype.element_ty), mask=mask)
    tl.store(OUT2 + g * SIZE + offs, _round(tl.sum(acc2, 0), OUT2.dtype.element_ty), mask=mask)


_REDUCE_TILE = 2048  # elements per buffer in one step's tile (BLOCK_C × BLOCK): 16 fp32 per thread at 4 warps
_REDUCE_MAX_CHUNKS = 64  # chunk rows of a tile; more chunks take ⌈N_CHUNKS / 64⌉ steps
_REDUCE_WARPS = 4


def _reduce_blocks(n_chunks: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK) of the chunk-sum kernel for `n_chunks` partials: all chunks in one tile up to
    64 (a power of two ≥ n_chunks), the element block filling the rest of a 2048-element tile."""
    block_c = min(triton.next_power_of_2(max(1, n_chunks)), _REDUCE_MAX_CHUNKS)
    return block_c, max(32, _REDUCE_TILE // block_c)


def _chunk_sum(part1, part2, out1, out2, n_chunks: int, size: int, groups: int) -> None:
    """out_i[g] = Σ_c part_i[g, c] (part_i: groups × n_chunks × size fp32, out_i: groups × size, both
    contiguous) by `_attn_bwd_reduce_kernel`; shared with `msf.kernels.attention_sublayer`."""
    block_c, block = _reduce_blocks(n_chunks)
    _attn_bwd_reduce_kernel[(triton.cdiv(size, block), groups)](
        part1, part2, out1, out2, size, N_CHUNKS=n_chunks, BLOCK_C=block_c, BLOCK=block, num_warps=_REDUCE_WARPS,
        num_stages=1)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _block_d(d: int) -> int:
    if d > _MAX_BLOCK_D:
        raise ValueError(f"attention: head dim {d} > {_MAX_BLOCK_D} is not supported by the fused kernel")
    return max(32, triton.next_power_of_2(d))  # ≥ 32: the smallest block the configurations were built for


def _chunking(batch: int, n: int, m: int, sms: int | None, chunk_rows: int | None = None,
              block_m: int = 64) -> tuple[int, int]:
    """(chunk_rows, n_chunks) of the dK/dV kernel (`sms` = the GPU's SM count; None under the
    interpreter, where short chunks let tests cover several; `block_m` = the launch's KV tile).

    The grid is ⌈M/block_m⌉ · C · B programs of chunk_rows query rows each. C is chosen to fill the
    machine evenly: the least work on the busiest SM, ⌈programs / SMs⌉ · chunk_rows (counted as two
    programs when there is only one: a lone 8-warp CTA leaves half the issue slots idle), taking the
    fewest chunks within 3 % of the best. C ≤ N / (2M), so the fp32 partials (2·B·C·M·d·4 bytes, written and read once) cost
    at most as much as the kernel's own reads of q and dO (2·B·N·d·2 bytes in bf16). At B = 32,
    M = 256 on an H100 (132 SMs, 128-row KV tiles at d = 32, 64; 32 at d = 128): C = 4, 4, 1, 1 for the
    four stages, 256 programs at stages 1-2 (1.94 per SM, 3 % above an even split; the earlier rule's
    C = 5 gave 320 programs, 2.4 per SM: 3 on the busiest, 24 % above).
    """
    if chunk_rows is None:
        if sms is not None:
            kv_tiles = triton.cdiv(m, block_m)
            loads = {}  # chunk rows -> rows swept by the busiest SM
            for want in range(1, max(1, min(n // (2 * m), triton.cdiv(n, _CHUNK_ALIGN))) + 1):
                rows = triton.cdiv(triton.cdiv(n, want), _CHUNK_ALIGN) * _CHUNK_ALIGN
                loads[rows] = max(2, triton.cdiv(kv_tiles * triton.cdiv(n, rows) * batch, sms)) * rows
            # the fewest chunks within 3 % of the best split (partials are bytes the split must earn)
            chunk_rows = max(r for r, load in loads.items() if load <= 1.03 * min(loads.values()))
        else:
            chunk_rows = _CHUNK_ALIGN
    # CHUNK_ROWS is the kernel's constexpr trip count: never longer than N rounded up to the
    # alignment, so a single chunk does not sweep masked tiles past the end
    chunk_rows = max(1, min(int(chunk_rows), triton.cdiv(n, _CHUNK_ALIGN) * _CHUNK_ALIGN))
    return chunk_rows, triton.cdiv(n, chunk_rows)


def _dkdv_block_m(dtype: torch.dtype, block_d: int, precise: bool, device: torch.device) -> int:
    """BLOCK_M of the dK/dV kernel's pinned configuration for this launch (64 if none is pinned)."""
    from msf.kernels import configs
    try:
        kind = configs.device_kind(device if device.type == "cuda" else None)
        cfg = configs.lookup(_attn_bwd_dkdv_kernel.name, f"{_mode(dtype.itemsize, precise)}_d{block_d}", kind)
    except KeyError:
        return 64
    return int(cfg.kwargs["BLOCK_M"])


def _dkdv_chunks(batch: int, n: int, m: int, d: int, sms: int, kind: str = "sm_90") -> int:
    """Query chunks of a bf16 dK/dV launch at these shapes on `sms` SMs with device kind `kind`'s
    pinned configuration (for the bytes tables: `msf.bench.bytes_attention`, `msf.kernels.attention_sublayer`)."""
    from msf.kernels import configs
    with configs.for_device(kind):
        block_m = _dkdv_block_m(torch.bfloat16, _block_d(d), False, torch.device("cpu"))
    return _chunking(batch, n, m, sms, None, block_m)[1]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"attention: q, k, v must be B×N×d, B×M×d, B×M×d; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: shape mismatch q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0:
        raise ValueError("attention: empty key/value sequence")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"attention: q, k, v must share a dtype in fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("attention: q, k, v on different devices")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("attention: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _new(shape, device, dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _forward(q, k, v, allow_tf32: bool):
    batch, n, d = q.shape
    m = k.shape[1]
    o = _new((batch, n, d), q.device, q.dtype)
    lse = _new((batch, n), q.device, torch.float32)
    if n == 0:
        return o, lse
    block_d = _block_d(d)
    precise = _precise(q.dtype, allow_tf32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), batch)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        n, d, _LOG2E / math.sqrt(d),
        M=m, BLOCK_D=block_d, PRECISE=precise,
    )
    return o, lse


def _backward(q, k, v, o, lse, do, allow_tf32: bool, chunk_rows: int | None):
    batch, n, d = q.shape
    m = k.shape[1]
    dq = _new((batch, n, d), q.device, q.dtype)
    if n == 0:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    block_d = _block_d(d)
    precise = _precise(q.dtype, allow_tf32)
    sm_scale = 1.0 / math.sqrt(d)
    qk_scale = _LOG2E * sm_scale
    delta = _new((batch, n), q.device, torch.float32)

    grid_q = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), batch)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, o, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        n, d, qk_scale, sm_scale,
        M=m, BLOCK_D=block_d, PRECISE=precise,
    )

    dk, dv = _dkdv(q, k, v, do, lse, delta, qk_scale, sm_scale, block_d, precise, chunk_rows,
                   _sm_count(q.device), _new)
    return dq, dk, dv


def _dkdv(q, k, v, do, lse, delta, qk_scale: float, sm_scale: float, block_d: int, precise: bool,
          chunk_rows: int | None, sms: int | None, new):
    """dK, dV (B×M×d, input dtype) from q, dO, lse and D: the chunked dK/dV kernel, plus the chunk-sum
    kernel when there are several chunks. Shared by `_backward` and `msf.kernels.attention_sublayer`'s
    (which passes its q and dO scratch); `new` allocates every buffer (the calling module's `_new`)."""
    batch, n, d = q.shape
    m = k.shape[1]
    block_m = _dkdv_block_m(q.dtype, block_d, precise, q.device) if sms is not None and chunk_rows is None else 64
    chunk_rows, n_chunks = _chunking(batch, n, m, sms, chunk_rows, block_m)
    # one chunk: the dK/dV kernel stores straight into dK, dV (B×1×M×d = B×M×d, input dtype);
    # several: fp32 partials B×C×M×d, then one pass summing them in chunk order and casting
    part_dtype = q.dtype if n_chunks == 1 else torch.float32
    dk_part = new((batch, n_chunks, m, d), q.device, part_dtype)
    dv_part = new((batch, n_chunks, m, d), q.device, part_dtype)
    grid_kv = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_chunks, batch)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk_part, dv_part,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        n, d, n_chunks, qk_scale, sm_scale,
        M=m, CHUNK_ROWS=chunk_rows, BLOCK_D=block_d, PRECISE=precise, EVEN_N=n % chunk_rows == 0,
    )
    if n_chunks == 1:
        return dk_part[:, 0], dv_part[:, 0]
    dk = new((batch, m, d), q.device, k.dtype)
    dv = new((batch, m, d), q.device, v.dtype)
    _chunk_sum(dk_part, dv_part, dk, dv, n_chunks, m * d, batch)
    return dk, dv


class AttentionFunction(torch.autograd.Function):
    """`softmax(q kᵀ/√d) v` with the fused Triton forward and backward (saves q, k, v, O, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, allow_tf32: bool = False, bwd_chunk_rows: int | None = None):
        o, lse = _forward(q, k, v, allow_tf32)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.allow_tf32 = allow_tf32
        ctx.bwd_chunk_rows = bwd_chunk_rows
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.allow_tf32, ctx.bwd_chunk_rows)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, allow_tf32: bool = False,
              bwd_chunk_rows: int | None = None) -> torch.Tensor:
    """Fused `softmax(q kᵀ/√q.shape[-1]) v` for q: B×N×d, k, v: B×M×d (any strides, d ≤ 256).

    Output B×N×d in the input dtype (q, k, v must share fp32 / fp16 / bf16); fp32 accumulation.
    fp32 inputs get fp32-accurate tf32x3 dots; `allow_tf32` lets them use plain tf32 instead (faster,
    ~3e-4 relative error). fp32 at d > 128 without `allow_tf32` runs `attention_eager` (see
    `fused_supported`). `bwd_chunk_rows` overrides the query chunk length of the dK/dV kernel (tests
    use it; by default it is sized to the GPU).
    """
    _check(q, k, v)
    if not fused_supported(q.dtype, q.shape[-1], allow_tf32):
        return attention_eager(q, k, v)
    return AttentionFunction.apply(q, k, v, allow_tf32, bwd_chunk_rows)


# ----------------------------------------------------------------------------------------------
# ahead-of-time builds (python -m msf.profiling.report): every kernel × d block × dtype × surviving config
# ----------------------------------------------------------------------------------------------
_AOT_M = 256  # the model's KV length at every stage (SPEC §2)
_AOT_CHUNK_ROWS = 4096  # stage 1 at B = 32 on an H100 (132 SMs): 16384 rows in 4 chunks
# the chunk sums the model runs: dK/dV at stages 1-3 (4 chunks on an H100; 8 and 2 on an A100, whose
# 108 SMs split the rows otherwise), the sublayer's weight gradients (256)
_AOT_REDUCE_CHUNKS = (2, 4, 8, 256)
_AOT_DTYPES = {"16": ("bf16",), "tf32x3": ("fp32",), "tf32": ("fp32",)}
# fp16 compiles to the same code as bf16 but for the conversion instructions; one spot check per
# kernel (its largest d block, first configuration) keeps the report short
_AOT_FP16_SPOT = 256
_AOT_KERNELS = {
    # name: (kernel, pointer args in the input dtype, fp32 pointer args, extra constexprs)
    "fwd": (_attn_fwd_kernel, ("Q", "K", "V", "O"), ("LSE",), {}),
    "dq": (_attn_bwd_dq_kernel, ("Q", "K", "V", "O", "DO", "DQ"), ("LSE", "DELTA"), {}),
    "dkdv": (_attn_bwd_dkdv_kernel, ("Q", "K", "V", "DO"), ("LSE", "DELTA", "DK_PART", "DV_PART"),
             {"CHUNK_ROWS": _AOT_CHUNK_ROWS, "EVEN_N": True}),
}


def _aot_spec(name: str, jit_fn, ptr_types: dict[str, str], constexprs: dict, num_warps: int,
              num_stages: int, floats: tuple[str, ...] = ()) -> AotSpec:
    """The build of `jit_fn` with these pointer types and constexprs, specialised as Triton's launcher
    specialises it at the model's shapes: every pointer 16-byte aligned and every integer argument a
    multiple of 16 (d, 2d, N·d, M·2d are), so marked `tt.divisibility = 16` (`divisibility_attrs`),
    which allows vectorised loads; `n_chunks` is not; a last-dim stride (`stride_*d`) of 1 becomes a
    constexpr. `floats` (and the softmax scales) are fp32 scalars. A build without the attrs would be
    a pessimistic estimate: scalar loads, up to twice the registers."""
    sig, const = {}, dict(constexprs)
    for a in jit_fn.arg_names:
        if a in const:
            continue
        if a.startswith("stride_") and a.endswith("d"):
            const[a] = 1  # a contiguous last dim: Triton specialises a stride of 1 to a constant
        elif a in floats or a in ("qk_scale", "sm_scale"):
            sig[a] = "fp32"
        else:
            sig[a] = ptr_types.get(a, "i32")
    return AotSpec(name=name, fn=jit_fn, signature=sig, constexprs=const, num_warps=num_warps,
                   num_stages=num_stages, attrs=divisibility_attrs(jit_fn, sig, {"n_chunks"}))


def _aot_specs() -> list[AotSpec]:
    specs = []
    for kname, (kernel, data_ptrs, f32_ptrs, extra) in _AOT_KERNELS.items():
        jit_fn = kernel.fn  # the JITFunction under the pinned-config wrapper
        for mode, per_d in _ALLOWED[kname].items():
            for dname in _AOT_DTYPES[mode]:
                ptrs = {**{a: f"*{dname}" for a in data_ptrs}, **{a: "*fp32" for a in f32_ptrs}}
                builds = [(dname, ptrs, block_d, cfg) for block_d, cfgs in per_d.items() for cfg in cfgs]
                if mode == "16":
                    fp16 = {a: t.replace("bf16", "fp16") for a, t in ptrs.items()}
                    builds.append(("fp16", fp16, _AOT_FP16_SPOT, per_d[_AOT_FP16_SPOT][0]))
                for dt, pt, block_d, (bn, bm, w, st) in builds:
                    const = {"M": _AOT_M, "BLOCK_D": block_d, "PRECISE": mode == "tf32x3",
                             "BLOCK_N": bn, "BLOCK_M": bm, **extra}
                    tag = f"{kname}_{dt}{'' if mode == '16' else '_' + mode}_d{block_d}_n{bn}_m{bm}_w{w}_s{st}"
                    specs.append(_aot_spec(f"attention.{tag}", jit_fn, pt, const, w, st))
    for dname in ("bf16", "fp16", "fp32"):
        ptrs = {"PART1": "*fp32", "PART2": "*fp32", "OUT1": f"*{dname}", "OUT2": f"*{dname}"}
        for n_chunks in _AOT_REDUCE_CHUNKS:
            block_c, block = _reduce_blocks(n_chunks)
            specs.append(_aot_spec(f"attention.reduce_{dname}_c{n_chunks}", _attn_bwd_reduce_kernel, ptrs,
                                   {"N_CHUNKS": n_chunks, "BLOCK_C": block_c, "BLOCK": block}, _REDUCE_WARPS, 1))
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
