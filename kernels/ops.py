"""The fused ops as `torch.library` operators, so that `torch.compile` traces the model in one graph.

`msf.backend` takes the triton backend's op table from `TRITON_OPS` here. Each entry validates its
arguments on the host (shapes, dtypes; never the data) and calls one operator of the `msf`
namespace; a case the kernels do not serve (fp32 attention at d > 128, an unusual dtype mix) runs
the eager composition instead, which torch.compile traces like any other PyTorch code.

    msf::attention(q, k, v) -> (o, lse)                                    + msf::attention_backward
    msf::attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo) -> (out, o, lse)
                                                                           + msf::attention_sublayer_backward
    msf::attention_block(x, LN1, [W_sr, b_sr, LN_sr,] W_kv, b_kv, wq, bq, wo, bo, [γ_pe, β_pe,] hw, R, eps,
                         eps_sr, compute_dtype, eps_pe, residual_dtype) -> (out, xn, red, kin, kv, o, lse)
                                                                          + msf::attention_block_backward
    msf::map_layer_norm(x, γ, β, eps, out_dtype, copy_dtype) -> (tokens, copy)
                                                                           + msf::map_layer_norm_backward
    msf::ffn_sublayer(x, γ, β, w1, b1, w2, b2, eps, compute_dtype) -> (out, mean, rstd)
                                                                           + msf::ffn_sublayer_backward
    msf::ffn_stage_output(x, γ, β, w1, b1, w2, b2, eps, compute_dtype, γ_s, β_s, eps_s, hw, y_dtype,
                          copy_dtype) -> (tokens, copy, out, mean, rstd)
                                                                           + msf::ffn_stage_output_backward
    msf::decoder_mlp(f1, P2, P3, P4, M1, c, w2, b2, seed, p, size, compute_dtype, save) -> (x, h, D)
                                                                           + msf::decoder_mlp_backward
    msf::decoder_fold(W, b, [U_i], [u_i], low_dtype) -> [M_1..M_4, c]      + msf::decoder_fold_backward
    msf::head_loss(logits, targets, eps) -> (loss, coef)                   + msf::head_loss_backward
    msf::lmsa(x, params) -> (out, P, W̃, D, XW)                             + msf::lmsa_backward
    msf::lmsa_classifier(x, params, W_c, b_c) -> (logits, β, P, W̃)          + msf::lmsa_classifier_backward
    msf::upsample_argmax(logits, size) -> labels                           (not differentiable)

A forward operator returns, after its result, what its backward needs (attention's O and
log-sum-exp, the FFN's LayerNorm statistics, the decoder MLP's pre-activation and dropout output,
head + loss's Dice coefficients, LMSA's cell sums, gated weights, depthwise outputs and word-ordered
x); the backward is an operator of its own, wired by `register_autograd`. Each operator's body is
the kernel module's own host code (`_forward` / `_backward`): the same launches, configurations and
partial buffers as the `torch.autograd.Function`s, so the results match them bit for bit.

How each operator runs
----------------------
- Eager, any device: the body runs on real tensors (CUDA: compiled kernels; CPU: Triton's
  interpreter under TRITON_INTERPRET=1).
- Under torch.compile on CUDA: every operator is a `torch.library.triton_op`. AOTAutograd
  decomposes it into its body, and every Triton launch in it (`kernel[grid](...)`, pinned or not)
  is recorded as a `wrap_triton` node, so Inductor sees the user kernels themselves and schedules
  its own kernels around them.
- Under torch.compile on CPU: the operator stays one opaque node (its fake implementation gives
  Dynamo the output shapes; the body runs through the interpreter at run time). Decomposing it
  would hand Inductor Triton launches on CPU tensors, which it cannot compile.

The launches sit in the kernel modules as plain `kernel[grid](...)` calls. Rather than rewrite
each of them as `wrap_triton(kernel)[grid](...)`, the decomposition runs the body with
`KernelInterface.__getitem__` (what every JITFunction and Autotuner launch goes through) routed
to `wrap_triton` (`_launches_as_graph_nodes`); outside tracing a launch is the plain Triton call.

`lmsa_backward` (and `lmsa_classifier_backward`) stays one opaque node under torch.compile on CUDA as well (`decompose=False`):
its body differentiated LMSA's gate graph with autograd until 2026-12-06 (now Triton kernels), which
AOTAutograd's trace of a backward could not follow; tracing into it has not been tried on a GPU.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from triton.runtime.jit import KernelInterface

from msf.kernels import attention as _attn
from msf.kernels import attention_block as _blk
from msf.kernels import attention_sublayer as _sub
from msf.kernels import decoder_mlp as _dec
from msf.kernels import ffn_sublayer as _ffn
from msf.kernels import head_loss as _hl
from msf.kernels import lmsa as _lm
from msf.kernels import map_norm as _mn
from msf.kernels import upsample_argmax as _ua
from msf.reference import DEFAULT_DICE_EPS, DecoderParams, LMSAParams, composed_attention_sublayer

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _launches_as_graph_nodes():
    """Within: `kernel[grid](...)` on any Triton kernel records a `wrap_triton` graph node."""
    original = KernelInterface.__getitem__

    def traced_launch(kernel, grid):
        return torch.library.wrap_triton(kernel)[grid]

    KernelInterface.__getitem__ = traced_launch
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def _on_cuda(args) -> bool:
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else (arg,))]
    return any(isinstance(a, Tensor) and a.device.type == "cuda" for a in flat)


def _export_keeps_ops_whole() -> bool:
    """torch.export keeps triton_ops whole (as `triton_op` itself checks)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # pragma: no cover - depends on the torch version
        return False
    return custom_triton_ops_decomposition_disabled()


