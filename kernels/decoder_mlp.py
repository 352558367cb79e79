"""The decoder's fuse MLP without its 512-channel concat, in Triton.

The paper's decoder (SPEC §2) unifies each stage's features to E channels, upsamples them to stage 1's
size, concatenates the four and runs Linear(4E → E) → GELU → Dropout → Linear(E → E). The first fuse
Linear, split by input blocks W = [W1 | W2 | W3 | W4], commutes with the bilinear upsample (a per-pixel
linear map; interpolation weights that sum to one carry constants through unchanged), so

    x = dropout(GELU(f1 M1ᵀ + Σ_{i=2..4} up_i(P_i) + c)) w2ᵀ + b2,   P_i = f_i M_iᵀ,  M_i = W_i U_i,
    c = b + Σ_i W_i u_i                                                (U_i, u_i: the unify Linears)

which is exact. `decoder_mlp` computes the folded weights from the module's parameters on every call
(so checkpoints keep their format and both backends load the same files), projects stages 2-4 at
their own low resolution with plain `F.linear`, and runs the rest as this module's kernels:

    f1: B×N×C1 tokens of stage 1 (N = H·W)     P2..P4: B×(h_i·w_i)×E tokens (H = s_i·h_i, W = s_i'·w_i)
    M1: E×C1   c: E   w2: E×E   b2: E   seed: one int64 (the dropout stream)   x: B×N×E tokens

Dropout is counter-based: element (row, e) is kept when its 16-bit Philox draw (`_draws`: a half of
one of the four outputs of a call that serves eight elements of two rows, laid out as the tensor
cores' accumulator holds them) is ≥ p·2¹⁶ rounded, so no mask is stored and the backward
regenerates it; `keep_mask` returns it for tests. The keep probability is nn.Dropout's 1 − p up
to p's rounding to a multiple of 2⁻¹⁶ (p = 0.15: 0.149994; below what a test of a step's 67 M draws
can see, standard error 4·10⁻⁵), and kept values are scaled by 1 / (1 − p).

Precision (`compute_dtype`): one dtype throughout (fp32 products as tf32x3), or the model's CUDA
autocast mix: fp32 master weights rounded on load, f1 in fp32 (rounded on load) or already in the
autocast dtype (the model's: stage_output writes it so), P_i in the autocast dtype (F.linear's
output), the pre-activation, GELU's output, the dropout output, x and in the backward dx·w2, the
dropout and GELU gradients rounded where eager autocast rounds its own tensors.

Kernels (no atomics: parameter gradients through per-program fp32 partials and a fixed-order sum):
- `_decoder_fwd_kernel`: a run of BLOCK_P-pixel tiles a program (about 2 programs an SM), M1 and w2
  loaded once a program as MMA operands: per tile the pre-activation h (stage 1's product plus the
  12 bilinear taps of P2..P4 plus c; in the model's case, tiles within one output row and stages
  that halve, each stage's taps as one tensor-core product, `_upsampled_row`), GELU, dropout, the
  second Linear; x written once, and h and
  D = dropout(GELU(h)) (in the compute dtype, the values the kernel rounds them to anyway) when a
  backward will need them.
- `_decoder_bwd_kernel`: a run of pixel tiles a program, w2 and M1 loaded once a program as MMA
  operands: from the saved h, dh (stored: stages 2-4 need it at full resolution, and the weight
  gradients) and df1 = dh M1.
- the attention sublayer's GEMM kernel (`msf.kernels.attention_sublayer.launch_wgrad`), two groups in
  one launch: the row chunks' partial sums of [dw2 | db2] = Σ (gᵀ D, g) and [dM1 | dc] = Σ (dhᵀ f1, dh).
- `_pyramid_adjoint_kernel` (one launch for stages 2-4, where they halve stage 1 exactly and dh is
  16-bit: the model's case): dP_i = up_iᵀ(dh), a program reading once the 16 × 32 window of dh that a
  block of 7 low-resolution rows × 14 columns of the three stages gathers from, each window row's
  x-adjoint one tensor-core product with the stacked interpolation weights.
- `_upsample_adjoint_kernel` (otherwise, once per stage 2-4): dP_i = up_iᵀ(dh), each low-resolution
  pixel gathering the 2s × 2s full-resolution pixels whose taps reach it, weights from the
  forward's formula. Both deterministic, where eager's upsample backward adds with atomics.
- `partial_sums`: the fixed-order sums of both partial buffers, in one launch.
- `_fold_fwd_kernel` / `_fold_bwd_kernel` (`FoldFunction`, `fold`): M_1..M_4 and c from the fp32
  parameters in one launch (M_2..M_4 rounded on store to the projections' dtype), their gradients in
  one more; `fold_reference` is the PyTorch form (any other parameter dtype).

docs/decoder_mlp.md: the algebra, the backward's math, the bytes against eager, the designs dropped.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from msf.kernels import attention as _core, attention_sublayer as _sub
from msf.kernels._common import INTERPRET, AotSpec, _round, dot, products_dtype, row_chunks
from msf.kernels.attention import _aot_spec, _mm
from msf.kernels.configs import PinnedKernel, candidate_order
from msf.kernels.ffn_sublayer import _CDT, _gelu_parts, _rounded, _tile_runs, _to_compute
from msf.kernels.partial_sums import sum_partials
from msf.precision import autocast_off
from msf.reference import DecoderParams, eager_decoder_mlp

__all__ = ["decoder_mlp", "decoder_mlp_eager", "DecoderMLPFunction", "FoldFunction", "AOT_SPECS", "compute_dtype",
           "fold", "fold_reference", "project", "keep_mask", "fused_reference"]

decoder_mlp_eager = eager_decoder_mlp  # the reference: unify → upsample → concat → fuse MLP, as the paper
_MAX_BLOCK_E = 128
_MAX_BLOCK_C1 = 64
# fp32 (tf32x3 products) past E = 64 has no spill-free backward tile (368 B at E = 128 on sm_80 and
# sm_90): there the op runs the eager composition, as the FFN sublayer does past C = 64
_MAX_FP32_E = 64
DRAW_BITS = 16  # the dropout draw's resolution: p is rounded to a multiple of 2⁻¹⁶

# ----------------------------------------------------------------------------------------------
# configurations (BLOCK_P, num_warps, num_stages) per kernel and dtype class ("16": bf16 / fp16
# throughout; "amp": fp32 weights, 16-bit products; "fp32": tf32x3); the adjoint's
# (BLOCK_X, num_warps, num_stages). Every entry builds for sm_80 and sm_90 without spills at
# E = 128, C1 = 32 (fp32: E = 64; `AOT_SPECS`, `python -m msf.profiling.report --module
# msf.kernels.decoder_mlp`: 38 builds with the fold, 0 spills). Left out: fwd BLOCK_P 64 (spills
# 200 B on sm_90), the backward at BLOCK_P 32 (bf16: 32 B on sm_80) and, for bf16, at 4 warps (24 B
# on sm_80: before the pixel sums left it). Both
# loops keep their weights in registers across tiles. The forward's pin is BLOCK_P 16 at 8 warps:
# 128 registers a thread (2 CTAs an SM), where BLOCK_P 32 takes 180 (one CTA an SM, predicted 2x
# slower). The backward's, under autocast, BLOCK_P 16 at 8 warps since its pixel sums went to the
# GEMM kernel (2026-12-06): 120 registers, 2 CTAs an SM, 178 µs on an H100 against 244 at 4 warps
# (164 registers, 3 CTAs), 304 against 371 on an A100.
# ----------------------------------------------------------------------------------------------
_Cfg = tuple[int, int, int]
_ALLOWED: dict[str, dict[str, list[_Cfg]]] = {
    "fwd": {"16": [(32, 8, 2), (16, 8, 2)], "amp": [(32, 8, 2), (16, 8, 2)], "fp32": [(16, 8, 2)]},
    "bwd": {"16": [(16, 8, 2)], "amp": [(16, 4, 2), (16, 8, 2)], "fp32": [(16, 8, 2)]},
    "adjoint": {"16": [(16, 4, 2), (32, 4, 2)], "fp32": [(16, 4, 2)]},
    "pyramid": {"16": [(128, 4, 2), (64, 4, 2), (128, 8, 2)]},
}
_BLOCK_NAME = {"fwd": "BLOCK_P", "bwd": "BLOCK_P", "adjoint": "BLOCK_X", "pyramid": "BLOCK_N"}
_CANDIDATES: list[_Cfg] = [(bp, w, 2) for bp in (16, 32, 64, 128) for w in (4, 8)]
# under the interpreter: small tiles, so CPU tests at small shapes cover ragged tiles and several
# tiles a program
_INTERPRETER_CFG: _Cfg = (16, 4, 2)


def _mode(named_args) -> str:
    """The dtype class of a launch; the adjoint's ("16" or "fp32") from the dtype of dh alone."""
    if "CDT" not in named_args:
        return "fp32" if named_args["DH"].element_size() == 4 else "16"
    if named_args["CDT"] == 0:
        return "fp32"
    return "amp" if named_args["W2"].element_size() == 4 else "16"


