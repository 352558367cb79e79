"""The training loss (SPEC §4), written plainly: the eager reference every fused loss is held to.

    loss = CE + Dice
    CE   = mean over all B·H·W pixels of  -log softmax(logits)[target]
    Dice = 1 - mean_{b,c} (2 Σ_px p·y + ε) / (Σ_px p + Σ_px y + ε)

with p = softmax(logits) over the class axis and y = onehot(target); the Dice mean runs over every
image b and every class c, including classes absent from an image (their term is ε/(Σp + ε), which
rewards predicting none of them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_DICE_EPS = 1.0


def check_targets(targets: torch.Tensor, num_classes: int, name: str = "targets") -> None:
    """Reject target ids outside [0, num_classes). Syncs with the device: call where data enters."""
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {targets.dtype}")
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} holds class id {lo if lo < 0 else hi}, outside 0..{num_classes - 1}")


def dice_terms(probs: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-(image, class) Dice coefficient d_bc, shape B×C, from B×C×H×W probabilities."""
    onehot = F.one_hot(targets.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * onehot).sum(dim=(2, 3))
    total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    return (2 * intersection + eps) / (total + eps)


def ce_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = DEFAULT_DICE_EPS) -> torch.Tensor:
    """CE + Dice of B×C×H×W logits against B×H×W integer targets; computed in fp32 or wider."""
    if logits.dim() != 4 or targets.dim() != 3 or logits.shape[0] != targets.shape[0] \
            or logits.shape[2:] != targets.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match "
                         "(expected B×C×H×W and B×H×W)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(logits, targets.long())
    dice = dice_terms(torch.softmax(logits, dim=1), targets, eps)
    return ce + (1 - dice.mean())
