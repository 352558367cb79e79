"""Pieces every Triton kernel module in `kernels/` shares.

- `INTERPRET`: True when Triton runs kernels through its CPU interpreter: `TRITON_INTERPRET=1`, or
  Triton-Sanitizer (`triton-viz`), which runs every kernel through the same interpreter but must be
  started *without* `TRITON_INTERPRET=1` (SPEC §7). The sanitizer sets no variable; it replaces
  `triton.jit` by its own tracing wrapper before the kernels are imported, and that is what is
  checked (`python -m msf.checking.sanitize` and the `triton-sanitizer` command both do this).
- `dot(a, b)`: `tl.dot` that stays correct under the interpreter. Triton 3.6's interpreter keeps
  bfloat16 as raw 16-bit integers and multiplies the bit patterns in `tl.dot` (SPEC §7,
  triton-lang/triton#11584), so under the interpreter bf16 operands are upcast to fp32 first.
  On a GPU the call is a plain `tl.dot` with fp32 accumulation.
- `dot_tf32x3(a, b)`: the same with `input_precision="tf32x3"` (fp32-accurate products of fp32
  operands on tensor cores; plain `tl.dot` rounds fp32 operands to tf32).
- `_round(x, dtype)`: `x.to(dtype)` rounded to nearest even under the interpreter too (Triton 3.6's
  interpreter truncates fp32 → bf16): every rounding to a narrower dtype in a kernel goes through it.
- `_ln_hat(x, mask, C, eps)`, `_vec(PTR, offs, mask)`: LayerNorm's normalised rows of a tile and a
  parameter vector loaded in fp32 (the attention block's, the map norm's and the FFN's stage norm).
- `AotSpec`: how a kernel module declares its kernels to the report (`AOT_SPECS = [...]`);
  `divisibility_attrs(...)`: its `attrs`, as Triton's launcher specialises a launch at the model's shapes.
- `row_chunks(...)`: how a weight-gradient grid splits its rows into chunks (host side; the
  attention and FFN sublayers' fp32 partial sums).
- `products_dtype(tensors)`: the dtype a fused op's products run in, by autocast's rule (the FFN
  sublayer's and the attention block's).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from msf.precision import autocast_on



def _sanitizer_active() -> bool:
    """True when triton-viz has replaced `triton.jit` by its tracing wrapper (its `triton-sanitizer`
    command and `msf.checking.sanitize` do this before importing the kernels)."""
    return getattr(triton.jit, "__module__", "").startswith("triton_viz")


INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1" or _sanitizer_active()

_UPCAST_BF16_DOT: tl.constexpr = tl.constexpr(INTERPRET)


_EMULATE_RNE: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x.to(dtype). Triton 3.6's interpreter converts fp32 → bf16 by truncation where the GPU rounds
    to nearest even (see tests/test_attention_sublayer.py), so under the interpreter the value is
    first rounded to nearest even on its fp32 bits (finite values; the truncation is then exact).
    Every kernel module uses it for each rounding to a narrower dtype its kernels do; on a GPU it
    is a plain conversion."""
    if _EMULATE_RNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b):
    """fp32-accumulated `a @ b` for 2-D blocks; bf16 is upcast under the interpreter."""
    if _UPCAST_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def dot_tf32x3(a, b):
    """`dot` with `input_precision="tf32x3"`: fp32 operands split into tf32 high and low parts and
    multiplied with three tensor-core products (hi·hi + hi·lo + lo·hi), about fp32 accuracy (~1e-6
    relative instead of plain tf32's ~1e-3) at about a third of tf32 speed. Preferred to "ieee",
    whose FMA lowering keeps whole K-slices of both operands in registers and spills at K ≥ 64.
    bf16/fp16 operands are unaffected; bf16 is upcast under the interpreter exactly as in `dot`
    (the interpreter ignores input_precision and multiplies in fp32)."""
    if _UPCAST_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=tl.float32, input_precision="tf32x3")


