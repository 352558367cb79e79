"""Fused multi-scale LMSA (SPEC §2, §6): forward and backward in Triton.

`lmsa(x, p)` computes exactly `msf.backend.eager_lmsa(x, p)`:

    f_k = PW_k(DW_k(x))            k ∈ {3, 5, 7}: depthwise k×k (padding k//2, no bias), then C×C + bias
    s   = GAP([f_3; f_5; f_7])     B×3C
    z   = sigmoid(FC2(ReLU(FC1(s))))
    out = x + Σ_k z_k ⊙ f_k

for x: B×C×H×W (any strides: NCHW, channels-last, views; C a power of two ≥ 16, 128 in the model),
fp32 / bf16 / fp16, without ever holding f_k in memory. The gate needs GAP(f_k) before any output:
by linearity it comes from x's sums over a 7×7 grid of cells (border rows and columns, interior).

Kernels (no atomics; per-chunk fp32 partials summed in a fixed order):
- `_lmsa_stats_kernel`: the cell sums of x and a zero-bordered fp32 copy X̂ (channels-last).
- `_gate_fwd_kernel` (one program a sample): the gate z from the cell sums, the gated weights
  W̃ = [diag(z_k) W_k] and bias β; `_gate_bwd_sample_kernel` and `_gate_bwd_params_kernel` its
  backward (the cell sums' gradient, then the gate parameters' gradients, each summed over the
  batch in order by one program).
- `_lmsa_fwd_kernel`: the three depthwise sweeps over X̂ on chip, one K = 3C GEMM with W̃,
  + β + x; also stores the depthwise outputs D and x in the wgrad kernel's word order (XW).
- `_lmsa_bwd_gram_kernel`: E_k = W̃_kᵀ dO (bordered; packed bf16 channel pairs for bf16 inputs),
  M_k = dO D_kᵀ (= ∂L/∂W̃) and Σ dO (= ∂L/∂β).
- `_lmsa_bwd_wgrad_kernel`: the depthwise weight gradients Σ_q x[q] E_k[q − δ].
- with the classifier (below): `_lmsa_bwd_dl_head_kernel` (dL's sums and bordered copy),
  `_lmsa_bwd_corr_head_kernel` (the correlation of x and dL) and `_lmsa_bwd_dx_head_kernel` (dx
  from dL on tensor cores) in place of the gram, wgrad and dx kernels.
- `_lmsa_bwd_dx_kernel`: dx = dO + Σ_k DW_kᵀ(E_k) + the statistics path's broadcast.
Between them on the host: the bordered buffers' fills, the chunk sums and the cell weights' mm.

`lmsa_classifier(x, p, W_c, b_c)` = the classifier (1×1 convolution C → NCLS) on LMSA's output,
the model's low-res logits, with neither LMSA's output nor its gradient ever formed: the logits
are a 7×7 convolution of x with per-sample window weights A = Σ_k w_k V_k + W_c at the centre
(V_k = W_c W̃_k; `_head_window_weights`), which `_lmsa_fwd_head_kernel` runs from x as 7 × C/BK
tensor-core products a tile, a window row's seven column offsets in each (N = the packed 7·NCLS
below, then shifted by δc), plus W_c β + b_c; no D, no XW. The backward works from the logits'
gradient dL, whose NCLS channels make every sum cheap on tensor cores: `_lmsa_bwd_dl_head_kernel` sums dL and copies it
zero-bordered, S = NCLS rounded up to 4 values a pixel, so the seven pixels of a window row are one
run of 7·S values (`_window_pack`: 128 + 16 wide for 19 classes); `_lmsa_bwd_corr_head_kernel` forms
the correlation G[δ] = Σ_p dL[p] x[p + δ]ᵀ, a window row in one product against those runs, and
contracts it at once into N_k = dL D_kᵀ (M_k = W_cᵀ N_k on the host), the depthwise weights'
main-path gradient (no wgrad sweep) and Σ dL xᵀ (for ∂W_c, with Σ_k N_k W̃_kᵀ and (Σ dL) βᵀ on the
host); `_lmsa_bwd_dx_head_kernel` forms dx from the same A, packed by window rows, one product a
window row against dL's runs (A's centre carries the residual W_cᵀ dL), plus the statistics path:
E_k and dO are never formed. The classifier's convolution and its backward never run.

docs/lmsa.md: the derivation of each step, precision, layouts, memory held and bytes moved, the
cost table and what the cost model said about the steps taken and not taken.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from msf.kernels._common import INTERPRET, AotSpec, _round, divisibility_attrs, dot
from msf.kernels.casts import cast_all
from msf.kernels.configs import PinnedKernel, sm_count as _sm_count
from msf.kernels.partial_sums import sum_partials
from msf.precision import autocast_off
from msf.reference import LMSAParams, eager_lmsa

__all__ = ["lmsa", "lmsa_classifier", "lmsa_eager", "LMSAFunction", "AOT_SPECS", "AOT_SPECS_SLOW"]

KERNEL_SIZES = (3, 5, 7)
_N_TAPS = sum(k * k for k in KERNEL_SIZES)  # 83 depthwise taps in all
_TAP_ROW0 = (0, 9, 34)  # first row of each scale in the B × n × 83 × C depthwise-gradient partials
_ROW0_5: tl.constexpr = tl.constexpr(_TAP_ROW0[1])  # the same, as kernel constants
_ROW0_7: tl.constexpr = tl.constexpr(_TAP_ROW0[2])
_NT: tl.constexpr = tl.constexpr(_N_TAPS)
# wgrad launches: the scales each one sweeps (x is read once per launch; a scale narrower than the
# launch's widest skips the rows outside its window). Predicted on an H100 with pixel pairs:
# 3 5 7: 437 µs, 3 5 | 7: 456 µs, 3 | 5 | 7: 502 µs, 3 7 | 5: 493 µs.
WGRAD_SPLIT = ((3, 5, 7),)
_CELLS = 7  # cell grid per axis of the statistics (rows 0, 1, 2, interior, H−3, H−2, H−1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

lmsa_eager = eager_lmsa  # the plain PyTorch reference (msf.backend)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
# Each entry is (config, the input dtypes it serves): "half" (bf16 / fp16) and/or "fp32". A config is
# listed for a dtype only if its sm_80 and sm_90 builds use no local memory / stack (no register
# spill; `python -m msf.profiling.report`); fp32 needs smaller tiles (tf32x3 dots hold both halves of
# each operand). `AOT_SPECS` builds exactly those pairs; kernels/configs.json pins the one that runs
# (autotuning, an opt-in, searches the configs of the input's dtype: `_dtype_prune`). The interpreter's
# pinned entry is each list's first: tiles large enough to keep it affordable (its cost is per program and per op), while the tests
# still cover several tiles, chunks and channel blocks.
_HALF, _BOTH = ("half",), ("half", "fp32")
_STATS_TABLE = [  # BLOCK_C: channel block (clamped to C in the kernel)
    (triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4, num_stages=2), _BOTH),
    (triton.Config({"BLOCK_P": 128, "BLOCK_C": 64}, num_warps=8, num_stages=2), _HALF),
]
_FWD_TABLE = [  # BLOCK_P: pixel pairs per tile (`_pair_tile`), BLOCK_K: depthwise slice / GEMM K step
    (triton.Config({"BLOCK_P": 32, "BLOCK_K": 32}, num_warps=8, num_stages=1), _HALF),
    (triton.Config({"BLOCK_P": 32, "BLOCK_K": 16}, num_warps=8, num_stages=1), _BOTH),
    (triton.Config({"BLOCK_P": 16, "BLOCK_K": 32}, num_warps=8, num_stages=1), _HALF),
    (triton.Config({"BLOCK_P": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1), _HALF),
    (triton.Config({"BLOCK_P": 16, "BLOCK_K": 16}, num_warps=8, num_stages=1), _BOTH),
]
_FWD_HEAD_TABLE = [  # BLOCK_P: a tile's input pixels (the products' M), BLOCK_K: the K step (channels);
    # N is a packed window row (LEAD + TAIL). 8 warps hold the BLOCK_P × (LEAD + TAIL) fp32 Z in 72
    # registers a thread and the store's addresses as many again; 16 take half (a third entry: the
    # only architectures a tile builds without spills on). A 64-pixel tile takes a 128-pixel row in
    # three halo tiles (1.5 × the products)
    (triton.Config({"BLOCK_P": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 64, "BLOCK_K": 16}, num_warps=8, num_stages=1), _BOTH),  # (fp32: tf32x3; the
    # narrower fp32 tiles tried, 32 × 16 / 32 at 8 warps and 16 × 16 at 4, spill)
    (triton.Config({"BLOCK_P": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2), _HALF, (90,)),
    (triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=16, num_stages=2), _HALF, (90,)),
]
_FWD_HEAD_MAX_P = max(cfg.kwargs["BLOCK_P"] for cfg, *_ in _FWD_HEAD_TABLE)
_GRAM_TABLE = [  # BLOCK_J: channel block of M and E, BLOCK_C: E's K step (three accumulators of each)
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 32, "BLOCK_C": 32}, num_warps=8, num_stages=1), _HALF),
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 32, "BLOCK_C": 16}, num_warps=8, num_stages=1), _HALF),
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 16, "BLOCK_C": 16}, num_warps=8, num_stages=1), _HALF),
    (triton.Config({"BLOCK_P": 32, "BLOCK_J": 32, "BLOCK_C": 16}, num_warps=8, num_stages=1), _BOTH),
    (triton.Config({"BLOCK_P": 32, "BLOCK_J": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1), _BOTH),
]
_DL_HEAD_TABLE = [  # BLOCK_P: pixels a tile (K_PAD-wide tiles; S values a pixel stored)
    (triton.Config({"BLOCK_P": 64}, num_warps=4, num_stages=1), _BOTH),
    (triton.Config({"BLOCK_P": 128}, num_warps=4, num_stages=1), _BOTH),
    (triton.Config({"BLOCK_P": 256}, num_warps=8, num_stages=1), _BOTH),
]
_CORR_HEAD_TABLE = [  # BLOCK_P: the products' K (pixels a tile), BLOCK_J: their M (channels); one
    # BJ × (LEAD + TAIL) fp32 accumulator a program (the packed window row). num_stages 2: the loop's
    # loads become asynchronous copies (H100: 128 × 64 at 8 warps 176 µs, 64 × 64 233, 64 × 128 at
    # 8 warps 281 (one CTA an SM); A100: 64 × 128 at 8 warps 627, 64 × 64 873)
    (triton.Config({"BLOCK_P": 32, "BLOCK_J": 64}, num_warps=4, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 32, "BLOCK_J": 32}, num_warps=4, num_stages=1), _HALF),
    (triton.Config({"BLOCK_P": 16, "BLOCK_J": 32}, num_warps=4, num_stages=1), _BOTH),  # (fp32: the K = 128
    (triton.Config({"BLOCK_P": 16, "BLOCK_J": 16}, num_warps=4, num_stages=1), _BOTH),  # tf32x3 products spill wider)
    (triton.Config({"BLOCK_P": 128, "BLOCK_J": 64}, num_warps=8, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 64}, num_warps=8, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 128}, num_warps=8, num_stages=2), _HALF),
]
# The backward's two sweeps over E_k give each lane a strip of this many horizontally adjacent
# pixels: a window row's STRIP + k − 1 loads (and unpacks) feed STRIP·k taps of a channel
_WGRAD_STRIP = 16
_DX_STRIP = 8
_E_TAIL = max(_WGRAD_STRIP, _DX_STRIP)  # zero pixels after the bordered E_k: a strip's reads past the end
_WGRAD_TABLE = [  # BLOCK_S: strips per tile, BLOCK_W: words (channel pairs m, m + C/2) per block; one word a
    # lane (2 words: 168-196 registers, 1-2 CTAs per SM)
    (triton.Config({"BLOCK_S": 16, "BLOCK_W": 8}, num_warps=4, num_stages=1), _BOTH),
    (triton.Config({"BLOCK_S": 32, "BLOCK_W": 4}, num_warps=4, num_stages=1), _BOTH),
]
_DX_TABLE = [  # BLOCK_S: strips per tile (`_strip_tile`), BLOCK_W: words (channel pairs m, m + C/2) per block
    (triton.Config({"BLOCK_S": 32, "BLOCK_W": 8}, num_warps=4, num_stages=1), _BOTH),
    (triton.Config({"BLOCK_S": 16, "BLOCK_W": 16}, num_warps=4, num_stages=1), _BOTH),
]
_DX_HEAD_TABLE = [  # BLOCK_P × BLOCK_R: a tile's columns × rows (the products' N, BLOCK_R accumulators),
    # BLOCK_J: its channels (M); the products' K is a packed window row (LEAD + TAIL). Each program
    # reads the sample's A (7 × BJ × (LEAD + TAIL)) once for its BLOCK_R rows. A third entry: the only
    # architectures it builds without spills on (H100: 64 × 128 at 8 warps 199 µs, 32 × 64 at 4 warps
    # 232; A100: 32 × 64 499, the wider tiles spill there)
    (triton.Config({"BLOCK_P": 32, "BLOCK_J": 64, "BLOCK_R": 1}, num_warps=4, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 32, "BLOCK_J": 32, "BLOCK_R": 1}, num_warps=4, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 16, "BLOCK_J": 16, "BLOCK_R": 1}, num_warps=4, num_stages=1), _BOTH),  # (fp32:
    (triton.Config({"BLOCK_P": 16, "BLOCK_J": 32, "BLOCK_R": 1}, num_warps=4, num_stages=1), _HALF),  # tf32x3)
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 32, "BLOCK_R": 1}, num_warps=4, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 32, "BLOCK_J": 128, "BLOCK_R": 1}, num_warps=8, num_stages=2), _HALF),
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 64, "BLOCK_R": 1}, num_warps=4, num_stages=2), _HALF, (90,)),
    (triton.Config({"BLOCK_P": 64, "BLOCK_J": 128, "BLOCK_R": 1}, num_warps=8, num_stages=2), _HALF, (90,)),
]


def _by_precise(named) -> bool:
    """The fp32 shape class: fp32 inputs (PRECISE)."""
    return named["PRECISE"]


def _by_unpacked(named) -> bool:
    """The fp32 shape class of the sweeps over E_k: fp32 E_k (fp32 and fp16 inputs)."""
    return not named["PACKED"]


def _shape_class(named, is_fp32) -> str:
    """"half" or "fp32" by `is_fp32`."""
    return "fp32" if is_fp32(named) else "half"


def _dtype_prune(table, is_fp32=_by_precise):
    """Autotune pruning: the configs of `table` that serve the call's shape class."""
    serves = [(row[0].all_kwargs(), row[1]) for row in table]

    def prune(configs, named_args, **kwargs):
        cls = _shape_class(kwargs, is_fp32)
        kept = [cfg for cfg in configs if any(cfg.all_kwargs() == kw and cls in d for kw, d in serves)]
        return kept or configs[:1]
    return prune


def _pinned(name: str, fn, table, key: list[str], is_fp32=_by_precise) -> PinnedKernel:
    """`fn` launched with its configuration from kernels/configs.json; shape class "half" or "fp32".
    A table row's optional third element: the architectures its configuration is limited to."""
    configs = [row[0] for row in table]
    return PinnedKernel(name, fn, configs, key,
                        shape_class=lambda named: _shape_class(named, is_fp32),
                        allowed=lambda cls: [row[0] for row in table if cls in row[1]],
                        classes=["half", "fp32"],
                        prune=_dtype_prune(table, is_fp32),
                        archs=lambda cls, cfg: next((row[2] for row in table if len(row) > 2
                                                     and row[0].all_kwargs() == cfg.all_kwargs()), None))


_CHUNK_ALIGN = 256  # chunks of the stats / gram kernels are multiples of every BLOCK_P above


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
# Loops: every loop has a constexpr trip count (kernel sizes, C, chunk lengths, tile counts).
# Under TRITON_INTERPRET=1 with numpy ≥ 2.4 a `range()` bound that is a runtime argument fails
# (see kernels/attention.py); constexpr bounds also let the compiler unroll and pipeline.
@triton.jit
def _mm(a, b, PRECISE: tl.constexpr):
    """fp32-accumulated a @ b. PRECISE (fp32 inputs; both operands are then fp32): tf32x3 tensor-core
    products, about fp32 accuracy ("ieee" would lower to FMAs that spill at K ≥ 64). Otherwise
    `msf.kernels._common.dot` (bf16 / fp16 operands, upcast under the interpreter)."""
    if PRECISE:
        return tl.dot(a, b, out_dtype=tl.float32, input_precision="tf32x3")
    else:
        return dot(a, b)


@triton.jit
def _cell_class(v, N, TN):
    """Statistics cell class (0..6) of row (or column) v of N: 0, 1, 2 | 3 = interior | 4, 5, 6 =
    the last three (for N < 7, TN = N and every row is its own class)."""
    return tl.where(v < 3, v, tl.where(v >= N - 3, v - N + TN, 3))


@triton.jit
def _cell(h, w, H, W, TH, TW):
    """Statistics cell (0..48) of pixel (h, w): the row class times 7 plus the column class."""
    return _cell_class(h, H, TH) * 7 + _cell_class(w, W, TW)


@triton.jit
def _row_col(p, W):
    """(row, column) of flat pixel indices p in an image W pixels wide."""
    return p // W, p % W


@triton.jit
def _pair_tile(pid, H, W, BLOCK_P: tl.constexpr):
    """Tile `pid` of BLOCK_P pixel pairs: lane i holds pair p = pid·BLOCK_P + i of the image's
    H·⌈W/2⌉ pairs (h, wa), (h, wa + 1), wa = 2·(p mod ⌈W/2⌉) (a tile may span rows, so narrow images
    waste no lanes). Returns (h, wa, wb, mask_a, mask_b): lanes past the image, or right pixels past
    the row, get a valid pixel to compute and a false mask for their stores."""
    WH = (W + 1) // 2
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    h = p // WH
    wa = 2 * (p - h * WH)
    mask_a = h < H
    return tl.minimum(h, H - 1), wa, tl.minimum(wa + 1, W - 1), mask_a, mask_a & (wa + 1 < W)


@triton.jit
def _step_row_col(h, w, DH, DW, W):
    """(row, column) of the pixels DH·W + DW further on (0 ≤ DW < W): one carry, no division."""
    w = w + DW
    carry = w >= W
    return h + DH + carry.to(tl.int32), tl.where(carry, w - W, w)


# Tap loops: a runtime loop over window rows around a compile-time-unrolled sweep of the row's
# columns (constant column offsets and weight rows). Fully unrolled windows get every tap's loads
# hoisted by the compiler and spill registers (sm_80 / sm_90 builds).
@triton.jit
def _strip_tile(pid, H, W, S: tl.constexpr, BLOCK_S: tl.constexpr):
    """Tile `pid` of BLOCK_S pixel strips: lane i holds strip p = pid·BLOCK_S + i of the image's
    H·⌈W/S⌉ strips of S horizontally adjacent pixels (h, ws), .., (h, ws + S − 1), ws = S·(p mod
    ⌈W/S⌉) (a tile may span rows, so narrow images waste no lanes). Returns (h, ws, mask): lanes
    past the image get row H − 1 and a false mask; pixels past the row are the caller's to mask."""
    NS = (W + S - 1) // S
    p = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    h = p // NS
    return tl.minimum(h, H - 1), S * (p - h * NS), h < H