def _decompose_on_cuda(body: Callable, decompose: bool):
    """torch_dispatch rule under FunctionalTensorMode (AOTAutograd): on CUDA trace into `body`
    (what `triton_op` does for every device), elsewhere (or if not `decompose`) keep the operator whole."""

    def rule(mode, op, types, args, kwargs):
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not Tensor for t in types):
            return NotImplemented
        if decompose and _on_cuda(args) and not _export_keeps_ops_whole():
            with mode, _launches_as_graph_nodes():
                return body(*args, **kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)

    return rule


def _define(name: str, body: Callable, fake: Callable, decompose: bool = True):
    """`msf::<name>` as a triton_op whose body is `body`, with a hand-written fake (the body itself
    cannot run on fake CPU tensors: the interpreter launches kernels on real memory)."""
    op = torch.library.triton_op(f"msf::{name}", body, mutates_args=())
    op.register_fake(fake)
    op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(body, decompose))
    return op


def _contiguous_like(t: Tensor, shape=None, dtype=None) -> Tensor:
    return t.new_empty(t.shape if shape is None else shape, dtype=t.dtype if dtype is None else dtype)


# ----------------------------------------------------------------------------------------------
# attention: softmax(q kᵀ/√d) v
# ----------------------------------------------------------------------------------------------
def _attention_body(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return _attn._forward(q, k, v, False)


def _attention_fake(q, k, v):
    return _contiguous_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _attention_backward_body(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                             do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _attn._backward(q, k, v, o, lse, do, False, None)


def _attention_backward_fake(q, k, v, o, lse, do):
    return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)


attention_op = _define("attention", _attention_body, _attention_fake)
attention_backward_op = _define("attention_backward", _attention_backward_body, _attention_backward_fake)


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _attention_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return tuple(torch.ops.msf.attention_backward(q, k, v, o, lse, do.contiguous()))


attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`msf.kernels.attention.attention` (no tf32) through `msf::attention`."""
    _attn._check(q, k, v)
    if q.shape[1] == 0 or not _attn.fused_supported(q.dtype, q.shape[-1]):
        return _attn.attention_eager(q, k, v)
    return torch.ops.msf.attention(q, k, v)[0]


# ----------------------------------------------------------------------------------------------
# attention sublayer: residual + attention(x_norm wqᵀ + bq, k, v) woᵀ + bo
# ----------------------------------------------------------------------------------------------
def _sublayer_body(x: Tensor, r: Tensor, k: Tensor, v: Tensor, wq: Tensor, bq: Tensor, wo: Tensor,
                   bo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    wq, wo = _sub.compute_weights(k.dtype, wq, wo)
    return _sub._forward(x, r, k, v, wq, bq, wo, bo)


def _sublayer_fake(x, r, k, v, wq, bq, wo, bo):
    return (_contiguous_like(x, dtype=r.dtype), _contiguous_like(x, dtype=k.dtype),
            x.new_empty(x.shape[:2], dtype=torch.float32))


def _sublayer_backward_body(x: Tensor, k: Tensor, v: Tensor, wq: Tensor, bq: Tensor, wo: Tensor, o: Tensor,
                            lse: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    wq_c, wo_c = _sub.compute_weights(k.dtype, wq, wo)
    dx, dk, dv, dwq, dbq, dwo, dbo = _sub._backward(x, k, v, wq_c, bq, wo_c, o, lse, g, wq.dtype, None, None)
    # the four weight and bias gradients are views of one buffer there (one sum launch); an operator's
    # outputs may not alias each other, so all but dWq are copied out (C² + 2C elements)
    return dx, dk, dv, dwq, dbq.clone(), dwo.clone(), dbo.clone()


def _sublayer_backward_fake(x, k, v, wq, bq, wo, o, lse, g):
    return (_contiguous_like(x), _contiguous_like(k), _contiguous_like(v),
            *(_contiguous_like(w) for w in (wq, bq, wo, bq)))


attention_sublayer_op = _define("attention_sublayer", _sublayer_body, _sublayer_fake)
attention_sublayer_backward_op = _define("attention_sublayer_backward", _sublayer_backward_body,
                                         _sublayer_backward_fake)


def _sublayer_setup(ctx, inputs, output):
    x, _, k, v, wq, bq, wo, _ = inputs
    _, o, lse = output
    ctx.save_for_backward(x, k, v, wq, bq, wo, o, lse)


def _sublayer_grad(ctx, g, _do, _dlse):
    g = g.contiguous()
    dx, dk, dv, dwq, dbq, dwo, dbo = torch.ops.msf.attention_sublayer_backward(*ctx.saved_tensors, g)
    return dx, g, dk, dv, dwq, dbq, dwo, dbo  # ∂/∂residual is g itself


attention_sublayer_op.register_autograd(_sublayer_grad, setup_context=_sublayer_setup)


def attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo) -> Tensor:
    """`msf.kernels.attention_sublayer.attention_sublayer_for_model` through `msf::attention_sublayer`:
    fused for one shared dtype or autocast's mix; otherwise the projections around `attention`."""
    ts = (x_norm, residual, k, v, wq, bq, wo, bo)
    if _sub._precision(*ts) is None:
        return composed_attention_sublayer(*ts, attention=attention)
    _sub._check(*ts)
    if x_norm.shape[1] == 0 or not _sub.fused_supported(k.dtype, x_norm.shape[-1]):
        return composed_attention_sublayer(*ts, attention=attention)
    x_norm, residual, wq, bq, wo, bo = (t.contiguous() for t in (x_norm, residual, wq, bq, wo, bo))
    return torch.ops.msf.attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo)[0]


