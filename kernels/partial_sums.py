"""Fixed-order sums of fp32 partial-row buffers, up to four buffers in one launch.

Every fused backward writes its parameter gradients as per-program fp32 partial rows (no atomics)
and sums the rows afterwards:

    out_i = Σ_c part_i[c, :]        part_i: n_i × size_i fp32 contiguous, out_i: size_i fp32 contiguous

A backward used to sum each buffer in its own launch (a fused attention block: four, of 5-7 µs each
predicted, almost all of it launch and latency); `sum_partials` sums up to four buffers of any
shapes in one launch. Buffers are passed whole: a caller that wants several gradients from one
buffer lays them side by side in its columns and slices the sum.

Kernel `_sum_partials_kernel`: a 1-D grid, ⌈size_i / BLOCK_i⌉ programs a buffer, buffer after
buffer. A program adds BLOCK_C chunk rows × BLOCK elements a step into an fp32 tile of 2048, then
reduces the tile's chunk axis once (`tl.sum`, a fixed tree for a fixed BLOCK_C). Each buffer has its
own tile shape, from its own row count (`blocks`: BLOCK_C 4, 16, 32 or 64, the fewest that hold all
its rows): a uniform branch a program, four inlined copies of the tile loop in one build. So a
gradient of a dozen rows and 150 K columns runs 16-row tiles while a many-row buffer of the same
launch keeps 64-row steps (one shape a launch, from the largest row count, ran such a gradient in
64-row tiles 80 % masked: 5-7 µs of issue a launch at stages 3-4). The summation order depends only
on the shapes, so the sums are deterministic; masked rows load zeros (exact in a sum). The chunk
counts are runtime scalars (one build serves every shape of a backward) and the loop is a `while`
(Triton 3.6's interpreter rejects a runtime `range` bound under numpy ≥ 2.4, triton-lang/triton#9171).

The sums are fp32; callers cast to their parameters' dtypes (free for fp32 master weights).
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
import triton
import triton.language as tl

__all__ = ["sum_partials", "MAX_BUFFERS", "AOT_SPECS"]

MAX_BUFFERS = 4
_TILE = 2048        # elements of one step's fp32 tile (BLOCK_C × BLOCK): 16 a thread at 4 warps
# the row counts of a step's tile (BLOCK_C; BLOCK fills the rest of the 2048): a buffer takes the
# fewest that hold all its rows, 64 beyond (⌈n / 64⌉ steps). The kernel has one branch for each.
TILE_ROWS = (4, 16, 32, 64)
_WARPS = 4


@triton.jit
def _sum_columns(part, out, size, n, block_id, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = Σ_c part[c, e] for the BLOCK columns of block `block_id` (part: n × size fp32)."""
    offs = block_id * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros([BLOCK_C, BLOCK], tl.float32)
    c0 = 0
    while c0 < n:
        rows = c0 + tl.arange(0, BLOCK_C)
        acc += tl.load(part + rows[:, None].to(tl.int64) * size + offs[None, :],
                       mask=(rows < n)[:, None] & mask[None, :], other=0.0)
        c0 += BLOCK_C
    tl.store(out + offs, tl.sum(acc, 0), mask=mask)


@triton.jit
def _sum_partials_kernel(
    P0, P1, P2, P3, O0, O1, O2, O3,
    S0, S1, S2, S3, N0, N1, N2, N3, END0, END1, END2, STEP0, STEP1, STEP2, STEP3,
):
    """O_i[e] = Σ_c P_i[c, e] (P_i: N_i × S_i fp32) for one column block of program pid's buffer:
    programs [0, END0) sum buffer 0, [END0, END1) buffer 1, [END1, END2) buffer 2, the rest buffer 3;
    buffer i's tile takes STEP_i rows a step (one of `TILE_ROWS`: a uniform branch a program)."""
    pid = tl.program_id(0)
    part, out, size, n, first, step = P3, O3, S3, N3, END2, STEP3
    if pid < END2:
        part, out, size, n, first, step = P2, O2, S2, N2, END1, STEP2
    if pid < END1:
        part, out, size, n, first, step = P1, O1, S1, N1, END0, STEP1
    if pid < END0:
        part, out, size, n, first, step = P0, O0, S0, N0, 0, STEP0
    # a call site a tile shape (TILE_ROWS, written out: each a constexpr), 2048 elements each
    if step == 4:
        _sum_columns(part, out, size, n, pid - first, 4, 512)
    elif step == 16:
        _sum_columns(part, out, size, n, pid - first, 16, 128)
    elif step == 32:
        _sum_columns(part, out, size, n, pid - first, 32, 64)
    else:
        _sum_columns(part, out, size, n, pid - first, 64, 32)


def blocks(rows: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK) of a buffer of `rows` rows: the fewest `TILE_ROWS` that hold all its rows in
    one step (64 rows a step beyond), BLOCK filling the 2048-element tile."""
    block_c = next((r for r in TILE_ROWS if rows <= r), TILE_ROWS[-1])
    return block_c, _TILE // block_c


def _aot_specs() -> list:
    from msf.kernels.attention import _aot_spec
    ptrs = {f"{kind}{i}": "*fp32" for kind in "PO" for i in range(MAX_BUFFERS)}
    # one build serves every launch, the tile shapes being branches of it (launched with the default 3
    # stages); the STEP_i are 4 to 64, not multiples of 16 in general: no divisibility hint on them
    spec = _aot_spec("partial_sums", _sum_partials_kernel, ptrs, {}, _WARPS, 3)
    steps = {(_sum_partials_kernel.arg_names.index(f"STEP{i}"),) for i in range(MAX_BUFFERS)}
    return [dataclasses.replace(spec, attrs={k: v for k, v in spec.attrs.items() if k not in steps})]


AOT_SPECS = _aot_specs()  # `python -m msf.profiling.report --module msf.kernels.partial_sums`


def sum_partials(*pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """out = part.sum(0) for each (part, out) pair, in one launch: part n × size fp32 contiguous,
    out a contiguous fp32 tensor of `size` elements. At most `MAX_BUFFERS` pairs."""
    if not 1 <= len(pairs) <= MAX_BUFFERS:
        raise ValueError(f"sum_partials: 1 to {MAX_BUFFERS} (part, out) pairs, got {len(pairs)}")
    for i, (part, out) in enumerate(pairs):
        if part.dim() != 2 or part.dtype != torch.float32 or not part.is_contiguous():
            raise ValueError(f"sum_partials: part {i} must be a contiguous n × size fp32 tensor, got "
                             f"{tuple(part.shape)} {part.dtype} strides {part.stride()}")
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != part.shape[1]:
            raise ValueError(f"sum_partials: out {i} must be a contiguous fp32 tensor of {part.shape[1]} "
                             f"elements, got {tuple(out.shape)} {out.dtype}")
    parts, outs = [p for p, _ in pairs], [o for _, o in pairs]
    spare = MAX_BUFFERS - len(pairs)  # unused slots: the last buffer's pointers, size 0, no programs
    sizes = [p.shape[1] for p in parts] + [0] * spare
    rows = [p.shape[0] for p in parts] + [0] * spare
    tiles = [blocks(n) for n in rows]
    ends = list(itertools.accumulate(triton.cdiv(size, block) for size, (_, block) in zip(sizes, tiles)))
    if ends[-1] == 0:  # every buffer is empty
        return
    _sum_partials_kernel[(ends[-1],)](*parts, *parts[-1:] * spare, *outs, *outs[-1:] * spare, *sizes, *rows,
                                      *ends[:3], *(step for step, _ in tiles),
                                      num_warps=_WARPS)
