"""LayerNorm over the channels of a B×C×h×w map, written as B×(h·w)×C tokens: the norms between stages.

    y[b, n, :] = (x[b, :, n] − mean) · rstd · γ + β          x: B×C×h×w, y: B×N×C contiguous (N = h·w)

What eager computes as `F.layer_norm(x.flatten(2).transpose(1, 2), ...)` on the patch embedding's
convolution output (`msf.reference.eager_map_layer_norm`). Eager under CUDA autocast first copies
the bf16 map to fp32 in its own strides, then to a contiguous tensor for the LayerNorm, and in the
backward casts the fp32 gradient back to bf16: here the map is read once in its dtype and layout
(NCHW or channels-last: a token's channels are one stride apart), the statistics stay on chip, and
the tokens are written once. Out dtype: fp32 under CUDA autocast (autocast's policy for
layer_norm), else x's. dx in x's dtype and strides.

The stage-final norm (`stage_output`, `msf.reference.eager_stage_output`) is the same op on the
tokens seen as a channels-last map, with a second output: the 16-bit copy the next stage's
convolution would cast the tokens to under autocast (written beside them; COPY), whose gradient
the backward adds to the tokens' in fp32 (HAS_DY2), as autograd adds its cast-back. The decoder
reads the tokens only through a Linear (or the decoder kernel's product, which rounds them alike),
so under autocast they are written in 16 bits too (`decoder_linear`: the values autocast's cast
gives; the two outputs stay two tensors).

Kernels (no atomics):
- `_map_norm_fwd_kernel`: a tile of BLOCK_N tokens of one image × all C channels.
- `_map_norm_bwd_kernel`: a run of such tiles (about four programs an SM); x̂ recomputed,
  dx = rstd (γ∘dy − mean(γ∘dy) − x̂ mean(γ∘dy∘x̂)), and the program's Σ dy∘x̂, Σ dy into one fp32
  partial row; `partial_sums` reduces the rows.

docs/map_norm.md: the bytes against eager, and what the copy removes from the step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from msf.kernels._common import INTERPRET, AotSpec, _ln_grad, _ln_hat, _round, _vec
from msf.kernels.attention import _aot_spec
from msf.kernels.partial_sums import sum_partials
from msf.precision import autocast_device_type, autocast_on
from msf.reference import eager_map_layer_norm, tokens_to_map

__all__ = ["map_layer_norm", "stage_output", "MapNormFunction", "AOT_SPECS", "copy_dtype", "out_dtype"]

# tokens a tile per C block: 4096 values a tile in the forward, 2048 in the backward (which holds
# x̂, dy and γ∘dy at once: its 4096-value tiles spilled 8-400 B at C ≥ 64); 4 warps
_BLOCK_N = {"fwd": {32: 128, 64: 64, 128: 32, 256: 16}, "bwd": {32: 64, 64: 32, 128: 16, 256: 8}}
_WARPS = 4
_MAX_C = 256


def _block_c(c: int) -> int:
    return max(32, triton.next_power_of_2(c))


@triton.jit
def _tile(b, pid_n, stride_xb, stride_xc, stride_xn, N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """(channels, channel mask, mask, offsets into the map, token offsets of B×N×C) of token tile pid_n
    of image b (int64)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_n < N)[:, None] & mask_c[None, :]
    in_map = b * stride_xb + offs_c[None, :].to(tl.int64) * stride_xc + offs_n[:, None].to(tl.int64) * stride_xn
    return offs_c, mask_c, mask, in_map, (b * N + offs_n)[:, None] * C + offs_c[None, :]


