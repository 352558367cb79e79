"""The eager references of the fused ops, and the LMSA parameter bundle, in plain PyTorch.

Kept apart from `msf.backend` (which loads `kernels` for the triton backend) so that the kernel
modules can import their references without importing the backend switch: no import circle
between `kernels/` and `msf/`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msf.losses import DEFAULT_DICE_EPS, ce_dice_loss

__all__ = ["DEFAULT_DICE_EPS", "LMSAParams", "composed_attention_sublayer", "eager_attention", "eager_ffn_sublayer",
           "eager_head_loss", "eager_lmsa", "eager_upsample_argmax"]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def composed_attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo, attention=eager_attention):
    return residual + F.linear(attention(F.linear(x_norm, wq, bq), k, v), wo, bo)


def eager_ffn_sublayer(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps: float = 1e-5):
    """The block's feed-forward sublayer as the paper's model computes it: x + fc2(GELU(fc1(LN(x))))."""
    hidden = F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), fc1_weight, fc1_bias))
    return x + F.linear(hidden, fc2_weight, fc2_bias)


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