def _pinned(kernel: str, fn) -> PinnedKernel:
    """`fn` launched with its configuration from kernels/configs.json ("decoder_mlp.<kernel>"; shape
    class = dtype class and E block, e.g. "amp_e128")."""
    block = _BLOCK_NAME[kernel]
    seen = candidate_order(_INTERPRETER_CFG, *_ALLOWED[kernel].values(), _CANDIDATES)

    def as_config(c: _Cfg) -> triton.Config:
        return triton.Config({block: c[0]}, num_warps=c[1], num_stages=c[2])

    def allowed(cls: str) -> list[triton.Config]:
        return [as_config(c) for c in _ALLOWED[kernel][cls.rsplit("_e", 1)[0]]]

    def shape_class(named) -> str:
        return f"{_mode(named)}_e{named['BLOCK_E']}"

    def prune(configs, named_args, **kwargs):
        ok = _ALLOWED[kernel][_mode({**named_args, **kwargs})]
        kept = [c for c in configs if (c.kwargs[block], c.num_warps, c.num_stages) in ok]
        return kept or configs[:1]

    classes = [f"{mode}_e{e}" for mode in _ALLOWED[kernel] for e in (32, 64, 128)]
    return PinnedKernel(f"decoder_mlp.{kernel}", fn, [as_config(c) for c in seen], ["E", "C1", "CDT"],
                        shape_class, allowed, classes, prune=prune)


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _taps(scale, dst, size_in):
    """Bilinear taps (align_corners=False) of output index `dst` along one axis, as PyTorch computes
    them: src = max(scale·(dst + ½) − ½, 0), i0 = ⌊src⌋, i1 = i0 + 1 short of the edge (else i0),
    weights (1 − λ, λ), λ = src − i0. `scale` = size_in / size_out in fp32."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # truncation = floor: src ≥ 0
    i1 = tl.where(i0 < size_in - 1, i0 + 1, i0)
    lam = src - i0.to(tl.float32)
    return i0, i1, 1.0 - lam, lam


@triton.jit
def _upsampled(P, b, oy, ox, h_in, w_in, scale_y, scale_x, offs_e, mask_pe, E: tl.constexpr):
    """The bilinear upsample of P (B×h_in×w_in×E tokens) at output pixels (oy, ox) of images b: a
    BLOCK_P × BLOCK_E fp32 tile (zero outside mask_pe)."""
    y0, y1, ly0, ly1 = _taps(scale_y, oy, h_in)
    x0, x1, lx0, lx1 = _taps(scale_x, ox, w_in)
    img = b * h_in  # int32 offsets: the host keeps every P_i under 2³¹ elements
    r0 = ((img + y0) * w_in)[:, None]
    r1 = ((img + y1) * w_in)[:, None]
    e = offs_e[None, :]
    v00 = tl.load(P + (r0 + x0[:, None]) * E + e, mask=mask_pe, other=0.0).to(tl.float32)
    v01 = tl.load(P + (r0 + x1[:, None]) * E + e, mask=mask_pe, other=0.0).to(tl.float32)
    v10 = tl.load(P + (r1 + x0[:, None]) * E + e, mask=mask_pe, other=0.0).to(tl.float32)
    v11 = tl.load(P + (r1 + x1[:, None]) * E + e, mask=mask_pe, other=0.0).to(tl.float32)
    top = lx0[:, None] * v00 + lx1[:, None] * v01
    bottom = lx0[:, None] * v10 + lx1[:, None] * v11
    return ly0[:, None] * top + ly1[:, None] * bottom


@triton.jit
def _upsampled_row(P, b, oy, ox0, h_in, w_in, scale_y, scale_x, offs_e, mask_e, E: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """The bilinear upsample of P (B×h_in×w_in×E tokens) at the BLOCK_P pixels ox0 .. ox0 + BLOCK_P − 1 of
    output row oy of image b (scalars), as one tensor-core product where `_upsampled` gathers four taps
    a pixel. The row's y taps (y0, y1; weights ly0, ly1) are one pair for the tile; the pixels' x taps
    lie in the BLOCK_P columns of P from X0, the first pixel's left tap (at s = W/w_in ≥ 2 they span
    at most BLOCK_P/s + 2), so with K = those columns in row y0, then in row y1,
        up = U · [P[y0, X0 .. X0 + BLOCK_P); P[y1, X0 .. X0 + BLOCK_P)],   U[p, (r, j)] = ly_r · lx_p(X0 + j)
    (BLOCK_P × 2·BLOCK_P times 2·BLOCK_P × E). The x taps are taken unclamped (X0 = −1 at the left edge,
    X0 + j past w_in − 1 at the right) from columns clamped into the row: a tap outside the row reads
    the edge column, whose weight then adds to the edge tap's, which is what PyTorch's clamped taps
    give. So the x half of U is one pattern for every tile (s divides BLOCK_P: ox0/s is an integer),
    formed from the scale alone, outside the tile loop. At the scales ½, ¼, ⅛ (the only ones this runs
    at) ly and lx are multiples of 1/16 and their products multiples of 1/256 below 2: exact in P's
    16-bit dtype; the products accumulate in fp32, the gather's sum in another order."""
    y0, y1, ly0, ly1 = _taps(scale_y, oy, h_in)
    src = scale_x * (tl.arange(0, BLOCK_P).to(tl.float32) + 0.5) - 0.5  # the tile's pixels, ox0 = 0 wlog
    lo = tl.floor(src)
    lam = src - lo
    rel = (lo - tl.floor(scale_x * 0.5 - 0.5)).to(tl.int32)[:, None]  # left tap − X0
    k = tl.arange(0, 2 * BLOCK_P)
    col = (k % BLOCK_P)[None, :]
    u = tl.where(rel == col, 1.0 - lam[:, None], 0.0) + tl.where(rel + 1 == col, lam[:, None], 0.0)
    u = (u * tl.where(k < BLOCK_P, ly0, ly1)[None, :]).to(P.dtype.element_ty)
    first = tl.floor(scale_x * (ox0.to(tl.float32) + 0.5) - 0.5).to(tl.int32)  # X0, unclamped
    cols = tl.minimum(tl.maximum(first + k % BLOCK_P, 0), w_in - 1)
    src_row = (b * h_in + tl.where(k < BLOCK_P, y0, y1)) * w_in + cols  # int32: P_i < 2³¹ elements
    taps = tl.load(P + src_row[:, None] * E + offs_e[None, :], mask=mask_e[None, :], other=0.0)
    return dot(u, taps)


