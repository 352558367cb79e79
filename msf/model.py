"""MicroSegFormer (SPEC §2): a four-stage hierarchical transformer encoder, an all-MLP decoder, the
three-scale LMSA module and a 1×1 classifier, for 19-class face parsing.

    images B×3×H×W ─► stage 1..4 (overlapping patch embed + SR-attention blocks) ─► f1..f4
    f_i ─► Linear(C_i→128) ─► bilinear up to H/4×W/4 ─► concat 512 ─► fuse MLP ─► LMSA ─► x
    eager (paper order):  logits = conv1x1(up4(x))
    fused (triton):       logits_low = conv1x1(x);  loss / argmax upsample on the fly

The 1×1 classifier commutes with bilinear upsampling (interpolation weights sum to one, the bias
passes through), so both orders compute the same function; only the memory traffic differs.

All hot-path calls go through `msf.backend.get_ops(backend)`; this module never imports Triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from msf.backend import BACKENDS, AttentionBlockParams, DecoderParams, EmbedNorm, LMSAParams, StageNorm, get_ops
from msf.data import FLIP_ID_MAP
from msf.losses import DEFAULT_DICE_EPS, ce_dice_loss
from msf.nvtx import nvtx_range
from msf.reference import tokens_to_map

NUM_CLASSES = 19
TTA_MODES = ("none", "flip")  # test-time augmentations of `MicroSegFormer.predict`


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = NUM_CLASSES
    lmsa: bool = True
    channels: tuple[int, ...] = (32, 64, 128, 192)
    depths: tuple[int, ...] = (1, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    ffn_expansion: int = 2
    decoder_dim: int = 128
    decoder_dropout: float = 0.15
    lmsa_kernels: tuple[int, ...] = (3, 5, 7)
    lmsa_reduction: int = 8


ConvWeights = tuple[torch.Tensor, torch.Tensor | None]  # a convolution's (weight, bias)


def convolve(conv: nn.Conv2d, x: torch.Tensor, weights: ConvWeights | None = None) -> torch.Tensor:
    """`conv(x)`, with `weights` (weight, bias) in place of the module's own where given."""
    if weights is None:
        return conv(x)
    return F.conv2d(x, weights[0], weights[1], conv.stride, conv.padding, conv.dilation, conv.groups)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: strided Conv2d, flatten to tokens, LayerNorm (the last two one
    fused op on triton: the map read once in its layout, the tokens written once)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, backend: str = "eager"):
        super().__init__()
        self.backend = backend
        self.proj = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(out_ch)

    def forward(self, x: torch.Tensor, conv_weights: ConvWeights | None = None) -> tuple[torch.Tensor, int, int]:
        x = convolve(self.proj, x, conv_weights)
        h, w = x.shape[-2:]
        return get_ops(self.backend).map_layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps), h, w

    def embed_norm(self) -> EmbedNorm:
        """The norm's parameters, for a first block that takes the convolution's map (`Stage.forward`)."""
        return EmbedNorm(self.norm.weight, self.norm.bias, self.norm.eps)


class SRAttention(nn.Module):
    """Single-head attention whose keys/values come from an R×R-strided reduction of the map: the
    parameters of the block's attention half, which `Block` runs through the backend's
    `attention_block` together with the block's first LayerNorm and the residual."""

    def __init__(self, dim: int, sr_ratio: int):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def params(self, norm: nn.LayerNorm) -> AttentionBlockParams:
        """The attention half's parameters, `norm` (the block's first LayerNorm) included."""
        reduce = self.sr_ratio > 1
        return AttentionBlockParams(
            ln_weight=norm.weight, ln_bias=norm.bias,
            sr_weight=self.sr.weight if reduce else None, sr_bias=self.sr.bias if reduce else None,
            sr_norm_weight=self.sr_norm.weight if reduce else None, sr_norm_bias=self.sr_norm.bias if reduce else None,
            kv_weight=self.kv.weight, kv_bias=self.kv.bias, q_weight=self.q.weight, q_bias=self.q.bias,
            proj_weight=self.proj.weight, proj_bias=self.proj.bias,
            ln_eps=norm.eps, sr_norm_eps=self.sr_norm.eps if reduce else norm.eps)


