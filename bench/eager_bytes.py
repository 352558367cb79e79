"""Bytes the eager PyTorch path moves, counted aten op by aten op on meta tensors (issue 12, item 4).

    python -m msf.bench.eager_bytes [--batch 32] [--size 512] [--top 15] [--json PATH]

The model (or one of its fused ops, alone) runs on the `meta` device, so nothing is computed or
allocated; a `TorchDispatchMode` below autograd sees every aten op of the forward and of autograd's
backward and adds, for each, the bytes of its tensor inputs and outputs:

- An op whose every tensor output aliases an input without writing it (view, reshape-as-view,
  transpose, expand, slice, as_strided, detach, t, permute, unsqueeze, split / chunk, ...) moves
  nothing; this is read from the op's schema (`alias_info` of its returns), not from a hand list.
  The one exception is `_unsafe_view` (a view whose schema declares a fresh tensor, used by
  `reshape` after a clone and by `matmul`): free too. Allocations (`empty*`, `new_empty*`) move
  nothing; an `out=` argument counts as written, not read.
- A tensor counts its distinct elements × element size: dimensions of stride 0 (an `expand`ed
  gradient, a broadcast bias) count once, as a kernel reading them hits cache. Every other element
  counts once per op that reads or writes it (reuse inside a kernel is free, between kernels it is
  not): the same rule as `bench/bytes_*.py`, now applied by the machine to every op autograd runs.

Autocast: CUDA autocast does not apply to meta tensors (their dispatch keys carry no Autocast key),
and fake CUDA tensors cannot go through autograd on a CPU-only build. So `CudaAutocastEmulation`, a
`TorchFunctionMode` above autograd (where autocast sits), casts the arguments of each call the way
CUDA autocast's op lists do (bf16 for matmul / conv / linear, fp32 for layer_norm, the
interpolation ops, the losses; softmax / log_softmax / sum get `dtype=float32`; see `_LOWER`,
`_FP32`, `_FP32_OUT_DTYPE`, `_PROMOTE`, named after the aten ops torch registers an
`AutocastCUDA` kernel for), with `.to()` calls that autograd records exactly as the real casts,
and caches the casts of leaf weights as autocast does. A call that reaches an op with an
`AutocastCUDA` kernel missing from those lists is an error, not a silent fp32 run.

Variants of one training step (`model.loss`, forward + backward, B = batch, size², bf16 autocast;
the images in bf16, as the device pipeline hands a training step under autocast, `DeviceBatches`'
image_dtype: before 2026-12-06 they were float32 and every variant held their cast, 0.15 GB at
B = 32, 512²):
- `paper`: eager, classifier after the ×4 upsample (`MicroSegFormer(paper_head_order=True)`);
- `h4`: eager, classifier at H/4 then the 19-class upsample (`paper_head_order=False`);
- `triton_rest`: the `h4` step with the ops the triton backend fuses (`msf.backend.fused_op_names`)
  replaced by uncounted stand-ins of the right shapes and dtypes, and the triton backend's own
  PyTorch ops (`autocast_weights`: the convolutions' weights cast together; `weight_copies`: the
  blocks' weight matrices cast together for the fused ops): what stays eager on triton.
Per op (`eager_op_bytes`): the eager reference of each fused op at the model's shapes and autocast
dtypes (the arguments the model hands it), forward and backward.

Against SPEC §6b (72.8 / 62.3 / 16.2 GB for paper / h4 / triton_rest; this module, 2026-11-29,
B = 32, 512²: 108.8 / 78.9 / 26.1 GB): SPEC's figures are those of a model cast to bf16 without
autocast (the same counter on `model.to(bfloat16)`, bf16 images: 70.9 / 60.3 / 14.9 GB). Training
runs autocast over fp32 weights, which adds the casts (`_to_copy`: 31.8 / 16.4 / 6.6 GB) and
runs LayerNorm, softmax and the bilinear upsamples in fp32: the upsample alone is ~24 GB of the
paper order (kept in bf16 the steps would count 84.9 / 74.3 / 20.4 GB). The per-op counts agree
with the hand counts of `bench/bytes_*.py`: eager head + loss 21.9 GB here against 21.9 GB
("eager-lowres"), LMSA 13.6 against 14.8 GB.

Floors are bytes ÷ bandwidth: H100 SXM 3.0 TB/s (SPEC §8, device-to-device copy measured) and
A100 80 GB SXM 1.7 TB/s (about 85 % of its 2.04 TB/s peak, the H100's copy-to-peak ratio; assumed,
not measured here).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BANDWIDTH = {"H100": 3.0e12, "A100": 1.7e12}  # bytes/s, see the module docstring
OPS = ("head_loss", "upsample_argmax", "attention_sublayer", "map_layer_norm", "attention_block",
       "attention_block_embedded", "ffn_sublayer", "stage_output", "ffn_stage_output", "decoder_mlp", "lmsa",
       "lmsa_classifier")
STEP_VARIANTS = ("paper", "h4", "triton_rest")
PHASES = ("forward", "backward")

# ----------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# Views whose schema declares a fresh output (so autograd does not track the alias): reshape's
# `clone` + `_unsafe_view`, matmul's folding of batch dimensions. The clone is counted, the view not.
_UNDECLARED_VIEWS = {"_unsafe_view"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements × element size (stride-0 dimensions count once)."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return n * t.element_size()


@lru_cache(maxsize=None)
def _op_kind(func: torch._ops.OpOverload) -> str:
    """"view" when every output aliases an input read-only, "alloc" for allocations, else "data"."""
    name = func._schema.name.split("::")[-1]
    if name in _ALLOCATIONS:
        return "alloc"
    if name in _UNDECLARED_VIEWS:
        return "view"
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return "view"
    return "data"


@lru_cache(maxsize=None)
def _out_argument_names(func: torch._ops.OpOverload) -> frozenset:
    return frozenset(a.name for a in func._schema.arguments if a.is_out)


def op_tensors(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out) -> list[torch.Tensor]:
    """The tensors one aten call moves: its tensor inputs (an `out=` argument counts as written, not
    read) and its outputs; none for a view or an allocation."""
    if _op_kind(func) != "data":
        return []
    outs = _out_argument_names(func)
    read = tree_leaves((args, {k: v for k, v in kwargs.items() if k not in outs}))
    return [t for t in read + tree_leaves(out) if isinstance(t, torch.Tensor)]


class ByteCounter(TorchDispatchMode):
    """Sums the bytes of every aten op's tensor inputs and outputs, per (phase, op name).

    `phase` labels what runs ("forward" / "backward"); inside `paused()` nothing is counted.
    `launches[phase]`: the ops that move bytes, each a kernel launch on a GPU (the record-function
    markers and dtype queries autograd also dispatches move none and launch nothing)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # bytes, calls
        self.launches: dict[str, int] = defaultdict(int)
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused or _op_kind(func) != "data":
            return out
        moved = sum(tensor_bytes(t) for t in op_tensors(func, args, kwargs, out))
        row = self.rows[(self.phase, func._schema.name.split("::")[-1])]
        row[0] += moved
        row[1] += 1
        if moved:
            self.launches[self.phase] += 1
        return out

    def total(self, phase: str | None = None) -> int:
        return sum(b for (p, _), (b, _) in self.rows.items() if phase in (None, p))

    def by_op(self) -> list[dict]:
        """[{op, forward, backward, total, calls}] largest first, summed over phases."""
        merged: dict[str, dict] = {}
        for (phase, name), (nbytes, calls) in self.rows.items():
            row = merged.setdefault(name, {"op": name, "forward": 0, "backward": 0, "calls": 0})
            row[phase] += nbytes
            row["calls"] += calls
        for row in merged.values():
            row["total"] = row["forward"] + row["backward"]
        return sorted(merged.values(), key=lambda r: -r["total"])