# ----------------------------------------------------------------------------------------------
# FFN sublayer: x + fc2(GELU(fc1(LayerNorm(x)))) on rows × C tokens
# ----------------------------------------------------------------------------------------------
def _ffn_body(x: Tensor, lnw: Tensor, lnb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, eps: float,
              compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    w1, w2 = _ffn.compute_weights(compute_dtype, w1, w2)
    return _ffn._forward(x, lnw, lnb, w1, b1, w2, b2, eps, compute_dtype)


def _ffn_fake(x, lnw, lnb, w1, b1, w2, b2, eps, compute_dtype):
    rows = x.shape[0]
    return (_contiguous_like(x, dtype=torch.promote_types(x.dtype, compute_dtype)),
            x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))


def _ffn_backward_body(x: Tensor, lnw: Tensor, lnb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                       mean: Tensor, rstd: Tensor, g: Tensor, compute_dtype: torch.dtype) -> list[Tensor]:
    w1c, w2c = _ffn.compute_weights(compute_dtype, w1, w2)  # the forward's, made again
    dx, *param_grads = _ffn._backward(x, lnw, lnb, w1c, b1, w2c, mean, rstd, g, compute_dtype, b2.dtype,
                                      w_dtype=w1.dtype)
    # the parameter gradients are slices of two sum buffers; an operator's outputs may not alias
    return [dx, *(t.clone() for t in param_grads)]


def _ffn_backward_fake(x, lnw, lnb, w1, b1, w2, b2, mean, rstd, g, compute_dtype):
    return [_contiguous_like(t) for t in (x, lnw, lnb, w1, b1, w2, b2)]


ffn_sublayer_op = _define("ffn_sublayer", _ffn_body, _ffn_fake)
ffn_sublayer_backward_op = _define("ffn_sublayer_backward", _ffn_backward_body, _ffn_backward_fake)


def _ffn_setup(ctx, inputs, output):
    x, lnw, lnb, w1, b1, w2, b2, _, compute_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, lnw, lnb, w1, b1, w2, b2, mean, rstd)
    ctx.compute_dtype = compute_dtype


def _ffn_grad(ctx, g, _dmean, _drstd):
    grads = torch.ops.msf.ffn_sublayer_backward(*ctx.saved_tensors, g.contiguous(), ctx.compute_dtype)
    return (*grads, None, None)


ffn_sublayer_op.register_autograd(_ffn_grad, setup_context=_ffn_setup)


