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

__all__ = ["AttentionBlockParams", "DEFAULT_DICE_EPS", "DecoderParams", "LMSAParams", "composed_attention_sublayer",
           "eager_attention", "eager_attention_block", "eager_map_layer_norm", "eager_stage_output", "StageNorm",
           "eager_decoder_mlp", "eager_ffn_sublayer", "eager_head_loss", "eager_lmsa", "eager_lmsa_classifier",
           "eager_upsample_argmax",
           "tokens_to_map"]


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B×(h·w)×C tokens as a B×C×h×w map: a channels-last view in eager (no copy).

    Under torch.compile the view is made a dense NCHW copy instead. Inductor (torch 2.11–2.13)
    sorts the strides of every tensor the forward graph saves for backward, and for a
    channels-last view with symbolic sizes (C·w against C) it compares them without the shape
    environment and fails ("cannot determine truth value of Relational: 32*s96 < 32") as soon as
    shapes are dynamic: `torch.compile(..., dynamic=True)`, or the recompile after a second batch
    or image size. Smallest reproduction: Conv2d → LayerNorm on its tokens → this view → Conv2d,
    with gradients (tests/test_compile.py). The copy lets Inductor choose the layout itself.
    """
    map_ = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
    return map_.contiguous() if torch.compiler.is_compiling() else map_


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def composed_attention_sublayer(x_norm, residual, k, v, wq, bq, wo, bo, attention=eager_attention):
    return residual + F.linear(attention(F.linear(x_norm, wq, bq), k, v), wo, bo)


@dataclass(frozen=True)
class AttentionBlockParams:
    """The parameters of a block's attention half: its first LayerNorm, the key/value path (an R×R
    stride-R convolution and its LayerNorm where R > 1, None where R = 1; the kv Linear) and the
    q and output projections. Weights as their modules hold them (nn.Linear's out × in, Conv2d's
    out × in × R × R)."""

    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    sr_weight: torch.Tensor | None
    sr_bias: torch.Tensor | None
    sr_norm_weight: torch.Tensor | None
    sr_norm_bias: torch.Tensor | None
    kv_weight: torch.Tensor
    kv_bias: torch.Tensor
    q_weight: torch.Tensor
    q_bias: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    ln_eps: float = 1e-5
    sr_norm_eps: float = 1e-5


@dataclass(frozen=True)
class EmbedNorm:
    """The patch embedding's LayerNorm (the module's weight, bias, eps), handed to a stage's first block
    with the convolution's map so that the fused backend can form the block's input inside the block."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float = 1e-5