# ----------------------------------------------------------------------------------------------
# CUDA autocast, emulated above autograd
# ----------------------------------------------------------------------------------------------
# CUDA autocast's op lists (aten/src/ATen/autocast_mode.{h,cpp}; torch 2.13), by aten op name.
_LOWER = frozenset({
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "cudnn_convolution", "cudnn_convolution_transpose", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "lstm_cell",
    "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention"})
_BANNED = frozenset({"binary_cross_entropy"})  # autocast raises on it; so does the emulation
_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "rms_norm",
    "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
    "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
    "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa", "norm"})
_FP32_OUT_DTYPE = frozenset({"softmax", "log_softmax", "cumprod", "cumsum", "prod", "sum", "linalg_vector_norm",
                             "linalg_matrix_norm"})
_PROMOTE = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
                      "index_put", "tensordot", "scatter_add"})
# Python-level composites whose inner aten calls a TorchFunctionMode does not see, by what autocast
# does to those inner calls: F.interpolate reaches an upsample op (fp32 list) in every mode but
# "area"; cross_entropy is log_softmax(dtype=fp32) + nll_loss (fp32), the same bytes as casting first.
_COMPOSITES = {"interpolate": lambda args, kwargs: "fp32" if _interp_mode(args, kwargs) != "area" else None,
               "cross_entropy": lambda args, kwargs: "fp32"}