# a stage's last FFN sublayer with the stage's final LayerNorm in its forward kernel; its backward
# operator runs the norm's backward inside the FFN's dx kernel (`_stage_output_backward`)
def _ffn_stage_body(x: Tensor, lnw: Tensor, lnb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, eps: float,
                    compute_dtype: torch.dtype, snw: Tensor, snb: Tensor, stage_eps: float, hw: list[int],
                    y_dtype: torch.dtype, copy_dtype: torch.dtype | None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    w1, w2 = _ffn.compute_weights(compute_dtype, w1, w2)
    out, mean, rstd, y, y2 = _ffn._forward(x, lnw, lnb, w1, b1, w2, b2, eps, compute_dtype,
                                           _ffn._StageNormArgs(snw, snb, stage_eps, y_dtype, copy_dtype))
    return y, y.new_empty((0,)) if y2 is None else y2, out, mean, rstd  # no copy: an empty second output


def _ffn_stage_fake(x, lnw, lnb, w1, b1, w2, b2, eps, compute_dtype, snw, snb, stage_eps, hw, y_dtype, copy_dtype):
    out, mean, rstd = _ffn_fake(x, lnw, lnb, w1, b1, w2, b2, eps, compute_dtype)
    y = _contiguous_like(x, dtype=y_dtype)
    return y, y.new_empty((0,)) if copy_dtype is None else _contiguous_like(x, dtype=copy_dtype), out, mean, rstd


def _ffn_stage_backward_body(x: Tensor, lnw: Tensor, lnb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                             mean: Tensor, rstd: Tensor, out: Tensor, snw: Tensor, snb: Tensor, dy: Tensor,
                             dy2: Tensor | None, compute_dtype: torch.dtype, stage_eps: float,
                             hw: list[int]) -> list[Tensor]:
    w1c, w2c = _ffn.compute_weights(compute_dtype, w1, w2)  # the forward's, made again
    (dx, *param_grads), sn_sum = _ffn._stage_output_backward(x, lnw, lnb, w1c, b1, w2c, mean, rstd, out, snw, dy, dy2,
                                                            compute_dtype, b2.dtype, w1.dtype, stage_eps, tuple(hw))
    c = snw.shape[0]
    # the parameter gradients are slices of sum buffers; an operator's outputs may not alias
    return [dx, *(t.clone() for t in param_grads), sn_sum[:c].to(snw.dtype).clone(),
            sn_sum[c:].to(snb.dtype).clone()]


def _ffn_stage_backward_fake(x, lnw, lnb, w1, b1, w2, b2, mean, rstd, out, snw, snb, dy, dy2, compute_dtype,
                             stage_eps, hw):
    return [_contiguous_like(t) for t in (x, lnw, lnb, w1, b1, w2, b2, snw, snb)]


ffn_stage_output_op = _define("ffn_stage_output", _ffn_stage_body, _ffn_stage_fake)
ffn_stage_output_backward_op = _define("ffn_stage_output_backward", _ffn_stage_backward_body,
                                       _ffn_stage_backward_fake)


def _ffn_stage_setup(ctx, inputs, output):
    x, lnw, lnb, w1, b1, w2, b2, _, compute_dtype, snw, snb, stage_eps, hw, _, copy_dtype = inputs
    _, _, out, mean, rstd = output
    ctx.save_for_backward(x, lnw, lnb, w1, b1, w2, b2, mean, rstd, out, snw, snb)
    ctx.compute_dtype, ctx.stage_eps, ctx.hw, ctx.has_copy = compute_dtype, stage_eps, hw, copy_dtype is not None


def _ffn_stage_grad(ctx, dy, dy2, _dout, _dmean, _drstd):
    *ffn_saved, out, snw, snb = ctx.saved_tensors
    dy2 = dy2.contiguous() if ctx.has_copy and dy2 is not None else None
    if dy is None:  # only the copy was used
        dy, dy2 = dy2, None
    *grads, dsw, dsb = torch.ops.msf.ffn_stage_output_backward(*ffn_saved, out, snw, snb, dy.contiguous(), dy2,
                                                                ctx.compute_dtype, ctx.stage_eps, list(ctx.hw))
    return (*grads, None, None, dsw, dsb, None, None, None, None)


ffn_stage_output_op.register_autograd(_ffn_stage_grad, setup_context=_ffn_stage_setup)


def _ffn_stage_operator(x, lnw, lnb, w1, b1, w2, b2, eps, compute_dtype, snw, snb, stage_eps, hw, y_dtype, copy_dtype):
    y, y2, *_ = torch.ops.msf.ffn_stage_output(x, lnw, lnb, w1, b1, w2, b2, eps, compute_dtype, snw, snb, stage_eps,
                                               list(hw), y_dtype, copy_dtype)
    return y if copy_dtype is None else (y, y2)


def ffn_sublayer(x, lnw, lnb, w1, b1, w2, b2, eps: float = 1e-5, stage_norm=None):
    """`msf.kernels.ffn_sublayer.ffn_sublayer` through `msf::ffn_sublayer` (the eager composition
    where the kernels do not serve the dtypes or C); with `stage_norm`, through
    `msf::ffn_stage_output` (or the two ops in turn where it does not serve)."""
    if stage_norm is not None:
        return _ffn.dispatch_stage_norm(x, lnw, lnb, w1, b1, w2, b2, eps, stage_norm, _ffn_stage_operator,
                                        ffn_sublayer, stage_output)
    return _ffn.dispatch(x, lnw, lnb, w1, b1, w2, b2, eps, lambda *args: torch.ops.msf.ffn_sublayer(*args)[0])


# ----------------------------------------------------------------------------------------------
# attention half of a block: x + attention_sublayer(LN1(x), k, v), k, v from LN1(x) through the kv path
# ----------------------------------------------------------------------------------------------
# R = 1 has no convolution: its W_sr, b_sr, LN_sr are None in, its red / kin and their gradients
# empty tensors out (an operator returns no None).
def _none_if_empty(t: Tensor | None) -> Tensor | None:
    return None if t is None or t.numel() == 0 else t


def _embed(pew: Tensor | None, eps_pe: float, residual_dtype: torch.dtype) -> tuple | None:
    """`msf.kernels.attention_block`'s `embed` from the operator's flat arguments (None: no γ_pe)."""
    return None if pew is None else (eps_pe, residual_dtype)


def _block_body(x: Tensor, lnw: Tensor, lnb: Tensor, srw: Tensor | None, srb: Tensor | None, snw: Tensor | None,
                snb: Tensor | None, kvw: Tensor, kvb: Tensor, wq: Tensor, bq: Tensor, wo: Tensor, bo: Tensor,
                pew: Tensor | None, peb: Tensor | None, hw: list[int], ratio: int, eps: float, eps_sr: float,
                compute_dtype: torch.dtype, eps_pe: float,
                residual_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    embed = _embed(pew, eps_pe, residual_dtype)
    out, xn, red, kin, kv, o, lse, _ = _blk._forward(x, lnw, lnb, srw, srb, snw, snb, kvw, kvb, wq, bq, wo, bo,
                                                     tuple(hw), ratio, eps, eps_sr, compute_dtype,
                                                     None if embed is None else (pew, peb, *embed))
    return (out, xn, xn.new_empty((0,)) if red is None else red, xn.new_empty((0,)) if kin is None else kin, kv, o,
            lse)  # R = 1: two distinct empties (an operator's outputs may not alias)


def _block_fake(x, lnw, lnb, srw, srb, snw, snb, kvw, kvb, wq, bq, wo, bo, pew, peb, hw, ratio, eps, eps_sr,
                compute_dtype, eps_pe, residual_dtype):
    b, c, n = x.shape[0], lnw.shape[0], hw[0] * hw[1]
    patches = b * (hw[0] // ratio) * (hw[1] // ratio)
    kept = x.new_empty((patches, c) if ratio > 1 else (0,), dtype=compute_dtype)
    tokens = x.new_empty((b, n, c), dtype=x.dtype if pew is None else residual_dtype)
    return (tokens, _contiguous_like(tokens, dtype=compute_dtype), kept, kept.new_empty(kept.shape),
            x.new_empty((b, patches // b, 2 * c), dtype=compute_dtype), _contiguous_like(tokens, dtype=compute_dtype),
            x.new_empty((b, n), dtype=torch.float32))


def _block_backward_body(x: Tensor, lnw: Tensor, lnb: Tensor, srw: Tensor | None, srb: Tensor | None,
                         snw: Tensor | None, snb: Tensor | None, kvw: Tensor, kvb: Tensor, wq: Tensor, bq: Tensor,
                         wo: Tensor, bo: Tensor, pew: Tensor | None, peb: Tensor | None, xn: Tensor, red: Tensor,
                         kin: Tensor, kv: Tensor, o: Tensor, lse: Tensor, g: Tensor, hw: list[int], ratio: int,
                         eps: float, eps_sr: float, compute_dtype: torch.dtype, eps_pe: float,
                         residual_dtype: torch.dtype) -> list[Tensor]:
    params = (lnw, lnb, srw, srb, snw, snb, kvw, kvb, wq, bq, wo, bo, pew, peb)
    dtypes = {name: None if t is None else t.dtype for name, t in zip(_blk._PARAM_NAMES, params)}
    wsr, wkv, wq_c, wo_c = _blk.compute_weights(srw, kvw, wq, wo, compute_dtype)  # the forward's, made again
    embed = _embed(pew, eps_pe, residual_dtype)
    grads = _blk._backward(x, lnw, wsr, snw, wkv, wq_c, bq, wo_c, xn, _none_if_empty(red), _none_if_empty(kin), kv,
                           o, lse, g, tuple(hw), ratio, eps, eps_sr, compute_dtype, dtypes, None,
                           None if embed is None else (pew, peb, *embed))
    # parameter gradients are slices of shared sum buffers (an operator's outputs may not alias),
    # dense as the fake's (dW_sr comes as a channels-last view)
    return [grads[0]] + [x.new_empty((0,)) if t is None else t.clone(memory_format=torch.contiguous_format)
                         for t in grads[1:]]


def _block_backward_fake(x, lnw, lnb, srw, srb, snw, snb, kvw, kvb, wq, bq, wo, bo, pew, peb, xn, red, kin, kv, o, lse,
                         g, hw, ratio, eps, eps_sr, compute_dtype, eps_pe, residual_dtype):
    # d x: x's strides (the map's gradient keeps its layout; tokens are contiguous)
    return [torch.empty_like(x)] + [x.new_empty((0,)) if t is None else _contiguous_like(t)
                                    for t in (lnw, lnb, srw, srb, snw, snb, kvw, kvb, wq, bq, wo, bo, pew, peb)]


attention_block_op = _define("attention_block", _block_body, _block_fake)
attention_block_backward_op = _define("attention_block_backward", _block_backward_body, _block_backward_fake)
_BLOCK_TENSORS = 15  # x and the fourteen parameters (`_blk._PARAM_NAMES`)


def _block_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_BLOCK_TENSORS], *output[1:])
    ctx.args = inputs[_BLOCK_TENSORS:]


def _block_grad(ctx, g, *_saved_grads):
    grads = torch.ops.msf.attention_block_backward(*ctx.saved_tensors, g.contiguous(), *ctx.args)
    saved = ctx.saved_tensors[:_BLOCK_TENSORS]
    return (*(None if t is None else d for t, d in zip(saved, grads)), *(None for _ in ctx.args))


attention_block_op.register_autograd(_block_grad, setup_context=_block_setup)


def _block_operator(x, *tensors_and_args):
    """`msf::attention_block`'s out, from `dispatch`'s call (`embed` unpacked to the operator's scalars)."""
    *rest, embed = tensors_and_args
    eps_pe, residual_dtype = (0.0, x.dtype) if embed is None else embed
    return torch.ops.msf.attention_block(x, *rest, eps_pe, residual_dtype)[0]


def attention_block(x, hw, sr_ratio: int, p, embed_norm=None) -> Tensor:
    """`msf.kernels.attention_block.attention_block` through `msf::attention_block` (the eager
    composition, around this module's `attention_sublayer`, where the kernels do not serve; with
    `embed_norm`, the separate norm `map_layer_norm` first where they cannot take it in)."""
    return _blk.dispatch(x, hw, sr_ratio, p, _block_operator, attention_sublayer, embed_norm, map_layer_norm)


# ----------------------------------------------------------------------------------------------
# map LayerNorm: the patch embedding's norm, a B×C×h×w map in, B×(h·w)×C tokens out
# ----------------------------------------------------------------------------------------------
def _map_norm_body(x: Tensor, lnw: Tensor, lnb: Tensor, eps: float, out_dtype: torch.dtype,
                   copy_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    y, y2 = _mn._forward(x, lnw, lnb, eps, out_dtype, copy_dtype)
    return y, y.new_empty((0,)) if y2 is None else y2  # no copy: an empty second output


def _map_norm_fake(x, lnw, lnb, eps, out_dtype, copy_dtype):
    b, c, h, w = x.shape
    y = x.new_empty((b, h * w, c), dtype=out_dtype)
    return y, y.new_empty((0,)) if copy_dtype is None else y.new_empty(y.shape, dtype=copy_dtype)


def _map_norm_backward_body(x: Tensor, lnw: Tensor, lnb: Tensor, dy: Tensor, dy2: Tensor | None,
                            eps: float) -> list[Tensor]:
    dx, dw, db = _mn._backward(x, lnw, dy, eps, lnb.dtype, dy2)
    return [dx, dw.to(lnw.dtype).clone(), db.clone()]  # slices of one sum buffer: no aliasing outputs


def _map_norm_backward_fake(x, lnw, lnb, dy, dy2, eps):
    return [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device), _contiguous_like(lnw),
            _contiguous_like(lnb)]


map_layer_norm_op = _define("map_layer_norm", _map_norm_body, _map_norm_fake)
map_layer_norm_backward_op = _define("map_layer_norm_backward", _map_norm_backward_body, _map_norm_backward_fake)


def _map_norm_setup(ctx, inputs, output):
    x, lnw, lnb, eps, _, copy_dtype = inputs
    ctx.save_for_backward(x, lnw, lnb)
    ctx.eps = eps
    ctx.has_copy = copy_dtype is not None


def _map_norm_grad(ctx, dy, dy2):
    dy2 = dy2.contiguous() if ctx.has_copy and dy2 is not None else None
    if dy is None:  # only the copy was used
        dy, dy2 = dy2, None
    dx, dw, db = torch.ops.msf.map_layer_norm_backward(*ctx.saved_tensors, dy.contiguous(), dy2, ctx.eps)
    return dx, dw, db, None, None, None


map_layer_norm_op.register_autograd(_map_norm_grad, setup_context=_map_norm_setup)


def _map_norm_operator(x, lnw, lnb, eps, out_dtype, copy_dtype):
    y, y2 = torch.ops.msf.map_layer_norm(x, lnw, lnb, eps, out_dtype, copy_dtype)
    return y if copy_dtype is None else (y, y2)


def map_layer_norm(x, lnw, lnb, eps: float = 1e-5, *, with_copy: bool = False, out_cast: bool = False):
    """`msf.kernels.map_norm.map_layer_norm` through `msf::map_layer_norm` (eager where the kernels
    do not serve)."""
    return _mn.dispatch(x, lnw, lnb, eps, _map_norm_operator, with_copy, out_cast)


def stage_output(tokens, hw, lnw, lnb, eps: float = 1e-5, feeds_next: bool = True, decoder_linear: bool = False):
    """`msf.kernels.map_norm.stage_output` through `msf::map_layer_norm`."""
    return _mn.stage_output(tokens, hw, lnw, lnb, eps, feeds_next, decoder_linear, norm=map_layer_norm)


# ----------------------------------------------------------------------------------------------
# decoder MLP: the fuse MLP on the folded weights, stages 2-4 projected at their own resolution
# ----------------------------------------------------------------------------------------------
def _dec_body(f1: Tensor, p2: Tensor, p3: Tensor, p4: Tensor, m1: Tensor, cb: Tensor, w2: Tensor, b2: Tensor,
              seed: Tensor, p: float, size: list[int], compute_dtype: torch.dtype,
              save: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _dec._forward(f1, p2, p3, p4, m1, cb, w2, b2, seed, p, tuple(size), compute_dtype, save)


def _dec_fake(f1, p2, p3, p4, m1, cb, w2, b2, seed, p, size, compute_dtype, save):
    rows, e = f1.shape[0], w2.shape[0]
    saved = (rows if save else 0, e)
    return (f1.new_empty((rows, e), dtype=torch.promote_types(compute_dtype, p2.dtype)),
            f1.new_empty(saved, dtype=compute_dtype), f1.new_empty(saved, dtype=compute_dtype))


def _dec_backward_body(f1: Tensor, hs: Tensor, d: Tensor, m1: Tensor, w2: Tensor, cb: Tensor, b2: Tensor,
                       seed: Tensor, g: Tensor, p: float, size: list[int], lows: list[int],
                       compute_dtype: torch.dtype) -> list[Tensor]:
    df1, dp2, dp3, dp4, *param_grads = _dec._backward(f1, hs, d, m1, w2, seed, g, p, tuple(size),
                                                      list(zip(lows[::2], lows[1::2])), compute_dtype,
                                                      (cb.dtype, b2.dtype))
    return [df1, dp2, dp3, dp4, *(t.clone() for t in param_grads)]  # (slices of one sum buffer: no aliasing)


def _dec_backward_fake(f1, hs, d, m1, w2, cb, b2, seed, g, p, size, lows, compute_dtype):
    batch, e = f1.shape[0] // (size[0] * size[1]), w2.shape[0]
    dps = [f1.new_empty((batch, h, w, e), dtype=compute_dtype) for h, w in zip(lows[::2], lows[1::2])]
    return [_contiguous_like(f1), *dps, *(_contiguous_like(t) for t in (m1, cb, w2, b2))]


decoder_mlp_op = _define("decoder_mlp", _dec_body, _dec_fake)
decoder_mlp_backward_op = _define("decoder_mlp_backward", _dec_backward_body, _dec_backward_fake)


def _dec_setup(ctx, inputs, output):
    f1, p2, p3, p4, m1, cb, w2, b2, seed, p, size, compute_dtype, _save = inputs
    # h and D, and cb and b2 for their dtypes (a few hundred bytes)
    ctx.save_for_backward(f1, output[1], output[2], m1, w2, cb, b2, seed)
    ctx.p, ctx.size, ctx.compute_dtype = p, size, compute_dtype
    ctx.lows = [n for pt in (p2, p3, p4) for n in pt.shape[1:3]]


def _dec_grad(ctx, g, _dh, _dd):
    grads = torch.ops.msf.decoder_mlp_backward(*ctx.saved_tensors, g.contiguous(), ctx.p, ctx.size, ctx.lows,
                                               ctx.compute_dtype)
    return (*grads, None, None, None, None, None)


decoder_mlp_op.register_autograd(_dec_grad, setup_context=_dec_setup)


# the fold (M_i = W_i U_i, c = b + Σ W_i u_i): one launch each way
def _fold_body(w: Tensor, b: Tensor, us: list[Tensor], vs: list[Tensor], low_dtype: torch.dtype) -> list[Tensor]:
    ms, c = _dec._fold_forward(w, b, us, vs, low_dtype)
    return [*ms, c]


def _fold_fake(w, b, us, vs, low_dtype):
    e = w.shape[0]
    return [w.new_empty((e, u.shape[1]), dtype=torch.float32 if i == 0 else low_dtype) for i, u in enumerate(us)] \
        + [w.new_empty((e,), dtype=torch.float32)]


def _fold_backward_body(w: Tensor, us: list[Tensor], vs: list[Tensor], dms: list[Tensor], dc: Tensor) -> list[Tensor]:
    dw, db, dus, dvs = _dec._fold_backward(w, us, vs, dms, dc)
    return [dw, db, *dus, *dvs]


def _fold_backward_fake(w, us, vs, dms, dc):
    return [_contiguous_like(w, dtype=torch.float32), w.new_empty((w.shape[0],), dtype=torch.float32),
            *(_contiguous_like(t, dtype=torch.float32) for t in (*us, *vs))]


decoder_fold_op = _define("decoder_fold", _fold_body, _fold_fake)
decoder_fold_backward_op = _define("decoder_fold_backward", _fold_backward_body, _fold_backward_fake)


def _fold_setup(ctx, inputs, output):
    w, _b, us, vs, _low_dtype = inputs
    ctx.save_for_backward(w, *us, *vs)


def _fold_grad(ctx, grads):
    w, *rest = ctx.saved_tensors
    dms, dc = [g.contiguous() for g in grads[:4]], grads[4].contiguous()
    dw, db, *more = torch.ops.msf.decoder_fold_backward(w, rest[:4], rest[4:], dms, dc)
    return dw, db, more[:4], more[4:], None


decoder_fold_op.register_autograd(_fold_grad, setup_context=_fold_setup)


# `msf.kernels.decoder_mlp.fold` through `msf::decoder_fold` (its reference where the kernels do not serve)
_fold = functools.partial(_dec.fold, fused=decoder_fold_op)


def decoder_mlp(features, p: DecoderParams, dropout_p: float = 0.0, training: bool = False, *,
                seed: Tensor | None = None) -> Tensor:
    """`msf.kernels.decoder_mlp.decoder_mlp` through `msf::decoder_mlp` and `msf::decoder_fold` (the
    eager composition where the kernels do not serve the dtypes or geometry)."""
    def fused(*args):
        return torch.ops.msf.decoder_mlp(*args[:10], list(args[10]), args[11], _dec._saves_for_backward(args))[0]
    return _dec.dispatch(features, p, dropout_p, training, fused, seed, _fold)


# ----------------------------------------------------------------------------------------------
# head + loss: CE + Dice of the bilinearly upsampled logits
# ----------------------------------------------------------------------------------------------
def _head_loss_body(logits: Tensor, targets: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _hl._forward(logits, targets, eps)


def _head_loss_fake(logits, targets, eps):
    b, k = logits.shape[:2]
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((b, 2, _hl._k_pad(k)), dtype=torch.float32)


def _head_loss_backward_body(logits: Tensor, targets: Tensor, coef: Tensor, grad: Tensor) -> Tensor:
    return _hl._backward(logits, targets, coef, grad)


def _head_loss_backward_fake(logits, targets, coef, grad):
    return torch.empty_like(logits)


head_loss_op = _define("head_loss", _head_loss_body, _head_loss_fake)
head_loss_backward_op = _define("head_loss_backward", _head_loss_backward_body, _head_loss_backward_fake)


def _head_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _head_loss_grad(ctx, grad, _dcoef):
    logits, targets, coef = ctx.saved_tensors
    return torch.ops.msf.head_loss_backward(logits, targets, coef, grad), None, None


head_loss_op.register_autograd(_head_loss_grad, setup_context=_head_loss_setup)


def head_loss(logits: Tensor, targets: Tensor, eps: float = DEFAULT_DICE_EPS) -> Tensor:
    """`msf.kernels.head_loss.head_loss` through `msf::head_loss` (0-dim fp32 loss)."""
    _hl._validate(logits, targets, eps)
    return torch.ops.msf.head_loss(logits, targets, float(eps))[0]


# ----------------------------------------------------------------------------------------------
# LMSA: x + Σ_k z_k ⊙ PW_k(DW_k(x)); params = dw_3, dw_5, dw_7, pw ×3, pb ×3, fc1 w, b, fc2 w, b
# ----------------------------------------------------------------------------------------------
def _lmsa_body(x: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _lm._forward(x, tuple(params), x.dtype == torch.float32)[:5]  # (the sixth, `_Kept`, is None here)


def _lmsa_fake(x, params):
    b, c, h, w = x.shape
    cells = x.new_empty((b, _lm._CELLS, _lm._CELLS, c), dtype=torch.float32).permute(0, 3, 1, 2)  # as _stats sums them
    return (_lm._new_like(x), cells, x.new_empty((b, len(_lm.KERNEL_SIZES), c, c)),
            x.new_empty((b, h, w, len(_lm.KERNEL_SIZES) * c)),  # D = [DW_3(x); DW_5(x); DW_7(x)], x's dtype
            _lm._word_ordered_x(b, h, w, c, x.dtype, x.device))  # XW: x in the wgrad kernel's order


def _lmsa_backward_body(x: Tensor, dsave: Tensor, xw: Tensor, g: Tensor, cells: Tensor, wg: Tensor,
                        params: list[Tensor]) -> list[Tensor]:
    dx, pgrads = _lm._backward(x, dsave, xw, g, cells, wg, tuple(params), x.dtype == torch.float32)
    return [dx, *pgrads]


def _lmsa_backward_fake(x, dsave, xw, g, cells, wg, params):
    return [_lm._new_like(x), *(_contiguous_like(p) for p in params)]


lmsa_op = _define("lmsa", _lmsa_body, _lmsa_fake)
# Kept whole on CUDA too (module docstring): Inductor calls it as one extern op.
lmsa_backward_op = _define("lmsa_backward", _lmsa_backward_body, _lmsa_backward_fake, decompose=False)


def _lmsa_setup(ctx, inputs, output):
    x, params = inputs
    _, cells, wg, dsave, xw = output
    ctx.save_for_backward(x, dsave, xw, cells, wg, *params)


def _lmsa_grad(ctx, grad, _dcells, _dwg, _ddsave, _dxw):
    x, dsave, xw, cells, wg, *params = ctx.saved_tensors
    g = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    dx, *pgrads = torch.ops.msf.lmsa_backward(x, dsave, xw, g, cells, wg, params)
    return dx, pgrads


lmsa_op.register_autograd(_lmsa_grad, setup_context=_lmsa_setup)


def lmsa(x: Tensor, p: LMSAParams) -> Tensor:
    """`msf.kernels.lmsa.lmsa` through `msf::lmsa`."""
    _lm._check(x, p)
    return torch.ops.msf.lmsa(x, _lm._params_of(p))[0]


# the classifier inside: (logits, β, P, W̃), no D or XW (its backward works from x); the backward
# also takes β (for ∂L/∂W_c)
def _lmsa_classifier_body(x: Tensor, params: list[Tensor], weight: Tensor,
                          bias: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    beta, cells, wg, _, logits = _lm._forward(x, tuple(params), x.dtype == torch.float32, head=(weight, bias))
    return logits, beta, cells, wg


def _lmsa_classifier_fake(x, params, weight, bias):
    _, cells, wg, _, _ = _lmsa_fake(x, params)
    return (_lm._new_like(x, weight.shape[0]), x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32), cells, wg)


def _lmsa_classifier_backward_body(x: Tensor, dl: Tensor, cells: Tensor, wg: Tensor, beta: Tensor,
                                   params: list[Tensor], weight: Tensor, bias: Tensor) -> list[Tensor]:
    dx, pgrads = _lm._backward(x, None, None, dl, cells, wg, tuple(params), x.dtype == torch.float32,
                               head=(beta, weight, bias))
    if pgrads[-1]._base is not None and pgrads[-1]._base is pgrads[-2]._base:  # (an output may alias no other)
        pgrads[-1] = pgrads[-1].clone()
    return [dx, *pgrads]


def _lmsa_classifier_backward_fake(x, dl, cells, wg, beta, params, weight, bias):
    return [_lm._new_like(x), *(_contiguous_like(p) for p in (*params, weight, bias))]


lmsa_classifier_op = _define("lmsa_classifier", _lmsa_classifier_body, _lmsa_classifier_fake)
# Kept whole on CUDA too, as lmsa_backward
lmsa_classifier_backward_op = _define("lmsa_classifier_backward", _lmsa_classifier_backward_body,
                                      _lmsa_classifier_backward_fake, decompose=False)


def _lmsa_classifier_setup(ctx, inputs, output):
    x, params, weight, bias = inputs
    _, beta, cells, wg = output
    ctx.save_for_backward(x, cells, wg, beta, weight, bias, *params)


def _lmsa_classifier_grad(ctx, grad, _dbeta, _dcells, _dwg):
    x, cells, wg, beta, weight, bias, *params = ctx.saved_tensors
    dl = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    dx, *grads = torch.ops.msf.lmsa_classifier_backward(x, dl, cells, wg, beta, params, weight, bias)
    return dx, grads[:-2], grads[-2], grads[-1]


lmsa_classifier_op.register_autograd(_lmsa_classifier_grad, setup_context=_lmsa_classifier_setup)


def lmsa_classifier(x: Tensor, p: LMSAParams, weight: Tensor, bias: Tensor) -> Tensor:
    """`msf.kernels.lmsa.lmsa_classifier` through `msf::lmsa_classifier`."""
    _lm._check(x, p)
    _lm._check_classifier(x, weight, bias)
    return torch.ops.msf.lmsa_classifier(x, _lm._params_of(p), weight, bias)[0]


# ----------------------------------------------------------------------------------------------
# upsample + argmax (inference)
# ----------------------------------------------------------------------------------------------
def _upsample_argmax_body(logits: Tensor, size: list[int]) -> Tensor:
    return _ua.upsample_argmax(logits, tuple(size))


def _upsample_argmax_fake(logits, size):
    return logits.new_empty((logits.shape[0], *size), dtype=torch.int64)


upsample_argmax_op = _define("upsample_argmax", _upsample_argmax_body, _upsample_argmax_fake)


def upsample_argmax(logits: Tensor, size) -> Tensor:
    """`msf.kernels.upsample_argmax.upsample_argmax` through `msf::upsample_argmax`."""
    size = [size, size] if isinstance(size, int) else list(size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or an (H, W) pair, got {size!r}")
    return torch.ops.msf.upsample_argmax(logits, size)


@dataclass(frozen=True)
class FusedOp:
    """One op of `msf.backend.Ops`: `entry` runs eagerly (the kernel module's public function, its
    `torch.autograd.Function`: no dispatcher in the way), `traced` under torch.compile (the same
    kernels behind the `msf::` operators above)."""

    entry: Callable
    traced: Callable


# What `msf.backend.get_ops("triton")` uses, keyed by the op names of `msf.backend.Ops`.
REGISTRY: dict[str, FusedOp] = {
    "attention": FusedOp(_attn.attention, attention),
    "attention_block": FusedOp(_blk.attention_block, attention_block),
    "attention_sublayer": FusedOp(_sub.attention_sublayer_for_model, attention_sublayer),
    "decoder_mlp": FusedOp(_dec.decoder_mlp, decoder_mlp),
    "ffn_sublayer": FusedOp(_ffn.ffn_sublayer, ffn_sublayer),
    "head_loss": FusedOp(_hl.head_loss, head_loss),
    "lmsa": FusedOp(_lm.lmsa, lmsa),
    "lmsa_classifier": FusedOp(_lm.lmsa_classifier, lmsa_classifier),
    "map_layer_norm": FusedOp(_mn.map_layer_norm, map_layer_norm),
    "stage_output": FusedOp(_mn.stage_output, stage_output),
    "upsample_argmax": FusedOp(_ua.upsample_argmax, upsample_argmax),
}
OPERATORS = ("attention", "attention_backward", "attention_block", "attention_block_backward", "attention_sublayer",
             "attention_sublayer_backward", "decoder_fold", "decoder_fold_backward", "decoder_mlp",
             "decoder_mlp_backward", "ffn_stage_output", "ffn_stage_output_backward", "ffn_sublayer",
             "ffn_sublayer_backward", "head_loss", "head_loss_backward", "lmsa", "lmsa_backward", "lmsa_classifier",
             "lmsa_classifier_backward", "map_layer_norm",
             "map_layer_norm_backward", "upsample_argmax")