class FeedForward(nn.Module):
    """fc1 (C → expansion·C), GELU, fc2 (back to C): the parameters of the block's FFN sublayer, which
    `Block` runs through the backend's `ffn_sublayer` together with its LayerNorm and residual."""

    def __init__(self, dim: int, expansion: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.fc2 = nn.Linear(expansion * dim, dim)


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += FFN(LN(x))."""

    def __init__(self, dim: int, sr_ratio: int, expansion: int, backend: str):
        super().__init__()
        self.backend = backend
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SRAttention(dim, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, expansion)

    def forward(self, x: torch.Tensor, h: int, w: int, embed_norm: EmbedNorm | None = None,
                stage_norm: StageNorm | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: B×N×C tokens, or with `embed_norm` the patch embedding's B×C×h×w map, the block's input
        then being its LayerNorm (on triton formed inside the attention half's kernels). With
        `stage_norm` (the stage's last block) the stage's output maps after the block, as
        `Stage.forward` returns them (on triton that norm runs inside the FFN's forward kernel)."""
        ops = get_ops(self.backend)  # x + Attn(norm1(x)), one fused op on triton (LayerNorm and kv path included)
        x = ops.attention_block(x, (h, w), self.attn.sr_ratio, self.attn.params(self.norm1), embed_norm=embed_norm)
        norm, ffn = self.norm2, self.ffn  # x + fc2(GELU(fc1(norm2(x)))), one fused op on triton
        return ops.ffn_sublayer(x, norm.weight, norm.bias, ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias,
                                norm.eps, stage_norm)


class Stage(nn.Module):
    def __init__(self, in_ch: int, dim: int, depth: int, sr_ratio: int, first: bool, cfg: ModelConfig, backend: str,
                 feeds_next: bool = True):
        super().__init__()
        self.embed = PatchEmbed(in_ch, dim, kernel=7 if first else 3, stride=4 if first else 2, backend=backend)
        self.blocks = nn.ModuleList(Block(dim, sr_ratio, cfg.ffn_expansion, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.backend = backend
        self.feeds_next = feeds_next

    def forward(self, x: torch.Tensor, conv_weights: ConvWeights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the map the decoder reads, the map the next stage reads): one tensor on eager; on triton
        under autocast the second is the 16-bit copy the next convolution would cast the first to.
        `conv_weights`: the patch embedding's (weight, bias) in place of its module's own (their
        autocast copies, `MicroSegFormer.conv_weights`)."""
        norm = self.norm
        # decoder_linear True: the decoder reads every stage's map through a Linear (stages 2-4's
        # projections; stage 1's, folded into M1, is the decoder kernel's product, which rounds f1 as
        # that Linear's autocast cast would)
        if not self.blocks:
            tokens, h, w = self.embed(x, conv_weights)
            return get_ops(self.backend).stage_output(tokens, (h, w), norm.weight, norm.bias, norm.eps,
                                                      self.feeds_next, True)
        # the patch embedding's norm goes to the first block with the convolution's map, the stage's
        # final norm to the last block (its FFN sublayer's)
        fmap = convolve(self.embed.proj, x, conv_weights)
        h, w = fmap.shape[-2:]
        final = StageNorm(norm.weight, norm.bias, norm.eps, (h, w), self.feeds_next, decoder_linear=True)
        last = len(self.blocks) - 1
        out = fmap
        for i, block in enumerate(self.blocks):
            out = block(out, h, w, embed_norm=self.embed.embed_norm() if i == 0 else None,
                        stage_norm=final if i == last else None)
        return out


class LMSA(nn.Module):
    """Lightweight Multi-Scale Attention (SPEC §2): x + Σ_k z_k ⊙ PW_k(DW_k(x)), k ∈ {3, 5, 7}."""

    def __init__(self, dim: int, kernels: tuple[int, ...], reduction: int, backend: str):
        super().__init__()
        self.backend = backend
        self.depthwise = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False) for k in kernels)
        self.pointwise = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in kernels)
        squeeze = len(kernels) * dim
        self.fc1 = nn.Linear(squeeze, squeeze // reduction)
        self.fc2 = nn.Linear(squeeze // reduction, squeeze)

    def params(self) -> LMSAParams:
        return LMSAParams(
            dw_weights=tuple(dw.weight for dw in self.depthwise),
            pw_weights=tuple(pw.weight.flatten(1) for pw in self.pointwise),  # (a view: its backward is free)
            pw_biases=tuple(pw.bias for pw in self.pointwise),
            fc1_weight=self.fc1.weight, fc1_bias=self.fc1.bias,
            fc2_weight=self.fc2.weight, fc2_bias=self.fc2.bias,
        )

    def forward(self, x: torch.Tensor, classifier: nn.Conv2d | None = None) -> torch.Tensor:
        """LMSA's output, or with `classifier` (a 1×1 convolution) its logits: on triton the
        classifier runs inside LMSA's kernels (the module's own weight and bias)."""
        with nvtx_range("decoder/lmsa"):
            if classifier is None:
                return get_ops(self.backend).lmsa(x, self.params())
            return get_ops(self.backend).lmsa_classifier(x, self.params(), classifier.weight.flatten(1),
                                                         classifier.bias)


class Decoder(nn.Module):
    """All-MLP decoder: unify channels, upsample to stage-1 size, concat, fuse; then LMSA. The part
    before LMSA runs as the backend's `decoder_mlp` (on triton: the fuse Linear folded into the
    unify Linears, no concat; the parameters and their names are the paper's either way)."""

    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        self.backend = backend
        e = cfg.decoder_dim
        self.unify = nn.ModuleList(nn.Linear(c, e) for c in cfg.channels)
        self.fuse = nn.Sequential(nn.Linear(len(cfg.channels) * e, e), nn.GELU(),
                                  nn.Dropout(cfg.decoder_dropout), nn.Linear(e, e))
        self.lmsa = LMSA(e, cfg.lmsa_kernels, cfg.lmsa_reduction, backend) if cfg.lmsa else None

    def params(self) -> DecoderParams:
        fuse1, fuse2 = self.fuse[0], self.fuse[3]
        return DecoderParams(unify_weights=tuple(u.weight for u in self.unify),
                             unify_biases=tuple(u.bias for u in self.unify),
                             fuse1_weight=fuse1.weight, fuse1_bias=fuse1.bias,
                             fuse2_weight=fuse2.weight, fuse2_bias=fuse2.bias)

    def forward(self, features: list[torch.Tensor], classifier: nn.Conv2d | None = None) -> torch.Tensor:
        """The decoder's B×E×h×w output, or with `classifier` (the model's 1×1 convolution) its logits."""
        h, w = features[0].shape[-2:]
        fused = get_ops(self.backend).decoder_mlp(features, self.params(), self.fuse[2].p, self.training)
        x = tokens_to_map(fused, h, w)
        if self.lmsa is not None:
            return self.lmsa(x, classifier)
        return x if classifier is None else classifier(x)


class MicroSegFormer(nn.Module):
    """MicroSegFormer for `num_classes`-way face parsing.

    `model(images)` returns B×num_classes×H×W logits for B×3×H×W images (H, W multiples of 32);
    `model.loss(images, masks)` returns the SPEC §4 training loss (CE + Dice, 1:1);
    `model.predict(images)` returns B×H×W class ids.
    `backend` is "eager" (plain PyTorch, the paper's order) or "triton" (fused kernels).
    """

    STRIDE = 32

    def __init__(self, num_classes: int = NUM_CLASSES, lmsa: bool = True, backend: str = "eager",
                 dice_eps: float = DEFAULT_DICE_EPS, paper_head_order: bool = True, **overrides):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # The eager loss follows the paper (upsample 128 channels, then classify) unless told to
        # classify at H/4 first: the same function, half the CPU time. Triton always does the latter.
        self.paper_head_order = paper_head_order and backend == "eager"
        get_ops(backend)  # fail here, not mid-forward, when the backend cannot load
        self.config = ModelConfig(num_classes=num_classes, lmsa=lmsa, **overrides)
        self.backend = backend
        self.dice_eps = dice_eps
        cfg = self.config
        in_channels = (3,) + cfg.channels[:-1]
        self.stages = nn.ModuleList(
            Stage(cin, c, d, r, first=(i == 0), cfg=cfg, backend=backend, feeds_next=i + 1 < len(cfg.channels))
            for i, (cin, c, d, r) in enumerate(zip(in_channels, cfg.channels, cfg.depths, cfg.sr_ratios)))
        self.decoder = Decoder(cfg, backend)
        self.classifier = nn.Conv2d(cfg.decoder_dim, num_classes, 1)
        self.apply(_init_weights)
        # Stages 2-4's patch embeddings read the previous stage's channels-last map, and the
        # convolution's backward returns their weight gradients in that layout, as the fused attention
        # block does its reduction convolution's (window position and input channel innermost):
        # channels-last weights take them as they come (a contiguous parameter is sent a copy each
        # step, as autograd makes a gradient match its parameter's layout). The function and the
        # checkpoints are the same.
        for stage in self.stages[1:]:
            stage.embed.proj.to(memory_format=torch.channels_last)
        for stage in self.stages:
            for block in stage.blocks:
                if block.attn.sr_ratio > 1:
                    block.attn.sr.to(memory_format=torch.channels_last)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B×3×H×W, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.STRIDE or w % self.STRIDE or h == 0 or w == 0:
            raise ValueError(f"image height and width must be positive multiples of {self.STRIDE}, got {h}×{w}")

    def conv_weights(self, classifier: bool = True) -> list[ConvWeights]:
        """(weight, bias) of each stage's patch embedding and (with `classifier`) of the classifier, as
        the backend hands them to their convolutions: on eager the modules' own (autocast casts each
        as it runs); on triton under autocast their 16-bit copies, all made by one cast
        (`Ops.autocast_weights`). Without `classifier` for the low-res logits, whose classifier runs
        as part of `Ops.lmsa_classifier` (with its own weights)."""
        convs = [stage.embed.proj for stage in self.stages] + ([self.classifier] if classifier else [])
        flat = get_ops(self.backend).autocast_weights([t for conv in convs for t in (conv.weight, conv.bias)])
        return list(zip(flat[0::2], flat[1::2]))

    def block_weights(self) -> list[torch.Tensor]:
        """Every transformer block's weight matrices (W_sr where R > 1, W_kv, W_q, W_o, fc1, fc2): what
        the backend's `weight_copies` casts once a forward (on triton under autocast)."""
        return [w for stage in self.stages for block in stage.blocks
                for w in ((block.attn.sr.weight,) if block.attn.sr_ratio > 1 else ())
                + (block.attn.kv.weight, block.attn.q.weight, block.attn.proj.weight,
                   block.ffn.fc1.weight, block.ffn.fc2.weight)]

    def features(self, images: torch.Tensor, conv_weights: list[ConvWeights] | None = None,
                 classify: bool = False) -> torch.Tensor:
        """Decoder output (after LMSA): B×128×H/4×W/4, or with `classify` the classifier's logits on it
        (B×NCLS×H/4×W/4). `conv_weights`: what `self.conv_weights()` gave the caller (made here if
        None; the patch embeddings' are the ones used)."""
        self._check_images(images)
        conv_weights = self.conv_weights(classifier=not classify) if conv_weights is None else conv_weights
        feats, x = [], images
        with get_ops(self.backend).weight_copies(self.block_weights()):
            for i, stage in enumerate(self.stages, start=1):
                with nvtx_range(f"encoder/stage{i}"):
                    feature, x = stage(x, conv_weights[i - 1])
                feats.append(feature)
        with nvtx_range("decoder"):
            return self.decoder(feats, self.classifier if classify else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        conv_weights = self.conv_weights()
        x = self.features(images, conv_weights)
        with nvtx_range("head/upsample+classifier"):
            x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
            return convolve(self.classifier, x, conv_weights[-1])

    def low_res_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits at H/4×W/4 (the classifier applied before the upsample; on triton inside
        LMSA's kernels)."""
        return self.features(images, classify=True)

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """CE + Dice (SPEC §4) of the full-resolution prediction against B×H×W masks."""
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        if self.paper_head_order:
            logits = self(images)
            with nvtx_range("loss"):
                return ce_dice_loss(logits, masks, self.dice_eps)
        return get_ops(self.backend).head_loss(self.low_res_logits(images), masks, self.dice_eps)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: tuple[int, int] | None = None, tta: str = "none") -> torch.Tensor:
        """B×size class ids (default: the images' size): the argmax of the H/4×W/4 logits
        bilinearly upsampled straight to `size` (at the input's own size this is the paper's order
        up to rounding, since the classifier commutes with the upsample). `tta="flip"` averages
        the logits of the image and of its mirror (see `predict_variants`)."""
        return self.predict_variants(images, size, (tta,))[tta]

    @torch.no_grad()
    def predict_variants(self, images: torch.Tensor, size: tuple[int, int] | None = None,
                         ttas: tuple[str, ...] = TTA_MODES) -> dict[str, torch.Tensor]:
        """Class ids with each test-time augmentation in `ttas`, sharing the forward passes.

        "none": the image alone. "flip": the mean of the image's low-resolution logits and its
        mirror's, the mirror's flipped back and its left/right channels swapped (4↔5, 6↔7, 8↔9),
        so that its "left eye" scores the right eye it is. Averaging before the upsample equals
        averaging after it (bilinear upsampling is linear and commutes with the mirror), and the
        result is mirror-equivariant for any weights: the prediction of the mirror is the mirror
        of the prediction with its ids swapped, up to exact ties.
        """
        unknown = set(ttas) - set(TTA_MODES)
        if unknown:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {sorted(unknown)}")
        size = tuple(size) if size is not None else tuple(images.shape[-2:])
        upsample_argmax = get_ops(self.backend).upsample_argmax
        logits = self.low_res_logits(images)
        ids = {}
        if "none" in ttas:
            ids["none"] = upsample_argmax(logits, size)
        if "flip" in ttas:
            ids["flip"] = upsample_argmax(self._flip_averaged(logits, images), size)
        return ids

    def flip_tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits averaged with the mirror's (test-time augmentation "flip")."""
        return self._flip_averaged(self.low_res_logits(images), images)

    def _flip_averaged(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return mirror_average(logits, self.low_res_logits(images.flip(-1)))

    @classmethod
    def from_config(cls, config: ModelConfig, backend: str = "eager") -> "MicroSegFormer":
        """A freshly initialised model of `config` on `backend` (load the weights after)."""
        overrides = {k: v for k, v in config.__dict__.items() if k not in ("num_classes", "lmsa")}
        return cls(num_classes=config.num_classes, lmsa=config.lmsa, backend=backend, **overrides)


def mirror_average(logits: torch.Tensor, logits_of_mirror: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation "flip": the mean of an image's B×K×h×w logits and its mirror's, the
    mirror's flipped back and its left/right channels swapped (4↔5, 6↔7, 8↔9), at any resolution."""
    if logits.shape[1] != len(FLIP_ID_MAP):
        raise ValueError(f"tta='flip' needs the {len(FLIP_ID_MAP)} CelebAMask-HQ classes, "
                         f"this model has {logits.shape[1]}")
    return 0.5 * (logits + logits_of_mirror.flip(-1)[:, FLIP_ID_MAP.to(logits.device)])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