def _interp_mode(args, kwargs) -> str:
    return kwargs.get("mode", args[3] if len(args) > 3 else "nearest")


def aten_name(func: Callable) -> str:
    """The aten op name a Python-level torch function reaches: `__rmatmul__` → matmul, `pow_` stays."""
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        name = name[1:] if name.startswith("r") and name[1:] in ("matmul", "pow") else name
    return name


@lru_cache(maxsize=None)
def has_autocast_cuda_kernel(name: str) -> bool:
    """Whether torch registers an AutocastCUDA kernel for any overload of aten::`name`."""
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    if not hasattr(packet, "overloads"):
        return False
    qualified = (f"aten::{name}" if o == "default" else f"aten::{name}.{o}" for o in packet.overloads())
    for q in qualified:
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(q, "AutocastCUDA"):
                return True
        except RuntimeError:  # an overload the Python side lists but the dispatcher does not hold
            continue
    return False


def autocast_policy(name: str) -> str | None:
    if name in _LOWER:
        return "lower"
    if name in _FP32:
        return "fp32"
    if name in _FP32_OUT_DTYPE:
        return "fp32_out"
    if name in _PROMOTE:
        return "promote"
    return None


class CudaAutocastEmulation(TorchFunctionMode):
    """`torch.autocast("cuda", dtype)` for tensors autocast cannot see (meta): casts each call's
    floating arguments by CUDA autocast's policy, with casts autograd records (see the module
    docstring). Leaf tensors that require grad are cast once per region, as autocast caches them.

    Inside, CUDA autocast's thread-local flag is on and its dtype `dtype`, so a region the model runs
    under `torch.autocast("cuda", enabled=False)` (the decoder's fold, `msf.kernels.decoder_mlp.fold_reference`,
    which turns CUDA autocast off for meta tensors for this reason) is not cast, as on a GPU, and
    code that asks CUDA autocast for its dtype (`msf.precision.autocast_dtype`) gets this one."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._outer: list[tuple[bool, torch.dtype]] = []  # CUDA autocast's (flag, dtype) outside each entry

    def __enter__(self):
        self._outer.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        self._cache.clear()
        enabled, dtype = self._outer.pop()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)
        return super().__exit__(*exc)

    def _cast(self, x, to: torch.dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64) \
                or x.dtype == to:
            return x
        cacheable = x.is_leaf and x.requires_grad
        if cacheable and (id(x), to) in self._cache:
            return self._cache[(id(x), to)][1]
        y = x.to(to)
        if cacheable:
            self._cache[(id(x), to)] = (x, y)
        return y

    def _cast_all(self, args, kwargs, to):
        def cast(v):
            if isinstance(v, (list, tuple)):
                return type(v)(cast(e) for e in v)
            return self._cast(v, to)
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not torch.is_autocast_enabled("cuda"):  # a region that turned autocast off
            return func(*args, **kwargs)
        name = aten_name(func)
        policy = autocast_policy(name)
        if policy is None and name in _COMPOSITES:
            policy = _COMPOSITES[name](args, kwargs)
        elif policy is None and (name in _BANNED or has_autocast_cuda_kernel(name)):
            raise NotImplementedError(f"aten::{name} has an AutocastCUDA kernel but no policy in msf.bench.eager_bytes")
        if policy == "lower":
            args, kwargs = self._cast_all(args, kwargs, self.dtype)
        elif policy == "fp32":
            args, kwargs = self._cast_all(args, kwargs, torch.float32)
        elif policy == "fp32_out":
            first = next((a for a in tree_leaves(args) if isinstance(a, torch.Tensor)), None)
            if first is not None and first.is_floating_point() and first.dtype != torch.float64 \
                    and kwargs.get("dtype") is None:
                kwargs["dtype"] = torch.float32
        elif policy == "promote":
            floats = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()
                      and t.dtype != torch.float64]
            widest = torch.float32 if any(t.dtype == torch.float32 for t in floats) else self.dtype
            args, kwargs = self._cast_all(args, kwargs, widest)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# stand-ins for the fused ops (triton_rest)
# ----------------------------------------------------------------------------------------------
def _flatten(value, leaves: list):
    """`value` with every tensor replaced by its index in `leaves` (tuples, dataclasses walked)."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return _Leaf(len(leaves) - 1)
    if isinstance(value, tuple):
        return tuple(_flatten(v, leaves) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: _flatten(getattr(value, f.name), leaves) for f in dataclasses.fields(value)})
    return value