@triton.jit
def _ln_stats(x, mask, C, eps):
    """(x̂, mean, rstd) of the rows of x (fp32, zero outside `mask`): x̂ = (x − mean)·rstd, rstd =
    1/√(var + eps) with the biased variance, as torch's layer_norm; x̂ zero outside `mask`."""
    mean = tl.sum(x, 1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    return xc * rstd[:, None], mean, rstd


@triton.jit
def _ln_hat(x, mask, C, eps):
    """(x̂, rstd) of the rows of x: `_ln_stats` without the mean."""
    xhat, _mean, rstd = _ln_stats(x, mask, C, eps)
    return xhat, rstd


@triton.jit
def _ln_grad(dy, xhat, rstd, gamma, mask, C):
    """∂L/∂x of LayerNorm rows from ∂L/∂y: rstd·(γ∘dy − mean(γ∘dy) − x̂·mean(γ∘dy∘x̂)), zero outside `mask`."""
    gd = tl.where(mask, dy * gamma[None, :], 0.0)
    dx = rstd[:, None] * (gd - (tl.sum(gd, 1) / C)[:, None] - xhat * (tl.sum(gd * xhat, 1) / C)[:, None])
    return tl.where(mask, dx, 0.0)


@triton.jit
def _vec(PTR, offs, mask):
    """PTR[offs] (zero where not `mask`) in fp32: a per-channel parameter vector."""
    return tl.load(PTR + offs, mask=mask, other=0.0).to(tl.float32)


def row_chunks(rows: int, tiles: int, min_rows: int, sms: int | None, chunk_rows: int | None = None,
               interpreter_rows: int = 64) -> tuple[int, int]:
    """(chunk_rows, n_chunks) of a weight-gradient grid with `tiles` output tiles a row chunk, each
    chunk summed into its own fp32 partial row: enough chunks for about two programs per SM, each
    at least `min_rows` rows (so its partial costs well under what it reads), a multiple of 128
    rows; `interpreter_rows` under the interpreter (sms None), short so that CPU tests cover several
    chunks; `chunk_rows` overrides (tests), clipped to the rows rounded up to 128."""
    if chunk_rows is None:
        if sms is None:
            chunk_rows = interpreter_rows
        else:
            want = max(1, triton.cdiv(2 * sms, tiles))
            chunk_rows = triton.cdiv(max(triton.cdiv(rows, want), min_rows), 128) * 128
    chunk_rows = max(1, min(int(chunk_rows), triton.cdiv(rows, 128) * 128))
    return chunk_rows, triton.cdiv(rows, chunk_rows)


def products_dtype(tensors) -> torch.dtype | None:
    """The dtype a fused op's products run in, or None when its kernels do not serve the mix: under
    autocast on the first tensor's device, autocast's bf16 / fp16 when every tensor is fp32 or that
    dtype (the model under CUDA autocast: the fp32 residual stream and fp32 master weights);
    otherwise the dtype all share, if fp32, bf16 or fp16."""
    tensors = list(tensors)
    cdt = autocast_on(tensors[0].device.type)
    if cdt is not None:
        if cdt in (torch.bfloat16, torch.float16) and all(t.dtype in (torch.float32, cdt) for t in tensors):
            return cdt
        return None
    dtypes = {t.dtype for t in tensors}
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return tensors[0].dtype if len(dtypes) == 1 and tensors[0].dtype in floats else None


@dataclass(frozen=True)
class AotSpec:
    """One kernel build for the ahead-of-time report.

    `signature` maps every non-constexpr argument to its Triton type string ("*fp32", "i32", ...);
    `constexprs` gives every `tl.constexpr` argument (block sizes, flags) its value; `num_warps` and
    `num_stages` are the launch options of the configuration being reported. `archs`: the compute
    capabilities the configuration is allowed on (empty: all); a configuration pinned for one
    architecture only (`kernels/configs.json` keeps one entry per architecture) is built only there.
    `attrs`: the specialisation Triton's launcher applies at run time (ASTSource's format, {(arg
    index,): [["tt.divisibility", 16]]}: a pointer 16-byte aligned, an integer a multiple of 16),
    where the spec states it; a build without it is pessimistic (scalar loads, more registers).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)

    def builds_on(self, arch: int) -> bool:
        return not self.archs or arch in self.archs


def divisibility_attrs(jit_fn, signature: dict, not_divisible=()) -> dict:
    """`AotSpec.attrs` for a build of `jit_fn` with this signature: `tt.divisibility = 16` on every
    pointer and integer argument in it but those named in `not_divisible` (the integers that are not
    multiples of 16 at the shapes the spec stands for), as Triton's launcher marks them at run time."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(jit_fn.arg_names)
            if a in signature and (signature[a].startswith("*") or signature[a] in ("i32", "i64"))
            and a not in not_divisible}


# Last in the file: Triton's cache key holds each kernel's line numbers, and lines added above the
# helpers here would send every kernel through its AOT build again (tests/test_kernel_report.py).
from msf.kernels import _interpreter  # noqa: E402

if INTERPRET:
    _interpreter.install()  # skip the interpreter's redundant re-patching on helper calls (tests' speed)