@dataclass(frozen=True)
class StageNorm:
    """A stage's final LayerNorm (the module's weight, bias, eps) and what `eager_stage_output` takes
    with it, handed to the stage's last FFN sublayer so that the fused backend can form the stage's
    output maps in that sublayer's forward kernel (`eager_ffn_sublayer`)."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    hw: tuple[int, int]
    feeds_next: bool = True
    decoder_linear: bool = False

    def applied(self, tokens: torch.Tensor, stage_output=None):
        """`stage_output` (a backend's, default `eager_stage_output`) of B×(h·w)×C tokens with this norm."""
        return (stage_output or eager_stage_output)(tokens, self.hw, self.weight, self.bias, self.eps, self.feeds_next,
                                                    self.decoder_linear)


def eager_attention_block(x: torch.Tensor, hw: tuple[int, int], sr_ratio: int, p: AttentionBlockParams,
                          attention_sublayer=composed_attention_sublayer,
                          embed_norm: EmbedNorm | None = None) -> torch.Tensor:
    """The block's attention half as the paper's model computes it: x + Attn(LN(x)), the keys and
    values from the LayerNorm'd map reduced by the R×R stride-R convolution and its LayerNorm
    (R > 1), on B×(h·w)×C tokens. With `embed_norm`, x is the patch embedding's B×C×h×w map and the
    block's input its LayerNorm (`eager_map_layer_norm`)."""
    if embed_norm is not None:
        x = eager_map_layer_norm(x, embed_norm.weight, embed_norm.bias, embed_norm.eps)
    c = x.shape[-1]
    x_norm = F.layer_norm(x, (c,), p.ln_weight, p.ln_bias, p.ln_eps)
    kv_in = x_norm
    if sr_ratio > 1:
        reduced = F.conv2d(tokens_to_map(x_norm, *hw), p.sr_weight, p.sr_bias, stride=sr_ratio)
        kv_in = F.layer_norm(reduced.flatten(2).transpose(1, 2), (c,), p.sr_norm_weight, p.sr_norm_bias,
                             p.sr_norm_eps)
    k, v = F.linear(kv_in, p.kv_weight, p.kv_bias).chunk(2, dim=-1)  # views into one B×M×2C tensor
    return attention_sublayer(x_norm, x, k, v, p.q_weight, p.q_bias, p.proj_weight, p.proj_bias)


def eager_map_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the channels of a B×C×h×w map, as B×(h·w)×C tokens (the patch embedding's norm)."""
    return F.layer_norm(x.flatten(2).transpose(1, 2), x.shape[1:2], weight, bias, eps)


def eager_stage_output(tokens: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor,
                       eps: float = 1e-5, feeds_next: bool = True,
                       decoder_linear: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage's output: its final LayerNorm of the B×(h·w)×C tokens as a B×C×h×w map, twice: the map
    the decoder reads and the one the next stage's patch embedding reads (one tensor in eager; the
    convolution casts it under autocast). `feeds_next` and `decoder_linear` are for the fused path,
    which makes the casts itself: the next stage's only where there is a next stage, the decoder's
    where the decoder reads the map only through a Linear."""
    out = tokens_to_map(F.layer_norm(tokens, tokens.shape[-1:], weight, bias, eps), *hw)
    return out, out


def eager_ffn_sublayer(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps: float = 1e-5,
                       stage_norm: StageNorm | None = None):
    """The block's feed-forward sublayer as the paper's model computes it: x + fc2(GELU(fc1(LN(x)))).
    With `stage_norm` (a stage's last block), the stage's output after it: `eager_stage_output` of
    the sublayer's tokens, the (decoder's, next stage's) pair of B×C×h×w maps."""
    hidden = F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), fc1_weight, fc1_bias))
    out = x + F.linear(hidden, fc2_weight, fc2_bias)
    return out if stage_norm is None else stage_norm.applied(out)


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


def eager_lmsa_classifier(x: torch.Tensor, p: "LMSAParams", weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The classifier (1×1 convolution, weight NCLS × C, bias NCLS) on LMSA's output: the model's
    low-resolution logits."""
    return F.conv2d(eager_lmsa(x, p), weight[:, :, None, None], bias)


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
class DecoderParams:
    """The decoder MLP's weights: per stage a unify Linear (E×C_i, E), the fuse MLP's two Linears
    (E×4E, E and E×E, E)."""

    unify_weights: tuple[torch.Tensor, ...]
    unify_biases: tuple[torch.Tensor, ...]
    fuse1_weight: torch.Tensor
    fuse1_bias: torch.Tensor
    fuse2_weight: torch.Tensor
    fuse2_bias: torch.Tensor


def eager_decoder_mlp(features: list[torch.Tensor], p: "DecoderParams", dropout_p: float = 0.0,
                      training: bool = False) -> torch.Tensor:
    """The paper's decoder up to LMSA (SPEC §2), as written: each B×C_i×h_i×w_i stage map unified to E
    channels, bilinearly upsampled to stage 1's size, the four concatenated, then Linear → GELU →
    Dropout → Linear. Returns B×(H·W)×E tokens."""
    b, _, h, w = features[0].shape
    aligned = []
    for f, weight, bias in zip(features, p.unify_weights, p.unify_biases):
        unified = F.linear(f.flatten(2).transpose(1, 2), weight, bias)  # B × h_i·w_i × E
        f = tokens_to_map(unified, *f.shape[-2:])
        if f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        aligned.append(f)
    tokens = torch.cat(aligned, dim=1).flatten(2).transpose(1, 2)
    hidden = F.dropout(F.gelu(F.linear(tokens, p.fuse1_weight, p.fuse1_bias)), dropout_p, training)
    return F.linear(hidden, p.fuse2_weight, p.fuse2_bias)