@triton.jit
def _pre_activation(F1, P2, P3, P4, m1, cb, tile, b0, oy0, ox0, ROWS, H, W, h2, w2, h3, w3, h4, w4,
                    sy2, sx2, sy3, sx3, sy4, sx4,
                    C1: tl.constexpr, E: tl.constexpr, CDT: tl.constexpr, ROW_TILES: tl.constexpr,
                    BLOCK_C1: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    """The pre-activation h = f1 M1ᵀ + Σ up_i(P_i) + c of pixel tile `tile` (rounded as the fuse
    Linear's output is), from the caller's M1 block `m1` (compute dtype) and c (`cb`, fp32), with
    what the caller reuses: (h, rows, offs_e, mask_p, mask_e, mask_pe). ROW_TILES: every tile is a
    segment of one output row and the stages are exact halvings in a 16-bit dtype (`_row_tiles`),
    so the taps are `_upsampled_row`'s products, and (b0, oy0, ox0) is the tile's image, output row and
    first column; else `_upsampled`'s gathers."""
    rows32 = tile * BLOCK_P + tl.arange(0, BLOCK_P)  # int32 for the divisions (an int64 one is a long
    rows = rows32.to(tl.int64)                         # subroutine): the host keeps B·H·W under 2³¹
    mask_p = rows32 < ROWS
    pix = rows32 % (H * W)
    b = rows32 // (H * W)
    oy = pix // W
    ox = pix % W
    offs_c = tl.arange(0, BLOCK_C1)
    offs_e = tl.arange(0, BLOCK_E)
    mask_c = offs_c < C1
    mask_e = offs_e < E
    mask_pe = mask_p[:, None] & mask_e[None, :]
    f1 = _to_compute(tl.load(F1 + rows[:, None] * C1 + offs_c[None, :], mask=mask_p[:, None] & mask_c[None, :],
                             other=0.0), CDT)
    h = _mm(f1, tl.trans(m1), CDT == 0)
    if ROW_TILES:
        h += _upsampled_row(P2, b0, oy0, ox0, h2, w2, sy2, sx2, offs_e, mask_e, E, BLOCK_P)
        h += _upsampled_row(P3, b0, oy0, ox0, h3, w3, sy3, sx3, offs_e, mask_e, E, BLOCK_P)
        h += _upsampled_row(P4, b0, oy0, ox0, h4, w4, sy4, sx4, offs_e, mask_e, E, BLOCK_P)
    else:
        h += _upsampled(P2, b, oy, ox, h2, w2, sy2, sx2, offs_e, mask_pe, E)
        h += _upsampled(P3, b, oy, ox, h3, w3, sy3, sx3, offs_e, mask_pe, E)
        h += _upsampled(P4, b, oy, ox, h4, w4, sy4, sx4, offs_e, mask_pe, E)
    h += cb[None, :]
    return _rounded(h, CDT), rows, offs_e, mask_p, mask_e, mask_pe


@triton.jit
def _draws(seed, row0, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """16-bit draws (int32 in [0, 2¹⁶)) for the BLOCK_P × BLOCK_E tile whose first row is `row0` (int64,
    a multiple of 16). One Philox call (four 32-bit outputs, each split into its two halves) serves
    eight elements: rows ρ and ρ + 8 of a 16-row group × channels c and c + BLOCK_E/2 × the channel
    pair c = 2m, 2m + 1. Element (16a + 8h + ρ, (BLOCK_E/2)·u + 2m + i) of the tile takes half i of
    output 2h + u of the call at the 64-bit counter ((row0/16 + a)·8 + ρ)·BLOCK_E/4 + m. Why this
    grouping: the tile is consumed in the tensor cores' accumulator layout (mma m16n8: a thread holds
    rows ρ and ρ + 8 and a channel pair of each n-tile, the n-tiles dealt to the warps in turn, so
    with BLOCK_E = 128 and ≤ 8 warps along E also channels c and c + 64), so Triton computes each
    call in the thread that holds its eight elements and lays the draws out with no shuffle through
    shared memory (grouping eight adjacent channels took five layout conversions, ~90 sm_90
    instructions of a 16-row tile: docs/decoder_mlp.md)."""
    tl.static_assert(BLOCK_P % 16 == 0, "decoder_mlp: dropout tiles are whole 16-row groups")
    tl.static_assert(BLOCK_E >= 16, "decoder_mlp: dropout tiles are at least 16 channels wide")
    a = tl.arange(0, BLOCK_P // 16)[:, None, None, None, None, None]
    h = tl.arange(0, 2)[None, :, None, None, None, None]
    rho = tl.arange(0, 8)[None, None, :, None, None, None]
    u = tl.arange(0, 2)[None, None, None, :, None, None]
    m = tl.arange(0, BLOCK_E // 4)[None, None, None, None, :, None]
    i = tl.arange(0, 2)[None, None, None, None, None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, ((row0 // 16 + a) * 8 + rho) * (BLOCK_E // 4) + m)
    out = tl.where(h == 0, tl.where(u == 0, r0, r1), tl.where(u == 0, r2, r3))
    return tl.reshape((out >> (16 * i)) & 0xFFFF, [BLOCK_P, BLOCK_E])


@triton.jit
def _in_layout_of(value, anchor):
    """`value` made to depend on `anchor`, a product's accumulator: value − anchor·0, the same number
    wherever anchor is finite (a zero may change sign). Triton lays an elementwise chain out anew in
    each layout its results are used in rather than convert one result: storing D alone, the
    forward computed GELU and the dropout draw a second time in the store's blocked layout (+170
    sm_90 instructions a tile); tied to the accumulator, the chain stays in the MMA layout and D is
    converted once for the store (+45). The backward ties the loaded h to its first product, so
    that GELU' is formed once, in the MMA layout, for dh's store and its products alike."""
    return (value.to(tl.float32) - anchor * 0.0).to(value.dtype)


@triton.jit
def _keep_scale(SEED, row0, drop_below, drop_scale, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                DROPOUT: tl.constexpr):
    """1/(1 − p) where element (row, e) of the tile from row `row0` is kept (its draw ≥ drop_below =
    p·2¹⁶, rounded), 0 where dropped; 1 without dropout."""
    if DROPOUT:
        ks = tl.where(_draws(tl.load(SEED), row0, BLOCK_P, BLOCK_E) >= drop_below, drop_scale, 0.0)
    else:
        ks = tl.full([BLOCK_P, BLOCK_E], 1.0, tl.float32)
    return ks


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _decoder_fwd_kernel(
    F1, P2, P3, P4, M1, CB, W2, B2, SEED, OUT, HS, D,
    ROWS, N_TILES, TILES, H, W, h2, w2, h3, w3, h4, w4, sy2, sx2, sy3, sx3, sy4, sx4, drop_below, drop_scale,
    C1: tl.constexpr, E: tl.constexpr, CDT: tl.constexpr, DROPOUT: tl.constexpr, SAVE: tl.constexpr,
    ROW_TILES: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """x of pixel tiles [pid·TILES, (pid+1)·TILES) ∩ [0, N_TILES) (BLOCK_P rows of the B·H·W × E
    output each) and, if SAVE, what the backward reads of them: the pre-activation h and the dropout
    output D, both in the compute dtype and exactly the values the kernel goes on with (rounded to
    it already). D is stored here, from the layout the second Linear's product takes it in, because
    the backward cannot form it cheaply: there Triton laid GELU and the dropout draw out twice, once
    for D's store and once for dh (~280 of 1004 sm_90 instructions a tile; docs/decoder_mlp.md)."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_C1)
    mask_e = offs_e < E
    mask_ee = mask_e[:, None] & mask_e[None, :]
    m1 = _to_compute(tl.load(M1 + offs_e[:, None] * C1 + offs_c[None, :], mask=mask_e[:, None] & (offs_c < C1)[None, :],
                             other=0.0), CDT)
    w2t = _to_compute(tl.load(W2 + offs_e[None, :] * E + offs_e[:, None], mask=mask_ee, other=0.0), CDT)  # w2ᵀ
    cb = tl.load(CB + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    b2 = _rounded(tl.load(B2 + offs_e, mask=mask_e, other=0.0), CDT)
    tile = tl.program_id(0) * TILES
    stop = tl.minimum(tile + TILES, N_TILES)
    # ROW_TILES: the tile's image, output row and first column, stepped from tile to tile (derived
    # from the tile index, their three integer divisions were ~50 of a tile's ~715 sm_90 instructions)
    ox0 = (tile * BLOCK_P) % W
    oy0 = (tile * BLOCK_P) // W % H
    b0 = (tile * BLOCK_P) // (H * W)
    while tile < stop:
        h, rows, offs_e, mask_p, mask_e, mask_pe = _pre_activation(
            F1, P2, P3, P4, m1, cb, tile, b0, oy0, ox0, ROWS, H, W, h2, w2, h3, w3, h4, w4,
            sy2, sx2, sy3, sx3, sy4, sx4, C1, E, CDT, ROW_TILES, BLOCK_C1, BLOCK_E, BLOCK_P)
        tok = rows[:, None] * E + offs_e[None, :]
        if SAVE:
            tl.store(HS + tok, _to_compute(h, CDT), mask=mask_pe)
        cdf, _pdf = _gelu_parts(h)
        a = _rounded(h * cdf, CDT)
        d = _to_compute(a * _keep_scale(SEED, tile.to(tl.int64) * BLOCK_P, drop_below, drop_scale, BLOCK_P, BLOCK_E,
                                         DROPOUT), CDT)
        x = _mm(d, w2t, CDT == 0) + b2[None, :]
        if SAVE:
            tl.store(D + tok, _in_layout_of(d, x), mask=mask_pe)
        tl.store(OUT + tok, _round(x, OUT.dtype.element_ty), mask=mask_pe)
        tile += 1
        if ROW_TILES:  # W is a multiple of BLOCK_P
            ox0 += BLOCK_P
            next_row = (ox0 >= W).to(tl.int32)
            ox0 -= next_row * W
            oy0 += next_row
            next_image = (oy0 >= H).to(tl.int32)
            oy0 -= next_image * H
            b0 += next_image


_decoder_fwd_kernel = _pinned("fwd", _decoder_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# g = ∂L/∂x (pixels × E). With h the pre-activation, A = GELU(h), k the keep scale (0 or 1/(1−p)),
# D = A ∘ k and x = D w2ᵀ + b2 (every product in the compute dtype, rounded as eager rounds it):
#   dw2 = Σ_pixels gᵀ D                db2 = Σ_pixels g
#   dD  = g w2                         dA  = dD ∘ k             dh = dA ∘ GELU'(h)
#   dc  = Σ_pixels dh                  dM1 = Σ_pixels dhᵀ f1    df1 = dh M1
#   dP_i = up_iᵀ(dh): the adjoint of the bilinear upsample, by `_pyramid_adjoint_kernel`
# and, outside the op, autograd through P_i = f_i M_iᵀ and the fold M_i = W_i U_i, c = b + Σ W_i u_i.
# `_decoder_bwd_kernel` reads h (saved by the forward) and writes dh and df1; the four sums over the
# pixels (dw2, db2 from g and the forward's D; dM1, dc from dh and f1) are two groups of the attention
# sublayer's GEMM kernel in one launch. In this kernel dM1ᵀ and Σ dh took 48 of its 250 registers
# at 4 warps, 2 CTAs an SM (and dw2's E×E fp32 accumulator spilled: 64 registers more): without them
# 120 at 8 warps, 2 CTAs (docs/decoder_mlp.md, "The weight gradients out of the backward kernel").
@triton.jit
def _decoder_bwd_kernel(
    HS, M1, W2, SEED, G, DH, DF1,
    ROWS, N_TILES, TILES, drop_below, drop_scale,
    C1: tl.constexpr, E: tl.constexpr, CDT: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_C1: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dh and df1 of pixel tiles [pid·TILES, (pid+1)·TILES) ∩ [0, N_TILES) from the saved h."""
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_C1)
    mask_e = offs_e < E
    mask_c = offs_c < C1
    mask_ee = mask_e[:, None] & mask_e[None, :]
    mask_ec = mask_e[:, None] & mask_c[None, :]
    # both weights loaded, rounded and laid out as MMA operands once a program, not once a tile: in
    # the loop they were 64 KB of fp32 loads and ~180 of its ~1180 instructions a tile (sm_90)
    fc2 = _to_compute(tl.load(W2 + offs_e[:, None] * E + offs_e[None, :], mask=mask_ee, other=0.0), CDT)
    m1 = _to_compute(tl.load(M1 + offs_e[:, None] * C1 + offs_c[None, :], mask=mask_ec, other=0.0), CDT)
    tile = pid * TILES
    stop = tl.minimum(tile + TILES, N_TILES)
    while tile < stop:  # (a while loop: the interpreter takes no tensor bounds in range())
        rows = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = rows < ROWS
        mask_pe = mask_p[:, None] & mask_e[None, :]
        mask_pc = mask_p[:, None] & mask_c[None, :]
        tok = rows[:, None] * E + offs_e[None, :]
        g = _to_compute(tl.load(G + tok, mask=mask_pe, other=0.0), CDT)
        gw = _mm(g, fc2, CDT == 0)
        # h tied to the product's layout: loaded plain, GELU' was laid out a second time for dh's store
        h = _in_layout_of(tl.load(HS + tok, mask=mask_pe, other=0.0).to(tl.float32), gw)
        cdf, pdf = _gelu_parts(h)
        ks = _keep_scale(SEED, tile.to(tl.int64) * BLOCK_P, drop_below, drop_scale, BLOCK_P, BLOCK_E, DROPOUT)
        da = _rounded(_rounded(gw, CDT) * ks, CDT)
        dh = _to_compute(da * (cdf + h * pdf), CDT)  # zero in rows past the end: their g is
        tl.store(DH + tok, dh, mask=mask_pe)
        df1 = _mm(dh, m1, CDT == 0)
        tl.store(DF1 + rows[:, None] * C1 + offs_c[None, :], _round(_rounded(df1, CDT), DF1.dtype.element_ty),
                 mask=mask_pc)
        tile += 1


_decoder_bwd_kernel = _pinned("bwd", _decoder_bwd_kernel)


# dP[b, y, x] = Σ_{Y, X} wy(Y, y) · wx(X, x) · dh[b, Y, X]: wy(Y, y) is the weight output row Y gives
# input row y in the forward (λ-weights of its taps i0, i1 that equal y). Output rows whose taps
# reach y have src = (Y + ½)/s − ½ ∈ (y − 1, y + 1), i.e. Y ∈ (s·y − s/2 − ½, s·y + 3s/2 − ½): 2s
# rows from s·y − s/2 for even s; for odd s the 2s − 1 rows strictly inside and the two on its ends,
# whose exact weight is 0 but whose fp32 src (the scale h_in/H is rounded) can land a few ulps
# inside (weights ~1e-6 at s = 7): 2s + 1 rows from s·y − ⌊s/2⌋ − 1. Fewer at the edges, where the
# clamped taps of rows near the border give their whole weight to row 0 or h_in − 1.
@triton.jit
def _upsample_adjoint_kernel(
    DH, DP, H, W, h_in, w_in, scale_y, scale_x,
    E: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """dP of BLOCK_X input pixels of input row (program 0 = b·h_in + y), gathered from dh
    (B·H·W × E tokens) by the forward's own tap formula; DP is B·h_in·w_in × E."""
    row = tl.program_id(0)
    y = row % h_in
    b = (row // h_in).to(tl.int64)
    xs = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_e = tl.arange(0, BLOCK_E)
    mask_x = xs < w_in
    mask_e = offs_e < E
    acc = tl.zeros([BLOCK_X, BLOCK_E], tl.float32)
    # x outermost: the BLOCK_X pixels' x taps, weights and masks once per window column, and the
    # inner loop over window rows is a scalar weight (the same for the whole row), a load and an FMA
    for jx in tl.range(0, 2 * SX + SX % 2, loop_unroll_factor=1):  # (kept rolled: 2s × 2s bodies at s = 8)
        ox = SX * xs - SX // 2 - SX % 2 + jx
        in_x = (ox >= 0) & (ox < W) & mask_x
        oxc = tl.minimum(tl.maximum(ox, 0), W - 1)
        x0, x1, lx0, lx1 = _taps(scale_x, oxc, w_in)
        wx = tl.where(in_x, tl.where(x0 == xs, lx0, 0.0) + tl.where(x1 == xs, lx1, 0.0), 0.0)
        column = DH + (b * H * W + oxc[:, None].to(tl.int64)) * E + offs_e[None, :]
        mask = in_x[:, None] & mask_e[None, :]
        col = tl.zeros([BLOCK_X, BLOCK_E], tl.float32)  # Σ_rows wy · dh of this window column
        for jy in tl.range(0, 2 * SY + SY % 2, loop_unroll_factor=1):
            oy = SY * y - SY // 2 - SY % 2 + jy
            oyc = tl.minimum(tl.maximum(oy, 0), H - 1)
            y0, y1, ly0, ly1 = _taps(scale_y, oyc, h_in)
            in_y = (oy >= 0) & (oy < H)
            wy = tl.where(in_y, tl.where(y0 == y, ly0, 0.0) + tl.where(y1 == y, ly1, 0.0), 0.0)
            col += wy * tl.load(column + oyc.to(tl.int64) * W * E, mask=mask & in_y, other=0.0).to(tl.float32)
        acc += wx[:, None] * col
    out = DP + ((b * h_in + y) * w_in + xs[:, None]) * E + offs_e[None, :]
    tl.store(out, _round(acc, DP.dtype.element_ty), mask=mask_x[:, None] & mask_e[None, :])


_upsample_adjoint_kernel = _pinned("adjoint", _upsample_adjoint_kernel)


# The pyramid adjoint, one launch for stages 2-4 where they are exactly H/2, H/4 and H/8 of stage 1
# along both axes (the model at any input size divisible by 32). Then the windows above nest:
# - rows: low-resolution row t of stage 4 (s = 8), rows 2t, 2t + 1 of stage 3 (s = 4) and 4t .. 4t + 3
#   of stage 2 (s = 2) all gather from the 16 rows 8t − 4 .. 8t + 11 of dh;
# - columns: columns 2k, 2k + 1 of stage 4, 4k .. 4k + 3 of stage 3 and 8k .. 8k + 7 of stage 2 all
#   gather from the 32 columns 16k − 8 .. 16k + 23.
# A program owns such a block (the 14 low-resolution columns of its three stages, stacked as the 16
# rows of a tensor-core tile: 8 of stage 2, 4 of stage 3, 2 of stage 4, 2 unused) for its band of
# rows, and reads each of the 16 × 32 window pixels of dh once for all three stages. Separably, for
# row oy of dh:
#     dP_i[Y, X] += w_y(Y, oy) · Σ_x w_x(X, x) dh[oy, x]
# The inner sum, for all 14 columns at once, is one product U · dh[oy, window] (16 × 32 times 32 ×
# channels) with U[m, x] the weight column m's stage gives window column x in the forward. At
# power-of-two scales those weights are multiples of 1/16 (or 1 and 0 at clamped borders), exact
# in bf16 and fp16, and the products accumulate in fp32: the gather's sum in another order. The
# outer weights w_y are scalars a program (the forward's formula); the 7 low-resolution rows become
# 4 accumulators ("slots"), slot r holding row 4t + r of stage 2, 2t + r of stage 3 (r < 2) and t of
# stage 4 (r = 0), each taking the row's product times its per-stage weight.
@triton.jit
def _window_taps(m, scale, xw, w_in, x_lo, n: tl.constexpr, first: tl.constexpr):
    """The weights U[m, x] of the stacked rows m in [first, first + n) (low-resolution column x_lo +
    m − first of a stage with `scale`, width w_in) for window columns xw (full resolution)."""
    x0, x1, l0, l1 = _taps(scale, xw, w_in)
    col = x_lo + m - first
    inside = (m >= first) & (m < first + n) & (col < w_in)
    return tl.where(inside & (x0[None, :] == col), l0[None, :], 0.0) + tl.where(inside & (x1[None, :] == col),
                                                                              l1[None, :], 0.0)


@triton.jit
def _slot_weights(m, w2, w3, w4):
    """The per-row weights [16, 1] of one slot: w2 for the stage-2 rows (0-7), w3 for stage 3's (8-11),
    w4 for stage 4's (12, 13)."""
    return tl.where(m < 8, w2, tl.where(m < 12, w3, tl.where(m < 14, w4, 0.0)))


@triton.jit
def _row_weight(y0, y1, l0, l1, y):
    """The weight input row y gets from an output row whose taps are (y0, y1) with weights (l0, l1)."""
    return tl.where(y0 == y, l0, 0.0) + tl.where(y1 == y, l1, 0.0)


@triton.jit
def _store_slot(DP2, DP3, DP4, acc, m, b, t, k, r: tl.constexpr, h4, w2, w3, w4, offs_n, E: tl.constexpr):
    """Slot r's accumulator (16 stacked rows × channels) into its rows of dP2, dP3 (r < 2), dP4 (r = 0)."""
    n = offs_n[None, :]
    val = _round(acc, DP2.dtype.element_ty)
    # one store a stage, so that every store's lanes stay inside one tensor
    tl.store(DP2 + ((b * 4 * h4 + 4 * t + r) * w2 + 8 * k + m) * E + n, val,
             mask=(m < 8) & (8 * k + m < w2) & (n < E))
    if r < 2:
        tl.store(DP3 + ((b * 2 * h4 + 2 * t + r) * w3 + 4 * k + m - 8) * E + n, val,
                 mask=(m >= 8) & (m < 12) & (4 * k + m - 8 < w3) & (n < E))
    if r == 0:
        tl.store(DP4 + ((b * h4 + t) * w4 + 2 * k + m - 12) * E + n, val,
                 mask=(m >= 12) & (m < 14) & (2 * k + m - 12 < w4) & (n < E))


@triton.jit
def _pyramid_adjoint_kernel(
    DH, DP2, DP3, DP4, H, W, h4, w2, w3, w4, sy2, sx2, sy3, sx3, sy4, sx4,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The block (band t, column block k) of dP2, dP3, dP4 (program 0 = b·h4 + t, program 1 = k,
    program 2: the channel block) from the 16 × 32 window of dh (B·H·W × E) above. dh is 16-bit
    (`_halvings`)."""
    tl.static_assert(DH.dtype.element_ty.primitive_bitwidth == 16, "the pyramid adjoint takes a 16-bit dh")
    BN: tl.constexpr = min(BLOCK_N, BLOCK_E)  # the configured channel block, clamped to E
    band = tl.program_id(0)
    t = band % h4
    b = (band // h4).to(tl.int64)
    k = tl.program_id(1)
    offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
    xw = 16 * k - 8 + tl.arange(0, 32)  # the window's columns of dh
    in_x = (xw >= 0) & (xw < W)
    m = tl.arange(0, 16)[:, None]
    u = (_window_taps(m, sx2, xw, w2, 8 * k, 8, 0) + _window_taps(m, sx3, xw, w3, 4 * k, 4, 8)
         + _window_taps(m, sx4, xw, w4, 2 * k, 2, 12))
    u = tl.where(in_x[None, :], u, 0.0).to(DH.dtype.element_ty)
    mask = in_x[:, None] & (offs_n < E)[None, :]
    column = DH + (b * H * W + xw[:, None]) * E + offs_n[None, :]
    acc0 = tl.zeros([16, BN], tl.float32)
    acc1 = tl.zeros([16, BN], tl.float32)
    acc2 = tl.zeros([16, BN], tl.float32)
    acc3 = tl.zeros([16, BN], tl.float32)
    for j in tl.range(0, 16, loop_unroll_factor=1):  # the band's rows of dh (kept rolled)
        oy = 8 * t - 4 + j
        # rows past the image: clamped loads, zero weights (six scalar selects; masking the row's
        # load instead costs more, a predicate per element: 214 against 211 instructions a row)
        in_y = (oy >= 0) & (oy < H)
        oyc = tl.minimum(tl.maximum(oy, 0), H - 1)
        prod = dot(u, tl.load(column + oyc * W * E, mask=mask, other=0.0))
        a0, a1, la0, la1 = _taps(sy2, oyc, 4 * h4)
        b0, b1, lb0, lb1 = _taps(sy3, oyc, 2 * h4)
        c0, c1, lc0, lc1 = _taps(sy4, oyc, h4)
        la0 = tl.where(in_y, la0, 0.0)
        la1 = tl.where(in_y, la1, 0.0)
        lb0 = tl.where(in_y, lb0, 0.0)
        lb1 = tl.where(in_y, lb1, 0.0)
        w4y = _row_weight(c0, c1, tl.where(in_y, lc0, 0.0), tl.where(in_y, lc1, 0.0), t)
        acc0 += _slot_weights(m, _row_weight(a0, a1, la0, la1, 4 * t), _row_weight(b0, b1, lb0, lb1, 2 * t),
                              w4y) * prod
        acc1 += _slot_weights(m, _row_weight(a0, a1, la0, la1, 4 * t + 1),
                              _row_weight(b0, b1, lb0, lb1, 2 * t + 1), 0.0) * prod
        acc2 += tl.where(m < 8, _row_weight(a0, a1, la0, la1, 4 * t + 2), 0.0) * prod
        acc3 += tl.where(m < 8, _row_weight(a0, a1, la0, la1, 4 * t + 3), 0.0) * prod
    _store_slot(DP2, DP3, DP4, acc0, m, b, t, k, 0, h4, w2, w3, w4, offs_n, E)
    _store_slot(DP2, DP3, DP4, acc1, m, b, t, k, 1, h4, w2, w3, w4, offs_n, E)
    _store_slot(DP2, DP3, DP4, acc2, m, b, t, k, 2, h4, w2, w3, w4, offs_n, E)
    _store_slot(DP2, DP3, DP4, acc3, m, b, t, k, 3, h4, w2, w3, w4, offs_n, E)


_pyramid_adjoint_kernel = _pinned("pyramid", _pyramid_adjoint_kernel)


@triton.jit
def _keep_mask_kernel(SEED, OUT, ROWS, drop_below, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    """OUT[row, e] = 1 where the kernels keep element (row, e) (ROWS × E uint8), else 0."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_P
    rows = row0 + tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    keep = _draws(tl.load(SEED), row0, BLOCK_P, BLOCK_E) >= drop_below
    tl.store(OUT + rows[:, None] * E + offs_e[None, :], keep.to(tl.uint8),
             mask=(rows < ROWS)[:, None] & (offs_e < E)[None, :])


# ----------------------------------------------------------------------------------------------
# the fold: M_i = W_i U_i, c = b + Σ_i W_i u_i, and its backward, one launch each
# ----------------------------------------------------------------------------------------------
# W = [W_1 | W_2 | W_3 | W_4] (E × 4E, the fuse Linear's weight), U_i: E × C_i, u_i: E, b: E (all fp32,
# dense). Given ∂L/∂M_i = dM_i (in M_i's dtype) and ∂L/∂c = dc:
#     ∂L/∂W_i = dM_i U_iᵀ + dc u_iᵀ        (E × E: a K = C_i product plus an outer product)
#     ∂L/∂U_i = W_iᵀ dM_i                  (E × C_i: K = E)
#     ∂L/∂u_i = W_iᵀ dc,   ∂L/∂b = dc
# Every gradient element is one program's dot product over a whole K: no partial sums.
@triton.jit
def _fold_tile(A, B, rows, mask_r, cols, mask_c, sa_r, sa_k, sb_k, sb_c, K: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k A[rows, k] B[k, cols] over k < K (fp32, "ieee": fp32 products, as torch's fp32 mm), A and B
    loaded through their strides and widened to fp32 on load."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(A + rows[:, None] * sa_r + kk[None, :] * sa_k, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(B + kk[:, None] * sb_k + cols[None, :] * sb_c, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _fold_fwd_stage(W, U, M, s: tl.constexpr, pid_r, pid_t, C: tl.constexpr, E: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows pid_r·BLOCK_E.. and columns pid_t·BLOCK_C.. of M_s = W_s U_s, rounded to M's dtype."""
    if pid_t * BLOCK_C < C:
        rows = pid_r * BLOCK_E + tl.arange(0, BLOCK_E)
        cols = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_r, mask_c = rows < E, cols < C
        acc = _fold_tile(W + s * E, U, rows, mask_r, cols, mask_c, 4 * E, 1, C, 1, E, BLOCK_E, BLOCK_C, BLOCK_K)
        tl.store(M + rows[:, None] * C + cols[None, :], _round(acc, M.dtype.element_ty),
                 mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _fold_bias_part(acc, W, V, s: tl.constexpr, rows, mask_r, E: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + W_s[rows, :] u_s."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, E, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < E
        w = tl.load(W + rows[:, None] * (4 * E) + s * E + kk[None, :], mask=mask_r[:, None] & mask_k[None, :],
                    other=0.0)
        acc += tl.sum(w * tl.load(V + kk, mask=mask_k, other=0.0)[None, :], axis=1)
    return acc


@triton.jit
def _fold_fwd_kernel(
    W, BIAS, U0, U1, U2, U3, V0, V1, V2, V3, M0, M1, M2, M3, CB,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, E: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (row tiles of E, 5, column tiles of the widest C_i): program (r, s, t) writes a tile of
    M_s = W_s U_s (s < 4; programs past C_s do nothing) or, for s = 4 and t = 0, rows r of
    c = b + Σ_s W_s u_s."""
    pid_r = tl.program_id(0)
    s = tl.program_id(1)
    pid_t = tl.program_id(2)
    if s == 0:
        _fold_fwd_stage(W, U0, M0, 0, pid_r, pid_t, C0, E, BLOCK_E, BLOCK_C, BLOCK_K)
    elif s == 1:
        _fold_fwd_stage(W, U1, M1, 1, pid_r, pid_t, C1, E, BLOCK_E, BLOCK_C, BLOCK_K)
    elif s == 2:
        _fold_fwd_stage(W, U2, M2, 2, pid_r, pid_t, C2, E, BLOCK_E, BLOCK_C, BLOCK_K)
    elif s == 3:
        _fold_fwd_stage(W, U3, M3, 3, pid_r, pid_t, C3, E, BLOCK_E, BLOCK_C, BLOCK_K)
    elif pid_t == 0:
        rows = pid_r * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_r = rows < E
        acc = tl.load(BIAS + rows, mask=mask_r, other=0.0)
        acc = _fold_bias_part(acc, W, V0, 0, rows, mask_r, E, BLOCK_K)
        acc = _fold_bias_part(acc, W, V1, 1, rows, mask_r, E, BLOCK_K)
        acc = _fold_bias_part(acc, W, V2, 2, rows, mask_r, E, BLOCK_K)
        acc = _fold_bias_part(acc, W, V3, 3, rows, mask_r, E, BLOCK_K)
        tl.store(CB + rows, acc, mask=mask_r)


@triton.jit
def _fold_bwd_stage(W, U, V, DM, DC, DW, DU, DV, s: tl.constexpr, role, pid_r, pid_t, C: tl.constexpr,
                    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """role 0: rows pid_r·BLOCK_E.. and columns pid_t·BLOCK_C.. of ∂L/∂W_s = dM_s U_sᵀ + dc u_sᵀ;
    role 1: the same tile of ∂L/∂U_s = W_sᵀ dM_s and, for pid_t = 0, those rows of ∂L/∂u_s = W_sᵀ dc.
    Tiles past the gradient's columns do nothing."""
    rows = pid_r * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < E
    if role == 0:
        if pid_t * BLOCK_C < E:
            mask_c = cols < E
            # dM_s[rows, j] · U_s[cols, j]ᵀ: B[j, col] = U_s[col, j] (strides 1, C)
            acc = _fold_tile(DM, U, rows, mask_r, cols, mask_c, C, 1, 1, C, C, BLOCK_E, BLOCK_C, BLOCK_K)
            dc = tl.load(DC + rows, mask=mask_r, other=0.0)
            acc += dc[:, None] * tl.load(V + cols, mask=mask_c, other=0.0)[None, :]
            tl.store(DW + rows[:, None] * (4 * E) + s * E + cols[None, :], acc, mask=mask_r[:, None] & mask_c[None, :])
    else:
        if pid_t * BLOCK_C < C:
            mask_c = cols < C
            # A[row, e] = W_s[e, row] (strides 1, 4E), B = dM_s
            acc = _fold_tile(W + s * E, DM, rows, mask_r, cols, mask_c, 1, 4 * E, C, 1, E, BLOCK_E, BLOCK_C,
                             BLOCK_K)
            tl.store(DU + rows[:, None] * C + cols[None, :], acc, mask=mask_r[:, None] & mask_c[None, :])
        if pid_t == 0:
            offs_k = tl.arange(0, BLOCK_K)
            dv = tl.zeros([BLOCK_E], tl.float32)
            for k0 in range(0, E, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < E
                wt = tl.load(W + kk[None, :] * (4 * E) + s * E + rows[:, None],
                             mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                dv += tl.sum(wt * tl.load(DC + kk, mask=mask_k, other=0.0)[None, :], axis=1)
            tl.store(DV + rows, dv, mask=mask_r)


@triton.jit
def _fold_bwd_kernel(
    W, U0, U1, U2, U3, V0, V1, V2, V3, DM0, DM1, DM2, DM3, DC, DW, DB, DU0, DU1, DU2, DU3, DV0, DV1, DV2, DV3,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, E: tl.constexpr, N_COL: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (row tiles of E, 4, 2·N_COL): program (r, s, role·N_COL + t) writes its tile of stage s's
    gradients (`_fold_bwd_stage`); programs (r, 0, N_COL) also write ∂L/∂b = dc for their rows. Math
    above `_fold_tile`."""
    pid_r = tl.program_id(0)
    s = tl.program_id(1)
    role = tl.program_id(2) // N_COL
    pid_t = tl.program_id(2) % N_COL
    if s == 0:
        _fold_bwd_stage(W, U0, V0, DM0, DC, DW, DU0, DV0, 0, role, pid_r, pid_t, C0, E, BLOCK_E, BLOCK_C, BLOCK_K)
        if role == 1 and pid_t == 0:
            rows = pid_r * BLOCK_E + tl.arange(0, BLOCK_E)
            tl.store(DB + rows, tl.load(DC + rows, mask=rows < E), mask=rows < E)
    elif s == 1:
        _fold_bwd_stage(W, U1, V1, DM1, DC, DW, DU1, DV1, 1, role, pid_r, pid_t, C1, E, BLOCK_E, BLOCK_C, BLOCK_K)
    elif s == 2:
        _fold_bwd_stage(W, U2, V2, DM2, DC, DW, DU2, DV2, 2, role, pid_r, pid_t, C2, E, BLOCK_E, BLOCK_C, BLOCK_K)
    else:
        _fold_bwd_stage(W, U3, V3, DM3, DC, DW, DU3, DV3, 3, role, pid_r, pid_t, C3, E, BLOCK_E, BLOCK_C, BLOCK_K)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _new(shape, device, dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _blocks(c1: int, e: int) -> tuple[int, int]:
    if e > _MAX_BLOCK_E or c1 > _MAX_BLOCK_C1:
        raise ValueError(f"decoder_mlp: E = {e} > {_MAX_BLOCK_E} or C1 = {c1} > {_MAX_BLOCK_C1} is not supported "
                         "by the fused kernels")
    return max(16, triton.next_power_of_2(c1)), max(32, triton.next_power_of_2(e))


def _geometry(size: tuple[int, int], lows: list[tuple[int, int]]) -> list:
    """The kernels' stage arguments: h2, w2, h3, w3, h4, w4, then the fp32 scales sy2, sx2, ..."""
    sizes = [n for hw in lows for n in hw]
    scales = [float(n) / float(big) for hw in lows for n, big in zip(hw, size)]
    return sizes + scales


def _halvings(size: tuple[int, int], lows: list[tuple[int, int]], dtype: torch.dtype) -> bool:
    """Stages 2-4 exactly 1/2, 1/4 and 1/8 of `size` along both axes, in a 16-bit dtype: the bilinear
    weights are then multiples of 1/16, exact in it, and the taps can be tensor-core products (the
    backward's `_pyramid_adjoint_kernel`; the forward's `_upsampled_row`, see `_row_tiles`). fp32 keeps
    the gathers: exact products would take tf32x3, and the pyramid adjoint's first form spilled 2-2.5 KB
    with them (its current form's fp32 build was not tried)."""
    return dtype.itemsize == 2 and all(size[0] == f * h and size[1] == f * w for (h, w), f in zip(lows, (2, 4, 8)))


def _row_tiles(size: tuple[int, int], lows: list[tuple[int, int]], dtype: torch.dtype, block_p: int) -> bool:
    """Whether the forward takes its taps as `_upsampled_row`'s products: `_halvings` (P_i in `dtype`)
    and tiles of `block_p` pixels that never straddle an output row."""
    return _halvings(size, lows, dtype) and size[1] % block_p == 0


def _weight_gradients(g, d, dh, f1, precise: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (partial rows, sum) pairs of [dw2 | db2] = Σ (gᵀ D, g) and [dM1 | dc] = Σ (dhᵀ f1, dh) over
    the pixel rows, the partials written by two groups of the attention sublayer's GEMM kernel in one
    launch (`msf.kernels.attention_sublayer.launch_wgrad`), each group in row chunks for about two
    programs an SM (chunks of at least 2·E rows: a chunk's fp32 partial then costs under a third of
    what it reads; 32 rows under the interpreter, so tests sum several). The sums are the caller's
    (`sum_partials`, with its other buffers)."""
    rows = g.shape[0]
    sms = _core._sm_count(g.device)
    block_i, block_j = (_sub._wg_block(precise, g.device, k) for k in ("BLOCK_I", "BLOCK_J"))
    groups, pairs = [], []
    for a, b in ((g, d), (dh, f1)):
        da, db = a.shape[1], b.shape[1]
        chunk, n_chunks = row_chunks(rows, triton.cdiv(da, block_i) * triton.cdiv(db, block_j), 2 * da, sms,
                                     interpreter_rows=32)
        part = _new((n_chunks, da * db + da), g.device, torch.float32)
        groups.append(_sub.wgrad_group(a, b, part, chunk))
        pairs.append((part, _new((da * db + da,), g.device, torch.float32)))
    _sub.launch_wgrad(groups, precise)
    return pairs


def _tile_split(kernel, cdt_code: int, w2: torch.Tensor, block_e: int, rows: int,
                dev: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_P, tiles, tiles a program, programs) of a tile-loop kernel (the forward, the backward):
    the rows in tiles of its pinned BLOCK_P, about 2 programs an SM."""
    shape_class = f"{_mode({'CDT': cdt_code, 'W2': w2})}_e{block_e}"
    block_p = kernel.pinned_kwarg(shape_class, "BLOCK_P", dev)
    n_tiles = triton.cdiv(rows, block_p)
    return (block_p, n_tiles, *_tile_runs(n_tiles, _core._sm_count(dev), per_sm=2))


def _dropout_args(p: float) -> tuple[int, float, bool]:
    """(drop_below, the kept values' scale, dropout on): an element is dropped when its 16-bit draw
    is below p·2¹⁶ rounded (`DRAW_BITS`), and kept values are scaled by nn.Dropout's 1 / (1 − p)."""
    return round(p * 2 ** DRAW_BITS), (1.0 / (1.0 - p) if p < 1 else 0.0), p > 0


def _forward(f1, p2, p3, p4, m1, cb, w2, b2, seed, p: float, size: tuple[int, int], cdt: torch.dtype,
             save: bool):
    """f1: B·H·W × C1, P_i: B×h_i×w_i×E contiguous. (x: B·H·W × E in `cdt` (or P_i's dtype, if wider),
    h: the pre-activation and D: the dropout output, each B·H·W × E in `cdt` if `save` (for the
    backward), else an empty 0 × E tensor)."""
    rows, c1 = f1.shape
    e = w2.shape[0]
    block_c1, block_e = _blocks(c1, e)
    lows = [(pt.shape[1], pt.shape[2]) for pt in (p2, p3, p4)]
    out = _new((rows, e), f1.device, torch.promote_types(cdt, p2.dtype))
    hs = _new((rows if save else 0, e), f1.device, cdt)
    d = _new((rows if save else 0, e), f1.device, cdt)
    drop_below, scale, dropout = _dropout_args(p)
    block_p, n_tiles, tiles, n_progs = _tile_split(_decoder_fwd_kernel, _CDT[cdt], w2, block_e, rows, f1.device)
    row_tiles = _row_tiles(size, lows, p2.dtype, block_p)
    _decoder_fwd_kernel[(n_progs,)](f1, p2, p3, p4, m1, cb, w2, b2, seed, out, hs, d, rows, n_tiles, tiles, *size,
                                    *_geometry(size, lows), drop_below, scale, C1=c1, E=e, CDT=_CDT[cdt],
                                    DROPOUT=dropout, SAVE=save, ROW_TILES=row_tiles, BLOCK_C1=block_c1,
                                    BLOCK_E=block_e)
    return out, hs, d


def _backward(f1, hs, d, m1, w2, seed, g, p: float, size: tuple[int, int], lows: list[tuple[int, int]],
              cdt: torch.dtype, dtypes: tuple[torch.dtype, ...]):
    """(df1, dP2, dP3, dP4, dM1, dc, dw2, db2) from the forward's saved h and D: df1 in f1's dtype,
    dP_i (B×h_i×w_i×E, `lows` = their (h_i, w_i)) in `cdt` (what F.linear gave P_i), the rest in their
    parameters' dtypes (`dtypes`: c's and b2's, which the backward does not read)."""
    rows, c1 = f1.shape
    e = w2.shape[0]
    batch = rows // (size[0] * size[1])
    dev = f1.device
    block_c1, block_e = _blocks(c1, e)
    code = _CDT[cdt]
    drop_below, scale, dropout = _dropout_args(p)

    dh = _new((rows, e), dev, cdt)
    df1 = _new((rows, c1), dev, f1.dtype)
    _, n_tiles, tiles, n_progs = _tile_split(_decoder_bwd_kernel, code, w2, block_e, rows, dev)
    _decoder_bwd_kernel[(n_progs,)](hs, m1, w2, seed, g, dh, df1, rows, n_tiles, tiles, drop_below, scale,
                                    C1=c1, E=e, CDT=code, DROPOUT=dropout, BLOCK_C1=block_c1, BLOCK_E=block_e)
    (w_part, w_sums), (m_part, m_sums) = _weight_gradients(g, d, dh, f1, code == 0)
    dps = _upsample_adjoints(dh, batch, size, lows, block_e)
    sum_partials((w_part, w_sums), (m_part, m_sums))
    cb_dtype, b2_dtype = dtypes
    dm1 = m_sums[:e * c1].view(e, c1).to(m1.dtype)
    dc = m_sums[e * c1:].to(cb_dtype)
    dw2 = w_sums[:e * e].view(e, e).to(w2.dtype)
    db2 = w_sums[e * e:].to(b2_dtype)
    return df1, *dps, dm1, dc, dw2, db2


def _upsample_adjoints(dh: torch.Tensor, batch: int, size: tuple[int, int], lows: list[tuple[int, int]],
                       block_e: int) -> list[torch.Tensor]:
    """dP_i = up_iᵀ(dh) for stages 2-4 (B×h_i×w_i×E each, dh's dtype) from dh (B·H·W × E): one launch
    of `_pyramid_adjoint_kernel` where `_halvings`, else `_upsample_adjoint_kernel` once a stage."""
    e = dh.shape[1]
    dps = [_new((batch, h, w, e), dh.device, dh.dtype) for h, w in lows]
    if _halvings(size, lows, dh.dtype):
        h4 = lows[2][0]
        _pyramid_adjoint_kernel[lambda meta: (batch * h4, triton.cdiv(size[1], 16),
                                              triton.cdiv(e, min(meta["BLOCK_N"], block_e)))](
            dh, *dps, *size, h4, *(w for _, w in lows), *_geometry(size, lows)[6:], E=e, BLOCK_E=block_e)
        return dps
    for (h, w), dp in zip(lows, dps):
        _upsample_adjoint_kernel[lambda meta, h=h, w=w: (batch * h, triton.cdiv(w, meta["BLOCK_X"]))](
            dh, dp, *size, h, w, float(h) / size[0], float(w) / size[1],
            E=e, SY=size[0] // h, SX=size[1] // w, BLOCK_E=block_e)
    return dps


class DecoderMLPFunction(torch.autograd.Function):
    """The fused pixel-level part (shapes in the module docstring); saves f1, M1, w2, the seed, the
    pre-activation h and the dropout output D (each B·H·W × E in the compute dtype): GELU's
    derivative and the dropout mask are recomputed in the backward, the 12 bilinear taps and f1's
    product are not."""

    @staticmethod
    def forward(ctx, f1, p2, p3, p4, m1, cb, w2, b2, seed, p, size, cdt, save):
        # (`save` from the caller: inside forward grad mode is off and needs_input_grad ignores no_grad)
        out, hs, d = _forward(f1, p2, p3, p4, m1, cb, w2, b2, seed, p, size, cdt, save)
        ctx.save_for_backward(f1, hs, d, m1, w2, seed)
        ctx.p, ctx.size, ctx.cdt, ctx.dtypes = p, size, cdt, (cb.dtype, b2.dtype)
        ctx.lows = [(pt.shape[1], pt.shape[2]) for pt in (p2, p3, p4)]
        return out

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would be taken as constants
            raise RuntimeError("decoder_mlp: the fused backward is not differentiable (no double backward); "
                               "use the eager composition (backend='eager') for higher-order gradients")
        f1, hs, d, m1, w2, seed = ctx.saved_tensors
        grads = _backward(f1, hs, d, m1, w2, seed, g.contiguous(), ctx.p, ctx.size, ctx.lows, ctx.cdt, ctx.dtypes)
        return (*grads, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------
_FOLD_BLOCKS = {"BLOCK_E": 16, "BLOCK_C": 64, "BLOCK_K": 16}  # E = 128: 120 programs forward, 192 backward
_FOLD_WARPS = 4


def _fold_served(p: DecoderParams) -> bool:
    """Whether the fold kernels serve these parameters: four stages, every tensor fp32 on one device
    the kernels run on (CUDA, or the interpreter)."""
    ts = (p.fuse1_weight, p.fuse1_bias, *p.unify_weights, *p.unify_biases)
    dev = p.fuse1_weight.device
    return (len(p.unify_weights) == 4 and all(t.dtype == torch.float32 and t.device == dev for t in ts)
            and (dev.type == "cuda" or INTERPRET))


def _check_fold(w, b, us, vs) -> None:
    """The layout the fold kernels assume (they take no strides): four stages, dense fp32 W (E × 4E),
    b (E), U_i (E × C_i), u_i (E) on one device."""
    e = w.shape[0] if w.dim() == 2 else -1
    ok = (len(us) == len(vs) == 4 and w.shape == (e, 4 * e) and b.shape == (e,)
          and all(u.dim() == 2 and u.shape[0] == e for u in us) and all(v.shape == (e,) for v in vs))
    ts = (w, b, *us, *vs)
    if not ok or any(t.dtype != torch.float32 or not t.is_contiguous() or t.device != w.device for t in ts):
        raise ValueError("decoder_mlp fold: needs dense fp32 W (E×4E), b (E), four U_i (E×C_i) and u_i (E) on one "
                         f"device; got W {tuple(w.shape)}, b {tuple(b.shape)}, U {[tuple(u.shape) for u in us]}, "
                         f"u {[tuple(v.shape) for v in vs]}, dtypes {sorted({str(t.dtype) for t in ts})}, "
                         f"contiguous {all(t.is_contiguous() for t in ts)}")


def _fold_forward(w, b, us, vs, low_dtype: torch.dtype):
    """([M_1..M_4], c) by `_fold_fwd_kernel`: M_1 and c fp32, M_2..M_4 in `low_dtype` (the rounding the
    projections' F.linear would apply under autocast, done once on store)."""
    _check_fold(w, b, us, vs)
    e, cs = w.shape[0], [u.shape[1] for u in us]
    ms = [_new((e, c), w.device, torch.float32 if i == 0 else low_dtype) for i, c in enumerate(cs)]
    cb = _new((e,), w.device, torch.float32)
    grid = (triton.cdiv(e, _FOLD_BLOCKS["BLOCK_E"]), 5, triton.cdiv(max(cs), _FOLD_BLOCKS["BLOCK_C"]))
    _fold_fwd_kernel[grid](w, b, *us, *vs, *ms, cb, *cs, e, **_FOLD_BLOCKS, num_warps=_FOLD_WARPS)
    return ms, cb


def _fold_backward(w, us, vs, dms, dc):
    """(∂W, ∂b, [∂U_i], [∂u_i]) by `_fold_bwd_kernel`, all fp32; dms in the M_i's dtypes."""
    e, cs = w.shape[0], [u.shape[1] for u in us]
    if len(dms) != 4 or any(d.shape != (e, c) or not d.is_contiguous() for d, c in zip(dms, cs)) \
            or dc.shape != (e,) or not dc.is_contiguous():
        raise ValueError(f"decoder_mlp fold backward: needs dense dM_i (E×C_i) and dc (E); got "
                         f"{[tuple(d.shape) for d in dms]}, {tuple(dc.shape)}")
    dw, db = _new(w.shape, w.device, torch.float32), _new((e,), w.device, torch.float32)
    dus = [_new(u.shape, w.device, torch.float32) for u in us]
    dvs = [_new((e,), w.device, torch.float32) for _ in vs]
    n_col = triton.cdiv(max(e, *cs), _FOLD_BLOCKS["BLOCK_C"])
    grid = (triton.cdiv(e, _FOLD_BLOCKS["BLOCK_E"]), 4, 2 * n_col)
    _fold_bwd_kernel[grid](w, *us, *vs, *dms, dc, dw, db, *dus, *dvs, *cs, e, n_col, **_FOLD_BLOCKS,
                           num_warps=_FOLD_WARPS)
    return dw, db, dus, dvs


class FoldFunction(torch.autograd.Function):
    """(M_1, M_2, M_3, M_4, c) from (W, b, U_1..U_4, u_1..u_4) in two launches, forward and backward
    (as PyTorch ops the fold was 13 launches forward and 28 backward, and stages 2-4's M_i were cast
    again by F.linear under autocast, 3 + 3 more)."""

    @staticmethod
    def forward(ctx, w, b, u0, u1, u2, u3, v0, v1, v2, v3, low_dtype):
        us, vs = [u0, u1, u2, u3], [v0, v1, v2, v3]
        ms, cb = _fold_forward(w, b, us, vs, low_dtype)
        ctx.save_for_backward(w, *us, *vs)
        return (*ms, cb)

    @staticmethod
    def backward(ctx, dm0, dm1, dm2, dm3, dc):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would be taken as constants
            raise RuntimeError("decoder_mlp: the fold's fused backward is not differentiable (no double backward); "
                               "use the eager composition (backend='eager') for higher-order gradients")
        w, *rest = ctx.saved_tensors
        dw, db, dus, dvs = _fold_backward(w, rest[:4], rest[4:], [d.contiguous() for d in (dm0, dm1, dm2, dm3)],
                                          dc.contiguous())
        return (dw, db, *dus, *dvs, None)


def fold_reference(p: DecoderParams) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([M_1..M_4], c): M_i = W_i U_i (E × C_i) and c = b + Σ_i W_i u_i, W_i the i-th E-column block of the
    fuse Linear's weight, as PyTorch ops. Differentiable (autograd carries the gradients back to the
    module's parameters) and outside autocast: the fold is in the parameters' (promoted) dtype."""
    e = p.fuse1_weight.shape[0]
    dt = functools.reduce(torch.promote_types, [t.dtype for t in (*p.unify_weights, *p.unify_biases, p.fuse1_weight,
                                                                   p.fuse1_bias)])
    blocks = p.fuse1_weight.to(dt).split(e, dim=1)  # (`.to`: parameters of mixed dtypes, as autocast allows)
    with autocast_off(p.fuse1_weight.device.type):
        ms = [w @ u.to(dt) for w, u in zip(blocks, p.unify_weights)]
        c = p.fuse1_bias.to(dt) + sum(w @ u.to(dt) for w, u in zip(blocks, p.unify_biases))
    return ms, c


def _fold_function(w, b, us, vs, low_dtype) -> list[torch.Tensor]:
    return list(FoldFunction.apply(w, b, *us, *vs, low_dtype))


def fold(p: DecoderParams, low_dtype: torch.dtype | None = None, *, fused=_fold_function
         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`fold_reference`'s ([M_1..M_4], c), by the fold's two kernels where `_fold_served` (fp32
    parameters: the model's), with M_2..M_4 rounded to `low_dtype` (the dtype stages 2-4's projections
    multiply in: bit for bit the cast F.linear would make of an fp32 M_i); else `fold_reference`.
    `fused(W, b, [U_i], [u_i], low_dtype) -> [M_1..M_4, c]` runs the kernels: `FoldFunction` here,
    `msf::decoder_fold` in kernels/ops.py."""
    if not _fold_served(p) or low_dtype is None:
        return fold_reference(p)
    *ms, c = fused(p.fuse1_weight.contiguous(), p.fuse1_bias.contiguous(), [u.contiguous() for u in p.unify_weights],
                   [v.contiguous() for v in p.unify_biases], low_dtype)
    return ms, c


def project(features, p: DecoderParams, cdt: torch.dtype | None = None, fold_fn=None
            ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The fused path's host half: (f1 as B·H·W × C1 tokens, [P2, P3, P4] as B×h_i×w_i×E, M1, c), the
    fold (`fold_fn`, by default `fold`, its M_2..M_4 in `cdt`, the products' dtype) and stages 2-4's
    projections at their own resolution (`F.linear`: under autocast, in its dtype)."""
    ms, c = (fold if fold_fn is None else fold_fn)(p, cdt)
    b = features[0].shape[0]
    lows = [F.linear(_tokens(f), m).view(b, f.shape[2], f.shape[3], -1) for f, m in zip(features[1:], ms[1:])]
    return _tokens(features[0]), lows, ms[0].contiguous(), c.contiguous()


def compute_dtype(features, p: DecoderParams) -> torch.dtype | None:
    """The products' dtype, or None where the kernels do not serve the mix: autocast's bf16 / fp16 when
    autocast is on for the features' device and every tensor is fp32 or that dtype; otherwise the
    dtype the features and parameters share (fp32, bf16, fp16)."""
    return products_dtype((*features, *p.unify_weights, *p.unify_biases, p.fuse1_weight, p.fuse1_bias,
                           p.fuse2_weight, p.fuse2_bias))


def fused_supported(features, p: DecoderParams, cdt: torch.dtype) -> bool:
    """Whether the kernels serve this geometry with products in `cdt`: four stages, E ≤ 128 (fp32:
    ≤ 64), C1 ≤ 64, each later stage smaller than stage 1 by a whole factor in each axis and its
    projection under 2³¹ elements."""
    if len(features) != 4:
        return False
    e, c1 = p.fuse1_weight.shape[0], features[0].shape[1]
    if e > (_MAX_FP32_E if cdt == torch.float32 else _MAX_BLOCK_E) or c1 > _MAX_BLOCK_C1:
        return False
    h, w = features[0].shape[-2:]
    b = features[0].shape[0]
    if b * h * w >= 2 ** 31:  # (int32 pixel indices)
        return False
    return all(f.shape[-2] > 0 and f.shape[-1] > 0 and h % f.shape[-2] == 0 and w % f.shape[-1] == 0
               and b * f.shape[-2] * f.shape[-1] * e < 2 ** 31 for f in features[1:])  # (int32 tap offsets)


def _check(features, p: DecoderParams, dropout_p: float, seed: torch.Tensor | None) -> None:
    n = len(p.unify_weights)
    if len(features) != n or len(p.unify_biases) != n:
        raise ValueError(f"decoder_mlp: {len(features)} feature maps for {n} unify Linears")
    if features[0].dim() != 4:
        raise ValueError(f"decoder_mlp: features must be B×C×h×w maps, got {tuple(features[0].shape)}")
    e = p.fuse1_weight.shape[0]
    for i, (f, u, ub) in enumerate(zip(features, p.unify_weights, p.unify_biases)):
        if f.dim() != 4 or f.shape[0] != features[0].shape[0] or u.shape != (e, f.shape[1]) or ub.shape != (e,):
            raise ValueError(f"decoder_mlp: stage {i + 1}: features {tuple(f.shape)} against unify weight "
                             f"{tuple(u.shape)} and bias {tuple(ub.shape)} (E = {e})")
    if p.fuse1_weight.shape != (e, n * e) or p.fuse1_bias.shape != (e,) or p.fuse2_weight.shape != (e, e) \
            or p.fuse2_bias.shape != (e,):
        raise ValueError(f"decoder_mlp: fuse Linears must be {e}×{n * e} and {e}×{e} with biases {e}; got "
                         f"{tuple(p.fuse1_weight.shape)}, {tuple(p.fuse2_weight.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"decoder_mlp: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != features[0].device):
        raise ValueError(f"decoder_mlp: seed must be one int64 on {features[0].device}, got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")
    devices = {t.device for t in (*features, p.fuse1_weight)}
    if len(devices) != 1:
        raise ValueError("decoder_mlp: tensors on different devices")
    if features[0].device.type != "cuda" and not INTERPRET:
        raise RuntimeError("decoder_mlp: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _tokens(f: torch.Tensor) -> torch.Tensor:
    """B×C×h×w map → B·h·w × C contiguous tokens (no copy for the model's channels-last views)."""
    return f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]).contiguous()


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout stream: one int64 from torch's generator on `device` (no host sync), so that
    torch.manual_seed makes a run reproducible."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int64)


def dispatch(features, p: DecoderParams, dropout_p: float, training: bool, fused, seed: torch.Tensor | None = None,
             fold_fn=None):
    """What both entries (`decoder_mlp` here and `msf::decoder_mlp`'s in kernels/ops.py) do: check the
    arguments; where the kernels serve the dtypes and geometry, fold the weights (`fold_fn(p, cdt)`, by
    default `fold`), project stages 2-4 and call `fused(f1, P2, P3, P4, M1, c, w2, b2, seed, p, (H, W),
    compute_dtype)` on tokens; else the eager composition. Returns B×N×E tokens."""
    features = list(features)
    _check(features, p, dropout_p, seed)
    cdt = compute_dtype(features, p)
    b, _, h, w = features[0].shape
    if cdt is None or features[0].numel() == 0 or not fused_supported(features, p, cdt):
        return decoder_mlp_eager(features, p, dropout_p, training)
    f1, lows, m1, c = project(features, p, cdt, fold_fn)
    p_eff = float(dropout_p) if training else 0.0
    if seed is None:
        seed = new_seed(features[0].device) if p_eff > 0 else torch.zeros(1, dtype=torch.int64,
                                                                            device=features[0].device)
    out = fused(f1, *lows, m1, c, p.fuse2_weight.contiguous(), p.fuse2_bias.contiguous(), seed, p_eff, (h, w), cdt)
    return out.view(b, h * w, -1)


def _saves_for_backward(args) -> bool:
    """Whether a fused call on `args` (f1, P2..P4, M1, c, w2, b2, seed, ...: `dispatch`'s order) writes
    h and D: only where a backward can run, with grad mode on and a tensor that wants a gradient (not
    under no_grad, not for inference)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in args[:9])


def decoder_mlp(features, p: DecoderParams, dropout_p: float = 0.0, training: bool = False, *,
                seed: torch.Tensor | None = None):
    """The decoder up to LMSA's input (B×H·W×E tokens; shapes in the module docstring): fused where
    `compute_dtype` and `fused_supported` allow, else the eager composition. `seed` (one int64 on the
    features' device) fixes the dropout stream; by default a fresh one is drawn."""
    return dispatch(features, p, dropout_p, training,
                    lambda *args: DecoderMLPFunction.apply(*args, _saves_for_backward(args)), seed)


def keep_mask(seed: torch.Tensor, rows: int, e: int, p: float) -> torch.Tensor:
    """The rows × E keep mask (bool) the kernels apply for `seed` and dropout probability p."""
    out = torch.empty((rows, e), device=seed.device, dtype=torch.uint8)
    block_p = 32
    _keep_mask_kernel[(triton.cdiv(rows, block_p),)](seed, out, rows, _dropout_args(p)[0], E=e,
                                                      BLOCK_E=_blocks(1, e)[1], BLOCK_P=block_p)
    return out.bool()


def fused_reference(f1, lows, m1, c, w2, b2, keep, p: float, size: tuple[int, int]) -> torch.Tensor:
    """The fused computation written with PyTorch ops (any dtype, float64 in tests): f1 (B·H·W × C1),
    lows (B×h_i×w_i×E each), keep (rows × E bool or None). Independent of the kernels: F.interpolate
    for the taps, F.gelu, F.linear."""
    b = lows[0].shape[0]
    h = F.linear(f1, m1) + c
    for low in lows:
        up = F.interpolate(low.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
        h = h + up.permute(0, 2, 3, 1).reshape(b * size[0] * size[1], -1)
    a = F.gelu(h)
    if keep is not None:
        a = a * keep.to(a.dtype) / (1.0 - p)
    return F.linear(a, w2, b2)


# ----------------------------------------------------------------------------------------------
# ahead-of-time builds: each kernel × dtype class × configuration at the model's E = 128, C1 = 32
# (fp32: E = 64, the widest it serves)
# ----------------------------------------------------------------------------------------------
_AOT_PTRS = {"fwd": ("F1", "P2", "P3", "P4", "M1", "CB", "W2", "B2", "OUT", "HS", "D"),
             "bwd": ("HS", "M1", "W2", "G", "DH", "DF1"),
             "adjoint": ("DH", "DP"), "pyramid": ("DH", "DP2", "DP3", "DP4")}
_AOT_F32 = {"fwd": (), "bwd": (), "adjoint": (), "pyramid": ()}
_AOT_KERNELS = {"fwd": _decoder_fwd_kernel, "bwd": _decoder_bwd_kernel,
                "adjoint": _upsample_adjoint_kernel, "pyramid": _pyramid_adjoint_kernel}
_AOT_FP32_ARGS = ("sy2", "sx2", "sy3", "sx3", "sy4", "sx4", "drop_scale", "scale_y", "scale_x")
# per dtype class: (16-bit pointers' type, CDT, the fp32 master tensors' type)
_AOT_DTYPE = {"16": ("bf16", 1, "bf16"), "amp": ("bf16", 1, "fp32"), "fp32": ("fp32", 0, "fp32")}  # adjoint: DH, DP
# fp32 under autocast: the folded and master weights (f1 and its gradient come in the autocast dtype:
# stage_output writes the map as the Linear it feeds would cast it, `decoder_linear`)
_AOT_MASTERS = ("M1", "CB", "W2", "B2")


def _aot_specs() -> list[AotSpec]:
    specs = []
    for kname, kernel in _AOT_KERNELS.items():
        for mode, cfgs in _ALLOWED[kname].items():
            act, code, master = _AOT_DTYPE[mode]
            ptrs = {a: f"*{master if a in _AOT_MASTERS else act}" for a in _AOT_PTRS[kname]}
            ptrs.update({a: "*fp32" for a in _AOT_F32[kname]})
            ptrs["SEED"] = "*i64"
            for block, w, st in cfgs:
                e = _MAX_FP32_E if mode == "fp32" else 128
                if kname == "adjoint":
                    const = {"E": e, "SY": 8, "SX": 8, "BLOCK_E": e, "BLOCK_X": block}
                elif kname == "pyramid":
                    const = {"E": e, "BLOCK_E": e, "BLOCK_N": block}
                else:
                    const = {"C1": 32, "E": e, "CDT": code, "DROPOUT": True, "BLOCK_C1": 32, "BLOCK_E": e,
                             "BLOCK_P": block, **({"SAVE": True, "ROW_TILES": code != 0} if kname == "fwd" else {})}
                specs.append(_aot_spec(f"decoder_mlp.{kname}_{mode}_e{e}_p{block}_w{w}_s{st}", kernel.fn,
                                       {k: v for k, v in ptrs.items() if k in kernel.fn.arg_names}, const, w, st,
                                       floats=_AOT_FP32_ARGS))
    # the fold at the model's widths: fp32 parameters, M_2..M_4 (and their gradients) in fp32 or bf16
    widths = {"C0": 32, "C1": 64, "C2": 128, "C3": 192, "E": 128}
    for low in ("fp32", "bf16"):
        lows = {f"{name}{i}": f"*{low}" for name in ("M", "DM") for i in (1, 2, 3)}
        for kernel, extra in ((_fold_fwd_kernel, {}), (_fold_bwd_kernel, {"N_COL": 3})):
            ptrs = {a: lows.get(a, "*fp32") for a in kernel.arg_names if a[:1].isupper() and a not in widths
                    and a not in extra and not a.startswith("BLOCK")}
            specs.append(_aot_spec(f"decoder_mlp.{kernel.fn.__name__.strip('_').replace('_kernel', '')}_{low}",
                                   kernel, ptrs, {**widths, **extra, **_FOLD_BLOCKS}, _FOLD_WARPS, 3))
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