def _rebuild(template, tensors):
    if isinstance(template, _Leaf):
        return tensors[template.index]
    if isinstance(template, tuple):
        return tuple(_rebuild(v, tensors) for v in template)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        return type(template)(**{f.name: _rebuild(getattr(template, f.name), tensors)
                                 for f in dataclasses.fields(template)})
    return template


@dataclasses.dataclass(frozen=True)
class _Leaf:
    index: int


class _Uncounted(torch.autograd.Function):
    """Runs `fn` with counting paused; its backward hands back uncounted empty gradients."""

    @staticmethod
    def forward(ctx, fn, counter, template, *tensors):
        ctx.counter = counter
        ctx.set_materialize_grads(False)  # (an output nothing reads gets no zeros fill: the fused ops make none)
        ctx.save_for_backward(*tensors)
        with counter.paused():
            return fn(*_rebuild(template, tensors))

    @staticmethod
    def backward(ctx, *grads):
        with ctx.counter.paused():
            return (None, None, None, *(torch.empty_like(t) if need else None
                                        for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])))


def uncounted(fn: Callable[..., torch.Tensor], counter: ByteCounter) -> Callable[..., torch.Tensor]:
    """`fn` as an uncounted stand-in: same output shape and dtype, gradients of the inputs' shapes."""
    def call(*args, **kwargs):
        leaves: list[torch.Tensor] = []
        template = _flatten((args, tuple(kwargs.items())), leaves)
        return _Uncounted.apply(lambda a, kw: fn(*a, **dict(kw)), counter, template, *leaves)
    return call


# ----------------------------------------------------------------------------------------------
# the model and its ops on meta tensors
# ----------------------------------------------------------------------------------------------
def _config():
    from msf.model import ModelConfig
    return ModelConfig()


def stage_shape(stage: int, size: int) -> tuple[int, int, int]:
    """(N tokens, M reduced keys, C channels) of an attention block in stage 1..4 at size²."""
    cfg = _config()
    if not 1 <= stage <= len(cfg.channels):
        raise ValueError(f"stage must be 1..{len(cfg.channels)}, got {stage}")
    side = size // 4 // 2 ** (stage - 1)
    reduced = side // cfg.sr_ratios[stage - 1]
    return side * side, reduced * reduced, cfg.channels[stage - 1]


