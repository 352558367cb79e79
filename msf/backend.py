"""The one switch between eager PyTorch and the fused Triton kernels.

The model asks `get_ops(backend)` for a table of the hot-path operations and calls them; it never
imports Triton. `"eager"` is plain PyTorch (the reference, and the CPU path). `"triton"` imports
`kernels` lazily and takes each op that has a fused Triton implementation from there; an op without
one yet keeps its eager version, and `fused_op_names("triton")` says which are which.

Ops (shapes are the model's):
- `attention(q, k, v)`: softmax(q kᵀ / √d) v for B×N×d queries against B×M×d keys/values.
- `attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo)`: the block's attention sublayer,
  `residual + attention(x_norm wqᵀ + bq, k, v) woᵀ + bo`; where it is not fused it composes the
  backend's own `attention` between plain projections.
- `head_loss(logits, targets, eps)`: CE + Dice (SPEC §4) of B×K×h×w *low-resolution* logits against
  B×H×W targets, the logits bilinearly upsampled (align_corners=False) to H×W on the way.
- `upsample_argmax(logits, size)`: argmax over classes of the bilinearly upsampled logits.
- `lmsa(x, params)`: the decoder's multi-scale attention, `x + Σ_k z_k ⊙ PW_k(DW_k(x))`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from msf.losses import DEFAULT_DICE_EPS, ce_dice_loss
from msf.nvtx import nvtx_range

BACKENDS = ("eager", "triton")


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def composed_attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo, attention=eager_attention):
    return residual + F.linear(attention(F.linear(x_norm, wq, bq), k, v), wo, bo)


def eager_head_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = DEFAULT_DICE_EPS) -> torch.Tensor:
    up = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return ce_dice_loss(up, targets, eps)


def eager_upsample_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


def eager_lmsa(x: torch.Tensor, p: "LMSAParams") -> torch.Tensor:
    """SPEC §2 LMSA written plainly: three depthwise-separable branches, SE gate, residual."""
    branches = []
    for dw_weight, pw_weight, pw_bias in zip(p.dw_weights, p.pw_weights, p.pw_biases):
        depthwise = F.conv2d(x, dw_weight, padding=dw_weight.shape[-1] // 2, groups=x.shape[1])
        branches.append(F.conv2d(depthwise, pw_weight[:, :, None, None], pw_bias))
    stacked = torch.cat(branches, dim=1)  # B × 3C × h × w
    squeeze = stacked.mean(dim=(2, 3))
    gates = torch.sigmoid(F.linear(F.relu(F.linear(squeeze, p.fc1_weight, p.fc1_bias)), p.fc2_weight, p.fc2_bias))
    gated = stacked * gates[:, :, None, None]
    return x + sum(gated.chunk(len(branches), dim=1))


@dataclass(frozen=True)
class LMSAParams:
    """LMSA weights as tensors: depthwise C×1×k×k (k = 3, 5, 7), pointwise C×C + C, SE FCs."""

    dw_weights: tuple[torch.Tensor, ...]
    pw_weights: tuple[torch.Tensor, ...]
    pw_biases: tuple[torch.Tensor, ...]
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


@dataclass(frozen=True)
class Ops:
    attention: Callable[..., torch.Tensor]
    attention_sublayer: Callable[..., torch.Tensor]
    head_loss: Callable[..., torch.Tensor]
    upsample_argmax: Callable[..., torch.Tensor]
    lmsa: Callable[..., torch.Tensor]


EAGER_OPS = Ops(attention=eager_attention, attention_sublayer=composed_attention_sublayer, head_loss=eager_head_loss,
                upsample_argmax=eager_upsample_argmax, lmsa=eager_lmsa)


def _annotated(name: str, fn: Callable[..., torch.Tensor], provider: str) -> Callable[..., torch.Tensor]:
    """`fn` inside an NVTX range named "<provider>/<name>", tagged with its provider."""
    label = f"{provider}/{name}"

    @functools.wraps(fn)
    def call(*args, **kwargs):
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


@lru_cache(maxsize=None)
def get_ops(backend: str) -> Ops:
    """The op table of `backend`, every op wrapped in an NVTX range."""
    if backend == "eager":
        fused = {}
    elif backend == "triton":
        try:
            import kernels  # imports Triton; only the triton backend pays for it
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ValueError(f"backend='triton' needs the `triton` package: {exc}") from exc
        unknown = set(kernels.TRITON_OPS) - {f.name for f in fields(Ops)}
        if unknown:
            raise RuntimeError(f"kernels.TRITON_OPS names unknown ops {sorted(unknown)}")
        fused = kernels.TRITON_OPS
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    table = {}
    for f in fields(Ops):
        if f.name in fused:
            table[f.name] = _annotated(f.name, fused[f.name], "triton")
        else:
            table[f.name] = _annotated(f.name, getattr(EAGER_OPS, f.name), "eager")
    if "attention_sublayer" not in fused:  # compose around whichever attention this backend has
        composed = functools.partial(composed_attention_sublayer, attention=table["attention"])
        table["attention_sublayer"] = _annotated("attention_sublayer", composed, "eager")
    return Ops(**table)


def fused_op_names(backend: str) -> list[str]:
    """The ops that `backend` runs through a fused Triton kernel (none for eager)."""
    ops = get_ops(backend)
    return [f.name for f in fields(Ops) if getattr(ops, f.name).provider == "triton"]