@triton.jit
def _chunk_pixels(pid, i, H, W, CHUNK_PIX: tl.constexpr, BLOCK_P: tl.constexpr):
    """(mask, pixel, row, column) of the BLOCK_P pixels at offset i of chunk `pid` of an image of the
    gram kernels; lanes past the image get a valid pixel (their gradient loads are masked to 0)."""
    offs_p = pid * CHUNK_PIX + i + tl.arange(0, BLOCK_P)
    pc = tl.minimum(offs_p, H * W - 1)
    return offs_p < H * W, pc, pc // W, pc % W


@triton.jit
def _e_channels(pid_j, BJ: tl.constexpr, C: tl.constexpr, PACKED: tl.constexpr):
    """The channels of E_k stored at positions pid_j·BJ + [0, BJ): PACKED (bf16 E) interleaves the
    halves, position 2m + r holding channel m + r·C/2 (word m = the channel pair (m, m + C/2) the
    sweeps unpack); fp32 E keeps the natural order."""
    ar = tl.arange(0, BJ)
    if PACKED:
        return pid_j * (BJ // 2) + ar // 2 + (ar % 2) * (C // 2)
    else:
        return pid_j * BJ + ar


@triton.jit
def _e_words(E, PACKED: tl.constexpr):
    """E_k as the sweeps index it: PACKED (bf16 E_k) as int32 words, word m of a pixel holding the
    channel pair (m, m + C/2); else the fp32 tensor itself (channel m at m, its partner at m + C/2)."""
    if PACKED:
        return E.to(tl.pointer_type(tl.int32))
    else:
        return E


@triton.jit
def _e_pair(ptr, HALF: tl.constexpr, PACKED: tl.constexpr):
    """fp32 (E[channels m], E[channels m + C/2]) at the word pointers `ptr`. PACKED: one load of the
    int32 word, then one instruction per value: bf16 → fp32 is a 16-bit shift (low half) or a
    mask (high half). Else two fp32 loads."""
    if PACKED:
        word = tl.load(ptr)
        return (word << 16).to(tl.float32, bitcast=True), (word & -65536).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr), tl.load(ptr + HALF)


@triton.jit
def _add_at(acc, i: tl.constexpr, v):
    """The tuple `acc` with v added to its element i (a compile-time index)."""
    return acc[:i] + (acc[i] + v,) + acc[i + 1:]


@triton.jit
def _dx_strip(lo, hi, row_ptr, w_ptr, offs_w, ROW_STEP, S: tl.constexpr, KS: tl.constexpr,
              C: tl.constexpr, PS: tl.constexpr, PACKED: tl.constexpr):
    """(lo, hi), the S pixels' accumulators of each strip's channels m and m + C/2, plus the
    transposed depthwise DW_KSᵀ(E) = Σ_δ w̄[δ] E[q + δ] (w̄: the taps flipped, w̄[t] = w[KS² − 1 − t],
    read so from the forward's fp32 tap-major KS² × C w)
    from the zero-bordered E (row_ptr: word pointers at each strip's top-left window tap;
    ROW_STEP words a row, PS a pixel). Per window row, S + KS − 1 loads feed S·KS taps of each
    channel (every load reaches every pixel of the strip whose window holds it); the row's KS
    weights are loaded once for the S pixels. Column offsets are compile-time constants."""
    HALF: tl.constexpr = C // 2
    for i in range(KS):
        wl = ()
        wh = ()
        for t in tl.static_range(KS):
            flipped = KS * KS - 1 - i * KS - t
            wl = wl + (tl.load(w_ptr + flipped * C + offs_w)[None, :],)
            wh = wh + (tl.load(w_ptr + flipped * C + HALF + offs_w)[None, :],)
        for m in tl.static_range(S + KS - 1):
            el, eh = _e_pair(row_ptr + m * PS, HALF, PACKED)
            for s in tl.static_range(S):
                if m - s >= 0 and m - s < KS:  # tap m − s of pixel s
                    lo = _add_at(lo, s, el * wl[m - s])
                    hi = _add_at(hi, s, eh * wh[m - s])
        row_ptr += ROW_STEP
    return lo, hi


@triton.jit
def _dw_taps(xv, w3_ptr, w5_ptr, w7_ptr, d3, d5, d7, di, jj: tl.constexpr, offs_j, C: tl.constexpr,
             RING: tl.constexpr):
    """xv (the x at window row di, column jj = dj + 3 of one pixel's 7×7 window) into DW_7 and,
    where the tap lies in their windows, DW_5 and DW_3. RING (constexpr) is the row's ring: 3
    (|di| = 3: DW_7 only), 2 (|di| = 2: DW_7, DW_5), 1 (|di| ≤ 1: all three); a column outside
    0..6 adds nothing."""
    dj: tl.constexpr = jj - 3
    if dj * dj <= 9:
        d7 += xv * tl.load(w7_ptr + ((di + 3) * 7 + jj) * C + offs_j)[None, :]
        if RING <= 2 and dj * dj <= 4:
            d5 += xv * tl.load(w5_ptr + ((di + 2) * 5 + jj - 1) * C + offs_j)[None, :]
        if RING <= 1 and dj * dj <= 1:
            d3 += xv * tl.load(w3_ptr + ((di + 1) * 3 + jj - 2) * C + offs_j)[None, :]
    return d3, d5, d7


@triton.jit
def _dw_row_pair(row_ptr, last, w3_ptr, w5_ptr, w7_ptr, da, db, di, offs_j, C: tl.constexpr, RING: tl.constexpr):
    """One row di of the 7×7 windows of a pixel pair (row_ptr: the left pixel's leftmost tap in the
    zero-bordered x; `last`: the offset of the right pixel's rightmost tap, clamped into the
    buffer): its 8 shifted loads, each added into the left pixel's taps at column jj and the
    right pixel's at jj − 1 (da, db: (DW_3, DW_5, DW_7) of each); the column offsets are
    immediates (the loop over them is unrolled), and a tap's weights serve both pixels."""
    d3a, d5a, d7a = da
    d3b, d5b, d7b = db
    for jj in tl.static_range(8):
        if jj < 7:
            xv = tl.load(row_ptr + jj * C).to(tl.float32)
        else:
            xv = tl.load(row_ptr + last).to(tl.float32)
        d3a, d5a, d7a = _dw_taps(xv, w3_ptr, w5_ptr, w7_ptr, d3a, d5a, d7a, di, jj, offs_j, C, RING)
        d3b, d5b, d7b = _dw_taps(xv, w3_ptr, w5_ptr, w7_ptr, d3b, d5b, d7b, di, jj - 1, offs_j, C, RING)
    return (d3a, d5a, d7a), (d3b, d5b, d7b)