def _meta(*shape, dtype=torch.float32, grad=False, channels_last=False) -> torch.Tensor:
    t = torch.empty(*shape, device="meta", dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _embedded_block(fmap, hw, ratio, params, embed):
    """A stage's first block as the eager model runs it: the patch embedding's norm, then the block."""
    from msf import backend
    return backend.EAGER_OPS.attention_block(fmap, hw, ratio, params, embed_norm=embed)


def _op_call(op: str, stage: int | None, batch: int, size: int, dtype: torch.dtype):
    """(eager fn, args, differentiable) of `op` with the arguments the model gives it under autocast."""
    from msf import backend
    cfg = _config()
    low, k = size // 4, cfg.num_classes
    if op == "head_loss":  # the classifier's low-res logits (a bf16 conv output) and uint8 masks
        return backend.eager_head_loss, (_meta(batch, k, low, low, dtype=dtype, grad=True),
                                         _meta(batch, size, size, dtype=torch.uint8)), True
    if op == "upsample_argmax":
        return backend.eager_upsample_argmax, (_meta(batch, k, low, low, dtype=dtype), (size, size)), False
    if op == "attention_sublayer":
        if stage is None:
            raise ValueError("attention_sublayer needs stage=1..4")
        n, m, c = stage_shape(stage, size)
        kv = _meta(batch, m, 2 * c, dtype=dtype, grad=True)  # the kv projection's bf16 output
        key, value = kv.chunk(2, dim=-1)
        return backend.EAGER_OPS.attention_sublayer, (
            _meta(batch, n, c, grad=True), _meta(batch, n, c, grad=True), key, value,  # LayerNorm out (fp32), residual
            _meta(c, c, grad=True), _meta(c, grad=True), _meta(c, c, grad=True), _meta(c, grad=True)), True
    if op == "map_layer_norm":
        if stage is None:
            raise ValueError("map_layer_norm needs stage=1..4")
        n, _, c = stage_shape(stage, size)
        side = int(round(n ** 0.5))
        # the patch embedding's convolution output (a bf16 NCHW map) and fp32 master γ, β
        return backend.EAGER_OPS.map_layer_norm, (_meta(batch, c, side, side, dtype=dtype, grad=True),
                                                  _meta(c, grad=True), _meta(c, grad=True), 1e-5), True
    if op == "stage_output":
        if stage is None:
            raise ValueError("stage_output needs stage=1..4")
        n, _, c = stage_shape(stage, size)
        side = int(round(n ** 0.5))
        # the residual stream's fp32 tokens and fp32 master γ, β; the eager path's two maps are one
        # tensor, so its first output carries the op (the next convolution's cast is that op's own)
        return (lambda *a: backend.EAGER_OPS.stage_output(*a)[0]), (
            _meta(batch, n, c, grad=True), (side, side), _meta(c, grad=True), _meta(c, grad=True), 1e-5,
            stage < len(cfg.channels)), True
    if op in ("attention_block", "attention_block_embedded"):
        if stage is None:
            raise ValueError(f"{op} needs stage=1..4")
        n, _, c = stage_shape(stage, size)
        side, ratio = int(round(n ** 0.5)), cfg.sr_ratios[stage - 1]
        conv = ((_meta(c, c, ratio, ratio, grad=True), _meta(c, grad=True), _meta(c, grad=True), _meta(c, grad=True))
                if ratio > 1 else (None,) * 4)
        # the residual stream (fp32 under CUDA autocast) and the fp32 master parameters
        params = backend.AttentionBlockParams(
            _meta(c, grad=True), _meta(c, grad=True), *conv, _meta(2 * c, c, grad=True), _meta(2 * c, grad=True),
            _meta(c, c, grad=True), _meta(c, grad=True), _meta(c, c, grad=True), _meta(c, grad=True))
        if op == "attention_block":
            return backend.EAGER_OPS.attention_block, (_meta(batch, n, c, grad=True), (side, side), ratio, params), True
        # a stage's first block: the patch embedding's bf16 NCHW map and its norm's fp32 γ, β in front
        # (an argument of their own, so that whoever walks the arguments for tensors finds them)
        embed = backend.EmbedNorm(_meta(c, grad=True), _meta(c, grad=True), 1e-5)
        return (_embedded_block, (_meta(batch, c, side, side, dtype=dtype, grad=True), (side, side), ratio, params,
                                  embed), True)
    if op in ("ffn_sublayer", "ffn_stage_output"):
        if stage is None:
            raise ValueError(f"{op} needs stage=1..4")
        n, _, c = stage_shape(stage, size)
        hid = cfg.ffn_expansion * c
        # the attention sublayer's fp32 output (the residual stream) and the fp32 master parameters
        args = (_meta(batch, n, c, grad=True), _meta(c, grad=True), _meta(c, grad=True), _meta(hid, c, grad=True),
                _meta(hid, grad=True), _meta(c, hid, grad=True), _meta(c, grad=True))
        if op == "ffn_sublayer":
            return backend.EAGER_OPS.ffn_sublayer, args, True
        # a stage's last block: then the stage's final norm (fp32 γ, β), as stage_output (its first map
        # carries the op: eager's two maps are one tensor)
        side = int(round(n ** 0.5))
        norm = backend.StageNorm(_meta(c, grad=True), _meta(c, grad=True), 1e-5, (side, side),
                                 stage < len(cfg.channels), True)
        return (lambda *a: backend.EAGER_OPS.ffn_sublayer(*a)[0]), (*args, 1e-5, norm), True
    if op == "decoder_mlp":
        e, low_sides = cfg.decoder_dim, [size // 4 // 2 ** i for i in range(len(cfg.channels))]
        # the stages' outputs: fp32 LayerNorm tokens seen as B×C×h×w maps (channels-last strides)
        features = [_meta(batch, c, s, s, grad=True, channels_last=True) for c, s in zip(cfg.channels, low_sides)]
        params = backend.DecoderParams(
            unify_weights=tuple(_meta(e, c, grad=True) for c in cfg.channels),
            unify_biases=tuple(_meta(e, grad=True) for _ in cfg.channels),
            fuse1_weight=_meta(e, len(cfg.channels) * e, grad=True), fuse1_bias=_meta(e, grad=True),
            fuse2_weight=_meta(e, e, grad=True), fuse2_bias=_meta(e, grad=True))
        return backend.eager_decoder_mlp, (features, params, cfg.decoder_dropout, True), True
    if op in ("lmsa", "lmsa_classifier"):
        c = cfg.decoder_dim
        params = backend.LMSAParams(
            dw_weights=tuple(_meta(c, 1, kk, kk, grad=True) for kk in cfg.lmsa_kernels),
            pw_weights=tuple(_meta(c, c, grad=True) for _ in cfg.lmsa_kernels),
            pw_biases=tuple(_meta(c, grad=True) for _ in cfg.lmsa_kernels),
            fc1_weight=_meta(3 * c // cfg.lmsa_reduction, 3 * c, grad=True),
            fc1_bias=_meta(3 * c // cfg.lmsa_reduction, grad=True),
            fc2_weight=_meta(3 * c, 3 * c // cfg.lmsa_reduction, grad=True), fc2_bias=_meta(3 * c, grad=True))
        # the decoder's fused output, a bf16 B×N×C tensor seen as B×C×h×w: channels-last strides
        x = _meta(batch, c, low, low, dtype=dtype, grad=True, channels_last=True)
        if op == "lmsa":
            return backend.eager_lmsa, (x, params), True
        # with the classifier on its output (the model's low-res logits; fp32 master weights)
        return backend.eager_lmsa_classifier, (x, params, _meta(k, c, grad=True), _meta(k, grad=True)), True
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def count_op(op: str, *, stage: int | None = None, batch: int = 32, size: int = 512,
             dtype: torch.dtype = torch.bfloat16) -> ByteCounter:
    """The counter after one forward (and backward, where the op has one) of `op`'s eager path."""
    fn, args, differentiable = _op_call(op, stage, batch, size, dtype)
    counter = ByteCounter()
    with counter:
        with CudaAutocastEmulation(dtype), torch.set_grad_enabled(differentiable):
            out = fn(*args)
        if differentiable:
            with counter.paused():
                grad = torch.empty_like(out)
            counter.phase = "backward"
            out.backward(grad)
    return counter


def _meta_model(variant: str):
    from msf.model import MicroSegFormer
    with torch.device("meta"):
        return MicroSegFormer(backend="eager", paper_head_order=(variant == "paper")).train()


@contextlib.contextmanager
def _fused_ops_uncounted(counter: ByteCounter, dtype: torch.dtype) -> Iterator[list[str]]:
    """msf.model's op table with the triton backend's fused ops swapped for uncounted stand-ins."""
    from unittest import mock

    from msf import backend, model
    fused = [name for name in backend.fused_op_names("triton")]
    eager = backend.get_ops("eager")
    table = {f.name: uncounted(getattr(eager, f.name), counter) if f.name in fused else getattr(eager, f.name)
             for f in dataclasses.fields(backend.Ops)}
    if "decoder_mlp" in fused:
        table["decoder_mlp"] = _decoder_mlp_host_counted(counter, dtype)
    if "stage_output" in fused:
        table["stage_output"] = _stage_output_standin(counter, dtype)
    if "ffn_sublayer" in fused:
        table["ffn_sublayer"] = _ffn_sublayer_standin(table["ffn_sublayer"], table["stage_output"])
    # the convolutions' autocast copies: the triton backend's own PyTorch ops, part of the rest
    table["autocast_weights"] = backend.get_ops("triton").autocast_weights
    # the blocks' weight matrices cast once a step for the fused ops (one cat, one cast): the rest's too
    table["weight_copies"] = backend.get_ops("triton").weight_copies
    table = backend.Ops(**table)
    with mock.patch.object(model, "get_ops", lambda _backend: table):
        yield fused


def _stage_output_standin(counter: ByteCounter, dtype: torch.dtype) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The triton backend's stage_output, uncounted, with its outputs' dtypes: under the emulated
    CUDA autocast to `dtype`, where a next stage reads it, the second map is the fused kernel's copy,
    not the decoder's fp32 map again, so the eager rest keeps neither the next convolution's cast
    nor autograd's sum of the two maps' gradients (the kernel's backward adds them); with
    `decoder_linear` (every stage, as `msf.model.Stage` calls it) the decoder's map is in `dtype`
    too, so the rest keeps neither the decoder projection's cast of it nor that cast's backward."""
    def fused(tokens, hw, weight, bias, eps, feeds_next, decoder_linear=False):
        out, _ = backend.eager_stage_output(tokens, hw, weight, bias, eps, feeds_next)
        decoder_map = out.to(dtype) if decoder_linear and out.dtype != dtype else out
        if feeds_next and out.dtype != dtype:
            return decoder_map, out.to(dtype)
        return decoder_map, decoder_map.clone()  # a tensor of its own either way: the two gradients reach the op apart

    from msf import backend
    return uncounted(fused, counter)


def _ffn_sublayer_standin(sublayer: Callable[..., torch.Tensor], stage_output: Callable[..., tuple]) -> Callable:
    """The triton backend's ffn_sublayer from the stand-ins of the sublayer and of stage_output: with a
    stage norm (a stage's last block) the fused op writes the maps stage_output writes, in its dtypes."""
    def call(x, lnw, lnb, w1, b1, w2, b2, eps=1e-5, stage_norm=None):
        out = sublayer(x, lnw, lnb, w1, b1, w2, b2, eps)
        return out if stage_norm is None else stage_norm.applied(out, stage_output)
    return call


def _decoder_mlp_host_counted(counter: ByteCounter, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The triton backend's decoder_mlp with stages 2-4's projections counted (`F.linear` in
    `msf.kernels.decoder_mlp.project`: plain PyTorch, part of the eager rest) and its kernels (the
    fold's and the fused MLP's) uncounted, stood in for by their PyTorch form with the kernels'
    output dtypes (the fold's M_2..M_4 in the products' dtype)."""
    from msf.kernels import decoder_mlp as dec
    core = uncounted(lambda f1, lows, m1, c, w2, b2, size: dec.fused_reference(f1, lows, m1, c, w2, b2, None, 0.0,
                                                                                 size), counter)

    def fold_standin(p, cdt):
        ms, c = dec.fold_reference(p)
        return (ms[0], *(m.to(cdt) for m in ms[1:]), c)
    fold_uncounted = uncounted(fold_standin, counter)

    def fold(p, cdt):  # (the fold's own parameters only: a stand-in hands back a gradient for each it takes)
        *ms, c = fold_uncounted(dataclasses.replace(p, fuse2_weight=None, fuse2_bias=None), cdt)
        return ms, c

    def call(features, p, dropout_p, training):
        f1, lows, m1, c = dec.project(features, p, dtype, fold)
        b, _, h, w = features[0].shape
        return core(f1, tuple(lows), m1, c, p.fuse2_weight, p.fuse2_bias, (h, w)).view(b, h * w, -1)
    return call


def count_step(variant: str, *, batch: int = 32, size: int = 512, dtype: torch.dtype = torch.bfloat16) -> ByteCounter:
    """The counter after one forward + backward of `model.loss` in `variant` (see the docstring)."""
    if variant not in STEP_VARIANTS:
        raise ValueError(f"variant must be one of {STEP_VARIANTS}, got {variant!r}")
    model = _meta_model(variant)
    images = _meta(batch, 3, size, size, dtype=dtype)  # as the device pipeline hands a step under autocast
    masks = _meta(batch, size, size, dtype=torch.uint8)
    counter = ByteCounter()
    swap = _fused_ops_uncounted(counter, dtype) if variant == "triton_rest" else contextlib.nullcontext()
    with swap, counter:
        with CudaAutocastEmulation(dtype):
            loss = model.loss(images, masks)
        counter.phase = "backward"
        loss.backward()
    return counter


# ----------------------------------------------------------------------------------------------
# memory kept for the backward
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def saved_storages(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict]:
    """Within: every tensor autograd saves for the backward, as {storage: bytes} (a view counts its
    whole storage, once), leaving out the storages of `exclude` (the inputs and parameters that live
    anyway). Works on meta tensors, on the CPU tensors of a recorded capture and on real ones."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def eager_op_saved_bytes(op: str, *, stage: int | None = None, batch: int = 32, size: int = 512,
                         dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the eager path of fused op `op` keeps for its backward under bf16 autocast at the model's
    shapes, beyond its own inputs (autocast's bf16 copies of the weights included)."""
    fn, args, differentiable = _op_call(op, stage, batch, size, dtype)
    if not differentiable:
        return 0
    inputs: list[torch.Tensor] = []
    _flatten(args, inputs)  # (walks LMSA's parameter dataclass too)
    with saved_storages(inputs) as seen, CudaAutocastEmulation(dtype):
        fn(*args)
    return sum(seen.values())


def eager_step_saved_bytes(variant: str, *, batch: int = 32, size: int = 512,
                           dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one training step of `variant` ("paper" or "h4") keeps between its forward and backward,
    beyond the parameters and the batch."""
    if variant not in ("paper", "h4"):
        raise ValueError(f"variant must be 'paper' or 'h4', got {variant!r}")
    model = _meta_model(variant)
    images, masks = _meta(batch, 3, size, size, dtype=dtype), _meta(batch, size, size, dtype=torch.uint8)
    with saved_storages([*model.parameters(), images, masks]) as seen, CudaAutocastEmulation(dtype):
        model.loss(images, masks)
    return sum(seen.values())


def eager_op_bytes(op: str, *, stage: int | None = None, batch: int = 32, size: int = 512) -> dict[str, int]:
    """{"forward": bytes, "backward": bytes} the eager path of fused op `op` moves under bf16 autocast
    at the model's shapes (attention_sublayer, ffn_sublayer: one block of `stage`; upsample_argmax:
    forward only)."""
    counter = count_op(op, stage=stage, batch=batch, size=size)
    return {phase: counter.total(phase) for phase in PHASES}


@lru_cache(maxsize=None)
def _step_counter(variant: str, batch: int, size: int) -> ByteCounter:
    return count_step(variant, batch=batch, size=size)


def eager_step_bytes(variant: str, *, batch: int = 32, size: int = 512) -> int:
    """Bytes of one forward + backward of `model.loss` (bf16 autocast) in `variant`:
    "paper", "h4" or "triton_rest" (see the module docstring)."""
    return _step_counter(variant, batch, size).total()


def eager_step_launches(variant: str, *, batch: int = 32, size: int = 512) -> int:
    """Kernel launches of that step's eager ops (`ByteCounter.launches`, forward + backward); for
    "triton_rest", the ops a triton-backend step keeps outside its fused ops."""
    return sum(_step_counter(variant, batch, size).launches.values())


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _op_cases() -> list[tuple[str, int | None]]:
    return [("head_loss", None), ("upsample_argmax", None)] + \
        [(op, s) for op in ("attention_sublayer", "map_layer_norm", "attention_block", "attention_block_embedded",
                            "ffn_sublayer", "stage_output", "ffn_stage_output")
         for s in range(1, len(_config().channels) + 1)] + \
        [("decoder_mlp", None), ("lmsa", None), ("lmsa_classifier", None)]


def collect(batch: int = 32, size: int = 512, top: int = 15) -> dict:
    """Every op and step row, and the top aten ops of each step."""
    ops = []
    for op, stage in _op_cases():
        counted = eager_op_bytes(op, stage=stage, batch=batch, size=size)
        ops.append({"op": op, "stage": stage, **counted})
    steps, top_ops = [], {}
    for variant in STEP_VARIANTS:
        counter = _step_counter(variant, batch, size)
        steps.append({"variant": variant, "forward": counter.total("forward"),
                      "backward": counter.total("backward"), "total": counter.total(),
                      "launches": sum(counter.launches.values())})
        top_ops[variant] = counter.by_op()[:top]
    return {"batch": batch, "size": size, "bandwidth": BANDWIDTH, "ops": ops, "steps": steps, "top_ops": top_ops}


def _floors(nbytes: int) -> str:
    return " ".join(f"{nbytes / bw * 1e3:9.3f}" for bw in BANDWIDTH.values())


def render(result: dict) -> str:
    gb = 1e9
    devices = " ".join(f"{d + ' ms':>9s}" for d in BANDWIDTH)
    lines = [f"Eager bytes on meta tensors, B={result['batch']}, {result['size']}², bf16 (CUDA autocast emulated); "
             "floors = bytes ÷ " + ", ".join(f"{d} {bw / 1e12:.1f} TB/s" for d, bw in BANDWIDTH.items()), "",
             f"{'fused op (eager path)':26s} {'fwd GB':>8s} {'bwd GB':>8s} {'total GB':>9s} {devices}"]
    for r in result["ops"]:
        label = r["op"] + (f" stage {r['stage']}" if r["stage"] else "")
        total = r["forward"] + r["backward"]
        lines.append(f"{label:26s} {r['forward'] / gb:8.3f} {r['backward'] / gb:8.3f} {total / gb:9.3f} {_floors(total)}")
    lines += ["", f"{'training step':26s} {'fwd GB':>8s} {'bwd GB':>8s} {'total GB':>9s} {devices} {'launches':>8s}"]
    for r in result["steps"]:
        lines.append(f"{r['variant']:26s} {r['forward'] / gb:8.3f} {r['backward'] / gb:8.3f} {r['total'] / gb:9.3f} "
                     f"{_floors(r['total'])} {r['launches']:8d}")
    for variant, rows in result["top_ops"].items():
        lines += ["", f"top aten ops, {variant}: {'fwd GB':>8s} {'bwd GB':>8s} {'total GB':>9s} {'calls':>6s}"]
        for r in rows:
            lines.append(f"  {r['op']:30s} {r['forward'] / gb:8.3f} {r['backward'] / gb:8.3f} {r['total'] / gb:9.3f} "
                         f"{r['calls']:6d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msf.bench.eager_bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="H = W of the images (a multiple of 32)")
    parser.add_argument("--top", type=int, default=15, help="aten ops listed per step variant")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here ('-' for stdout only)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size < 32 or args.size % 32:
        parser.error(f"--batch must be ≥ 1 and --size a positive multiple of 32 (got {args.batch}, {args.size})")
    result = collect(args.batch, args.size, args.top)
    if args.json is not None and str(args.json) == "-":
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