@triton.jit
def _map_norm_fwd_kernel(
    X, LNW, LNB, Y, Y2,
    stride_xb, stride_xc, stride_xn, N, C, eps,
    COPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Y (B×N×C contiguous) for BLOCK_N tokens of image pid 1, and with COPY the same values in Y2's
    dtype (the 16-bit copy a convolution under autocast would make); X read through its strides."""
    offs_c, mask_c, mask, in_map, tok = _tile(tl.program_id(1).to(tl.int64), tl.program_id(0), stride_xb, stride_xc,
                                              stride_xn, N, C, BLOCK_N, BLOCK_C)
    xhat, _rstd = _ln_hat(tl.load(X + in_map, mask=mask, other=0.0).to(tl.float32), mask, C, eps)
    y = xhat * _vec(LNW, offs_c, mask_c)[None, :] + _vec(LNB, offs_c, mask_c)[None, :]
    y = _round(y, Y.dtype.element_ty)
    tl.store(Y + tok, y, mask=mask)
    if COPY:
        tl.store(Y2 + tok, _round(y.to(tl.float32), Y2.dtype.element_ty), mask=mask)


# dx = rstd (γ∘dy − mean_C(γ∘dy) − x̂ mean_C(γ∘dy∘x̂)),  dγ = Σ dy∘x̂,  dβ = Σ dy  (x̂ recomputed from x)
@triton.jit
def _map_norm_bwd_kernel(
    X, LNW, DY, DY2, DX, PART,
    stride_xb, stride_xc, stride_xn, stride_db, stride_dc, stride_dn, N, C, TILES_N, TILES_ALL, eps,
    HAS_DY2: tl.constexpr, TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """DX (X's shape, its own strides, X's dtype) for TILES consecutive token tiles (of the
    TILES_ALL = B · TILES_N tiles, image by image) and the program's PART row [Σ dy∘x̂ | Σ dy]
    (2·C fp32). DY (and with HAS_DY2 the copy's gradient DY2, added in fp32 as autograd adds the
    fp32 cast of a 16-bit gradient): B×N×C contiguous."""
    pid = tl.program_id(0)
    gamma = _vec(LNW, tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_C) < C)
    dgamma = tl.zeros([BLOCK_C], tl.float32)
    dbeta = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, TILES):
        t = pid * TILES + i
        t_in = tl.minimum(t, TILES_ALL - 1)  # past the last tile: tile TILES_ALL - 1, its rows masked off
        b = (t_in // TILES_N).to(tl.int64)
        pid_n = t_in % TILES_N
        offs_c, mask_c, mask, in_map, tok = _tile(b, pid_n, stride_xb, stride_xc, stride_xn, N, C, BLOCK_N, BLOCK_C)
        mask = mask & (t < TILES_ALL)
        xhat, rstd = _ln_hat(tl.load(X + in_map, mask=mask, other=0.0).to(tl.float32), mask, C, eps)
        dy = tl.load(DY + tok, mask=mask, other=0.0).to(tl.float32)
        if HAS_DY2:
            dy += tl.load(DY2 + tok, mask=mask, other=0.0).to(tl.float32)
        dx = _ln_grad(dy, xhat, rstd, gamma, mask, C)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out = b * stride_db + offs_c[None, :].to(tl.int64) * stride_dc + offs_n[:, None].to(tl.int64) * stride_dn
        tl.store(DX + out, _round(dx, DX.dtype.element_ty), mask=mask)
        dgamma += tl.sum(dy * xhat, 0)  # a column sum a tile: two tile-sized accumulators spilled
        dbeta += tl.sum(dy, 0)
    offs_c = tl.arange(0, BLOCK_C)
    part = PART + pid.to(tl.int64) * (2 * C)
    tl.store(part + offs_c, dgamma, mask=offs_c < C)
    tl.store(part + C + offs_c, dbeta, mask=offs_c < C)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _new(shape, device, dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _token_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, channel, token) strides of a B×C×h×w tensor whose h·w tokens are one stride apart."""
    return t.stride(0), t.stride(1), t.stride(3)


def _tokens_evenly_spaced(t: torch.Tensor) -> bool:
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _tiles_per_program(tiles: int, device: torch.device) -> int:
    """Token tiles a backward program walks: about 4 programs an SM (so the partial rows the chunk-sum
    reduces number a few hundred, not one per tile), a power of two; 2 under the interpreter (tests
    see a program walk several tiles and a last one run past the end)."""
    from msf.kernels.attention import _sm_count
    sms = _sm_count(device)
    if sms is None:
        return 2
    return max(1, min(64, triton.next_power_of_2(triton.cdiv(tiles, 4 * sms))))


def _forward(x, lnw, lnb, eps: float, y_dtype: torch.dtype, copy_dtype: torch.dtype | None = None):
    """(y, its copy in `copy_dtype` or None): B×N×C tokens."""
    b, c, h, w = x.shape
    n = h * w
    y = _new((b, n, c), x.device, y_dtype)
    y2 = None if copy_dtype is None else _new((b, n, c), x.device, copy_dtype)
    block_c = _block_c(c)
    block_n = _BLOCK_N["fwd"][block_c]
    _map_norm_fwd_kernel[(triton.cdiv(n, block_n), b)](
        x, lnw, lnb, y, y if y2 is None else y2, *_token_strides(x), n, c, float(eps), COPY=y2 is not None,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_WARPS, num_stages=1)
    return y, y2


def _backward(x, lnw, dy, eps: float, w_dtype: torch.dtype, dy2: torch.Tensor | None = None):
    """(dx in x's dtype and strides, dγ, dβ in w_dtype) from the tokens' gradient dy and the copy's, dy2."""
    dx, part = backward_partials(x, lnw, dy, eps, dy2)
    sums = _new((part.shape[1],), x.device, torch.float32)
    sum_partials((part, sums))
    c = x.shape[1]
    return dx, sums[:c].to(w_dtype), sums[c:].to(w_dtype)


def backward_partials(x, lnw, dy, eps: float, dy2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, the programs' partial rows [dγ | dβ], programs × 2C fp32) of `_backward`, the sum left to
    the caller: the FFN sublayer that runs this norm's backward first sums these rows in its own
    `sum_partials` launch (`msf.kernels.ffn_sublayer.FFNStageOutputFunction`)."""
    b, c, h, w = x.shape
    n = h * w
    if x.stride(1) == 1 and c > 1:  # channels-last, as x
        dx = _new((b, h, w, c), x.device, x.dtype).permute(0, 3, 1, 2)
    else:
        dx = _new((b, c, h, w), x.device, x.dtype)
    block_c = _block_c(c)
    block_n = _BLOCK_N["bwd"][block_c]
    tiles_n = triton.cdiv(n, block_n)
    tiles = _tiles_per_program(b * tiles_n, x.device)
    programs = triton.cdiv(b * tiles_n, tiles)
    part = _new((programs, 2 * c), x.device, torch.float32)
    _map_norm_bwd_kernel[(programs,)](
        x, lnw, dy, dy if dy2 is None else dy2, dx, part, *_token_strides(x), *_token_strides(dx), n, c, tiles_n,
        b * tiles_n, float(eps), HAS_DY2=dy2 is not None, TILES=tiles, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=_WARPS, num_stages=1)
    return dx, part


class MapNormFunction(torch.autograd.Function):
    """Saves x (the input) and γ; the statistics are recomputed in the backward. With `copy_dtype`
    it returns (y, the copy), else y."""

    @staticmethod
    def forward(ctx, x, lnw, lnb, eps, y_dtype, copy_dtype=None):
        ctx.save_for_backward(x, lnw)
        ctx.eps = eps
        ctx.w_dtype = lnb.dtype
        ctx.set_materialize_grads(False)
        y, y2 = _forward(x, lnw, lnb, eps, y_dtype, copy_dtype)
        return y if y2 is None else (y, y2)

    @staticmethod
    def backward(ctx, dy, dy2=None):
        x, lnw = ctx.saved_tensors
        if dy is None:  # only the copy was used
            dy, dy2 = dy2, None
        dx, dw, db = _backward(x, lnw, dy.contiguous(), ctx.eps, ctx.w_dtype, None if dy2 is None else dy2.contiguous())
        return dx, dw.to(lnw.dtype), db, None, None, None


def out_dtype(x: torch.Tensor, lnw: torch.Tensor, lnb: torch.Tensor) -> torch.dtype | None:
    """The tokens' dtype, as eager's LayerNorm gives it, or None when the kernels do not serve the mix:
    under CUDA autocast fp32 (autocast runs layer_norm in fp32) for fp32 / bf16 / fp16 inputs; under
    CPU autocast x's (CPU autocast leaves layer_norm alone and mixed-dtype LayerNorm keeps the
    input's); without autocast the dtype x, γ, β share."""
    return _out_dtype(x.dtype, x.device.type, lnw, lnb)


def _out_dtype(x_dtype: torch.dtype, dev: str, lnw: torch.Tensor, lnb: torch.Tensor) -> torch.dtype | None:
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if x_dtype not in floats or lnw.dtype not in floats or lnb.dtype != lnw.dtype:
        return None
    dev = autocast_device_type(dev)
    if autocast_on(dev) is not None:  # CUDA autocast runs layer_norm in fp32; CPU autocast leaves it alone
        return torch.float32 if dev == "cuda" else (x_dtype if lnw.dtype in (torch.float32, x_dtype) else None)
    return x_dtype if lnw.dtype == x_dtype else None


def _check(x, lnw, lnb, eps) -> None:
    if x.dim() != 4:
        raise ValueError(f"map_layer_norm: x must be a B×C×h×w map, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if lnw.shape != (c,) or lnb.shape != (c,):
        raise ValueError(f"map_layer_norm: weight and bias must have C = {c} elements, got {tuple(lnw.shape)}, "
                         f"{tuple(lnb.shape)}")
    if not eps > 0:
        raise ValueError(f"map_layer_norm: eps must be positive, got {eps}")
    if len({x.device, lnw.device, lnb.device}) != 1:
        raise ValueError("map_layer_norm: tensors on different devices")


def copy_dtype(dev: str, y_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a convolution under autocast on device type `dev` casts the tokens to, where it is
    not theirs (`y_dtype`) already (None: no copy to make)."""
    cdt = autocast_on(dev)
    return cdt if cdt is not None and cdt != y_dtype else None


def output_dtypes(x_dtype: torch.dtype, dev: str, lnw: torch.Tensor, lnb: torch.Tensor, with_copy: bool,
                  out_cast: bool) -> tuple[torch.dtype, torch.dtype | None] | None:
    """(the tokens' dtype, the copy's or None) of the norm of a map of `x_dtype` on device type `dev`
    (`dispatch` says what `with_copy` and `out_cast` ask), or None when the kernels do not serve the mix."""
    y_dtype = _out_dtype(x_dtype, dev, lnw, lnb)
    if y_dtype is None:
        return None
    cast = copy_dtype(dev, y_dtype)  # what autocast's readers would cast the tokens to (None: nothing)
    return (cast or y_dtype) if out_cast else y_dtype, cast if with_copy else None


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels take a B×C×h×w map like x (C ≤ 256, not empty, on CUDA or interpreted);
    its dtypes are `output_dtypes`'s to judge."""
    return x.numel() > 0 and x.shape[1] <= _MAX_C and (x.device.type == "cuda" or INTERPRET)


def dispatch(x, lnw, lnb, eps: float, fused, with_copy: bool = False, out_cast: bool = False):
    """What both entries (this module's and `msf::map_layer_norm`'s in kernels/ops.py) do: check the
    arguments, then `fused(x, γ, β, eps, out dtype, copy dtype)` where the kernels serve (C ≤ 256, x
    on CUDA or interpreted; a map whose tokens are not one stride apart is made contiguous first),
    else eager. `with_copy`: return (y, the tokens as a convolution under autocast takes them) —
    the 16-bit copy where autocast would cast, else y itself. `out_cast`: y's only reader is a
    Linear that autocast runs in 16 bits, so y is written already cast (the same values: the fp32
    result rounded once, as autocast's cast rounds it; its gradient comes back in 16 bits, which the
    kernel widens as the cast's backward would). y and the copy then stay two tensors, so their
    gradients are still added in fp32."""
    _check(x, lnw, lnb, eps)
    dtypes = output_dtypes(x.dtype, x.device.type, lnw, lnb, with_copy, out_cast)
    if dtypes is None or not serves(x):
        y = eager_map_layer_norm(x, lnw, lnb, eps)
        return (y, y) if with_copy else y
    if not _tokens_evenly_spaced(x):
        x = x.contiguous()
    y_dtype, cdt = dtypes
    out = fused(x, lnw.contiguous(), lnb.contiguous(), float(eps), y_dtype, cdt)
    if with_copy and cdt is None:
        return out, out
    return out


def map_layer_norm(x, lnw, lnb, eps: float = 1e-5, *, with_copy: bool = False, out_cast: bool = False):
    """LayerNorm over the channels of the B×C×h×w map x, as B×(h·w)×C tokens (module docstring); with
    `with_copy` also the tokens as a convolution under autocast takes them; with `out_cast` the
    tokens as a Linear under autocast takes them (`dispatch`)."""
    return dispatch(x, lnw, lnb, eps, MapNormFunction.apply, with_copy, out_cast)


def stage_output(tokens, hw, lnw, lnb, eps: float = 1e-5, feeds_next: bool = True, decoder_linear: bool = False, *,
                 norm=map_layer_norm):
    """A stage's final LayerNorm as `msf.reference.eager_stage_output` returns it: (the map the decoder
    reads, the map the next stage's convolution reads). The tokens (B×(h·w)×C) are read once as a
    channels-last map; where `feeds_next` and autocast would cast the result for the convolution,
    the kernel writes that 16-bit copy beside the tokens and the backward adds both gradients.
    `decoder_linear`: the decoder reads this stage's map only through a Linear (stages 2-4's
    projections; stage 1's folded into the decoder kernel, which rounds it alike), so under
    autocast the decoder's map is written in the autocast dtype, as the Linear would cast it
    (`dispatch`'s `out_cast`: no fp32 map, no cast of it, and its gradient read in 16 bits).
    `norm`: this module's `map_layer_norm` or its operator form (kernels/ops.py)."""
    x = tokens_to_map(tokens, *hw)
    if feeds_next:
        y, y_next = norm(x, lnw, lnb, eps, with_copy=True, out_cast=decoder_linear)
    else:
        y = y_next = norm(x, lnw, lnb, eps, out_cast=decoder_linear)
    return tokens_to_map(y, *hw), tokens_to_map(y_next, *hw)


# ----------------------------------------------------------------------------------------------
# ahead-of-time builds: both kernels × the model's C × (bf16 map → fp32 tokens, one dtype)
# ----------------------------------------------------------------------------------------------
def _aot_specs() -> list[AotSpec]:
    specs = []
    for c in (32, 64, 128, 256):
        for name, xdt, ydt in (("amp", "bf16", "fp32"), ("bf16", "bf16", "bf16"), ("fp32", "fp32", "fp32")):
            const = {"BLOCK_N": _BLOCK_N["fwd"][c], "BLOCK_C": c}
            bwd_const = {"BLOCK_N": _BLOCK_N["bwd"][c], "BLOCK_C": c, "TILES": 8}
            # the patch embedding's norm (one output), and the stage-final norms of the model under
            # autocast: fp32 tokens in; out the decoder's map, bf16 in the model ("_lin",
            # `decoder_linear`; fp32 without it), and at stages 1-3 the bf16 copy for the next
            # convolution ("_copy"); both gradients back
            variants = [("", xdt, ydt, False)]
            if name == "amp":
                variants += [("_copy", "fp32", ydt, True), ("_copy_lin", "fp32", "bf16", True),
                             ("_lin", "fp32", "bf16", False)]
            for tag, xt, yt, has_copy in variants:
                fwd = {"X": f"*{xt}", "LNW": "*fp32", "LNB": "*fp32", "Y": f"*{yt}", "Y2": "*bf16"}
                bwd = {"X": f"*{xt}", "LNW": "*fp32", "DY": f"*{yt}", "DY2": "*bf16", "DX": f"*{xt}",
                       "PART": "*fp32"}
                specs.append(_aot_spec(f"map_norm.fwd_{name}{tag}_c{c}", _map_norm_fwd_kernel, fwd,
                                       {**const, "COPY": has_copy}, _WARPS, 1, floats=("eps",)))
                specs.append(_aot_spec(f"map_norm.bwd_{name}{tag}_c{c}", _map_norm_bwd_kernel, bwd,
                                       {**bwd_const, "HAS_DY2": has_copy}, _WARPS, 1, floats=("eps",)))
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
