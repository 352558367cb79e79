"""The one switch between eager PyTorch and the fused Triton kernels.

The model asks `get_ops(backend)` for a table of the hot-path operations and calls them; it never
imports Triton. `"eager"` is plain PyTorch (the references live in `msf.reference`). `"triton"`
imports the op registry `msf.kernels.ops` lazily and takes each op that has a fused Triton
implementation from there; an op without one yet keeps its eager version, and
`fused_op_names("triton")` says which are which. No table entry holds an `lru_cache` or syncs
with the device, so `torch.compile(model.loss, fullgraph=True)` traces either backend in one graph.

Ops (shapes are the model's):
- `attention(q, k, v)`: softmax(q kᵀ / √d) v for B×N×d queries against B×M×d keys/values.
- `attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo)`: the block's attention sublayer,
  `residual + attention(x_norm wqᵀ + bq, k, v) woᵀ + bo`; where it is not fused it composes the
  backend's own `attention` between plain projections.
- `attention_block(x, hw, sr_ratio, params, embed_norm=None)`: the block's whole attention half,
  `x + attention_sublayer(LN1(x), k, v)` with k, v from LN1(x) through the key/value path (R×R
  stride-R convolution and its LayerNorm where R > 1, the kv Linear; `msf.reference.AttentionBlockParams`);
  where it is not fused it composes the backend's own `attention_sublayer` with eager LayerNorms and
  projections. With `embed_norm` (`msf.reference.EmbedNorm`) x is the patch embedding's B×C×h×w map
  and the block's input its LayerNorm: a stage's first block (fused on triton into the kv kernels).
- `map_layer_norm(x, weight, bias, eps)`: LayerNorm over the channels of a B×C×h×w map, as
  B×(h·w)×C tokens (the patch embedding's norm).
- `stage_output(tokens, hw, weight, bias, eps, feeds_next, decoder_linear)`: a stage's final LayerNorm
  on its own (a stage without blocks; the model's stages hand it to their last FFN sublayer instead)
  as two B×C×h×w maps, the decoder's and the next stage's (one tensor in eager; on triton, under
  autocast, the next stage's is written as the 16-bit copy its convolution would cast to, and with
  `decoder_linear` the decoder's too, as the Linear that reads it would cast it).
- `ffn_sublayer(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, stage_norm=None)`:
  the block's feed-forward sublayer, `x + fc2(GELU(fc1(LayerNorm(x))))` on B×N×C tokens. With
  `stage_norm` (`msf.reference.StageNorm`: a stage's last block) the stage's output after it, as
  `stage_output` gives it (on triton that norm runs in the FFN's forward kernel).
- `head_loss(logits, targets, eps)`: CE + Dice (SPEC §4) of B×K×h×w *low-resolution* logits against
  B×H×W targets, the logits bilinearly upsampled (align_corners=False) to H×W on the way.
- `upsample_argmax(logits, size)`: argmax over classes of the bilinearly upsampled logits.
- `decoder_mlp(features, params, dropout_p, training)`: the decoder up to LMSA: the four stage maps
  unified to E channels, upsampled to stage 1's size, concatenated, Linear → GELU → Dropout → Linear;
  B×(H·W)×E tokens.
- `lmsa(x, params)`: the decoder's multi-scale attention, `x + Σ_k z_k ⊙ PW_k(DW_k(x))`.
- `lmsa_classifier(x, params, weight, bias)`: the classifier (a 1×1 convolution, weight NCLS × C) on
  LMSA's output: the model's low-resolution logits (on triton the classifier runs inside LMSA's
  kernels, with the fp32 master weight and bias rounded on load under autocast).
- `autocast_weights(tensors)`: the convolutions' weights and biases as the model hands them to
  `F.conv2d`. Eager: the fp32 masters (autocast casts each as its convolution runs, a launch a
  tensor each way). Triton: under autocast, all their 16-bit copies from one cat and one cast, and
  their gradients back the same way (`msf.precision.grouped_autocast_copies`: plain PyTorch, no kernel
  of its own, so `fused_op_names` does not list it).
- `weight_copies(tensors)`: a context the model runs its blocks in. Eager: nothing. Triton: under
  autocast the blocks' weight matrices cast in one cat and one cast for the fused ops to take
  instead of casting their own, an op a launch (`msf.precision.step_weight_copies`; plain PyTorch).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, fields
from typing import Callable

import torch

from msf.nvtx import nvtx_range
from msf.precision import as_they_are, grouped_autocast_copies, step_weight_copies
from msf.reference import (AttentionBlockParams, DecoderParams, EmbedNorm, LMSAParams, StageNorm,  # noqa: F401
                           composed_attention_sublayer,
                           eager_attention, eager_attention_block, eager_map_layer_norm, eager_stage_output,
                           eager_decoder_mlp, eager_ffn_sublayer, eager_head_loss, eager_lmsa, eager_lmsa_classifier,
                           eager_upsample_argmax)

BACKENDS = ("eager", "triton")


@dataclass(frozen=True)
class Ops:
    attention: Callable[..., torch.Tensor]
    attention_sublayer: Callable[..., torch.Tensor]
    attention_block: Callable[..., torch.Tensor]
    map_layer_norm: Callable[..., torch.Tensor]
    stage_output: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    ffn_sublayer: Callable[..., torch.Tensor]
    head_loss: Callable[..., torch.Tensor]
    upsample_argmax: Callable[..., torch.Tensor]
    decoder_mlp: Callable[..., torch.Tensor]
    lmsa: Callable[..., torch.Tensor]
    lmsa_classifier: Callable[..., torch.Tensor]
    autocast_weights: Callable[..., list[torch.Tensor | None]]
    weight_copies: Callable[..., contextlib.AbstractContextManager]


def no_weight_copies(tensors) -> contextlib.AbstractContextManager:
    """The eager backend's `weight_copies`: nothing lent (autocast casts each weight where it is used)."""
    return contextlib.nullcontext()