@triton.jit
def _depthwise3_pair(xp_base, w3_ptr, w5_ptr, w7_ptr, hp, wp, offs_j, WP, C: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_J: tl.constexpr):
    """(DW_3(x), DW_5(x), DW_7(x)) as fp32 [pixels × channels] tiles at two horizontally adjacent
    pixels per lane, zero-bordered coordinates (hp, wp) and (hp, wp + 1), channels offs_j, from one
    sweep over their 7×8 window of the bordered x (xp_base: row stride WP·C, pixel stride C,
    fp32): each of its 56 shifted loads feeds every tap of either pixel that holds it (166 FMAs
    per pixel pair and channel, no masks). The right pixel may lie past the image (wp + 1 = W + 3):
    its last column is clamped into the buffer and the caller masks its results. Three row loops,
    one per ring (rows ±3, rows ±2, rows −1..1), so which scales a tap feeds is known at compile
    time; they stay loops (a fully unrolled sweep has the compiler hoist every load, and spill).
    Returns ((DW_3, DW_5, DW_7) of the left pixels, the same of the right ones)."""
    z = tl.zeros([BLOCK_P, BLOCK_J], tl.float32)
    da = (z, z, z)
    db = (z, z, z)
    c_ptr = xp_base + offs_j[None, :] + ((hp - 3) * WP + wp - 3)[:, None] * C  # the window's top-left tap
    last = (tl.minimum(wp + 4, WP - 1) - (wp - 3))[:, None] * C  # = 7·C inside the image
    ws = (w3_ptr, w5_ptr, w7_ptr)
    for r in range(2):  # rows ±3
        da, db = _dw_row_pair(c_ptr + (6 * r) * WP * C, last, *ws, da, db, 6 * r - 3, offs_j, C, 3)
    for r in range(2):  # rows ±2
        da, db = _dw_row_pair(c_ptr + (4 * r + 1) * WP * C, last, *ws, da, db, 4 * r - 2, offs_j, C, 2)
    for r in range(3):  # rows −1, 0, 1
        da, db = _dw_row_pair(c_ptr + (r + 2) * WP * C, last, *ws, da, db, r - 1, offs_j, C, 1)
    return da, db


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lmsa_stats_kernel(
    X, SP, XP,
    sxb, sxc, sxh, sxw,
    H, W, TH, TW, n_chunks,
    C: tl.constexpr, CHUNK_PIX: tl.constexpr, PRECISE: tl.constexpr, WRITE_XP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Cell sums of x over pixel chunk `pid` of image b, channel block pid_c: SP[b, pid, cell, c]
    (B × n × 49 × C fp32), as onehot(cell)ᵀ · x on tensor cores (64 one-hot rows, 49 used), one
    BLOCK_P-pixel tile at a time. WRITE_XP (the plain forward's): also writes x's tiles in fp32 into
    the interior of XP, x channels-last with a 3-pixel zero border (B × (H+6) × (W+6) × C; the host
    zeroes the border), which its depthwise sweeps read without masks or conversions."""
    BC: tl.constexpr = min(BLOCK_C, C)  # the configured channel block, clamped to C
    pid_c = tl.program_id(0)
    pid = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BC + tl.arange(0, BC)
    offs_cell = tl.arange(0, 64)
    x_base = X + b * sxb
    acc = tl.zeros([64, BC], tl.float32)
    for i in range(0, CHUNK_PIX, BLOCK_P):
        if pid * CHUNK_PIX + i < H * W:  # the image's last chunk may end early
            offs_p = pid * CHUNK_PIX + i + tl.arange(0, BLOCK_P)
            mask_p = offs_p < H * W
            h = offs_p // W
            w = offs_p % W
            cell = _cell(h, w, H, W, TH, TW)
            xt = tl.load(x_base + (h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc,
                         mask=mask_p[:, None], other=0.0)  # BLOCK_P × BC
            if WRITE_XP:
                tl.store(XP + ((b * (H + 6) + h + 3) * (W + 6) + w + 3)[:, None] * C + offs_c[None, :],
                         xt.to(XP.dtype.element_ty), mask=mask_p[:, None])
            onehot_t = tl.where((offs_cell[:, None] == cell[None, :]) & mask_p[None, :], 1.0, 0.0)
            acc += _mm(onehot_t.to(xt.dtype), xt, PRECISE)  # 64 × BC
    out = SP + ((b * n_chunks + pid) * 49 + offs_cell[:, None]) * C + offs_c[None, :]
    tl.store(out, acc, mask=(offs_cell < 49)[:, None])


_lmsa_stats_kernel = _pinned("lmsa.stats", _lmsa_stats_kernel, _STATS_TABLE, ["H", "W", "C", "CHUNK_PIX", "PRECISE"])


@triton.jit
def _lmsa_fwd_kernel(
    X, XP, WG, BIAS, DW3, DW5, DW7, OUT, D, XW,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    H, W, WPAD,
    C: tl.constexpr, PRECISE: tl.constexpr, PACKED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, :, tile] = x + β[b] + Σ_k W̃_k[b] · DW_k(x)[:, tile] for a tile of BLOCK_P pixel pairs
    of image b (two horizontally adjacent pixels per lane, `_pair_tile`, `_depthwise3_pair`).

    WG is W̃ as B × 3 × C(out) × C(in), x's dtype; the GEMM runs over K = 3C in BK slices, each
    slice's depthwise outputs formed on chip right before it is multiplied in. Those outputs, as
    the GEMM takes them (x's dtype), are also stored once for the backward's gram kernel:
    D[b, h, w, k·C + j] = DW_k(x)[j, (h, w)]  (B × H × W × 3C). (With the classifier inside,
    `_lmsa_fwd_head_kernel` runs instead.)"""
    BK: tl.constexpr = min(BLOCK_K, C)  # the configured K slice, clamped to C
    b = tl.program_id(1).to(tl.int64)
    h, wa, wb, mask_a, mask_b = _pair_tile(tl.program_id(0), H, W, BLOCK_P)
    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, C)
    xp_base = XP + b * ((H + 6) * (W + 6) * C)
    wg_base = WG + b * (3 * C * C) + offs_n[None, :] * C  # W̃_k[b]ᵀ slices: BK (in) × C (out)
    da_ptr = D + (b * (H * W) + h * W + wa)[:, None] * (3 * C) + offs_k[None, :]
    acc_a = tl.zeros([BLOCK_P, C], tl.float32)
    acc_b = tl.zeros([BLOCK_P, C], tl.float32)
    for j0 in range(0, C, BK):
        offs_j = j0 + offs_k
        wt_ptr = wg_base + offs_j[:, None]
        da, db = _depthwise3_pair(xp_base, DW3, DW5, DW7, h + 3, wa + 3, offs_j, W + 6, C, BLOCK_P, BK)
        acc_a = _fwd_gemm(acc_a, da, wt_ptr, C * C, da_ptr + j0, mask_a, C, PRECISE)
        acc_b = _fwd_gemm(acc_b, db, wt_ptr, C * C, da_ptr + (3 * C + j0), mask_b, C, PRECISE)
    xw_row = (b * (H + 1) + h) * WPAD  # row h of image b of the word-ordered x, in pixels
    bias = tl.load(BIAS + b * C + offs_n)
    xc = _fwd_x(X, XW, xw_row + wa, b, h, wa, mask_a, sxb, sxc, sxh, sxw, C, PACKED)
    _fwd_out(acc_a, xc, bias, OUT, b, h, wa, mask_a, sob, soc, soh, sow, C)
    xc = _fwd_x(X, XW, xw_row + wb, b, h, wb, mask_b, sxb, sxc, sxh, sxw, C, PACKED)
    _fwd_out(acc_b, xc, bias, OUT, b, h, wb, mask_b, sob, soc, soh, sow, C)


@triton.jit
def _fwd_gemm(acc, d, wt_ptr, scale_stride, d_ptr, mask, C: tl.constexpr, PRECISE: tl.constexpr):
    """acc += Σ_k DW_k slice · (scale k's weight slice at wt_ptr + k·scale_stride) for one K slice,
    d = (DW_3, DW_5, DW_7) of it, which are also stored (as the GEMM takes them, in the weights'
    dtype) into D at d_ptr (masked lanes: pixels past the row)."""
    d3, d5, d7 = d
    d3 = _round(d3, wt_ptr.dtype.element_ty)
    d5 = _round(d5, wt_ptr.dtype.element_ty)
    d7 = _round(d7, wt_ptr.dtype.element_ty)
    tl.store(d_ptr, d3, mask=mask[:, None])
    tl.store(d_ptr + C, d5, mask=mask[:, None])
    tl.store(d_ptr + 2 * C, d7, mask=mask[:, None])
    acc += _mm(d3, tl.load(wt_ptr), PRECISE)
    acc += _mm(d5, tl.load(wt_ptr + scale_stride), PRECISE)
    acc += _mm(d7, tl.load(wt_ptr + 2 * scale_stride), PRECISE)
    return acc


@triton.jit
def _fwd_x(X, XW, xw_pix, b, h, w, mask, sxb, sxc, sxh, sxw, C: tl.constexpr, PACKED: tl.constexpr):
    """x at pixels (h, w) (BLOCK_P × C, x's dtype; masked lanes 0), also stored into the backward's
    word-ordered copy at pixels xw_pix (`_lmsa_bwd_wgrad_kernel`): PACKED, bf16 with the channel
    halves interleaved (position 2m + r = channel m + r·C/2, the layout of the packed E_k); else
    fp32 in channel order."""
    offs_c = tl.arange(0, C)
    xc = tl.load(X + b * sxb + (h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask[:, None], other=0.0)
    xw = xc.to(XW.dtype.element_ty)
    if PACKED:  # [halves, C/2] → [C/2, halves] per pixel, in registers: the store stays contiguous
        xw = tl.reshape(tl.permute(tl.reshape(xw, [xw.shape[0], 2, C // 2]), (0, 2, 1)), [xw.shape[0], C])
    tl.store(XW + xw_pix[:, None] * C + offs_c[None, :], xw, mask=mask[:, None])
    return xc


@triton.jit
def _fwd_out(acc, xc, bias, OUT, b, h, w, mask, sob, soc, soh, sow, C: tl.constexpr):
    """out = acc + β[b] + x at pixels (h, w), stored once (masked lanes: pixels past the row)."""
    offs_c = tl.arange(0, C)
    out = _round(acc + (bias[None, :] + xc.to(tl.float32)), OUT.dtype.element_ty)
    tl.store(OUT + b * sob + (h * soh + w * sow)[:, None] + offs_c[None, :] * soc, out, mask=mask[:, None])


@triton.jit
def _classifier_terms(WC, BC, BIAS, b, NCLS, dtype: tl.constexpr, C: tl.constexpr, K_PAD: tl.constexpr):
    """W_c β[b] + b_c (fp32, K_PAD; 0 past NCLS): what the logits add to Σ_k V_k DW_k(x) + W_c x, once
    a program. W_c is in x's dtype already; b_c is rounded to it, as autocast hands it to the
    convolution; β stays fp32 (the eager out it belongs to is formed in fp32 before its rounding)."""
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < NCLS
    wct = tl.load(WC + offs_k[None, :] * C + offs_c[:, None], mask=k_ok[None, :], other=0.0)  # C × K_PAD
    beta = tl.load(BIAS + b * C + offs_c)
    bias = _round(tl.load(BC + offs_k, mask=k_ok, other=0.0), dtype).to(tl.float32)
    return tl.sum(wct.to(tl.float32) * beta[:, None], 0) + bias


_lmsa_fwd_kernel = _pinned("lmsa.fwd", _lmsa_fwd_kernel, _FWD_TABLE, ["H", "W", "C", "PRECISE"])


# The classifier's forward as one implicit GEMM: with the per-sample window weights
#     A[b, δ, j, κ] = Σ_k w_k[j, δ] V_k[b, κ, j] + [δ = 0] W_c[κ, j]      (`_head_window_weights`, the host)
# (V_k = W_c W̃_k; 0 where δ is outside window k), the logits are
#     Σ_k V_k D_k[:, p] + W_c x[:, p] + W_c β + b_c = Σ_δ Σ_j A[b, δ, j, κ] x[j, p + δ] + (W_c β + b_c)
# a 7×7 convolution of x with per-sample weights (x read as it is, masked at the image's edges):
# no depthwise sweep and no D. With A packed by window rows
# (A[b, δr, j, u·S + κ] = A[b, (δr, 3 − u), j, κ], the backward's layout) each input pixel p of a
# tile takes all seven column offsets of a window row in one product:
#     Z[p, u·S + κ] = Σ_δr Σ_j x̂[(h + δr, p), j] A[b, δr, j, u·S + κ]      (N = 7·S, 128 + 16 for 19 classes)
#     logits[(h, q), κ] = Σ_u Z[q + 3 − u, u·S + κ] + W_c β + b_c
# (input pixel q + δc = q + 3 − u feeds output q through column offset δc): 7·C/BK products of
# N = lead + tail a tile instead of 49·C/BK of N = NCLS padded to a power of two (7 × 32 = 224
# columns a window row for 19 classes, now 144). The sum over u shifts rows of Z, which lie in
# other threads: each program stores Z in its own slot of ZS and reads it back shifted.
@triton.jit
def _lmsa_fwd_head_kernel(
    X, A, WC, BC, BIAS, ZS, LOGITS,
    sxb, sxc, sxh, sxw,
    slb, slk, slh, slw,
    H, W, NCLS, n_img, n_progs,
    C: tl.constexpr, PRECISE: tl.constexpr, K_PAD: tl.constexpr, S: tl.constexpr, LEAD: tl.constexpr,
    TAIL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """LOGITS[b, :, h, q] for every tile (b, h, column tile) = pid, pid + n_progs, … of the n_img
    images (a persistent grid of n_progs programs, so the slots ZS holds are one a program): Z for
    the tile's BLOCK_P input pixels (7·C/BK products of BLOCK_P × BK by BK × (LEAD + TAIL)), then the
    shifted sum and W_c β[b] + b_c (`_classifier_terms`), rounded to the logits' dtype. Where a row
    fits one tile (W ≤ BLOCK_P) its inputs and outputs are the row's pixels (inputs past the row are
    zero, as the convolution's padding); a wider row takes tiles of BLOCK_P − 8 outputs, each with
    the 4 input pixels on either side it needs. X: x, B × C × H × W (strides sx*, any layout; rows and
    columns outside the image masked); A: (B·7·C + 1) × (LEAD + TAIL) (x's dtype,
    `_head_window_weights`); WC: W_c (NCLS × C, x's dtype); BC: b_c; BIAS: β (B × C fp32); ZS:
    n_progs × BLOCK_P × (LEAD + TAIL) fp32; LOGITS: any strides (sl*)."""
    BK: tl.constexpr = min(BLOCK_K, C)  # the configured K slice, clamped to C
    NK: tl.constexpr = C // BK
    WIDTH: tl.constexpr = LEAD + TAIL
    step = BLOCK_P  # output columns a tile
    lo = 0  # input pixels a tile reads before its first output
    if W > BLOCK_P:
        step = BLOCK_P - 8
        lo = 4
    cols = (W + step - 1) // step
    i = tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BK)
    offs_k = tl.arange(0, K_PAD)
    n_lead = tl.arange(0, LEAD)
    n_tail = LEAD + tl.arange(0, max(TAIL, 16))  # (used only if TAIL > 0)
    zs = ZS + (tl.program_id(0) * BLOCK_P + i)[:, None] * WIDTH  # this program's slot, BLOCK_P × 1
    tile = tl.program_id(0)
    while tile < n_img * H * cols:  # (a while loop: the interpreter takes no tensor bounds in range())
        b = (tile // (H * cols)).to(tl.int64)
        h = tile // cols % H
        q0 = tile % cols * step
        p = q0 - lo + i  # the tile's input pixels
        p_ok = (p >= 0) & (p < W)
        x_at = X + b * sxb + (p * sxw)[:, None] + offs_c[None, :] * sxc
        a_row = A + b * 7 * C * WIDTH
        z = tl.zeros([BLOCK_P, LEAD], tl.float32)
        z_tail = tl.zeros([BLOCK_P, max(TAIL, 16)], tl.float32)
        for it in range(0, 7 * NK):
            r = it // NK
            c0 = it % NK * BK
            hr = h + r - 3  # window row δr = r − 3 (zero outside the image, as the convolution's padding)
            xs = tl.load(x_at + (hr * sxh + c0 * sxc), mask=p_ok[:, None] & (hr >= 0) & (hr < H), other=0.0)
            a_at = a_row + (r * C + c0) * WIDTH + offs_c[:, None] * WIDTH
            z += _mm(xs, tl.load(a_at + n_lead[None, :]), PRECISE)
            if TAIL > 0:
                z_tail += _mm(xs, tl.load(a_at + n_tail[None, :]), PRECISE)
        tl.store(zs + n_lead[None, :], z)
        if TAIL > 0:
            tl.store(zs + n_tail[None, :], z_tail)
        tl.debug_barrier()  # (the slot's rows come back to other threads)
        out = tl.zeros([BLOCK_P, K_PAD], tl.float32) + _classifier_terms(WC, BC, BIAS, b, NCLS,
                                                                       LOGITS.dtype.element_ty, C, K_PAD)[None, :]
        for u in range(0, 7):  # (a loop, not unrolled: one shifted load's addresses live at a time)
            src = i + lo + 3 - u  # the Z row of output q0 + i's input pixel q + δc (δc = 3 − u)
            out += tl.load(ZS + (tl.program_id(0) * BLOCK_P + src)[:, None] * WIDTH + u * S + offs_k[None, :],
                           mask=((src >= 0) & (src < BLOCK_P))[:, None] & (offs_k < NCLS)[None, :], other=0.0)
        q = q0 + i
        tl.store(LOGITS + b * slb + h * slh + (q * slw)[:, None] + offs_k[None, :] * slk,
                 _round(out, LOGITS.dtype.element_ty), mask=((i < step) & (q < W))[:, None] & (offs_k < NCLS)[None, :])
        tl.debug_barrier()  # (the next tile rewrites the slot)
        tile += n_progs


_lmsa_fwd_head_kernel = _pinned("lmsa.fwd_head", _lmsa_fwd_head_kernel, _FWD_HEAD_TABLE,
                                 ["H", "W", "C", "PRECISE", "n_img"])


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# Notation per sample b (dropped), channels c (output of the pointwise), j (input), pixels p, q;
# D_k = DW_k(x) (C × N), W̃_k = diag(z_k) W_k, β = Σ_k z_k ⊙ b_k, G = dO = ∂L/∂out.
#     out = x + Σ_k W̃_k D_k + β 1ᵀ,   D_k[j, p] = Σ_δ w_k[j, δ] x[j, p + δ]  (x = 0 outside)
# Main path (treating W̃ and β as inputs):
#     ∂L/∂W̃_k = M_k = G D_kᵀ                 (C × C: `_lmsa_bwd_gram_kernel`, D_k as the forward stored it)
#     ∂L/∂β    = Σ_p G[:, p]                  (same kernel)
#     E_k      = W̃_kᵀ G = ∂L/∂D_k             (C × N: formed per tile by the gram kernel, stored bordered)
#     ∂L/∂w_k[j, δ] += Σ_p E_k[j, p] x[j, p + δ]            (wgrad kernel, from the stored E_k)
#     ∂L/∂x[j, q]   += G[j, q] + Σ_k Σ_δ w_k[j, δ] E_k[j, q − δ]   (dx kernel; E_k = 0 outside the image)
# Gate path (P → g → s → z → (W̃, β) backwards, given M and Σ G: the comment above `_gate_fwd_kernel`):
#     ∂L/∂z_k = rowsum(W_k ∘ M_k) + b_k ⊙ Σ_p G,  then the SE-MLP backward → ∂L/∂s,
#     ∂L/∂g_k = W_kᵀ ∂L/∂s_k,
#     ∂L/∂W_k = Σ_b [diag(z_k) M_k + ∂L/∂s_k g_kᵀ],   ∂L/∂b_k = Σ_b [z_k ⊙ Σ_p G + ∂L/∂s_k],
#     ∂L/∂w_k (statistics part) = Σ_b ∂L/∂g_k ⊙ win / (H·W),  and T = ∂L/∂P (B × C × 7 × 7).
# The statistics are linear in x (cell sums), so their adjoint is a broadcast:
#     ∂L/∂x[j, q] += T[j, cell(q)]
# which the dx kernel adds while it writes dx, so dx is written once and never re-read.
# Order: the gram kernel and the gate graph first (T needs ∂L/∂z, a sum over every pixel), then dx.
# Sums over pixels (M, Σ G, ∂L/∂w_k) go to per-chunk fp32 partial buffers summed afterwards.
@triton.jit
def _lmsa_bwd_gram_kernel(
    D, DO, WG, MP, GSP, E3, E5, E7,
    sgb, sgc, sgh, sgw,
    H, W, n_chunks,
    C: tl.constexpr, CHUNK_PIX: tl.constexpr, PRECISE: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For channel block pid_j and the pixels p of chunk `pid` of image b, the three scales at once:
        MP[pid, b, k, :, j] = Σ_p dO[:, p] DW_k(x)[j, p]ᵀ            (∂L/∂W̃_k, C × BJ)
        GSP[pid, b, :]      = Σ_p dO[:, p]                            (∂L/∂β; pid_j = 0 writes it)
    with DW_k(x) read from D (B × H × W × 3C, x's dtype: what the forward multiplied, stored by
    it), and E_k = W̃_kᵀ dO formed on chip (the three products share each dO slice) and stored once:
        E_k[b, 3 + h, 3 + w, pos(j)] = E_k[j, (h, w)]   (B × (H+6) × (W+6) × C; the host zeroes
                                                        the 3-pixel border)
    for the wgrad and dx kernels: fp32 in channel order for fp32 / fp16 inputs; for bf16 (PACKED)
    rounded to bf16 with the channel halves interleaved, pos(m + r·C/2) = 2m + r, so that int32
    word m holds the channel pair (m, m + C/2). Two kernels' worth of tensor-core products and no depthwise
    sweep: the launch is bound by its bytes (dO and D read, the three E_k written once).
    MP: n × B × 3 × C × C, GSP: n × B × C, fp32: chunk-major, so each is one n-row partial buffer
    for `sum_partials`."""
    BJ: tl.constexpr = min(BLOCK_J, C)  # the configured channel block, clamped to C
    BC: tl.constexpr = min(BLOCK_C, C)  # the E GEMM's K step, clamped to C
    pid_j = tl.program_id(0)
    pid = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_j = pid_j * BJ + tl.arange(0, BJ)
    offs_c = tl.arange(0, C)
    g_base = DO + b * sgb
    offs_cc = tl.arange(0, BC)
    offs_e = _e_channels(pid_j, BJ, C, PACKED)  # E's channels in the order they are stored at offs_j
    wg_ptr = WG + (b * 3 * C + offs_cc[:, None]) * C + offs_e[None, :]  # W̃_3[b][c-step, E's channels]

    acc3 = tl.zeros([C, BJ], tl.float32)
    acc5 = tl.zeros([C, BJ], tl.float32)
    acc7 = tl.zeros([C, BJ], tl.float32)
    gsum = tl.zeros([C], tl.float32)
    for i in range(0, CHUNK_PIX, BLOCK_P):
        if pid * CHUNK_PIX + i < H * W:  # the image's last chunk may end early
            mask_p, pc, h, w = _chunk_pixels(pid, i, H, W, CHUNK_PIX, BLOCK_P)
            # E_k[p, j] = Σ_c dO[c, p] W̃_k[c, j] in BLOCK_C-channel steps, the three scales from one
            # dO slice (dO re-read from L1 below: a K = C product at once would hold the whole dO
            # tile twice more)
            e3 = tl.zeros([BLOCK_P, BJ], tl.float32)
            e5 = tl.zeros([BLOCK_P, BJ], tl.float32)
            e7 = tl.zeros([BLOCK_P, BJ], tl.float32)
            for c0 in range(0, C, BC):
                gc = tl.load(g_base + (c0 + offs_cc)[None, :] * sgc + (h * sgh + w * sgw)[:, None],
                             mask=mask_p[:, None], other=0.0)  # BLOCK_P × BC
                e3 += _mm(gc, tl.load(wg_ptr + c0 * C), PRECISE)
                e5 += _mm(gc, tl.load(wg_ptr + (C + c0) * C), PRECISE)
                e7 += _mm(gc, tl.load(wg_ptr + (2 * C + c0) * C), PRECISE)
            e_out = ((b * (H + 6) + h + 3) * (W + 6) + w + 3)[:, None] * C + offs_j[None, :]
            tl.store(E3 + e_out, _round(e3, E3.dtype.element_ty), mask=mask_p[:, None])
            tl.store(E5 + e_out, _round(e5, E5.dtype.element_ty), mask=mask_p[:, None])
            tl.store(E7 + e_out, _round(e7, E7.dtype.element_ty), mask=mask_p[:, None])
            gt = tl.load(g_base + offs_c[:, None] * sgc + (h * sgh + w * sgw)[None, :],
                         mask=mask_p[None, :], other=0.0)  # C × BLOCK_P
            d_ptr = D + (b * (H * W) + pc)[:, None] * (3 * C) + offs_j[None, :]  # BLOCK_P × BJ
            acc3 += _mm(gt, tl.load(d_ptr), PRECISE)
            acc5 += _mm(gt, tl.load(d_ptr + C), PRECISE)
            acc7 += _mm(gt, tl.load(d_ptr + 2 * C), PRECISE)
            if pid_j == 0:  # one channel block sums dO (a reduction across the pixel lanes)
                gsum += tl.sum(gt.to(tl.float32), 1)

    part = pid * tl.num_programs(2) + b  # (chunk, image) row of the partials
    mp = MP + (part * 3 * C + offs_c[:, None]) * C + offs_j[None, :]
    tl.store(mp, acc3)
    tl.store(mp + C * C, acc5)
    tl.store(mp + 2 * C * C, acc7)
    tl.store(GSP + part * C + offs_c, gsum, mask=(offs_c < C) & (pid_j == 0))


_lmsa_bwd_gram_kernel = _pinned("lmsa.gram", _lmsa_bwd_gram_kernel, _GRAM_TABLE,
                                ["H", "W", "C", "CHUNK_PIX", "PRECISE"])


# With the classifier inside (`lmsa_classifier`; W_c: NCLS × C, dL = ∂L/∂logits, κ a class):
#     dO = W_cᵀ dL,   so   E_k = W̃_kᵀ dO = V_kᵀ dL   with V_k = W_c W̃_k (NCLS × C a sample: the host)
#                          M_k = dO D_kᵀ = W_cᵀ N_k   with N_k = dL D_kᵀ (NCLS × C)
#                          Σ_p dO = W_cᵀ Σ_p dL
#     ∂L/∂W_c = Σ_b Σ_p dL out_pᵀ = Σ_b [Σ_p dL x_pᵀ + (Σ_p dL) βᵀ + Σ_k N_k W̃_kᵀ]   (out = x + β + Σ_k W̃_k D_k)
#     ∂L/∂b_c = Σ_b Σ_p dL
# Every pixel sum there that involves x (N_k, Σ_p dL xᵀ) and the main path of ∂L/∂w_k come from one
# correlation of x with dL, per sample (δ ∈ [−3, 3]², x = 0 outside the image; D_k = DW_k(x)):
#     G[b, δ, κ, j] = Σ_p dL[κ, p] x[j, p + δ]
#     N_k[b, κ, j]  = Σ_p dL[κ, p] Σ_δ w_k[j, δ] x[j, p + δ]  = Σ_{δ in window k} w_k[j, δ] G[b, δ, κ, j]
#     ∂L/∂w_k[j, δ] = Σ_b Σ_p E_k[j, p] x[j, p + δ]           = Σ_b Σ_κ V_k[b, κ, j] G[b, δ, κ, j]
#     Σ_p dL x_pᵀ   = G[b, 0, :, :]
# G's products run on tensor cores with K = pixels and N = NCLS (padded to K_PAD): 49·K_PAD·C
# multiply-adds a pixel, where the plain path's FP32 sweep spends 83·C FMAs on ∂L/∂w_k alone and
# the forward stores D (3C a pixel) and XW (C) for the gram and wgrad kernels. Here the forward
# stores neither: `_lmsa_bwd_dl_head_kernel` sums dL and copies it zero-bordered (DLP),
# `_lmsa_bwd_corr_head_kernel` forms G a window row δr a program and contracts it at once (G never
# in memory); the host forms M_k, Σ_p dO and ∂L/∂W_c from the summed N_k (B × 3 × NCLS × C); dx
# comes from DLP as well (`_lmsa_bwd_dx_head_kernel`, its math above it).
@triton.jit
def _lmsa_bwd_dl_head_kernel(
    DL, SP, DLP,
    slb, slk, slh, slw,
    H, W, NCLS,
    CHUNK_PIX: tl.constexpr, S: tl.constexpr, K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """For the pixels p of chunk `pid` of image b (the math above):
        SP[pid, b, κ]           = Σ_p dL[κ, p]                       (for Σ_p dO, ∂L/∂W_c, ∂L/∂b_c)
        DLP[b, 3 + h, 3 + w, κ] = dL[κ, p], 0 for NCLS ≤ κ < S
    dL: B × NCLS × H × W (strides sl*), x's dtype; SP fp32, chunk-major (`sum_partials` sums it over
    the chunks); DLP: dL channels-last, S values a pixel (`_Pack.stride`), with a zero 3-pixel border
    (B × (H+6) × (W+6) × S, x's dtype: the host zeroes the border), the windowed operand of the
    correlation and dx kernels (no masks at the image's borders). K_PAD ≥ S: the tiles' width."""
    pid = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < NCLS
    dl_sum = tl.zeros([K_PAD], tl.float32)
    for i in range(0, CHUNK_PIX, BLOCK_P):
        if pid * CHUNK_PIX + i < H * W:  # the image's last chunk may end early
            mask_p, pc, h, w = _chunk_pixels(pid, i, H, W, CHUNK_PIX, BLOCK_P)
            dl = tl.load(DL + b * slb + offs_k[None, :] * slk + (h * slh + w * slw)[:, None],
                         mask=mask_p[:, None] & k_ok[None, :], other=0.0)  # BLOCK_P × K_PAD
            dl_sum += tl.sum(dl.to(tl.float32), 0)
            tl.store(DLP + ((b * (H + 6) + h + 3) * (W + 6) + w + 3)[:, None] * S + offs_k[None, :], dl,
                     mask=mask_p[:, None] & (offs_k < S)[None, :])
    tl.store(SP + (pid * tl.num_programs(2) + b) * NCLS + offs_k, dl_sum, mask=k_ok)


_lmsa_bwd_dl_head_kernel = _pinned("lmsa.dl_head", _lmsa_bwd_dl_head_kernel, _DL_HEAD_TABLE,
                                   ["H", "W", "CHUNK_PIX"], lambda named: named["DL"].dtype == torch.float32)


@triton.jit
def _lmsa_bwd_corr_head_kernel(
    X, DLP, V, DW3, DW5, DW7, GS, NP, DWP, XLP,
    sxb, sxc, sxh, sxw,
    H, W, NCLS,
    C: tl.constexpr, CHUNK_ROWS: tl.constexpr, W_CEIL: tl.constexpr, PRECISE: tl.constexpr,
    K_PAD: tl.constexpr, S: tl.constexpr, LEAD: tl.constexpr, TAIL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """G (the math above) of window row δr = pid_dr − 3, channel block pid_j, over the CHUNK_ROWS
    image rows of chunk `pid` of image b (each row W_CEIL / BLOCK_P tiles of BLOCK_P pixels, W_CEIL:
    W rounded up to 128, a multiple of every configured BLOCK_P; pixels past W masked), contracted as
    soon as it is complete (pid_dr, pid_j = divmod(program 0, C/BJ)):
        DWP[b, pid, row_k(δ), j]   = Σ_κ V_k[b][κ, j] G[δ, κ, j]         every scale k whose window holds δ
        NP[pid, pid_dr, b, k, κ, j] = Σ_{δ in row δr of window k} w_k[j, δ] G[δ, κ, j]   (0 outside it)
        XLP[pid, b, κ, j]           = G[0, κ, j]                           (δr = 0's programs)
    The row's seven δc = 3 − u are one fp32 accumulator Gp[j, u·S + κ] = G[(δr, 3 − u), κ, j]
    (BJ × (LEAD + TAIL): channels × the packed window, the products' M × N), each tile adding its x
    (BJ × BLOCK_P, loaded once) times dL's windows: pixel q's is the run of 7·S values of DLP from
    bordered pixel (h − δr + 3, w) (q − δ for the seven δc, S values each; the dx kernel's operand,
    transposed). A tile lies in one row, so its pixels' row and columns need no division; masks only
    past the row's end and the image's last row. Gp's columns group by S, not a power of two: for its
    contractions over u and over κ (`_corr_contract`) the program stores Gp in its own slot of GS and
    reads it back as a BJ × 8 × K_PAD tile (u, κ), where both are plain reductions.
    x: B × C × H × W (strides sx*), x's dtype; DLP: B × (H+6) × (W+6) × S (`_lmsa_bwd_dl_head_kernel`),
    x's dtype; V: B × 3 × NCLS × C, x's dtype; DW3/5/7: the taps tap-major k² × C fp32; GS: one
    C × (LEAD + TAIL) fp32 slot a program (chunk, image, window row). NP, DWP, XLP fp32, chunk-major
    (`sum_partials` sums NP over chunks and rows, DWP over images and chunks, XLP over chunks and
    images; DWP is the wgrad kernel's layout)."""
    BJ: tl.constexpr = min(BLOCK_J, C)  # the configured channel block, clamped to C
    NJ: tl.constexpr = C // BJ
    TAIL_N: tl.constexpr = max(TAIL, 16)  # (the tail's tiles exist only if TAIL > 0)
    pid_dr = tl.program_id(0) // NJ
    pid_j = tl.program_id(0) % NJ
    dr = pid_dr - 3
    pid = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_j = pid_j * BJ + tl.arange(0, BJ)
    n_lead = tl.arange(0, LEAD)
    n_tail = LEAD + tl.arange(0, TAIL_N)
    g = tl.zeros([BJ, LEAD], tl.float32)
    g_tail = tl.zeros([BJ, TAIL_N], tl.float32)
    COLS: tl.constexpr = W_CEIL // BLOCK_P
    for i in range(0, CHUNK_ROWS * COLS):
        h = pid * CHUNK_ROWS + i // COLS
        w = (i % COLS) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (w < W) & (h < H)  # (a chunk's rows past the image, a row's tiles past its end)
        xt = tl.load(X + b * sxb + h * sxh + offs_j[:, None] * sxc + (w * sxw)[None, :], mask=ok[None, :],
                     other=0.0)  # BJ × BLOCK_P
        win = DLP + ((b * (H + 6) + h - dr + 3) * (W + 6) + w)[:, None] * S  # BLOCK_P × 1
        g += _mm(xt, tl.load(win + n_lead[None, :], mask=ok[:, None], other=0.0), PRECISE)
        if TAIL > 0:
            g_tail += _mm(xt, tl.load(win + n_tail[None, :], mask=ok[:, None], other=0.0), PRECISE)
    # the contraction: Gp to this program's slot of GS, then read back as BJ × 8 × K_PAD (window pixel
    # u, class κ: Gp[j, u·S + κ], u < 7, κ < NCLS), where the sums over u and over κ are plain
    # reductions of a 3-D tile (Gp's columns group by S, not a power of two)
    n_img = tl.num_programs(2)
    part = pid * n_img + b  # (chunk, image)
    gs = GS + ((part * 7 + pid_dr) * C + offs_j[:, None]) * (LEAD + TAIL)
    tl.store(gs + n_lead[None, :], g)
    if TAIL > 0:
        tl.store(gs + n_tail[None, :], g_tail)
    tl.debug_barrier()  # (the slot's values come back to other threads of the program)
    u = tl.arange(0, 8)
    k = tl.arange(0, K_PAD)
    live = (u < 7)[None, :, None] & (k < NCLS)[None, None, :]
    g3 = tl.load(gs[:, :, None] + (u * S)[None, :, None] + k[None, None, :], mask=live, other=0.0)  # BJ × 8 × K_PAD
    g0 = tl.sum(tl.where((u == 3)[None, :, None], g3, 0.0), 1)  # G[0] (δc = 0: u = 3)
    tl.store(XLP + (part * NCLS + k[None, :]) * C + offs_j[:, None], g0, mask=(k < NCLS)[None, :] & (dr == 0))
    n_chunks = tl.num_programs(1)
    np_ = NP + ((pid * 7 + pid_dr) * n_img + b) * 3 * (NCLS * C)
    dwp = DWP + (b * n_chunks + pid) * _NT * C
    _corr_contract(g3, u, k, V, DW3, np_, dwp, b, dr, offs_j, NCLS, C, 0, 3, 0)
    _corr_contract(g3, u, k, V, DW5, np_, dwp, b, dr, offs_j, NCLS, C, 1, 5, _ROW0_5)
    _corr_contract(g3, u, k, V, DW7, np_, dwp, b, dr, offs_j, NCLS, C, 2, 7, _ROW0_7)


@triton.jit
def _corr_contract(g3, u, k, V, DWK, np_, dwp, b, dr, offs_j, NCLS, C: tl.constexpr, K_IDX: tl.constexpr,
                   KS: tl.constexpr, ROW0: tl.constexpr):
    """Scale KS's share of the correlation kernel's window row δr (`_lmsa_bwd_corr_head_kernel`;
    g3[j, u, κ] = G[(δr, 3 − u), κ, j]): ∂L/∂w_k's taps on that row (stored where the row lies in the
    window) and N_k's partial (zero where it does not)."""
    HALF: tl.constexpr = KS // 2
    in_win = (dr >= -HALF) & (dr <= HALF)
    tap_row = tl.where(in_win, dr + HALF, 0) * KS  # the row's first tap (0 outside the window: unused)
    col = 3 + HALF - u  # the window column of pixel u (δc + HALF)
    tap_ok = ((col >= 0) & (col < KS))[None, :] & in_win
    v = tl.load(V + ((b * 3 + K_IDX) * NCLS + k[None, :]) * C + offs_j[:, None], mask=(k < NCLS)[None, :],
                other=0.0).to(tl.float32)  # BJ × K_PAD
    tl.store(dwp + (ROW0 + tap_row + col[None, :]) * C + offs_j[:, None], tl.sum(g3 * v[:, None, :], 2), mask=tap_ok)
    wk = tl.load(DWK + (tap_row + col[None, :]) * C + offs_j[:, None], mask=tap_ok, other=0.0)  # BJ × 8
    tl.store(np_ + (K_IDX * NCLS + k[None, :]) * C + offs_j[:, None], tl.sum(g3 * wk[:, :, None], 1),
             mask=(k < NCLS)[None, :])


_lmsa_bwd_corr_head_kernel = _pinned("lmsa.corr_head", _lmsa_bwd_corr_head_kernel, _CORR_HEAD_TABLE,
                                     ["H", "W", "C", "CHUNK_ROWS", "PRECISE"])


@triton.jit
def _wgrad_row(tl_, th_, xl, xh, row_ptr, S: tl.constexpr, KS: tl.constexpr, HALF: tl.constexpr,
               PS: tl.constexpr, PACKED: tl.constexpr):
    """(tl_, th_), one window row's KS tap accumulators of channels m and m + C/2, plus
    Σ_s x[q_s] E[q_s − (·, c − KS//2)] for the S pixels q_s of each strip (xl, xh: their x;
    row_ptr: word pointers at the E row, column ws − KS//2). S + KS − 1 loads feed S·KS taps of
    each channel: position m serves pixel s at tap c = s − m + KS − 1 (compile-time constants)."""
    for m in tl.static_range(S + KS - 1):
        el, eh = _e_pair(row_ptr + m * PS, HALF, PACKED)
        for s in tl.static_range(S):
            if s - m + KS - 1 >= 0 and s - m + KS - 1 < KS:
                tl_ = _add_at(tl_, s - m + KS - 1, xl[s] * el)
                th_ = _add_at(th_, s - m + KS - 1, xh[s] * eh)
    return tl_, th_


@triton.jit
def _wgrad_store(out, tl_, th_, offs_w, KS: tl.constexpr, C: tl.constexpr):
    """The pixel sums of one window row's KS taps into KS consecutive C-wide rows of the partial
    buffer at `out` (channels m and m + C/2)."""
    for c in tl.static_range(KS):
        tl.store(out + c * C + offs_w, tl.sum(tl_[c], 0))
        tl.store(out + c * C + C // 2 + offs_w, tl.sum(th_[c], 0))


@triton.jit
def _lmsa_bwd_wgrad_kernel(
    XW, E3, E5, E7, DWP,
    H, W, WPAD, n_chunks,
    C: tl.constexpr, S3: tl.constexpr, S5: tl.constexpr, S7: tl.constexpr, CHUNK_S: tl.constexpr,
    PACKED: tl.constexpr, STRIP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Main-path ∂L/∂w_k of the scales S3 / S5 / S7 (constexpr flags) for one group of window row
    offsets di (R: the widest scale's half-width; groups g = program_id(0) // NW: g < R − 1 the
    rows ±(R − g), whose x loads two rows share; g ≥ R − 1 the single row di = g − R ∈ {−1, 0, 1})
    and word block pid_w (program_id(0) % NW: channels m and m + C/2 of BW words m), strip chunk
    `pid` of image b,
        DWP[b, pid, ROW0_k + i·k + c, j] = Σ_q x[j, q] E_k[j, q − δ],  δ = (di, c − k//2), i = di + k//2
    (= Σ_p E_k[j, p] x[j, p + δ]) for every scale k of the launch whose window holds the row, from
    the stored, zero-bordered E_k (the gram kernel's), over strips of STRIP horizontally adjacent
    pixels per lane (`_strip_tile`'s order): x (XW, the forward's word-ordered copy, B × (H+1) ×
    WPAD × C, zero past each row and in row H) is loaded once per tile for all the group's taps, and
    each E_k row at a strip's STRIP + k − 1 positions feeds all STRIP·k of its taps. Chunks are
    CHUNK_S strips. Each tap keeps per-thread fp32 partial sums over the whole chunk (the tile loop
    only multiplies and adds); the pixel reduction across threads runs once per tap and chunk, at
    the end. DWP: B × n × 83 × C fp32. Groups: R + 2 (5 for the 7×7 launch: 14, 24, 15, 15 and 15
    taps)."""
    HALF: tl.constexpr = C // 2
    BW: tl.constexpr = min(BLOCK_W, HALF)  # the configured word block, clamped to C/2
    NW: tl.constexpr = HALF // BW
    grp = tl.program_id(0) // NW
    pid_w = tl.program_id(0) % NW
    pid = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_w = pid_w * BW + tl.arange(0, BW)
    R: tl.constexpr = 3 if S7 else (2 if S5 else 1)
    out = DWP + ((b * n_chunks + pid) * 83) * C
    # one tile loop per ring of rows (a uniform branch): the loop a program runs holds only its
    # rows' taps
    if grp >= R - 1:
        _wgrad_sweep(XW, E3, E5, E7, out, offs_w, grp - R, b, H, W, WPAD, pid, C, S3, S5, S7, 1,
                     CHUNK_S, PACKED, STRIP, BLOCK_S, BW)
    elif grp == R - 2:
        _wgrad_sweep(XW, E3, E5, E7, out, offs_w, -2, b, H, W, WPAD, pid, C, S3, S5, S7, 2,
                     CHUNK_S, PACKED, STRIP, BLOCK_S, BW)
    else:
        _wgrad_sweep(XW, E3, E5, E7, out, offs_w, -3, b, H, W, WPAD, pid, C, S3, S5, S7, 3,
                     CHUNK_S, PACKED, STRIP, BLOCK_S, BW)


@triton.jit
def _wgrad_taps(acc, xl, xh, E3, E5, E7, r_pix, offs_w, S3: tl.constexpr, S5: tl.constexpr, S7: tl.constexpr,
                RING: tl.constexpr, S: tl.constexpr, HALF: tl.constexpr, PS: tl.constexpr, PACKED: tl.constexpr):
    """One window row's taps of every scale whose window holds it (RING: the row's |di|, at least
    1) for a tile: acc = (7×7 lo, hi, 5×5 lo, hi, 3×3 lo, hi) tap accumulators, r_pix the bordered
    pixel of each strip's E row at column ws − 3 (the 5×5 and 3×3 rows start one and two further)."""
    a7l, a7h, a5l, a5h, a3l, a3h = acc
    base = r_pix[:, None] * PS + offs_w[None, :]
    if S7:
        a7l, a7h = _wgrad_row(a7l, a7h, xl, xh, _e_words(E7, PACKED) + base, S, 7, HALF, PS, PACKED)
    if S5 and RING <= 2:
        a5l, a5h = _wgrad_row(a5l, a5h, xl, xh, _e_words(E5, PACKED) + base + PS, S, 5, HALF, PS, PACKED)
    if S3 and RING <= 1:
        a3l, a3h = _wgrad_row(a3l, a3h, xl, xh, _e_words(E3, PACKED) + base + 2 * PS, S, 3, HALF, PS, PACKED)
    return a7l, a7h, a5l, a5h, a3l, a3h


@triton.jit
def _wgrad_store_row(out, acc, di, offs_w, S3: tl.constexpr, S5: tl.constexpr, S7: tl.constexpr,
                     RING: tl.constexpr, C: tl.constexpr):
    """The chunk's per-tap sums of window row di (ring RING) into the partial buffer at `out`."""
    a7l, a7h, a5l, a5h, a3l, a3h = acc
    if S7:
        _wgrad_store(out + (_ROW0_7 + (di + 3) * 7) * C, a7l, a7h, offs_w, 7, C)
    if S5 and RING <= 2:
        _wgrad_store(out + (_ROW0_5 + (di + 2) * 5) * C, a5l, a5h, offs_w, 5, C)
    if S3 and RING <= 1:
        _wgrad_store(out + (di + 1) * 3 * C, a3l, a3h, offs_w, 3, C)


@triton.jit
def _wgrad_sweep(XW, E3, E5, E7, out, offs_w, di, b, H, W, WPAD, pid, C: tl.constexpr,
                 S3: tl.constexpr, S5: tl.constexpr, S7: tl.constexpr, RING: tl.constexpr,
                 CHUNK_S: tl.constexpr, PACKED: tl.constexpr, S: tl.constexpr, BLOCK_S: tl.constexpr,
                 BW: tl.constexpr):
    """The tile loop of `_lmsa_bwd_wgrad_kernel` for window row di of ring RING (constexpr: 1 for
    |di| ≤ 1; for RING 2 and 3 the rows di = −RING and +RING together, sharing each tile's x), and
    the scales of the launch whose windows hold it, then the chunk's per-tap sums into the partial
    buffer at `out`."""
    HALF: tl.constexpr = C // 2
    PS: tl.constexpr = HALF if PACKED else C  # E's pixel stride in words
    z = tl.zeros([BLOCK_S, BW], tl.float32)
    up = ((z,) * 7, (z,) * 7, (z,) * 5, (z,) * 5, (z,) * 3, (z,) * 3)  # row di
    down = up  # row −di (RING ≥ 2)
    x_words = _e_words(XW, PACKED) + offs_w[None, :]
    e_img = b * ((H + 6) * (W + 6))  # image b of each bordered E_k, in pixels
    # (h, strip) of the tile's lanes: divided once, then stepped by BLOCK_S = DH·NS + DW strips a
    # tile with one carry (an integer division per lane and tile costs ~30 instructions)
    NS = (W + S - 1) // S
    h, q = _row_col(pid * CHUNK_S + tl.arange(0, BLOCK_S), NS)
    DH = BLOCK_S // NS
    DW = BLOCK_S % NS
    for i in range(0, CHUNK_S, BLOCK_S):
        if pid * CHUNK_S + i < H * NS:  # the image's last chunk may end early
            offs_p = pid * CHUNK_S + i + tl.arange(0, BLOCK_S)
            mask = offs_p < H * NS
            ws = S * q
            hc = tl.minimum(h, H - 1)  # past the image: a valid row for E (its x is 0)
            # x from the forward's word-ordered copy (`_fwd_x`): zero past the row (WPAD is a
            # multiple of S) and in row H, where lanes past the image read, so no masks
            x_row = (b * (H + 1) + tl.where(mask, h, H)) * WPAD + ws
            xl = ()
            xh = ()
            for s in tl.static_range(S):
                xv_lo, xv_hi = _e_pair(x_words + (x_row + s)[:, None] * PS, HALF, PACKED)
                xl = xl + (xv_lo,)
                xh = xh + (xv_hi,)
            # E row hc − di from column ws − 3 (bordered: + 3 each); past the row's end the reads
            # run into the next row or the buffer's zeroed tail, times a zero x
            r_pix = e_img + (hc + 3 - di) * (W + 6) + ws
            up = _wgrad_taps(up, xl, xh, E3, E5, E7, r_pix, offs_w, S3, S5, S7, RING, S, HALF, PS, PACKED)
            if RING >= 2:
                down = _wgrad_taps(down, xl, xh, E3, E5, E7, r_pix - 2 * RING * (W + 6), offs_w, S3, S5, S7, RING,
                                   S, HALF, PS, PACKED)
        h, q = _step_row_col(h, q, DH, DW, NS)
    _wgrad_store_row(out, up, di, offs_w, S3, S5, S7, RING, C)
    if RING >= 2:
        _wgrad_store_row(out, down, -di, offs_w, S3, S5, S7, RING, C)


_lmsa_bwd_wgrad_kernel = _pinned("lmsa.wgrad", _lmsa_bwd_wgrad_kernel, _WGRAD_TABLE,
                                 ["H", "W", "C", "S3", "S5", "S7", "CHUNK_S", "PACKED"], _by_unpacked)


@triton.jit
def _lmsa_bwd_dx_kernel(
    DO, E3, E5, E7, DW3, DW5, DW7, T, DX,
    sgb, sgc, sgh, sgw,
    sdb, sdc, sdh, sdw,
    H, W, TH, TW,
    C: tl.constexpr, PACKED: tl.constexpr, STRIP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dx = dO + Σ_k DW_kᵀ(E_k) + T[cell] for a tile of BLOCK_S strips of STRIP horizontally
    adjacent pixels (one strip a lane, `_strip_tile`, `_dx_strip`) and word block pid_w (channels
    m and m + C/2 of BW words m) of image b.

    E3/5/7 hold E_k = W̃_kᵀ dO as the gram kernel stored them (B × (H+6) × (W+6) × C, zero border:
    bf16 channel pairs when PACKED, else fp32); DW3/5/7 are the depthwise taps (tap-major KS² × C
    fp32, the forward's), read flipped in both axes (tap KS² − 1 − t), so the transposed depthwise
    Σ_δ w[δ] E[q − δ] is a plain, mask-free sweep over E. Reads dO once (no halo), E_k with their
    3-pixel halos (from L1/L2), writes dx once; never reads x. (With the classifier inside,
    `_lmsa_bwd_dx_head_kernel` runs instead.)"""
    HALF: tl.constexpr = C // 2
    BW: tl.constexpr = min(BLOCK_W, HALF)  # the configured word block, clamped to C/2
    pid_w = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h, ws, mask = _strip_tile(tl.program_id(0), H, W, STRIP, BLOCK_S)
    offs_w = pid_w * BW + tl.arange(0, BW)
    # each strip's top-left 7×7 window tap, in bordered pixels (= (h, ws − 3) of the image)
    top = (b * (H + 6) + h) * (W + 6) + ws
    z = tl.zeros([BLOCK_S, BW], tl.float32)
    lo, hi = (z,) * STRIP, (z,) * STRIP
    lo, hi = _dx_scale(lo, hi, E3, DW3, top, offs_w, W, STRIP, 3, C, PACKED)
    lo, hi = _dx_scale(lo, hi, E5, DW5, top, offs_w, W, STRIP, 5, C, PACKED)
    lo, hi = _dx_scale(lo, hi, E7, DW7, top, offs_w, W, STRIP, 7, C, PACKED)
    row_cls = _cell_class(h, H, TH) * 7
    for s in tl.static_range(STRIP):
        w = ws + s
        m = mask & (w < W)
        g_ptr = DO + b * sgb + (h * sgh + w * sgw)[:, None] + offs_w[None, :] * sgc
        g_lo = tl.load(g_ptr, mask=m[:, None], other=0.0).to(tl.float32)
        g_hi = tl.load(g_ptr + HALF * sgc, mask=m[:, None], other=0.0).to(tl.float32)
        _dx_finish(lo[s] + g_lo, hi[s] + g_hi, T, DX, b, h, w, m, row_cls + _cell_class(w, W, TW), offs_w,
                   sdb, sdc, sdh, sdw, C)


@triton.jit
def _dx_scale(lo, hi, E, DWK, top, offs_w, W, S: tl.constexpr, KS: tl.constexpr, C: tl.constexpr,
              PACKED: tl.constexpr):
    """`_dx_strip` for scale KS: its window's top-left tap is a (3 − KS//2) rows and columns in
    from the 7×7 window's (`top`, bordered pixels)."""
    PS: tl.constexpr = C // 2 if PACKED else C  # E's pixel stride in words
    first = top + (3 - KS // 2) * (W + 7)
    return _dx_strip(lo, hi, _e_words(E, PACKED) + first[:, None] * PS + offs_w[None, :], DWK, offs_w,
                     (W + 6) * PS, S, KS, C, PS, PACKED)


@triton.jit
def _dx_finish(dx_lo, dx_hi, T, DX, b, h, w, mask, cell, offs_w, sdb, sdc, sdh, sdw, C: tl.constexpr):
    """dx += T[cell] (the statistics path: the adjoint of the cell sums is a broadcast of T) at pixels
    (h, w) for channels m (dx_lo) and m + C/2 (dx_hi), then the stores (masked lanes: pixels past
    the row or the image)."""
    m2 = mask[:, None]
    t_ptr = T + (b * 49 + cell[:, None]) * C + offs_w[None, :]  # T: B × 49 × C
    d_ptr = DX + b * sdb + (h * sdh + w * sdw)[:, None] + offs_w[None, :] * sdc
    _dx_store(dx_lo, t_ptr, d_ptr, m2, DX)
    _dx_store(dx_hi, t_ptr + C // 2, d_ptr + (C // 2) * sdc, m2, DX)


@triton.jit
def _dx_store(dx, t_ptr, d_ptr, m2, DX):
    dx += tl.load(t_ptr, mask=m2, other=0.0)
    tl.store(d_ptr, _round(dx, DX.dtype.element_ty), mask=m2)


_lmsa_bwd_dx_kernel = _pinned("lmsa.dx", _lmsa_bwd_dx_kernel, _DX_TABLE, ["H", "W", "C", "PACKED"], _by_unpacked)


# The classifier's dx without E_k (the math above `_lmsa_bwd_dl_head_kernel`): with the forward's
# window weights A[b, δ, j, κ] = Σ_k w_k[j, δ] V_k[b, κ, j] + [δ = 0] W_c[κ, j] (`_head_window_weights`)
# the three scales' depthwise adjoints and the residual dO = W_cᵀ dL are one sum of tensor-core
# products over dL shifted by −δ:
#     dO + Σ_k DW_kᵀ(E_k)[j, q] = Σ_κ W_c[κ, j] dL[κ, q] + Σ_k Σ_δ w_k[j, δ] E_k[j, q − δ]
#                               = Σ_δ Σ_κ A[b, δ, j, κ] dL[κ, q − δ]
# (the adjoint of the forward's Σ_δ A[b, δ]ᵀ x[p + δ]): E_k is never formed. For a window row δr the
# seven δc = 3 − u read dL at (h − δr, w − 3 + u), u = 0..6: seven neighbouring pixels of DLP, whose S
# values each lie in one run of 7·S, the order of A's packed row (`_head_window_weights`). So a window
# row is one product with K = 7·S (lead + tail wide: 128 + 16 for 19 classes) instead of seven with
# K = NCLS padded to a power of two (7 × 32): the B operand's columns are overlapping runs of DLP,
# S values apart.
@triton.jit
def _lmsa_bwd_dx_head_kernel(
    DLP, A, T, DX,
    sdb, sdc, sdh, sdw,
    H, W, TH, TW,
    C: tl.constexpr, W_CEIL: tl.constexpr, PRECISE: tl.constexpr, S: tl.constexpr, LEAD: tl.constexpr,
    TAIL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dx[b, j, h, w] for channel block pid_j and BLOCK_R rows × BLOCK_P columns (tile pid: a band
    of rows, a column tile; W_CEIL: W rounded up to 128, a multiple of every configured BLOCK_P):
        Σ_δr Σ_n A[b, δr, j, n] · DLP[b, h − δr + 3, w + n // S, n % S] + T[b, cell(h, w), j]
    (the math above; A's centre holds W_cᵀ: dO). DLP: dL channels-last, S values a pixel,
    zero-bordered (`_lmsa_bwd_dl_head_kernel`), so the windows need a mask only past the row's end or
    the image's last row; A: B × 7 × C × (LEAD + TAIL) (x's dtype, `_head_window_weights`), read once
    a program for its BLOCK_R row tiles; T: B × 49 × C fp32 (the statistics path, `_dx_finish`); DX:
    any strides."""
    BJ: tl.constexpr = min(BLOCK_J, C)  # the configured channel block, clamped to C
    COLS: tl.constexpr = W_CEIL // BLOCK_P
    WIDTH: tl.constexpr = LEAD + TAIL
    h0 = tl.program_id(0) // COLS * BLOCK_R
    w = tl.program_id(0) % COLS * BLOCK_P + tl.arange(0, BLOCK_P)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_j = pid_j * BJ + tl.arange(0, BJ)
    # dL's window for (h0, w) on window row δr = 0: bordered pixels (h0 + 3, w .. w + 6), its run from w's
    win = ((b * (H + 6) + h0 + 3) * (W + 6) + w)[None, :] * S  # 1 × BLOCK_P
    a_row = (b * 7 * C + offs_j[:, None]) * WIDTH  # BJ × 1, δr = −3
    n_lead = tl.arange(0, LEAD)
    n_tail = LEAD + tl.arange(0, max(TAIL, 16))  # (used only if TAIL > 0)
    z = tl.zeros([BJ, BLOCK_P], tl.float32)
    acc = (z,) * BLOCK_R
    for i in range(0, 7):
        on = ((3 - i) * (W + 6)) * S  # window row δr = i − 3 reads dL's row h − δr
        a = tl.load(A + a_row + i * (C * WIDTH) + n_lead[None, :])  # BJ × LEAD
        if TAIL > 0:
            a_tail = tl.load(A + a_row + i * (C * WIDTH) + n_tail[None, :])  # BJ × TAIL
        for r in tl.static_range(BLOCK_R):
            ok = (w < W) & (h0 + r < H)
            at = DLP + win + (r * (W + 6) * S + on)
            d = _mm(a, tl.load(at + n_lead[:, None], mask=ok[None, :], other=0.0), PRECISE)  # LEAD × BLOCK_P
            if TAIL > 0:
                d += _mm(a_tail, tl.load(at + n_tail[:, None], mask=ok[None, :], other=0.0), PRECISE)
            acc = _add_at(acc, r, d)
    for r in tl.static_range(BLOCK_R):
        h = h0 + r
        ok = (w < W) & (h < H)
        cell = _cell(h, w, H, W, TH, TW)
        dx = acc[r] + tl.load(T + (b * 49 + cell[None, :]) * C + offs_j[:, None], mask=ok[None, :], other=0.0)
        tl.store(DX + b * sdb + h * sdh + offs_j[:, None] * sdc + (w * sdw)[None, :], _round(dx, DX.dtype.element_ty),
                 mask=ok[None, :])


_lmsa_bwd_dx_head_kernel = _pinned("lmsa.dx_head", _lmsa_bwd_dx_head_kernel, _DX_HEAD_TABLE,
                                   ["H", "W", "C", "PRECISE"])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# The gate: P (the cell sums) and the parameters → z, β, W̃ (forward); ∂L/∂W̃, ∂L/∂β → T and
# the parameters' gradients (backward). Per sample b (a program each), with HID = 3C / r:
#   g_k = Σ_u cells[u] ∘ on_k[u]             on_k = the weights of the 49 cell sums in GAP(DW_k(x))
#   s_k = pw_k g_k + pb_k                    (C)
#   a1  = fc1w [s_3; s_5; s_7] + fc1b        (HID)      h1 = max(a1, 0)
#   a2  = fc2w h1 + fc2b                     (3C)       z = sigmoid(a2)
#   β   = Σ_k z_k ∘ pb_k,   W̃_k = diag(z_k) pw_k
# Backward, given M = ∂L/∂W̃ and G = ∂L/∂β (the gram kernel's sums):
#   ∂z_k   = rowsum(M_k ∘ pw_k) + G ∘ pb_k               ∂a2 = ∂z ∘ z ∘ (1 − z)
#   ∂a1    = (fc2wᵀ ∂a2) ∘ [a1 > 0]                      ∂s  = fc1wᵀ ∂a1
#   ∂g_k   = pw_kᵀ ∂s_k                                   T[u] = Σ_k ∂g_k ∘ on_k[u]  (= ∂L/∂cells)
# and, summed over the batch (the second kernel: one program a parameter tile, the samples in order):
#   ∂pw_k  = Σ_b M_k ∘ z_k 1ᵀ + ∂s_k g_kᵀ               ∂pb_k = Σ_b G ∘ z_k + ∂s_k
#   ∂fc2w  = Σ_b ∂a2 h1ᵀ, ∂fc2b = Σ_b ∂a2                ∂fc1w = Σ_b ∂a1 sᵀ, ∂fc1b = Σ_b ∂a1
#   ∂on_k  = Σ_b cells ∘ ∂g_k   →  ∂dw_k[c, t] = Σ_u GAP[k·49 + u, row0_k + t] ∂on_k[u, c]
#            (+ the main path's ∂dw_k from the wgrad kernel, added here: one write a gradient)
# STATE (B × (9C + HID_P) fp32) keeps [g | s | z | a1] of each sample for the backward, DSTATE
# [∂a2 | ∂s | ∂g | ∂a1]. fp32 throughout: FMA products and tree sums (the tiny GEMVs are far
# below a tensor-core tile).
@triton.jit
def _by_scale(k, a, b, c):
    """a, b or c for scale index k (0, 1, 2): a runtime choice of pointer."""
    out = c
    if k == 0:
        out = a
    if k == 1:
        out = b
    return out


@triton.jit
def _gate_sample(STATE, HID, C: tl.constexpr, HID_P: tl.constexpr, BLOCK: tl.constexpr):
    """What both per-sample gate kernels start from: the program's sample b, the aranges over the
    channels, a row block and the padded hidden width, the hidden mask, and b's STATE row (9C + HID_P
    fp32: g, s, z, a1)."""
    b = tl.program_id(0)
    offs_h = tl.arange(0, HID_P)
    return (b, tl.arange(0, C), tl.arange(0, BLOCK), offs_h, offs_h < HID, STATE + b * (9 * C + HID_P))


@triton.jit
def _gate_fwd_kernel(
    CELLS, ONC, PW3, PW5, PW7, PB3, PB5, PB7, FC1W, FC1B, FC2W, FC2B, WG, BETA, STATE,
    HID,
    C: tl.constexpr, HID_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """One sample's gate (grid B): z, β, W̃ (in WG's dtype) and its STATE row. Loops, not unrolled
    copies: the unrolled scales and row blocks held every tile at once (255 registers, spilling)."""
    b, offs_c, offs_r, offs_h, hmask, st = _gate_sample(STATE, HID, C, HID_P, BLOCK)
    for k in range(3):  # g_k and s_k
        pw, pb = _by_scale(k, PW3, PW5, PW7), _by_scale(k, PB3, PB5, PB7)
        g = tl.zeros([C], tl.float32)
        for u0 in range(0, 64, 16):  # the 49 cells, 16 a step
            offs_u = u0 + tl.arange(0, 16)
            cell = offs_u[:, None] * C + offs_c[None, :]
            umask = (offs_u < 49)[:, None]
            g += tl.sum(tl.load(CELLS + b * 49 * C + cell, mask=umask, other=0.0)
                        * tl.load(ONC + k * 49 * C + cell, mask=umask, other=0.0), axis=0)
        tl.store(st + k * C + offs_c, g)
        for o0 in range(0, C, BLOCK):
            rows = o0 + offs_r
            w = tl.load(pw + rows[:, None] * C + offs_c[None, :]).to(tl.float32)
            s = tl.sum(w * g[None, :], axis=1) + tl.load(pb + rows).to(tl.float32)
            tl.store(st + 3 * C + k * C + rows, s)
    tl.debug_barrier()  # s, written in row blocks, read back whole
    a1 = tl.load(FC1B + offs_h, mask=hmask, other=0.0).to(tl.float32)
    for k in range(3):
        s = tl.load(st + 3 * C + k * C + offs_c)
        w1 = tl.load(FC1W + offs_h[:, None] * (3 * C) + k * C + offs_c[None, :], mask=hmask[:, None], other=0.0)
        a1 += tl.sum(w1.to(tl.float32) * s[None, :], axis=1)
    tl.store(st + 9 * C + offs_h, a1)
    h1 = tl.maximum(a1, 0.0)
    for o0 in range(0, C, BLOCK):  # z, β and W̃, a row block of every scale
        rows = o0 + offs_r
        beta = tl.zeros([BLOCK], tl.float32)
        for k in range(3):
            pw, pb = _by_scale(k, PW3, PW5, PW7), _by_scale(k, PB3, PB5, PB7)
            w2 = tl.load(FC2W + (k * C + rows)[:, None] * HID + offs_h[None, :], mask=hmask[None, :], other=0.0)
            a2 = tl.sum(w2.to(tl.float32) * h1[None, :], axis=1) + tl.load(FC2B + k * C + rows).to(tl.float32)
            z = 1.0 / (1.0 + tl.exp(-a2))
            tl.store(st + 6 * C + k * C + rows, z)
            beta += z * tl.load(pb + rows).to(tl.float32)
            w = tl.load(pw + rows[:, None] * C + offs_c[None, :]).to(tl.float32)
            tl.store(WG + ((b * 3 + k) * C + rows)[:, None] * C + offs_c[None, :],
                     _round(z[:, None] * w, WG.dtype.element_ty))
        tl.store(BETA + b * C + rows, beta)


@triton.jit
def _gate_bwd_sample_kernel(
    M, GSUM, STATE, ONC, PW3, PW5, PW7, PB3, PB5, PB7, FC1W, FC2W, T, DSTATE,
    HID,
    C: tl.constexpr, HID_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """One sample's gate backward (grid B): T = ∂L/∂cells and its DSTATE row."""
    b, offs_c, offs_r, offs_h, hmask, st = _gate_sample(STATE, HID, C, HID_P, BLOCK)
    dst = DSTATE + b * (9 * C + HID_P)
    dh1 = tl.zeros([HID_P], tl.float32)
    for k in range(3):  # ∂a2, and ∂h1 = fc2wᵀ ∂a2 as it comes
        pw, pb = _by_scale(k, PW3, PW5, PW7), _by_scale(k, PB3, PB5, PB7)
        for o0 in range(0, C, BLOCK):
            rows = o0 + offs_r
            m = tl.load(M + ((b * 3 + k) * C + rows)[:, None] * C + offs_c[None, :])
            w = tl.load(pw + rows[:, None] * C + offs_c[None, :]).to(tl.float32)
            dz = tl.sum(m * w, axis=1) + tl.load(GSUM + b * C + rows) * tl.load(pb + rows).to(tl.float32)
            z = tl.load(st + 6 * C + k * C + rows)
            da2 = dz * z * (1.0 - z)
            tl.store(dst + k * C + rows, da2)
            w2 = tl.load(FC2W + (k * C + rows)[:, None] * HID + offs_h[None, :], mask=hmask[None, :], other=0.0)
            dh1 += tl.sum(w2.to(tl.float32) * da2[:, None], axis=0)
    a1 = tl.load(st + 9 * C + offs_h)
    da1 = tl.where(a1 > 0.0, dh1, 0.0)
    tl.store(dst + 9 * C + offs_h, da1)
    for k in range(3):  # ∂s = fc1wᵀ ∂a1
        w1 = tl.load(FC1W + offs_h[:, None] * (3 * C) + k * C + offs_c[None, :], mask=hmask[:, None], other=0.0)
        tl.store(dst + 3 * C + k * C + offs_c, tl.sum(w1.to(tl.float32) * da1[:, None], axis=0))
    tl.debug_barrier()  # ∂s, written whole, read back in row blocks
    for k in range(3):  # ∂g_k = pw_kᵀ ∂s_k
        pw = _by_scale(k, PW3, PW5, PW7)
        dg = tl.zeros([C], tl.float32)
        for o0 in range(0, C, BLOCK):
            rows = o0 + offs_r
            w = tl.load(pw + rows[:, None] * C + offs_c[None, :]).to(tl.float32)
            dg += tl.sum(w * tl.load(dst + 3 * C + k * C + rows)[:, None], axis=0)
        tl.store(dst + 6 * C + k * C + offs_c, dg)
    tl.debug_barrier()  # ∂g, written in the reductions' layout, read back in another
    dg3 = tl.load(dst + 6 * C + offs_c)[None, :]
    dg5 = tl.load(dst + 7 * C + offs_c)[None, :]
    dg7 = tl.load(dst + 8 * C + offs_c)[None, :]
    for u0 in range(0, 64, 16):  # T = Σ_k ∂g_k ∘ on_k, 16 cells a step
        offs_u = u0 + tl.arange(0, 16)
        cell = offs_u[:, None] * C + offs_c[None, :]
        umask = (offs_u < 49)[:, None]
        t = (tl.load(ONC + cell, mask=umask, other=0.0) * dg3
             + tl.load(ONC + 49 * C + cell, mask=umask, other=0.0) * dg5
             + tl.load(ONC + 2 * 49 * C + cell, mask=umask, other=0.0) * dg7)
        tl.store(T + b * 49 * C + cell, t, mask=umask)


@triton.jit
def _gate_dpw_rows(M, GSUM, STATE, DSTATE, DPW, DPB, k, rows, offs_c, B, C: tl.constexpr, HID_P: tl.constexpr,
                   BLOCK: tl.constexpr):
    """∂pw_k and ∂pb_k for output rows `rows` of scale k, summed over the batch in order."""
    acc = tl.zeros([BLOCK, C], tl.float32)
    dpb = tl.zeros([BLOCK], tl.float32)
    bb = 0
    while bb < B:
        row = bb * (9 * C + HID_P)
        z = tl.load(STATE + row + 6 * C + k * C + rows)
        ds = tl.load(DSTATE + row + 3 * C + k * C + rows)
        g = tl.load(STATE + row + k * C + offs_c)
        m = tl.load(M + ((bb * 3 + k) * C + rows)[:, None] * C + offs_c[None, :])
        acc += m * z[:, None] + ds[:, None] * g[None, :]
        dpb += tl.load(GSUM + bb * C + rows) * z + ds
        bb += 1
    tl.store(DPW + rows[:, None] * C + offs_c[None, :], _round(acc, DPW.dtype.element_ty))
    tl.store(DPB + rows, _round(dpb, DPB.dtype.element_ty))


@triton.jit
def _gate_outer_sum(U, V, u_at, v_at, v_mask, B, ROW: tl.constexpr, RELU_V: tl.constexpr,
                    NU: tl.constexpr, NV: tl.constexpr):
    """(Σ_b u_b v_bᵀ, Σ_b u_b), the batch summed in order: u_b = U[b·ROW + u_at] (NU values) and
    v_b = V[b·ROW + v_at] (NV values, masked by v_mask, through a ReLU if RELU_V): a Linear's weight
    and bias gradients from the per-sample rows of STATE and DSTATE."""
    acc = tl.zeros([NU, NV], tl.float32)
    usum = tl.zeros([NU], tl.float32)
    bb = 0
    while bb < B:
        u = tl.load(U + bb * ROW + u_at)
        v = tl.load(V + bb * ROW + v_at, mask=v_mask, other=0.0)
        if RELU_V:
            v = tl.maximum(v, 0.0)
        acc += u[:, None] * v[None, :]
        usum += u
        bb += 1
    return acc, usum


@triton.jit
def _gate_ddw_cols(CELLS, DSTATE, GAP, DWMAIN, DDW, k, cols, B, C: tl.constexpr, HID_P: tl.constexpr,
                   BLOCK: tl.constexpr):
    """∂dw_k for channels `cols`: the gate's part (∂on_k summed over the batch, taken to the taps
    through GAP's block k) plus the main path's (DWMAIN), written once in the C × k² layout."""
    offs_u = tl.arange(0, 64)
    umask = offs_u < 49
    d_on = tl.zeros([64, BLOCK], tl.float32)
    bb = 0
    while bb < B:
        dg = tl.load(DSTATE + bb * (9 * C + HID_P) + 6 * C + k * C + cols)
        cells = tl.load(CELLS + bb * 49 * C + offs_u[:, None] * C + cols[None, :], mask=umask[:, None], other=0.0)
        d_on += cells * dg[None, :]
        bb += 1
    taps = (2 * k + 3) * (2 * k + 3)                          # k²: 9, 25, 49
    row0 = tl.where(k > 0, 9, 0) + tl.where(k > 1, 25, 0)     # the scale's first of the 83 taps
    t = 0
    while t < taps:  # a tap a step (a [tap × cell] product on the FMA pipe spilled)
        weights = tl.load(GAP + (k * 49 + offs_u) * 83 + row0 + t, mask=umask, other=0.0)
        ddw = tl.sum(weights[:, None] * d_on, axis=0) + tl.load(DWMAIN + (row0 + t) * C + cols)
        tl.store(DDW + cols * taps + t, _round(ddw, DDW.dtype.element_ty))
        t += 1


@triton.jit
def _gate_bwd_params_kernel(
    M, GSUM, STATE, DSTATE, CELLS, GAP, DWMAIN,
    DPW3, DPW5, DPW7, DPB3, DPB5, DPB7, DFC1W, DFC1B, DFC2W, DFC2B, DDW3, DDW5, DDW7,
    B, HID,
    C: tl.constexpr, HID_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gate parameters' gradients (grid 12·C/BLOCK): programs [0, 3n) ∂pw_k, ∂pb_k by row
    block, [3n, 6n) ∂fc2 by row block, [6n, 9n) ∂fc1 by column block, [9n, 12n) ∂dw_k by channel
    block (n = C/BLOCK). Each sums the batch in order: no partials, no atomics."""
    pid = tl.program_id(0)
    n = C // BLOCK
    offs_r = tl.arange(0, BLOCK)
    offs_c = tl.arange(0, C)
    offs_h = tl.arange(0, HID_P)
    role = pid // (3 * n)
    j = pid % (3 * n)
    k = j // n
    if role == 0:
        _gate_dpw_rows(M, GSUM, STATE, DSTATE, _by_scale(k, DPW3, DPW5, DPW7), _by_scale(k, DPB3, DPB5, DPB7), k,
                       (j % n) * BLOCK + offs_r, offs_c, B, C, HID_P, BLOCK)
    elif role == 1:  # ∂fc2w = Σ_b ∂a2 h1ᵀ, ∂fc2b = Σ_b ∂a2, by row block of 3C
        rows = j * BLOCK + offs_r
        hmask = offs_h < HID
        dw, db = _gate_outer_sum(DSTATE, STATE, rows, 9 * C + offs_h, hmask, B, 9 * C + HID_P, True, BLOCK, HID_P)
        tl.store(DFC2W + rows[:, None] * HID + offs_h[None, :], _round(dw, DFC2W.dtype.element_ty), mask=hmask[None, :])
        tl.store(DFC2B + rows, _round(db, DFC2B.dtype.element_ty))
    elif role == 2:  # ∂fc1w = Σ_b ∂a1 sᵀ, ∂fc1b = Σ_b ∂a1 (block 0 writes it), by column block of 3C
        cols = j * BLOCK + offs_r
        hmask = offs_h < HID
        dw, db = _gate_outer_sum(DSTATE, STATE, 9 * C + offs_h, 3 * C + cols, cols < 3 * C, B, 9 * C + HID_P, False,
                                 HID_P, BLOCK)
        tl.store(DFC1W + offs_h[:, None] * (3 * C) + cols[None, :], _round(dw, DFC1W.dtype.element_ty), mask=hmask[:, None])
        tl.store(DFC1B + offs_h, _round(db, DFC1B.dtype.element_ty), mask=hmask & (j == 0))
    else:
        _gate_ddw_cols(CELLS, DSTATE, GAP, DWMAIN, _by_scale(k, DDW3, DDW5, DDW7), k, (j % n) * BLOCK + offs_r, B,
                       C, HID_P, BLOCK)


def _new(shape, device, dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _new_like(x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An output shaped like x (with `channels` channels if given): x's memory format when x is dense
    (NCHW / channels-last), else NCHW."""
    b, c, h, w = x.shape
    c = c if channels is None else channels
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return _new((b, h, w, c), x.device, x.dtype).permute(0, 3, 1, 2)
    return _new((b, c, h, w), x.device, x.dtype)


def _bordered(b: int, h: int, w: int, c: int, device, dtype=torch.float32, tail: int = 0,
              count: int = 1) -> list[torch.Tensor]:
    """`count` buffers of B·(H+6)·(W+6) + tail pixels × C: B images of (H+6) × (W+6) pixels with their
    3-pixel border zeroed (a kernel fills the interior), the zero padding of the depthwise sweeps that
    read it (x from the statistics kernel, E_k from the gram kernel), so their shifted loads need no
    masks; then `tail` zeroed pixels, where a strip sweep's reads past the last row's end land (part
    of the tensor the kernels get, so every access stays inside their arguments). The buffers are
    slices of one allocation, so all their borders and tails take one fill (`_frame_pixels`)."""
    t = _new((count, b * (h + 6) * (w + 6) + tail, c), device, dtype)
    t.index_fill_(1, _frame_pixels(b, h, w, tail, t.device), 0)
    return list(t.unbind(0))


_CONSTANTS: dict[tuple, torch.Tensor] = {}  # what `_constant` built, by (builder, arguments)


def _constant(build, *args) -> torch.Tensor:
    """build(*args), built once a process and cached (the device among `args`): the shapes' constants
    a step asks for every time. A traced value (a fake tensor under torch.compile) is never cached.
    For the meta device (the cost model's trace of the model) the value is built on the CPU and its
    shape moved: the builders' `nonzero` has no meta form."""
    key = (build, *args)
    if key not in _CONSTANTS:
        meta = torch.device("meta")
        value = (build(*(torch.device("cpu") if a == meta else a for a in args)).to(meta) if meta in args
                 else build(*args))
        if isinstance(value, torch._subclasses.fake_tensor.FakeTensor):
            return value
        _CONSTANTS[key] = value
    return _CONSTANTS[key]


def _frame_pixels(b: int, h: int, w: int, tail: int, device) -> torch.Tensor:
    """The pixel indices (int64, on `device`) of the 3-pixel borders of B stacked (H+6) × (W+6)
    images and of the `tail` pixels after them: what `_bordered` zeroes, in one `index_fill_` instead
    of a fill per border strip. Cached (`_constant`)."""
    return _constant(_build_frame_pixels, b, h, w, tail, torch.device(device))


def _build_frame_pixels(b: int, h: int, w: int, tail: int, device) -> torch.Tensor:
    rows = torch.arange(h + 6, device=device)[:, None]
    cols = torch.arange(w + 6, device=device)[None, :]
    edge = (rows < 3) | (rows >= h + 3) | (cols < 3) | (cols >= w + 3)
    one = edge.flatten().nonzero().flatten()
    per_image = (h + 6) * (w + 6)
    images = (torch.arange(b, device=device)[:, None] * per_image + one[None, :]).flatten()
    return torch.cat([images, torch.arange(b * per_image, b * per_image + tail, device=device)])


def _chunk_pix(hw: int, batch: int, per_chunk_programs: int, sms: int | None, max_chunks: int) -> int:
    """Pixels per chunk of the stats / gram kernels (a multiple of _CHUNK_ALIGN): enough chunks for
    about 4 programs per SM, at most `max_chunks` (the partials they write are fp32). Under the
    interpreter (sms None) short chunks, so tests cover several chunks of several tiles."""
    if sms is None:
        return 128
    want = _chunks_wanted(batch, per_chunk_programs, sms, max_chunks)
    return triton.cdiv(triton.cdiv(hw, want), _CHUNK_ALIGN) * _CHUNK_ALIGN


def _chunks_wanted(batch: int, per_chunk_programs: int, sms: int, max_chunks: int) -> int:
    """Chunks an image so that the launch has about 4 programs per SM, between 1 and `max_chunks`."""
    return max(1, min(max_chunks, triton.cdiv(4 * sms, batch * per_chunk_programs)))


def _cell_indicator(n: int, device) -> torch.Tensor:
    """7×7 fp32: [δ + 3, cell class] = 1 where the representative row of the class lies in the
    window of tap offset δ (rows q with 0 ≤ q − δ < n). Built on the device (no host copy). For
    n ≥ 7 the representatives are 0, 1, 2, 3 (the interior's), n − 3, n − 2, n − 1 and the test
    reduces to |δ + 3 − class| ≤ 3, whatever n (a band: 5 tiny ops on a GPU instead of 17)."""
    cls = torch.arange(_CELLS, device=device)
    if n >= _CELLS:
        return ((cls[:, None] - cls[None, :]).abs() <= 3).to(torch.float32)
    delta = cls[:, None] - 3
    return ((cls[None, :] >= delta) & (cls[None, :] < n + delta) & (cls < n)[None, :]).to(torch.float32)


def _gap_taps(h: int, w: int, device) -> torch.Tensor:
    """The 3·49 × 83 fp32 matrix that takes the three scales' depthwise taps (C × 83: the 9, 25 and
    49 taps of each channel, side by side) to their weights on the 49 cell sums: GAP(DW_k(x))[c] =
    Σ_u P[c, u] (G taps[c])[k, u]. Block-diagonal, a block a scale: a tap t of DW_k sits at window
    offset δ(t) of the 7×7 window, and the window sum at offset δ is Σ_u rows[δ_r, u_r] cols[δ_c,
    u_c] P[u] (`_cell_indicator`), so block k is kron(rows, cols)[δ(taps), :]ᵀ ÷ (H·W). Cached
    (`_constant`): it depends on H, W only, and building it is a dozen launches (none once cached)."""
    return _constant(_build_gap_taps, h, w, torch.device(device))


def _build_gap_taps(h: int, w: int, device) -> torch.Tensor:
    rows = _cell_indicator(h, device)
    kron = torch.kron(rows, rows if w == h else _cell_indicator(w, device)) / (h * w)  # [window, cell]
    blocks = []
    for k in KERNEL_SIZES:
        o = (_CELLS - k) // 2
        blocks.append(kron[[(i + o) * _CELLS + j + o for i in range(k) for j in range(k)]].t())
    return torch.block_diag(*blocks)


def _build_constants(b: int, h: int, w: int, device) -> None:
    """Build the constants LMSA caches for inputs of B images of H × W on `device` (`_gap_taps`,
    `_frame_pixels` of the forward and the backward), as a first call would: the cost model's
    capture calls this first, so that a step's count holds none of their one-off launches."""
    _gap_taps(h, w, device)
    for tail in (0, _E_TAIL):
        _frame_pixels(b, h, w, tail, device)


def _cells(P: torch.Tensor) -> torch.Tensor:
    """The cell sums as the gate kernels read them: B × 49 × C fp32 contiguous (P is a view of them)."""
    cells = P.flatten(2).transpose(1, 2)
    return cells if cells.is_contiguous() else cells.contiguous()


def _on_cells(h: int, w: int, dw_flat) -> torch.Tensor:
    """3 × 49 × C fp32: each scale's weights on the 49 cell sums, GAP(DW_k(x))[c] = Σ_u P[c, u]
    on_k[u, c], from the tap-major depthwise weights (`_gap_taps` times the taps: 2 launches)."""
    with autocast_off(dw_flat[0].device.type):
        taps = torch.cat(dw_flat)  # 83 × C
        return (_gap_taps(h, w, taps.device) @ taps).view(len(KERNEL_SIZES), _CELLS * _CELLS, -1)


# the per-sample gate kernels (4 warps predicted 2× slower). The backward at 8 warps spills 4 B on sm_80
# with the launch's specialisation (ptxas holds it to 64 registers; seen once the AOT builds took the
# launch's `attrs`, 2026-12-07); at 16 it does not, and is faster (H100 20.6 → 13.2 µs, A100 32.6 → 29.0)
_GATE_FWD_WARPS = 8
_GATE_BWD_WARPS = 16
_GATE_PARAMS_WARPS = 8  # the gate's parameter kernel


def _dense(params):
    """The parameters as the gate kernels index them (rows dense, unit last stride): the model's are
    already (no copy); another caller's transposed or strided views are copied."""
    return [t if t.is_contiguous() else t.contiguous() for t in params]


def _hid_pad(hid: int) -> int:
    return max(16, triton.next_power_of_2(hid))


def _gate_block(c: int) -> int:
    return min(c, 32)


def _gate_forward(P, onc, params, dtype):
    """(W̃ in `dtype`, β fp32, STATE): `_gate_fwd_kernel`, one program a sample."""
    b, c = P.shape[:2]
    params = _dense(params)
    hid = params[9].shape[0]
    wg = _new((b, len(KERNEL_SIZES), c, c), P.device, dtype)
    beta = _new((b, c), P.device, torch.float32)
    state = _new((b, 9 * c + _hid_pad(hid)), P.device, torch.float32)
    _gate_fwd_kernel[(b,)](_cells(P), onc, *params[3:13], wg, beta, state, hid,
                           C=c, HID_P=_hid_pad(hid), BLOCK=_gate_block(c), num_warps=_GATE_FWD_WARPS, num_stages=1)
    return wg, beta, state


def _gate_backward(m, gsum, state, P, onc, dw_main, params, h, w):
    """(T = ∂L/∂cells as B × 49 × C fp32, the 13 parameters' gradients in their dtypes, the depthwise
    weights' including the main path's `dw_main`): two launches."""
    b, c = P.shape[:2]
    params = _dense(params)
    hid, hid_p, block = params[9].shape[0], _hid_pad(params[9].shape[0]), _gate_block(c)
    cells = _cells(P)
    t_cells = _new((b, _CELLS * _CELLS, c), P.device, torch.float32)
    dstate = _new(state.shape, P.device, torch.float32)
    _gate_bwd_sample_kernel[(b,)](m, gsum, state, onc, *params[3:9], params[9], params[11], t_cells, dstate, hid,
                                  C=c, HID_P=hid_p, BLOCK=block, num_warps=_GATE_BWD_WARPS, num_stages=1)
    grads = [_new(t.shape, t.device, t.dtype) for t in params]
    _gate_bwd_params_kernel[(12 * c // block,)](
        m, gsum, state, dstate, cells, _gap_taps(h, w, P.device), dw_main, *grads[3:13], *grads[0:3], b, hid,
        C=c, HID_P=hid_p, BLOCK=block, num_warps=_GATE_PARAMS_WARPS, num_stages=1)
    return t_cells, grads


def _stats(x: torch.Tensor, precise: bool, bordered: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(P: the cell sums, B × C × 7 × 7 fp32; X̂: x zero-bordered in fp32 for the FP32 depthwise sweeps
    of the plain forward, if `bordered`, else None: the classifier's forward reads x itself)."""
    b, c, h, w = x.shape
    chunk = _chunk_pix(h * w, b, 1, _sm_count(x.device), max_chunks=8)
    n_chunks = triton.cdiv(h * w, chunk)
    sp = _new((b, n_chunks, _CELLS * _CELLS, c), x.device, torch.float32)
    xp = _bordered(b, h, w, c, x.device)[0] if bordered else None
    grid = lambda meta: (c // min(meta["BLOCK_C"], c), n_chunks, b)  # noqa: E731
    _lmsa_stats_kernel[grid](
        x, sp, sp if xp is None else xp, *x.stride(), h, w, min(h, _CELLS), min(w, _CELLS), n_chunks,
        C=c, CHUNK_PIX=chunk, PRECISE=precise, WRITE_XP=bordered)
    cells = sp.sum(1)  # B×49×C, summed in chunk order
    return cells.transpose(1, 2).reshape(b, c, _CELLS, _CELLS), xp


def _dw_flat(dws):
    """Depthwise weights as fp32 tap-major k²×C (per-tap loads of a channel block are contiguous): the
    three transposed copies in one launch (`cast_all`)."""
    return cast_all(torch.float32, *(dw.detach().reshape(dw.shape[0], -1).t() for dw in dws))


class _Kept(NamedTuple):
    """What the forward hands the backward beside the saved tensors (`LMSAFunction` keeps it): the
    depthwise taps tap-major (`_dw_flat`), the cells' weights (`_on_cells`), the gate's STATE and,
    with the classifier, (W_c in x's dtype, V = W_c W̃, A) (`_classifier_weights`,
    `_head_window_weights`; else None). `LMSAFunction` keeps A among its saved tensors instead (the
    kept-memory accounting sees those) and puts it back for the backward."""
    dw_flat: list
    onc: torch.Tensor
    state: torch.Tensor
    head: tuple | None = None


def _k_pad(ncls: int) -> int:
    """The classifier's class count padded for its tensor-core products (N or K ≥ 16)."""
    return max(16, triton.next_power_of_2(ncls))


class _Pack(NamedTuple):
    """How the classifier's backward lays out a window row of NCLS classes (`_window_pack`): dL's
    bordered copy DLP holds `stride` values a pixel (NCLS rounded up to 4: every pixel's row starts
    on 8 bytes), so the 7 pixels of a window row are 7·stride contiguous values, which the kernels
    take as one product operand `lead` + `tail` wide (two tiles of powers of two, `tail` 0 or ≥ 16)."""
    stride: int
    lead: int
    tail: int

    @property
    def width(self) -> int:
        return self.lead + self.tail


def _split_width(n: int) -> tuple[int, int]:
    """(lead, tail): the narrowest lead + tail ≥ n with lead a power of two ≥ 16 and tail 0 or a power
    of two in [16, lead] (140 → 128 + 16; 56 → 64 + 0)."""
    lead = max(16, triton.next_power_of_2(n))
    half = lead // 2
    if half >= 16 and half < n:
        tail = max(16, triton.next_power_of_2(n - half))
        if half + tail < lead:
            return half, tail
    return lead, 0


def _window_pack(ncls: int) -> _Pack:
    """The packed window row of NCLS classes (`_Pack`): 19 classes → 20 a pixel, 140 values, products
    128 + 16 wide (7 shifts × 32 padded classes before: 224)."""
    stride = -(-ncls // 4) * 4
    return _Pack(stride, *_split_width(7 * stride))


def _forward(x, params, precise, keep: bool = False, head=None):
    """(out, P, W̃, D, XW, kept, None) (module docstring), with `keep` a `_Kept` for the backward (else
    None, and the backward builds its contents again). With `head` = (W_c, b_c), the classifier's:
    (β, P, W̃, kept, logits): LMSA's out is never formed, nor D and XW (the classifier's kernels work
    from x itself and the window weights A, `_head_window_weights`), and the
    backward takes β (B × C fp32) in out's place for ∂L/∂W_c; logits B × NCLS × H × W, x's dtype and
    memory format."""
    b, c, h, w = x.shape
    P, xp = _stats(x, precise, bordered=head is None)
    dw_flat = _dw_flat(params[0:3])
    onc = _on_cells(h, w, dw_flat)
    wg, beta, state = _gate_forward(P, onc, params, x.dtype)
    if head is None:
        dsave = _new((b, h, w, 3 * c), x.device, x.dtype)  # DW_k(x) for the gram kernel
        xw = _word_ordered_x(b, h, w, c, x.dtype, x.device)  # x for the wgrad kernel
        out = _new_like(x)
        grid = lambda meta: (triton.cdiv(h * triton.cdiv(w, 2), meta["BLOCK_P"]), b)  # noqa: E731
        _lmsa_fwd_kernel[grid](
            x, xp, wg, beta, *dw_flat, out, dsave, xw, *x.stride(), *out.stride(), h, w, xw.shape[2],
            C=c, PRECISE=precise, PACKED=_word_dtype(x.dtype) == torch.bfloat16)
        kept = _Kept(dw_flat, onc, state) if keep else None
        return out, P, wg, dsave, xw, kept, None
    wc, bc = _dense(head)
    ncls = wc.shape[0]
    wc, v = _classifier_weights(wc, wg)
    pack = _window_pack(ncls)
    a = _head_window_weights(dw_flat, v, wc, pack)
    logits = _new_like(x, ncls)
    # a persistent grid: one Z slot a program (the largest configured tile's)
    n_progs = _fwd_programs(b, h, w, _sm_count(x.device))
    zs = _new((n_progs * _FWD_HEAD_MAX_P, pack.width), x.device, torch.float32)
    _lmsa_fwd_head_kernel[(n_progs,)](
        x, a, wc, bc, beta, zs, logits, *x.stride(), *logits.stride(), h, w, ncls, b, n_progs,
        C=c, PRECISE=precise, K_PAD=_k_pad(ncls), S=pack.stride, LEAD=pack.lead, TAIL=pack.tail)
    kept = _Kept(dw_flat, onc, state, (wc, v, a)) if keep else None
    return beta, P, wg, kept, logits


def _classifier_weights(wc: torch.Tensor, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_c in W̃'s dtype, as autocast's copy would be; V_k = W_c W̃_k: B × 3 × NCLS × C in W̃'s dtype,
    what the forward's GEMM and the backward's E_k product take): two launches."""
    with autocast_off(wg.device.type):
        wc_x = wc.detach().to(wg.dtype)
        return wc_x, torch.matmul(wc_x, wg)


def _word_dtype(dtype: torch.dtype) -> torch.dtype:
    """What E_k and XW are stored in for inputs of `dtype`: bf16 channel pairs ("packed": half the
    bytes, one instruction a value to unpack) for bf16, else fp32 (fp16's range is too small for
    gradients)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _wgrad_groups(rows: int) -> int:
    """Row groups of the wgrad launch whose widest scale has `rows` window rows: ±3, ±2 (where it
    has them), −1, 0, 1 (see `_lmsa_bwd_wgrad_kernel`)."""
    return rows // 2 + 2


def _wgrad_chunk(strips: int, batch: int, c: int, sms: int) -> int:
    """Strips per wgrad chunk on a GPU with `sms` SMs. Programs per chunk: the row groups × C/16
    word blocks (8-word blocks, the pinned configs'); at the model's shape they fill 2.4 waves with
    one chunk per image, so each program sweeps a whole image and its cross-thread tap reductions
    run once."""
    return _chunk_pix(strips, batch, _wgrad_groups(max(WGRAD_SPLIT[0])) * max(1, c // 16), sms, max_chunks=4)


def _corr_rows(h: int, batch: int, c: int, sms: int | None) -> int:
    """Image rows per chunk of the correlation kernel: about 4 programs an SM (7 window rows × C/64
    channel blocks a chunk and image), at most 4 chunks; under the interpreter (sms None) 3, so the
    tests cover several chunks and a short last one."""
    if sms is None:
        return 3
    return triton.cdiv(h, _chunks_wanted(batch, 7 * max(1, c // 64), sms, max_chunks=4))


def _require_words(c: int, *buffers: torch.Tensor) -> None:
    """The packed bf16 buffers (E_k, XW) are read as int32 words, each holding a channel pair: the
    kernels need an even C, a unit channel stride and 4-byte aligned bases (every pixel's row then
    starts on a word). True of the buffers this module allocates; checked at launch (metadata only,
    no sync) so that a change of layout or a view cannot misread them silently."""
    for t in buffers:
        if c % 2 or t.stride(-1) != 1 or t.data_ptr() % 4 or t.element_size() != 2:
            raise RuntimeError(f"lmsa: a packed bf16 buffer {tuple(t.shape)} (strides {t.stride()}, "
                               f"{t.dtype}) is not readable as int32 channel-pair words (C = {c})")


def _word_ordered_x(b: int, h: int, w: int, c: int, dtype, device) -> torch.Tensor:
    """B × (H+1) × WPAD × C for the forward to fill with x as the wgrad kernel's strips read it: bf16
    with the channel halves interleaved (the packed E_k's layout) for bf16 x, else fp32; WPAD = W
    rounded up to the strip, the columns past W and the extra row H zeroed (so the strips need no
    masks)."""
    wpad = triton.cdiv(w, _WGRAD_STRIP) * _WGRAD_STRIP
    t = _new((b, h + 1, wpad, c), device, _word_dtype(dtype))
    t[:, h].zero_()
    if wpad > w:  # (a fill of nothing is no launch on a GPU, but an op all the same)
        t[:, :h, w:].zero_()
    return t


def _backward(x, dsave, xw, g, P, wg, params, precise, kept: _Kept | None = None, head=None):
    """dx and the parameters' gradients. `kept`: the forward's `_Kept`, or None to build the gate
    graph and the tap-major taps again (what the `msf::lmsa_backward` operator does). `head` =
    (β, W_c, b_c): g is the classifier's logits' gradient (x's dtype), β the forward's, and the
    parameters' gradients end with W_c's and b_c's; dsave and xw are then None (the forward stores
    neither: the correlation kernel works from x)."""
    b, c, h, w = x.shape
    dws = params[0:3]
    if kept is None:  # (the operator's backward: the gate's STATE again, W̃ rewritten unused)
        dw_flat = _dw_flat(dws)
        onc = _on_cells(h, w, dw_flat)
        state = _gate_forward(P, onc, params, x.dtype)[2]
    else:
        dw_flat, onc, state, _ = kept
    ncls = 1 if head is None else head[1].shape[0]  # the classifier's classes (1: unused without it)
    sms = _sm_count(x.device)
    # 1. the pixel sums of the gate's backward and of the weights' gradients
    dw_main = _new((_N_TAPS, c), x.device, torch.float32)
    if head is None:
        # the gram kernel: M = ∂L/∂W̃ (B×3×C×C fp32) and Σ_p dO = ∂L/∂β from dO and the stored D, and
        # E_k = W̃_kᵀ dO for the wgrad and dx kernels: channels-last with a zero 3-pixel border, so
        # their shifted reads need no masks (the gram kernel writes the interior); bf16 channel pairs
        # for bf16 inputs (half the bytes of fp32; one instruction a value to unpack), else fp32.
        # One launch, about C/64 channel blocks per chunk: 4 chunks at the model shape
        chunk = _chunk_pix(h * w, b, max(1, c // 64), sms, max_chunks=4)
        n_chunks = triton.cdiv(h * w, chunk)
        packed = _word_dtype(x.dtype) == torch.bfloat16
        ek = _bordered(b, h, w, c, x.device, _word_dtype(x.dtype), _E_TAIL, count=len(KERNEL_SIZES))
        if packed:
            _require_words(c, *ek, xw)
        mp = _new((n_chunks, b, 3, c, c), x.device, torch.float32)
        gsp = _new((n_chunks, b, c), x.device, torch.float32)
        grid = lambda meta: (c // min(meta["BLOCK_J"], c), n_chunks, b)  # noqa: E731
        _lmsa_bwd_gram_kernel[grid](
            dsave, g, wg, mp, gsp, *ek, *g.stride(), h, w, n_chunks,
            C=c, CHUNK_PIX=chunk, PRECISE=precise, PACKED=packed)
        # main-path ∂L/∂w_k from the stored E_k: one program per window row, word block and chunk
        # of pixel strips (under the interpreter, chunks of 32 strips: the tests still cover several)
        strips = h * triton.cdiv(w, _WGRAD_STRIP)
        wchunk = 32 if sms is None else _wgrad_chunk(strips, b, c, sms)
        n_wchunks = triton.cdiv(strips, wchunk)
        dwp = _new((b, n_wchunks, _N_TAPS, c), x.device, torch.float32)
        for scales in WGRAD_SPLIT:
            rows = max(scales)
            groups = _wgrad_groups(rows)
            grid = lambda meta, groups=groups: (groups * (c // 2 // min(meta["BLOCK_W"], c // 2)), n_wchunks, b)  # noqa: E731
            mine = [ek[i] if k in scales else ek[KERNEL_SIZES.index(max(scales))] for i, k in enumerate(KERNEL_SIZES)]
            _lmsa_bwd_wgrad_kernel[grid](
                xw, *mine, dwp, h, w, xw.shape[2], n_wchunks, C=c, S3=3 in scales, S5=5 in scales, S7=7 in scales,
                CHUNK_S=wchunk, PACKED=packed, STRIP=_WGRAD_STRIP)
        m = _new((b, 3, c, c), x.device, torch.float32)
        gsum = _new((b, c), x.device, torch.float32)
        # one launch (each buffer gets its own tile shape: M's few rows in wide tiles, dwp's B·chunks in tall)
        sum_partials((mp.view(n_chunks, -1), m), (gsp.view(n_chunks, -1), gsum), (dwp.view(-1, _N_TAPS * c), dw_main))
    else:  # the classifier inside: the math above `_lmsa_bwd_dl_head_kernel`
        beta, wc, bc = head
        k_pad, pack = _k_pad(ncls), _window_pack(ncls)
        if kept is None or kept.head is None:
            wc_x, v = _classifier_weights(wc, wg)
            a = _head_window_weights(dw_flat, v, wc_x, pack)
        else:
            wc_x, v, a = kept.head
        # dL's sums and its zero-bordered copy DLP (channels-last, S = pack.stride values a pixel): the
        # windowed operand of the correlation and dx kernels, whose last windows run up to a window's
        # width past the last pixel (the zeroed tail)
        chunk = _chunk_pix(h * w, b, 1, sms, max_chunks=16)  # (16 at the model's shape: 4 programs an SM)
        n_chunks = triton.cdiv(h * w, chunk)
        sp = _new((n_chunks, b, ncls), x.device, torch.float32)
        dlp, = _bordered(b, h, w, pack.stride, x.device, x.dtype, tail=triton.cdiv(pack.width, pack.stride))
        _lmsa_bwd_dl_head_kernel[(1, n_chunks, b)](
            g, sp, dlp, *g.stride(), h, w, ncls, CHUNK_PIX=chunk, S=pack.stride, K_PAD=k_pad)
        # G a window row and channel block a program: 7 × C/64 programs a chunk of image rows
        crows = _corr_rows(h, b, c, sms)
        n_cchunks = triton.cdiv(h, crows)
        np_ = _new((n_cchunks * 7, b, 3, ncls, c), x.device, torch.float32)
        dwp = _new((b, n_cchunks, _N_TAPS, c), x.device, torch.float32)
        xlp = _new((n_cchunks * b, ncls, c), x.device, torch.float32)
        gs = _new((n_cchunks * b * 7, c, pack.width), x.device, torch.float32)  # each program's G, for its contraction
        grid = lambda meta: (7 * (c // min(meta["BLOCK_J"], c)), n_cchunks, b)  # noqa: E731
        _lmsa_bwd_corr_head_kernel[grid](
            x, dlp, v, *dw_flat, gs, np_, dwp, xlp, *x.stride(), h, w, ncls,
            C=c, CHUNK_ROWS=crows, W_CEIL=_w_ceil(w), PRECISE=precise, K_PAD=k_pad, S=pack.stride,
            LEAD=pack.lead, TAIL=pack.tail)
        n_sum = _new((b, 3, ncls, c), x.device, torch.float32)
        dl_sum = _new((b, ncls), x.device, torch.float32)
        dl_x = _new((ncls, c), x.device, torch.float32)
        sum_partials((np_.view(n_cchunks * 7, -1), n_sum), (sp.view(n_chunks, -1), dl_sum),
                     (dwp.view(-1, _N_TAPS * c), dw_main), (xlp.view(n_cchunks * b, -1), dl_x))
        with autocast_off(x.device.type):  # fp32, W_c and W̃ as the forward rounded them
            wc32 = wc_x.float()
            m = torch.matmul(wc32.t(), n_sum)  # M_k = W_cᵀ N_k
            gsum = dl_sum @ wc32  # Σ_p dO = W_cᵀ Σ_p dL
            # ∂L/∂W_c = Σ_b [Σ_p dL xᵀ + (Σ_p dL) βᵀ + Σ_k N_k W̃_kᵀ]
            dwc = torch.matmul(n_sum, wg.float().transpose(-1, -2)).sum((0, 1))
            dwc += dl_x
            dwc.addmm_(dl_sum.t(), beta)
        head_grads = [dwc.to(wc.dtype), dl_sum.sum(0).to(bc.dtype)]

    # 2. the gate's backward: the parameters' gradients (the depthwise weights' with dw_main added), and
    # T = ∂L/∂P for the statistics path (B × 49 × C: a pixel's C values contiguous, as dx reads them)
    t_cells, pgrads = _gate_backward(m, gsum, state, P, onc, dw_main, params, h, w)

    # 3. dx, written once
    dx = _new_like(x)
    if head is None:  # from the E_k the gram kernel stored (the dx kernel reads the tap-major taps flipped)
        grid = lambda meta: (triton.cdiv(h * triton.cdiv(w, _DX_STRIP), meta["BLOCK_S"]),  # noqa: E731
                             c // 2 // min(meta["BLOCK_W"], c // 2), b)
        _lmsa_bwd_dx_kernel[grid](
            g, *ek, *dw_flat, t_cells, dx, *g.stride(), *dx.stride(), h, w, min(h, _CELLS), min(w, _CELLS),
            C=c, PACKED=packed, STRIP=_DX_STRIP)
        return dx, pgrads
    grid = lambda meta: (triton.cdiv(h, meta["BLOCK_R"]) * (_w_ceil(w) // meta["BLOCK_P"]),  # noqa: E731
                         c // min(meta["BLOCK_J"], c), b)
    _lmsa_bwd_dx_head_kernel[grid](
        dlp, a, t_cells, dx, *dx.stride(), h, w, min(h, _CELLS), min(w, _CELLS),
        C=c, W_CEIL=_w_ceil(w), PRECISE=precise, S=pack.stride, LEAD=pack.lead, TAIL=pack.tail)
    return dx, [*pgrads, *head_grads]


def _fwd_programs(b: int, h: int, w: int, sms: int | None) -> int:
    """Programs of the classifier's persistent forward (`_lmsa_fwd_head_kernel`: B·H rows of column
    tiles): 2 an SM (the pinned 8-warp tiles' occupancy), or under the interpreter (sms None) 3, so
    the tests cover several tiles a program; never more than the narrowest configured tile's tile
    count (programs past their last tile do nothing)."""
    p = min(cfg.kwargs["BLOCK_P"] for cfg, *_ in _FWD_HEAD_TABLE)
    return min(b * h * (1 if w <= p else triton.cdiv(w, p - 8)), 3 if sms is None else 2 * sms)


def _w_ceil(w: int) -> int:
    """W rounded up to 128: the head kernels' row of column tiles (every configured BLOCK_P divides
    128, so the pinned one's tiles cover the row whatever it is; tiles past W do nothing)."""
    return triton.cdiv(w, 128) * 128


def _head_window_weights(dw_flat, v: torch.Tensor, wc: torch.Tensor, pack: _Pack) -> torch.Tensor:
    """A[b, δ, j, κ] = Σ_k w_k[j, δ] V_k[b, κ, j] + [δ = 0] W_c[κ, j] (w_k[δ] = 0 outside window k), the
    per-sample weights of the classifier's forward (`_lmsa_fwd_head_kernel`) and dx
    (`_lmsa_bwd_dx_head_kernel`) kernels, packed by window rows: (B·7·C + 1) × pack.width in V's dtype
    (B × 7 × C × width, then a zero row: the forward's reads of the last row's u = 6 run past it),
    A[b, δr + 3, j, u·S + κ] = A[b, (δr, 3 − u), j, κ] for the window's u = 0..6 (S = pack.stride),
    0 for κ ≥ NCLS and past 7·S: a window row's classes in the order DLP holds the pixels (δc = 3 at
    the left). The taps are placed in the 7×7 window by one product with a constant 0/1 matrix
    (`_window_taps`, rows in that order), summed over the scales in fp32 by one einsum, W_c added at
    the window's centre, rounded to V's dtype as they are copied into the zero-padded layout."""
    b, _, ncls, c = v.shape
    with autocast_off(v.device.type):
        w49 = (_window_taps(v.device) @ torch.cat(dw_flat)).view(len(KERNEL_SIZES), 7, 7, c)
        a = torch.einsum("sruj,bskj->brjuk", w49, v.float())  # B × 7 × C × 7 × NCLS
        a[:, 3, :, 3] += wc.float().t()  # δ = (0, 0): δr + 3 = 3, u = 3
        # (B·7·C + 1) × width: a zero row after the last, where the forward's last K_PAD-wide reads end
        out = torch.zeros(b * 7 * c + 1, pack.width, device=v.device, dtype=v.dtype)
        out[:-1].view(b, 7, c, pack.width)[..., :7 * pack.stride].view(
            b, 7, c, 7, pack.stride)[..., :ncls] = a
        return out


def _window_taps(device) -> torch.Tensor:
    """(3·49) × 83 fp32, 1 where window position δ of scale k takes tap t of the tap-major taps
    (`_dw_flat`, concatenated), the rows of a scale in window rows δr, then u = 3 − δc (the packed
    window's order, `_head_window_weights`): cached (`_constant`)."""
    return _constant(_build_window_taps, torch.device(device))


def _build_window_taps(device) -> torch.Tensor:
    s = torch.zeros(len(KERNEL_SIZES) * 49, _N_TAPS, device=device)
    for i, (k, row0) in enumerate(zip(KERNEL_SIZES, _TAP_ROW0)):
        half = k // 2
        for r in range(k):
            for col in range(k):
                s[i * 49 + (r - half + 3) * 7 + 3 - (col - half), row0 + r * k + col] = 1.0
    return s


_N_PARAMS = 13  # LMSA's parameter tensors (`LMSAFunction`)


class LMSAFunction(torch.autograd.Function):
    """LMSA with the fused Triton kernels. Inputs: x, then the 13 parameter tensors in the order
    dw_3, dw_5, dw_7, pw_3, pw_5, pw_7, pb_3, pb_5, pb_7, fc1_w, fc1_b, fc2_w, fc2_b, and optionally
    the classifier's W_c (NCLS × C) and b_c (`lmsa_classifier`: the output is then its logits).
    Saves x, the cell sums P (B×C×49 fp32) and W̃ (B×3×C×C); without the classifier also the
    depthwise outputs D (B×H×W×3C in x's dtype: what the forward's GEMM multiplied, so the
    backward's gram kernel needs no depthwise sweep) and x in the wgrad kernel's word order (XW),
    with it β (B×C fp32, for ∂L/∂W_c) and neither D nor XW (the correlation kernel works from x);
    never f_k, nor with the classifier LMSA's output."""

    @staticmethod
    def forward(ctx, x, *params):
        precise = x.dtype == torch.float32
        params, head = params[:_N_PARAMS], params[_N_PARAMS:] or None
        if head is None:
            out, P, wg, dsave, xw, kept, _ = _forward(x, params, precise, keep=True)
            ctx.save_for_backward(x, dsave, xw, P, wg, *params)
        else:  # (the window weights A, 12.8 MB at the model's shape, saved as a tensor: counted as kept memory)
            beta, P, wg, kept, logits = _forward(x, params, precise, keep=True, head=head)
            ctx.save_for_backward(x, None, None, P, wg, *params, beta, *head, kept.head[2])
            kept = kept._replace(head=kept.head[:2])
        ctx.precise = precise
        ctx.kept = kept  # the gate graph (tiny: B×C×7×7 and smaller) and the taps: not built again
        return out if head is None else logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, dsave, xw, P, wg, *params = ctx.saved_tensors
        params, head = params[:_N_PARAMS], params[_N_PARAMS:] or None
        kept = ctx.kept
        if head is not None:  # β, W_c, b_c, A
            head, kept = head[:3], kept._replace(head=(*kept.head, head[3]))
        g = grad_out if grad_out.dtype == x.dtype else grad_out.to(x.dtype)
        dx, pgrads = _backward(x, dsave, xw, g, P, wg, params, ctx.precise, kept, head)
        ctx.kept = None
        return (dx, *pgrads)


def _check(x: torch.Tensor, p: LMSAParams) -> None:
    if x.dim() != 4:
        raise ValueError(f"lmsa: x must be B×C×H×W, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if c < 16 or c & (c - 1):
        raise ValueError(f"lmsa: the fused kernels need C a power of two ≥ 16, got C = {c}")
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"lmsa: empty input {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"lmsa: x must be fp32 / bf16 / fp16, got {x.dtype}")
    if len(p.dw_weights) != 3 or tuple(t.shape for t in p.dw_weights) != tuple((c, 1, k, k) for k in KERNEL_SIZES):
        raise ValueError(f"lmsa: the fused kernels need depthwise weights C×1×k×k for k = {KERNEL_SIZES}, got "
                         f"{[tuple(t.shape) for t in p.dw_weights]}")
    if len(p.pw_weights) != 3 or any(t.shape != (c, c) for t in p.pw_weights) or len(p.pw_biases) != 3 \
            or any(t.shape != (c,) for t in p.pw_biases):
        raise ValueError("lmsa: pointwise weights must be three C×C matrices and three C biases")
    hid = p.fc1_weight.shape[0] if p.fc1_weight.dim() == 2 else -1
    if (p.fc1_weight.dim() != 2 or p.fc1_weight.shape[1] != 3 * c or tuple(p.fc2_weight.shape) != (3 * c, hid)
            or tuple(p.fc1_bias.shape) != (hid,) or tuple(p.fc2_bias.shape) != (3 * c,)):
        raise ValueError(f"lmsa: SE weights must map 3C = {3 * c} → r → 3C (fc1 r×3C + r, fc2 3C×r + 3C), got "
                         f"{[tuple(t.shape) for t in (p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias)]}")
    tensors = [*p.dw_weights, *p.pw_weights, *p.pw_biases, p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias]
    if any(t.device != x.device for t in tensors):
        raise ValueError("lmsa: x and the parameters are on different devices")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("lmsa: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _params_of(p: LMSAParams) -> list[torch.Tensor]:
    """The 13 parameter tensors in `LMSAFunction`'s order."""
    return [*p.dw_weights, *p.pw_weights, *p.pw_biases, p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias]


MAX_CLASSES = 36  # the classifier's NCLS: a packed window row (`_window_pack`) at most 256 wide (7 × 36)


def _check_classifier(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    c = x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != c or not 1 <= weight.shape[0] <= MAX_CLASSES:
        raise ValueError(f"lmsa_classifier: weight must be NCLS × C with C = {c} and 1 ≤ NCLS ≤ {MAX_CLASSES}, "
                         f"got {tuple(weight.shape)}")
    if bias is None or tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"lmsa_classifier: bias must be a tensor of NCLS = {weight.shape[0]} elements, got "
                         f"{None if bias is None else tuple(bias.shape)}")
    if weight.device != x.device or bias.device != x.device:
        raise ValueError("lmsa_classifier: x and the classifier's weight and bias are on different devices")
    if weight.dtype not in DTYPES or bias.dtype not in DTYPES:
        raise TypeError(f"lmsa_classifier: weight and bias must be fp32 / bf16 / fp16, got {weight.dtype}, "
                        f"{bias.dtype}")


def lmsa(x: torch.Tensor, p: LMSAParams) -> torch.Tensor:
    """Fused LMSA (`msf.backend.eager_lmsa`) for x: B×C×H×W (any strides), fp32 / bf16 / fp16.

    The parameters may have another dtype than x (fp32 master weights under autocast): the gate
    runs in fp32, the kernels in x's dtype, each gradient comes back in its input's dtype."""
    _check(x, p)
    return LMSAFunction.apply(x, *_params_of(p))


def lmsa_classifier(x: torch.Tensor, p: LMSAParams, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The classifier (a 1×1 convolution, weight NCLS × C, bias NCLS) on LMSA's output, fused
    (`msf.reference.eager_lmsa_classifier`): B×NCLS×H×W logits in x's dtype and memory format. The
    forward kernel writes the logits only (LMSA's output is never formed: its GEMM takes W_c W̃);
    the backward works from the logits' gradient tile by tile, never forming ∂L/∂out in memory
    (docs/lmsa.md). W_c and b_c are rounded to x's dtype (autocast's copies); their gradients come
    back in their own dtypes."""
    _check(x, p)
    _check_classifier(x, weight, bias)
    return LMSAFunction.apply(x, *_params_of(p), weight, bias)


# ----------------------------------------------------------------------------------------------
# ahead-of-time builds (python -m msf.profiling.report): every kernel × dtype × config at the model's
# shape (B = 32, C = 128, 128×128 on an H100: the chunk lengths below are what the host picks there)
# ----------------------------------------------------------------------------------------------
_AOT_C = 128
_AOT_HW = 128
_AOT_DTYPES = {"bf16": False, "fp32": True}
_AOT_CLASSES = 19


# the integer arguments that are not multiples of 16 at the model's shape (19 classes: the logits'
# pixel stride too; 7 cell rows and columns; 4-8 chunks): every other pointer and integer is, and
# Triton's launcher marks those `tt.divisibility = 16` (the AOT builds then vectorise as the GPU's do)
_AOT_NOT_DIVISIBLE = frozenset({"NCLS", "slw", "TH", "TW", "n_chunks"})


def _aot_attrs(jit_fn, signature: dict, not_divisible=()) -> dict:
    return divisibility_attrs(jit_fn, signature, _AOT_NOT_DIVISIBLE | set(not_divisible))


def _aot_specs() -> tuple[list[AotSpec], list[AotSpec]]:
    """(AOT_SPECS, AOT_SPECS_SLOW): every (kernel, dtype, config) of the config lists. The wgrad
    kernel's unrolled strip sweeps take ptxas ~35-50 s a build, so only its first (pinned) config
    is in CI's set; the others are slow builds (`python -m msf.profiling.report` without --skip-slow)."""
    specs: list[AotSpec] = []
    slow: list[AotSpec] = []
    hw = _AOT_HW * _AOT_HW
    stats_chunk = _chunk_pix(hw, 32, 1, 132, max_chunks=8)
    gram_chunk = _chunk_pix(hw, 32, _AOT_C // 64, 132, max_chunks=4)
    corr_rows = _corr_rows(_AOT_HW, 32, _AOT_C, 132)
    dl_chunk = _chunk_pix(hw, 32, 1, 132, max_chunks=16)
    wgrad_chunk = _wgrad_chunk(hw // _WGRAD_STRIP, 32, _AOT_C, 132)  # chunks of strips
    pack = _window_pack(_AOT_CLASSES)
    for dname, precise in _AOT_DTYPES.items():
        dt = f"*{dname}"
        packed = dname == "bf16"
        et = "*bf16" if packed else "*fp32"  # E_k and XW: bf16 channel pairs for bf16 inputs
        wgrads = tuple(("wgrad" + "".join(map(str, sc)), _lmsa_bwd_wgrad_kernel, _WGRAD_TABLE,
                        {"XW": et, "E3": et, "E5": et, "E7": et, "DWP": "*fp32"},
                        ["H", "W", "WPAD", "n_chunks"], {"CHUNK_S": wgrad_chunk, "S3": 3 in sc, "S5": 5 in sc, "S7": 7 in sc,
                                                 "PACKED": packed, "STRIP": _WGRAD_STRIP})
                       for sc in WGRAD_SPLIT)
        kernels = wgrads + tuple(  # with X̂ in fp32 (the plain forward's) and without (the classifier's)
            ("stats" if write else "stats_nox", _lmsa_stats_kernel, _STATS_TABLE,
             {"X": dt, "SP": "*fp32", "XP": "*fp32"}, ["H", "W", "TH", "TW", "n_chunks"],
             {"CHUNK_PIX": stats_chunk, "WRITE_XP": write})
            for write in (True, False)
        ) + (
            ("fwd", _lmsa_fwd_kernel, _FWD_TABLE,
             {"X": dt, "XP": "*fp32", "WG": dt, "BIAS": "*fp32", "DW3": "*fp32", "DW5": "*fp32", "DW7": "*fp32",
              "OUT": dt, "D": dt, "XW": et},
             ["H", "W", "WPAD"], {"PACKED": packed}),
            ("fwd_head", _lmsa_fwd_head_kernel, _FWD_HEAD_TABLE,  # (the model's 19 classes)
             {"X": dt, "A": dt, "WC": dt, "BC": "*fp32", "BIAS": "*fp32", "ZS": "*fp32", "LOGITS": dt},
             ["H", "W", "NCLS", "n_img", "n_progs"], {"K_PAD": _k_pad(_AOT_CLASSES), "S": pack.stride,
                                                      "LEAD": pack.lead, "TAIL": pack.tail}),
        ) + (
            ("gram", _lmsa_bwd_gram_kernel, _GRAM_TABLE,
             {"D": dt, "DO": dt, "WG": dt, "MP": "*fp32", "GSP": "*fp32", "E3": et, "E5": et, "E7": et},
             ["H", "W", "n_chunks"], {"CHUNK_PIX": gram_chunk, "PACKED": packed}),
            ("dl_head", _lmsa_bwd_dl_head_kernel, _DL_HEAD_TABLE,
             {"DL": dt, "SP": "*fp32", "DLP": dt}, ["H", "W", "NCLS"],
             {"CHUNK_PIX": dl_chunk, "K_PAD": _k_pad(_AOT_CLASSES), "S": pack.stride}),
            ("corr_head", _lmsa_bwd_corr_head_kernel, _CORR_HEAD_TABLE,
             {"X": dt, "DLP": dt, "V": dt, "DW3": "*fp32", "DW5": "*fp32", "DW7": "*fp32", "GS": "*fp32",
              "NP": "*fp32", "DWP": "*fp32", "XLP": "*fp32"},
             ["H", "W", "NCLS"], {"CHUNK_ROWS": corr_rows, "W_CEIL": _w_ceil(_AOT_HW), "K_PAD": _k_pad(_AOT_CLASSES),
                                  "S": pack.stride, "LEAD": pack.lead, "TAIL": pack.tail}),
            ("dx", _lmsa_bwd_dx_kernel, _DX_TABLE,
             {"DO": dt, "E3": et, "E5": et, "E7": et, "DW3": "*fp32", "DW5": "*fp32", "DW7": "*fp32", "T": "*fp32",
              "DX": dt},
             ["H", "W", "TH", "TW"], {"PACKED": packed, "STRIP": _DX_STRIP}),
            ("dx_head", _lmsa_bwd_dx_head_kernel, _DX_HEAD_TABLE,
             {"DLP": dt, "A": dt, "T": "*fp32", "DX": dt},
             ["H", "W", "TH", "TW"], {"W_CEIL": _w_ceil(_AOT_HW), "S": pack.stride, "LEAD": pack.lead,
                                      "TAIL": pack.tail}),
        )
        for name, fn, table, ptrs, ints, extra in kernels:
            jit_fn = fn.fn  # the JITFunction under the pinned-config wrapper
            for i, (cfg, serves, *only) in enumerate(table):
                cls = _shape_class({"PRECISE": precise}, _by_precise)
                if cls not in serves:
                    continue
                sig, unit = {}, {}
                for a in jit_fn.arg_names:
                    if a in ptrs:
                        sig[a] = ptrs[a]
                    elif a in ("sxc", "soc", "sgc", "slk", "sdc"):
                        unit[a] = 1  # channels-last (NHWC): the channel stride is 1 (the model's
                        # decoder output is token-major B×N×C, i.e. channels-last; its logits too)
                    elif a.startswith("s") and len(a) == 3 or a in ints:
                        sig[a] = "i32"
                const = {**({"C": _AOT_C} if "C" in jit_fn.arg_names else {}), **extra, **cfg.kwargs, **unit}
                attrs = _aot_attrs(jit_fn, sig)
                if "PRECISE" in jit_fn.arg_names:
                    const["PRECISE"] = precise
                tag = "_".join(f"{k.split('_')[-1].lower()}{v}" for k, v in cfg.kwargs.items())
                spec = AotSpec(name=f"lmsa.{name}_{dname}_{tag}_w{cfg.num_warps}_s{cfg.num_stages}",
                               fn=jit_fn, signature=sig, constexprs=const,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages, attrs=attrs,
                               archs=tuple(only[0]) if only else ())
                (slow if name.startswith("wgrad") and i > 0 else specs).append(spec)
    # the gate's kernels: fp32 state and master weights; W̃ in x's dtype
    hid = 3 * _AOT_C // 8  # the model's SE reduction
    gate = {"C": _AOT_C, "HID_P": _hid_pad(hid), "BLOCK": _gate_block(_AOT_C)}
    for fn, warps, wg_dtypes in ((_gate_fwd_kernel, _GATE_FWD_WARPS, list(_AOT_DTYPES)),
                                 (_gate_bwd_sample_kernel, _GATE_BWD_WARPS, ["fp32"]),
                                 (_gate_bwd_params_kernel, _GATE_PARAMS_WARPS, ["fp32"])):
        for dname in wg_dtypes:  # (only the forward has a WG)
            sig = {a: "i32" if a in ("HID", "B") else ("*" + dname if a == "WG" else "*fp32")
                   for a in fn.arg_names if a not in gate}
            specs.append(AotSpec(name=f"lmsa.{fn.__name__.strip('_')}_{dname}", fn=fn, signature=sig,
                                 constexprs=dict(gate), num_warps=warps, num_stages=1, attrs=_aot_attrs(fn, sig)))
    return specs, slow


AOT_SPECS, AOT_SPECS_SLOW = _aot_specs()
