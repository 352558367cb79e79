"""Up to four tensors copied into new dense tensors of one dtype, in one launch.

    out_i = src_i.to(dtype), laid out densely in src_i's dimension order     src_i: ≤ 4 dims, any strides

Under autocast the fused ops take their weight matrices in the compute dtype, cast once a forward
and saved for the backward (`attention_sublayer.compute_weights`, `attention_block.compute_weights`,
the FFN sublayer's): W_sr in its channels-last order (C×R²×C), W_kv, wq, wo, w1, w2. As torch ops that is a
launch a tensor (`.to`, `copy_`), each a few µs of GPU time for a few hundred KB; here the tensors
of one call share one launch (docs/casts.md).

Kernel `_cast_kernel`: a 1-D grid, ⌈numel_i / BLOCK⌉ programs a tensor, tensor after tensor (as
`partial_sums`); a program maps its BLOCK output elements to their source offsets through the
source's sizes and strides (4-D, leading sizes 1 for fewer dims), loads, rounds to the output
dtype (to nearest even, as `.to` does; under the interpreter too, `_common._round`) and
stores. The sources share a dtype (the fp32 masters), so one build serves a call.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from msf.kernels._common import INTERPRET, _round
from msf.precision import step_copy

__all__ = ["cast_all", "MAX_TENSORS", "AOT_SPECS"]

MAX_TENSORS = 4
_BLOCK = 1024  # elements a program: 8 a thread at 4 warps
_WARPS = 4


@triton.jit
def _cast_kernel(
    S0, S1, S2, S3, D0, D1, D2, D3,
    N0, A0, B0, C0, T00, T01, T02, T03,
    N1, A1, B1, C1, T10, T11, T12, T13,
    N2, A2, B2, C2, T20, T21, T22, T23,
    N3, A3, B3, C3, T30, T31, T32, T33,
    END0, END1, END2,
    BLOCK: tl.constexpr,
):
    """D_i[e] = S_i[source offset of e] in D_i's dtype, for the BLOCK elements of program pid's tensor:
    programs [0, END0) copy tensor 0, [END0, END1) tensor 1, [END1, END2) tensor 2, the rest tensor 3.
    Tensor i: N_i elements, sizes (·, A_i, B_i, C_i) (the leading size implied), source strides
    T_i0..T_i3 in elements; D_i dense."""
    pid = tl.program_id(0)
    src, dst, n, a, b, c, t0, t1, t2, t3, first = S3, D3, N3, A3, B3, C3, T30, T31, T32, T33, END2
    if pid < END2:
        src, dst, n, a, b, c, t0, t1, t2, t3, first = S2, D2, N2, A2, B2, C2, T20, T21, T22, T23, END1
    if pid < END1:
        src, dst, n, a, b, c, t0, t1, t2, t3, first = S1, D1, N1, A1, B1, C1, T10, T11, T12, T13, END0
    if pid < END0:
        src, dst, n, a, b, c, t0, t1, t2, t3, first = S0, D0, N0, A0, B0, C0, T00, T01, T02, T03, 0
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    i3 = offs % c
    rest = offs // c
    i2 = rest % b
    rest = rest // b
    i1 = rest % a
    i0 = rest // a
    v = tl.load(src + (i0.to(tl.int64) * t0 + i1.to(tl.int64) * t1 + i2.to(tl.int64) * t2 + i3.to(tl.int64) * t3),
                mask=mask)
    tl.store(dst + offs, _round(v, dst.dtype.element_ty), mask=mask)


def _as_4d(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """(sizes, strides) of t with leading size-1 dimensions added up to 4 (a 0-dim tensor: one element)."""
    pad = 4 - t.dim()
    return [1] * pad + list(t.shape), [0] * pad + list(t.stride())


def _kernel_device(t: torch.Tensor) -> bool:
    """Whether the kernel can run on t's device: CUDA, or any under the interpreter (the cost model's
    capture, which records launches without running them, replaces this)."""
    return t.device.type == "cuda" or INTERPRET


def _served(dtype: torch.dtype, todo: list[torch.Tensor]) -> bool:
    """Whether the kernel casts these: at most four tensors of one floating dtype and ≤ 4 dims, on one
    device the kernel runs on, each under 2³¹ elements."""
    return (0 < len(todo) <= MAX_TENSORS and len({t.dtype for t in todo}) == 1 and todo[0].is_floating_point()
            and dtype.is_floating_point and all(t.dim() <= 4 and t.numel() < 2 ** 31 for t in todo)
            and len({t.device for t in todo}) == 1 and _kernel_device(todo[0]))


def cast_all(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor as a dense tensor of `dtype` (its shape; a permuted view comes out dense in the
    view's dimension order), the ones that need a copy in one launch; tensors already dense in
    `dtype` come back as they are, None as None, and tensors whose dense copy the step has made
    already (`msf.precision.step_weight_copies`) as that copy. More than four to copy, sources of
    several dtypes, or CPU tensors without the interpreter: one `.to` / `copy_` a tensor instead."""
    lent = {id(t): c for t in tensors if t is not None and (c := step_copy(t, dtype)) is not None and c.is_contiguous()}
    todo = [t for t in tensors if t is not None and id(t) not in lent and (t.dtype != dtype or not t.is_contiguous())]
    outs = {id(t): torch.empty(t.shape, device=t.device, dtype=dtype) for t in todo}
    if todo and not _served(dtype, todo):
        for t in todo:
            outs[id(t)].copy_(t)
    elif todo:
        spare = MAX_TENSORS - len(todo)  # unused slots: the last tensor's pointers, no programs
        dsts = [outs[id(t)] for t in todo]
        srcs, dsts = todo + todo[-1:] * spare, dsts + dsts[-1:] * spare
        meta = []
        for t in todo:
            sizes, strides = _as_4d(t)
            meta += [t.numel(), *sizes[1:], *strides]
        meta += [0, 1, 1, 1, 0, 0, 0, 0] * spare
        ends = list(itertools.accumulate(triton.cdiv(t.numel(), _BLOCK) for t in todo))
        ends += ends[-1:] * spare
        if ends[-1]:  # (all empty: nothing to copy)
            _cast_kernel[(ends[-1],)](*srcs, *dsts, *meta, *ends[:3], BLOCK=_BLOCK, num_warps=_WARPS)
    return [None if t is None else lent.get(id(t), outs.get(id(t), t)) for t in tensors]


def _aot_specs() -> list:
    from msf.kernels.attention import _aot_spec
    specs = []
    for out in ("bf16", "fp16"):  # the fp32 masters to autocast's dtypes
        ptrs = {**{f"S{i}": "*fp32" for i in range(MAX_TENSORS)}, **{f"D{i}": f"*{out}" for i in range(MAX_TENSORS)}}
        specs.append(_aot_spec(f"casts.fp32_to_{out}", _cast_kernel, ptrs, {"BLOCK": _BLOCK}, _WARPS, 3))
    return specs


AOT_SPECS = _aot_specs()  # `python -m msf.profiling.report --module msf.kernels.casts`