EAGER_OPS = Ops(attention=eager_attention, attention_sublayer=composed_attention_sublayer,
                attention_block=eager_attention_block, map_layer_norm=eager_map_layer_norm,
                stage_output=eager_stage_output,
                ffn_sublayer=eager_ffn_sublayer, head_loss=eager_head_loss, upsample_argmax=eager_upsample_argmax,
                decoder_mlp=eager_decoder_mlp, lmsa=eager_lmsa, lmsa_classifier=eager_lmsa_classifier,
                autocast_weights=as_they_are,
                weight_copies=no_weight_copies)


def _annotated(name: str, fn: Callable[..., torch.Tensor], provider: str,
               traced: Callable[..., torch.Tensor] | None = None) -> Callable[..., torch.Tensor]:
    """`fn` inside an NVTX range named "<provider>/<name>", tagged with its provider. While
    torch.compile traces, `traced` (default `fn`) runs instead and without the range: a range
    would be a graph break, and the compiled graph is what runs."""
    label = f"{provider}/{name}"
    traced = fn if traced is None else traced

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return traced(*args, **kwargs)
        with nvtx_range(label):
            return fn(*args, **kwargs)

    call.provider = provider
    return call


def interpreted(backend: str, device: torch.device | str) -> bool:
    """True when `backend` runs its Triton kernels through Triton's CPU interpreter on `device`."""
    return backend == "triton" and torch.device(device).type != "cuda"


def require_runnable(backend: str, device: torch.device | str) -> None:
    """A one-line ValueError when `backend` cannot run on `device`: compiled Triton kernels need a
    CUDA GPU; on CPU tensors they run only through the interpreter (TRITON_INTERPRET=1, read
    when Triton is first imported, so it must be set before the process starts)."""
    if interpreted(backend, device) and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("--backend triton needs a CUDA GPU; on a CPU set TRITON_INTERPRET=1 to run the kernels "
                         "through Triton's interpreter (very slow: minutes per training step; for testing only)")


_TABLES: dict[str, Ops] = {}  # built once per backend (a plain dict: nothing to trace through)


def get_ops(backend: str) -> Ops:
    """The op table of `backend`, every op wrapped in an NVTX range.

    triton: the fused ops of `msf.kernels.ops.REGISTRY`. Eagerly each runs its kernel module's entry
    (a `torch.autograd.Function`); under torch.compile its `torch.library` operator (`msf::...`),
    which Dynamo and AOTAutograd trace without a graph break."""
    table = _TABLES.get(backend)
    if table is None:
        table = _TABLES[backend] = _build_ops(backend)
    return table


def _build_ops(backend: str) -> Ops:
    if backend == "eager":
        fused = {}
    elif backend == "triton":
        try:
            from msf.kernels.ops import REGISTRY  # imports Triton; only the triton backend pays for it
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ValueError(f"backend='triton' needs the `triton` package: {exc}") from exc
        unknown = set(REGISTRY) - {f.name for f in fields(Ops)}
        if unknown:
            raise RuntimeError(f"msf.kernels.ops.REGISTRY names unknown ops {sorted(unknown)}")
        fused = REGISTRY
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    table = {}
    for f in fields(Ops):
        if f.name in fused:
            table[f.name] = _annotated(f.name, fused[f.name].entry, "triton", fused[f.name].traced)
        else:
            table[f.name] = _annotated(f.name, getattr(EAGER_OPS, f.name), "eager")
    if "attention_sublayer" not in fused:  # compose around whichever attention this backend has
        composed = functools.partial(composed_attention_sublayer, attention=table["attention"])
        table["attention_sublayer"] = _annotated("attention_sublayer", composed, "eager")
    if "attention_block" not in fused:  # compose around whichever attention sublayer this backend has
        composed = functools.partial(eager_attention_block, attention_sublayer=table["attention_sublayer"])
        table["attention_block"] = _annotated("attention_block", composed, "eager")
    if backend == "triton":  # (PyTorch ops, no kernel: a provider of its own, not among the fused ops)
        table["autocast_weights"] = _annotated("autocast_weights", grouped_autocast_copies, "torch")
        # (traced by torch.compile: nothing lent, the compiled operators cast inside)
        table["weight_copies"] = _annotated("weight_copies", step_weight_copies, "torch", no_weight_copies)
    return Ops(**table)


def fused_op_names(backend: str) -> list[str]:
    """The ops that `backend` runs through a fused Triton kernel (none for eager)."""
    ops = get_ops(backend)
    return [f.name for f in fields(Ops) if getattr(ops, f.name).provider == "triton"]
