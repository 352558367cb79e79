"""Parity of the fused decoder MLP (kernels/decoder_mlp.py) with the paper's decoder in float64 and eager.

The decoder up to LMSA: unify each stage to E channels, upsample to stage 1's size, concatenate,
Linear → GELU → Dropout → Linear. The fused op folds the first fuse Linear into the unify Linears and
never builds the concat; here its output and the gradients of all four feature maps and all twelve
parameters are compared with float64 autograd of the concat form itself (the reference below applies
the kernels' own dropout mask, from `keep_mask`, so dropout is checked element for element), and
under autocast with eager autocast. On a CPU-only machine the kernels run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import importlib  # noqa: E402

dec_mod = importlib.import_module("msf.kernels.decoder_mlp")
attn_mod = importlib.import_module("msf.kernels.attention")
from conftest import KERNEL_DEVICES, assert_close, kernel_device, poison_new_buffers  # noqa: E402

from msf.reference import DecoderParams, eager_decoder_mlp  # noqa: E402

pytestmark = pytest.mark.parity

PARAM_NAMES = ([f"unify{i}.weight" for i in range(1, 5)] + [f"unify{i}.bias" for i in range(1, 5)]
               + ["fuse1.weight", "fuse1.bias", "fuse2.weight", "fuse2.bias"])
# (B, H, W, stage channels, stage downsampling factors, E)
SHAPES = {
    "model": (2, 8, 16, (32, 64, 128, 192), (1, 2, 4, 8), 128),       # the model's widths; 8×16 → 1×2 at stage 4
    "odd": (3, 12, 9, (20, 12, 8, 24), (1, 3, 3, 9), 48),             # odd factors, E and C1 no power of two
    "square": (1, 16, 16, (16, 32, 48, 64), (1, 2, 4, 8), 32),
    "flat": (2, 4, 24, (8, 8, 8, 8), (1, 2, 4, 4), 16),               # stage 4 one row: every tap clamped
    "rows": (1, 16, 48, (16, 16, 16, 16), (1, 2, 4, 8), 64),          # halvings, 3 pixel tiles a row
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CASES = [("square", torch.float32, 0.0), ("model", torch.bfloat16, 0.15), ("odd", torch.float32, 0.3),
         ("odd", torch.float16, 0.0), ("square", torch.bfloat16, 0.0), ("flat", torch.float32, 0.5),
         ("rows", torch.bfloat16, 0.2)]


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels fill (here and in the reused chunk-sum) starts as NaN."""
    poison_new_buffers(monkeypatch, dec_mod, attn_mod)


def _inputs(shape, seed: int) -> dict[str, torch.Tensor]:
    """Fresh random fp32 feature maps (LayerNorm-like scale), parameters at nn.Linear's scale, small
    biases, and an output gradient g."""
    b, h, w, chans, factors, e = shape
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    vals = {f"f{i}": rnd(b, c, h // s, w // s) for i, (c, s) in enumerate(zip(chans, factors), 1)}
    vals.update({f"unify{i}.weight": rnd(e, c) * c ** -0.5 for i, c in enumerate(chans, 1)})
    vals.update({f"unify{i}.bias": 0.2 * rnd(e) for i in range(1, 5)})
    vals.update({"fuse1.weight": rnd(e, 4 * e) * (4 * e) ** -0.5, "fuse1.bias": 0.2 * rnd(e),
                 "fuse2.weight": rnd(e, e) * e ** -0.5, "fuse2.bias": 0.2 * rnd(e), "g": rnd(b, h * w, e)})
    return vals


def _leaves(vals, device, dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(k != "g") for k, v in vals.items()}


def _split(leaves) -> tuple[list[torch.Tensor], DecoderParams]:
    t = [leaves[n] for n in PARAM_NAMES]
    return [leaves[f"f{i}"] for i in range(1, 5)], DecoderParams(tuple(t[:4]), tuple(t[4:8]), *t[8:])


def _concat_form(features, p: DecoderParams, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """The paper's decoder, written here without the fold (unify → upsample → concat → MLP), with an
    explicit keep mask (rows × E) in place of F.dropout's own draw."""
    b, _, h, w = features[0].shape
    maps = []
    for f, weight, bias in zip(features, p.unify_weights, p.unify_biases):
        u = F.linear(f.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
        maps.append(F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False) if u.shape[-2:] != (h, w)
                    else u)
    tokens = torch.cat(maps, dim=1).permute(0, 2, 3, 1).reshape(b, h * w, -1)
    hidden = F.gelu(F.linear(tokens, p.fuse1_weight, p.fuse1_bias))
    if keep is not None:
        hidden = hidden * keep.view(b, h * w, -1).to(hidden.dtype) / (1.0 - dropout_p)
    return F.linear(hidden, p.fuse2_weight, p.fuse2_bias)


def _compare(ours, ref, out, out_ref, tol: float, what: str) -> None:
    assert_close(out, out_ref, tol, f"{what} out")
    for name in [f"f{i}" for i in range(1, 5)] + PARAM_NAMES:
        assert_close(ours[name].grad, ref[name].grad, tol, f"{what} d{name}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape,dtype,dropout_p", CASES, ids=[f"{s}-{str(d)[6:]}-p{p}" for s, d, p in CASES])
def test_matches_float64(shape, dtype, dropout_p, device, poisoned):
    """One dtype throughout, dropout on or off: the output and all sixteen gradients against float64
    autograd of the concat form on the same (rounded) inputs and the kernels' keep mask."""
    kernel_device(device)
    vals = {k: v.to(dtype) for k, v in _inputs(SHAPES[shape], seed=len(shape) * 7 + int(dropout_p * 10)).items()}
    ours, ref = _leaves(vals, device, dtype), _leaves(vals, device, torch.float64)
    seed = torch.tensor([1234 + len(shape)], dtype=torch.int64, device=device)
    out = dec_mod.decoder_mlp(*_split(ours), dropout_p, training=True, seed=seed)
    out.backward(ours["g"])
    keep = dec_mod.keep_mask(seed, out.shape[0] * out.shape[1], out.shape[2], dropout_p) if dropout_p > 0 else None
    out_ref = _concat_form(*_split(ref), keep, dropout_p)
    out_ref.backward(ref["g"])
    assert out.dtype == dtype and out.shape == out_ref.shape
    _compare(ours, ref, out, out_ref, TOL[dtype], f"{shape} {dtype} p={dropout_p}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_autocast_matches_eager_autocast(device, poisoned):
    """The model's case: fp32 feature maps (the stages' LayerNorm outputs) and fp32 master weights under
    bf16 autocast, dropout off. The fold changes which sums are rounded to bf16, so the fused op is
    not bitwise eager's: both are held to the bf16 tolerance against float64, and to each other."""
    kernel_device(device)
    vals = _inputs(SHAPES["model"], seed=11)
    ours, eager, ref = (_leaves(vals, device, torch.float32), _leaves(vals, device, torch.float32),
                        _leaves(vals, device, torch.float64))
    with torch.autocast(device, dtype=torch.bfloat16):
        assert dec_mod.compute_dtype(*_split(ours)) == torch.bfloat16
        out = dec_mod.decoder_mlp(*_split(ours), 0.15, training=False)
        out_eager = eager_decoder_mlp(*_split(eager), 0.15, training=False)
    out.backward(ours["g"].to(out.dtype))
    out_eager.backward(eager["g"].to(out_eager.dtype))
    out_ref = _concat_form(*_split(ref), None, 0.0)
    out_ref.backward(ref["g"])
    assert out.dtype == out_eager.dtype == torch.bfloat16
    assert_close(out, out_eager, 1e-2, "autocast out vs eager autocast")
    for name in [f"f{i}" for i in range(1, 5)] + PARAM_NAMES:
        assert_close(ours[name].grad, eager[name].grad, 2e-2, f"autocast d{name} vs eager autocast")
        assert ours[name].grad.dtype == torch.float32
    _compare(ours, ref, out, out_ref, TOL[torch.bfloat16], "autocast vs float64")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_autocast_bf16_maps_equal_fp32_maps_rounded(device, poisoned):
    """The model's stage maps come in bf16 under autocast (stage_output's `decoder_linear`): the same
    values autocast's casts (and the kernel's rounding of fp32 f1 on load) give. Bit for bit the
    output and every parameter gradient of the fp32 maps, each map's gradient in bf16 the fp32 one
    (which is bf16-rounded) exactly, dropout on."""
    kernel_device(device)
    vals = _inputs((1, *SHAPES["model"][1:]), seed=17)  # one image: bit-for-bit needs no second (44 -> 22 s on CPU)
    seed = torch.tensor([91], dtype=torch.int64, device=device)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        leaves = _leaves(vals, device, torch.float32)
        for i in range(1, 5):  # the maps in `dtype`, rounded from the same fp32 values
            leaves[f"f{i}"] = vals[f"f{i}"].to(device).to(torch.bfloat16).to(dtype).requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = dec_mod.decoder_mlp(*_split(leaves), 0.15, training=True, seed=seed)
        out.backward(leaves["g"].to(out.dtype))
        runs[dtype] = (out, leaves)
    (out32, l32), (out16, l16) = runs[torch.float32], runs[torch.bfloat16]
    assert torch.equal(out16, out32), "output"
    for name in PARAM_NAMES:
        assert torch.equal(l16[name].grad, l32[name].grad), f"d{name}"
    for i in range(1, 5):
        g16, g32 = l16[f"f{i}"].grad, l32[f"f{i}"].grad
        assert g16.dtype == torch.bfloat16 and torch.equal(g16.float(), g32), f"df{i}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_autocast_with_dropout_matches_float64(device, poisoned):
    """The training step's case: bf16 autocast with dropout on, against float64 of the concat form with
    the kernels' own keep mask; the output bf16, every gradient in its leaf's dtype."""
    kernel_device(device)
    vals = _inputs(SHAPES["model"], seed=13)
    ours, ref = _leaves(vals, device, torch.float32), _leaves(vals, device, torch.float64)
    seed = torch.tensor([77], dtype=torch.int64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = dec_mod.decoder_mlp(*_split(ours), 0.15, training=True, seed=seed)
    out.backward(ours["g"].to(out.dtype))
    keep = dec_mod.keep_mask(seed, out.shape[0] * out.shape[1], out.shape[2], 0.15)
    out_ref = _concat_form(*_split(ref), keep, 0.15)
    out_ref.backward(ref["g"])
    assert out.dtype == torch.bfloat16
    assert all(ours[k].grad.dtype == torch.float32 for k in ours if k != "g")
    _compare(ours, ref, out, out_ref, TOL[torch.bfloat16], "autocast p=0.15 vs float64")


def test_dropout_keeps_one_minus_p_and_is_reproducible():
    """The keep mask: its rate is 1 − p within 5σ over 80 000 elements for several p, the same seed gives
    the same mask, another seed a different one; rows and channels are not correlated."""
    kernel_device("cpu")
    rows, e = 625, 128
    for p in (0.15, 0.5, 0.9):
        keep = dec_mod.keep_mask(torch.tensor([42]), rows, e, p)
        n = keep.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma, (p, keep.float().mean().item())
        per_channel = keep.float().mean(0)  # 625 draws a channel
        assert (per_channel - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / rows) ** 0.5 + 1e-9
    a = dec_mod.keep_mask(torch.tensor([42]), rows, e, 0.15)
    assert torch.equal(a, dec_mod.keep_mask(torch.tensor([42]), rows, e, 0.15))
    assert not torch.equal(a, dec_mod.keep_mask(torch.tensor([43]), rows, e, 0.15))


def test_dropout_draws_are_independent_across_channels():
    """The eight elements one Philox call serves (rows ρ and ρ + 8 of a 16-row group × channels 2m,
    2m + 1, 2m + E/2, 2m + 1 + E/2: the two 16-bit halves of each of its four outputs) and neighbouring
    rows get independent draws: over 8192 rows at p = 0.5 every such pair of channels' correlation is
    within 6σ of 0 (σ = 1/√8192), where a draw shared by two channels would correlate them fully; the
    rows a call pairs and neighbouring rows, averaged over the channels, within 6σ too."""
    kernel_device("cpu")
    rows, e = 8192, 128
    keep = dec_mod.keep_mask(torch.tensor([5]), rows, e, 0.5).double()
    z = (keep - keep.mean(0)) / keep.std(0)
    corr = (z.T @ z) / (rows - 1)
    call = (torch.arange(e) % (e // 2)) // 2  # the channels of one row that share a Philox call
    same_call = (call[:, None] == call[None, :]) & ~torch.eye(e, dtype=torch.bool)
    assert same_call.sum().item() == 3 * e  # each channel shares its call with three others
    limit = 6 / rows ** 0.5
    assert corr[same_call].abs().max().item() < limit, corr[same_call].abs().max().item()
    upper = z.view(rows // 16, 2, 8, e)  # [group, h, ρ, channel]: row 16·group + 8h + ρ
    for first, second, pairs in ((upper[:, 0], upper[:, 1], rows // 2), (z[:-1], z[1:], rows - 1)):
        by_row = ((first * second).sum(-1) / (e - 1)).mean()  # row pairs, averaged over channels
        assert abs(by_row.item()) < 6 / (pairs * e) ** 0.5, by_row.item()


@pytest.mark.parametrize("path", ["function", "op"])
def test_h_and_d_are_kept_only_for_a_backward(path, monkeypatch):
    """The forward writes h and D (B·H·W × E each, beside x) only where a backward can run: with
    gradients on and a leaf that wants one; under no_grad or for inputs that want none it allocates
    them empty. Through the autograd Function and through the torch.library operator."""
    kernel_device("cpu")
    from msf.kernels import ops
    fn = dec_mod.decoder_mlp if path == "function" else ops.decoder_mlp
    vals = _inputs(SHAPES["square"], seed=5)
    b, h, w, _, _, e = SHAPES["square"]
    made = []
    real_new = dec_mod._new
    monkeypatch.setattr(dec_mod, "_new", lambda shape, device, dtype: made.append(tuple(shape))
                        or real_new(shape, device, dtype))

    def forward_buffers(requires_grad: bool, grad_enabled: bool) -> list[tuple[int, ...]]:
        made.clear()
        leaves = {k: v.clone().requires_grad_(requires_grad) for k, v in vals.items() if k != "g"}
        with torch.set_grad_enabled(grad_enabled):
            fn(*_split(leaves), 0.2, training=True, seed=torch.tensor([3]))
        return [s for s in made if s[0] in (b * h * w, 0)]  # (not the fold's E-row weights)

    assert forward_buffers(True, True) == [(b * h * w, e)] * 3  # x, h, D
    for requires_grad, grad_enabled in ((True, False), (False, True)):
        assert forward_buffers(requires_grad, grad_enabled) == [(b * h * w, e), (0, e), (0, e)]


def test_double_backward_is_refused():
    """The backward is not itself differentiable: asking for its graph (create_graph=True) raises instead
    of silently treating the kernels' gradients as constants in a second derivative."""
    kernel_device("cpu")
    leaves = _leaves(_inputs(SHAPES["flat"], seed=6), "cpu", torch.float32)
    out = dec_mod.decoder_mlp(*_split(leaves))
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad((out * leaves["g"]).sum(), leaves["f2"], create_graph=True)
    torch.autograd.grad((out * leaves["g"]).sum(), leaves["f2"])  # a first derivative still runs


def test_same_function_on_both_backends_with_dropout_off(poisoned):
    """A Decoder's own parameters through the eager backend's decoder_mlp (the paper's concat form)
    and the triton backend's (folded): the same function, gradients included, in eval mode and in
    training mode at p = 0; the parameter names are the paper's on both."""
    kernel_device("cpu")
    from msf.backend import get_ops
    from msf.model import Decoder, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(decoder_dim=32, lmsa=False)
    eager, fused = Decoder(cfg, "eager"), Decoder(cfg, "triton")
    fused.load_state_dict(eager.state_dict())
    features = [torch.randn(2, c, 16 // s, 8 // s) for c, s in zip(cfg.channels, (1, 2, 4, 8))]
    g = torch.randn(2, cfg.decoder_dim, 16, 8)
    for training in (False, True):
        if training:
            eager.fuse[2].p = fused.fuse[2].p = 0.0
        eager.train(training), fused.train(training)
        eager.zero_grad(), fused.zero_grad()
        out_e, out_f = eager(features), fused(features)
        out_e.backward(g), out_f.backward(g)
        assert_close(out_f, out_e, 1e-5, f"training={training} out")
        for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
            assert_close(pf.grad, pe.grad, 1e-5, f"training={training} d{name}")
    assert get_ops("triton").decoder_mlp.provider == "triton" and get_ops("eager").decoder_mlp.provider == "eager"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_channels_last_and_nchw_maps(device):
    """Feature maps as the model hands them (channels-last views of tokens) and as dense NCHW tensors:
    the same result, gradients in each map's own layout, and the caller's maps left as they were."""
    kernel_device(device)
    vals = _inputs(SHAPES["square"], seed=5)
    results = []
    for layout in (torch.channels_last, torch.contiguous_format):
        ours = _leaves(vals, device, torch.float32)
        for i in range(1, 5):
            ours[f"f{i}"] = ours[f"f{i}"].detach().contiguous(memory_format=layout).requires_grad_()
        before = [ours[f"f{i}"].clone() for i in range(1, 5)]
        out = dec_mod.decoder_mlp(*_split(ours))
        out.backward(ours["g"])
        for i in range(1, 5):
            assert ours[f"f{i}"].grad.is_contiguous(memory_format=layout) or ours[f"f{i}"].grad.shape[-1] == 1
            assert torch.equal(ours[f"f{i}"], before[i - 1])
        results.append((out, [ours[n].grad for n in ["f1", "f4", "fuse1.weight"]]))
    assert_close(results[0][0], results[1][0], 1e-6, "out")
    for a, b in zip(results[0][1], results[1][1]):
        assert_close(a, b, 1e-6, "grad")


# (B, H, W, E, dtype): the pyramid adjoint at widths off its 16-column blocks (W = 24: the last block's
# stage-2 columns half past w2 = 12, w4 = 3), one band (H = 8: every row of dh near both edges), a
# single narrow block (W = 8), E off the channel block (48; the interpreter's block is 16), the
# model's E, several bands and column blocks
PYRAMIDS = [(2, 16, 16, 32, torch.bfloat16), (1, 8, 24, 48, torch.bfloat16), (1, 32, 8, 16, torch.float16),
            (2, 8, 16, 128, torch.bfloat16), (1, 24, 48, 32, torch.bfloat16)]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("batch,height,width,e,dtype", PYRAMIDS,
                         ids=[f"{b}x{h}x{w}-e{e}-{str(d)[6:]}" for b, h, w, e, d in PYRAMIDS])
def test_pyramid_adjoint_matches_float64(batch, height, width, e, dtype, device, poisoned):
    """The one-launch adjoint of the three upsamples (`_pyramid_adjoint_kernel`) against float64
    autograd of F.interpolate itself, for a dh rounded to `dtype` (each dP rounded once, so the
    tolerance is the dtype's)."""
    kernel_device(device)
    lows = [(height // f, width // f) for f in (2, 4, 8)]
    assert dec_mod._halvings((height, width), lows, dtype)
    dh = torch.randn(batch * height * width, e, generator=torch.Generator().manual_seed(e)).to(dtype)
    ours = dec_mod._upsample_adjoints(dh.to(device), batch, (height, width), lows, dec_mod._blocks(1, e)[1])
    for (h, w), dp in zip(lows, ours):
        low = torch.zeros(batch, e, h, w, dtype=torch.float64, requires_grad=True)
        up = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        torch.autograd.backward(up, dh.double().view(batch, height, width, e).permute(0, 3, 1, 2))
        assert dp.dtype == dtype
        assert_close(dp, low.grad.permute(0, 2, 3, 1), TOL[dtype], f"dP at {h}x{w}")


def test_the_tensor_core_taps_serve_exact_halvings_of_16_bit_maps():
    """Where the pyramid adjoint and the forward's row-tile taps run, and where the gathers do."""
    halvings = lambda h, w: [(h // f, w // f) for f in (2, 4, 8)]  # noqa: E731
    assert dec_mod._halvings((128, 128), halvings(128, 128), torch.bfloat16)  # the model at 512²
    assert dec_mod._halvings((8, 24), halvings(8, 24), torch.float16)
    assert dec_mod._halvings((64, 256), halvings(64, 256), torch.bfloat16)
    assert not dec_mod._halvings((128, 128), halvings(128, 128), torch.float32)  # fp32: exact only as tf32x3
    assert not dec_mod._halvings((12, 9), [(4, 3), (4, 3), (1, 1)], torch.bfloat16)  # factors 3, 3, 9
    assert not dec_mod._halvings((16, 16), [(8, 8), (4, 4), (4, 4)], torch.bfloat16)  # stage 4 not an eighth
    assert not dec_mod._halvings((20, 16), [(10, 8), (5, 4), (2, 2)], torch.bfloat16)  # 20 is no multiple of 8
    assert dec_mod._row_tiles((128, 128), halvings(128, 128), torch.bfloat16, 16)
    assert not dec_mod._row_tiles((8, 24), halvings(8, 24), torch.bfloat16, 16)  # a tile would straddle rows


def test_row_taps_give_the_gathers_pre_activation(monkeypatch):
    """The forward's tensor-core taps (`_upsampled_row`: one x-tap pattern for every tile, edge columns
    replicated for the unclamped taps) give the pre-activation h of the per-pixel gathers (`_upsampled`,
    PyTorch's clamped taps), on bf16 maps with three pixel tiles a row over two images (the first, an
    inner and the last tile of each row; runs of tiles that cross rows and the image boundary). The two
    differ only in the order of exact products' fp32 sums, so h (stored in bf16) may differ by one ulp
    where a sum lies at a rounding boundary: allowed on at most 0.2 % of its elements (a 1 % error in
    the row taps' weights moves far more)."""
    kernel_device("cpu")
    vals = _inputs((2, 16, 48, (16, 16, 16, 16), (1, 2, 4, 8), 64), seed=23)
    real_new, real_row_tiles = dec_mod._new, dec_mod._row_tiles

    def forward_h(row_tiles: bool) -> torch.Tensor:
        made, taken = [], []
        monkeypatch.setattr(dec_mod, "_new", lambda shape, device, dtype: made.append(real_new(shape, device, dtype))
                            or made[-1])
        monkeypatch.setattr(dec_mod, "_row_tiles", lambda *args: taken.append(row_tiles and real_row_tiles(*args))
                            or taken[-1])
        dec_mod.decoder_mlp(*_split(_leaves(vals, "cpu", torch.bfloat16)), 0.0, training=True)
        assert taken == [row_tiles]  # the path asked for is the one taken
        return made[1]  # x, h, D: h

    rows, gathered = forward_h(True), forward_h(False)
    assert rows.dtype == torch.bfloat16 and rows.shape == (2 * 16 * 48, 64)
    ulp = torch.finfo(torch.bfloat16).eps * gathered.float().abs().clamp_min(2 ** -8)
    off = (rows.float() - gathered.float()).abs()
    worst = int((off / ulp).argmax())
    assert (off <= ulp).all(), f"{(off / ulp).max().item():.2f} ulp off at (row, channel) {divmod(worst, 64)}"
    assert (off > 0).float().mean().item() <= 2e-3, f"{int((off > 0).sum())} of {off.numel()} elements differ"


# the fold alone: (E, stage widths C_1..C_4)
FOLD_SHAPES = {"model": (128, (32, 64, 128, 192)), "odd": (48, (20, 12, 8, 24)), "small": (16, (8, 16, 8, 40))}


def _fold_params(e, widths, seed, device, dtype=torch.float32, transposed=False):
    """Fresh fold parameters as leaves (U_i as transposed views of C_i × E tensors if `transposed`)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731

    def leaf(t):
        return t.to(device=device, dtype=dtype).requires_grad_()
    us = tuple(leaf(rnd(c, e) * c ** -0.5).t() if transposed else leaf(rnd(e, c) * c ** -0.5) for c in widths)
    vs = tuple(leaf(0.2 * rnd(e)) for _ in widths)
    return DecoderParams(us, vs, leaf(rnd(e, 4 * e) * (4 * e) ** -0.5), leaf(0.2 * rnd(e)), None, None)


def _fold_leaves(p):
    """The ten parameters' leaves (a transposed view's base)."""
    return [t if t._base is None else t._base for t in (*p.unify_weights, *p.unify_biases, p.fuse1_weight,
                                                          p.fuse1_bias)]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("path", ["function", "op"])
@pytest.mark.parametrize("shape", list(FOLD_SHAPES))
def test_fold_matches_float64(shape, path, device, poisoned):
    """The fold's two kernels (`FoldFunction`, and `msf::decoder_fold` as torch.compile runs it):
    M_1..M_4 and c, and the gradients of all ten parameters under fresh random output gradients,
    against float64 autograd of `fold_reference`. "odd" takes U_i as transposed views."""
    kernel_device(device)
    from msf.kernels import ops
    e, widths = FOLD_SHAPES[shape]
    ours = _fold_params(e, widths, seed=11, device=device, transposed=shape == "odd")
    ref = _fold_params(e, widths, seed=11, device=device, dtype=torch.float64, transposed=shape == "odd")
    assert dec_mod._fold_served(ours)
    launches = []
    real = dec_mod._fold_forward
    fold = dec_mod.fold if path == "function" else ops._fold
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dec_mod, "_fold_forward", lambda *a: launches.append(1) or real(*a))
        ms, c = fold(ours, torch.float32)
    assert launches == [1]
    ms_ref, c_ref = dec_mod.fold_reference(ref)
    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(m.shape, generator=gen).to(device) for m in (*ms_ref, c_ref)]
    for out, out_ref, what in zip((*ms, c), (*ms_ref, c_ref), ("M1", "M2", "M3", "M4", "c")):
        assert out.dtype == torch.float32
        assert_close(out, out_ref, 1e-6, f"fold {shape} {what}")
    torch.autograd.backward([*ms, c], grads)
    torch.autograd.backward([*ms_ref, c_ref], [g.double() for g in grads])
    names = [f"U{i}" for i in range(1, 5)] + [f"u{i}" for i in range(1, 5)] + ["W", "b"]
    for name, a, b in zip(names, _fold_leaves(ours), _fold_leaves(ref)):
        assert_close(a.grad, b.grad, 1e-6, f"fold {shape} d{name}")


@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
def test_fold_rounds_the_projected_stages_once_on_store(low_dtype):
    """M_2..M_4 in the projections' dtype are the fp32 fold's values rounded (bit for bit what
    F.linear's autocast cast makes of them), M_1 and c stay fp32; the backward widens dM_2..dM_4
    exactly (as that cast's backward), so 16-bit output gradients give the fp32 path's gradients."""
    kernel_device("cpu")
    e, widths = FOLD_SHAPES["odd"]
    full, low = (_fold_params(e, widths, seed=3, device="cpu") for _ in range(2))
    ms_full, c_full = dec_mod.fold(full, torch.float32)
    ms_low, c_low = dec_mod.fold(low, low_dtype)
    assert [m.dtype for m in ms_low] == [torch.float32] + [low_dtype] * 3
    assert torch.equal(ms_low[0], ms_full[0]) and torch.equal(c_low, c_full)
    for m_low, m_full in zip(ms_low[1:], ms_full[1:]):
        assert torch.equal(m_low, m_full.detach().to(low_dtype))
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(m.shape, generator=gen).to(m.dtype) for m in (*ms_low, c_low)]
    torch.autograd.backward([*ms_low, c_low], grads)
    torch.autograd.backward([*ms_full, c_full], [g.float() for g in grads])
    for a, b in zip(_fold_leaves(low), _fold_leaves(full)):
        assert torch.equal(a.grad, b.grad)


def test_fold_kernels_refuse_a_layout_they_do_not_take():
    """The kernels take no strides: the operator (which a caller may hand any tensors) names a
    strided, mis-shaped or non-fp32 argument instead of reading it wrongly."""
    kernel_device("cpu")
    from msf.kernels import ops
    e, widths = FOLD_SHAPES["small"]
    p = _fold_params(e, widths, seed=6, device="cpu")
    w, b, us, vs = (p.fuse1_weight.detach(), p.fuse1_bias.detach(), [u.detach() for u in p.unify_weights],
                    [v.detach() for v in p.unify_biases])
    bad = [(w.t().contiguous().t(), b, us, vs), (w, b, us[:3], vs[:3]), (w, b.double(), us, vs),
           (w, b, [us[0].t().contiguous().t(), *us[1:]], vs)]
    for args in bad:
        with pytest.raises(ValueError, match="decoder_mlp fold"):
            ops.decoder_fold_op(*args, torch.float32)


def test_fold_serves_fp32_parameters_only():
    """bf16 or mixed parameters, or no products' dtype: `fold_reference`, no launch."""
    kernel_device("cpu")
    e, widths = FOLD_SHAPES["small"]
    p = _fold_params(e, widths, seed=5, device="cpu")
    bf16 = _fold_params(e, widths, seed=5, device="cpu", dtype=torch.bfloat16)
    mixed = DecoderParams(p.unify_weights, p.unify_biases, p.fuse1_weight, bf16.fuse1_bias, None, None)
    assert dec_mod._fold_served(p) and not dec_mod._fold_served(bf16) and not dec_mod._fold_served(mixed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dec_mod, "FoldFunction", None)  # any launch would fail
        for params, low in ((bf16, torch.bfloat16), (mixed, torch.bfloat16), (p, None)):
            ms, c = dec_mod.fold(params, low)
            ms_ref, c_ref = dec_mod.fold_reference(params)
            assert all(torch.equal(a, b) for a, b in zip((*ms, c), (*ms_ref, c_ref)))


def test_unserved_cases_run_the_eager_composition(monkeypatch):
    """E > 128, fp32 at E > 64, C1 > 64, a stage that is not a whole fraction of stage 1, a dtype mix
    outside autocast: the eager composition, identical to it, with no kernel launch."""
    kernel_device("cpu")
    monkeypatch.setattr(dec_mod, "DecoderMLPFunction", None)  # any fused call would fail
    for shape in ((1, 4, 4, (8, 8, 8, 8), (1, 2, 2, 4), 136), (1, 4, 4, (8, 8, 8, 8), (1, 2, 2, 4), 72),
                  (1, 4, 4, (72, 8, 8, 8), (1, 2, 2, 4), 16)):
        leaves = _leaves(_inputs(shape, seed=1), "cpu", torch.float32)
        assert torch.equal(dec_mod.decoder_mlp(*_split(leaves)), eager_decoder_mlp(*_split(leaves)))
    leaves = _leaves(_inputs((1, 6, 6, (8, 8, 8, 8), (1, 2, 3, 6), 16), seed=2), "cpu", torch.float32)
    leaves["f3"] = torch.randn(1, 8, 4, 4)  # 6 is no multiple of 4
    assert not dec_mod.fused_supported(*_split(leaves), torch.float32)
    assert torch.equal(dec_mod.decoder_mlp(*_split(leaves)), eager_decoder_mlp(*_split(leaves)))
    mixed = {k: v.to(torch.bfloat16) if k.startswith("fuse") else v for k, v in leaves.items()}
    assert dec_mod.compute_dtype(*_split(mixed)) is None


def test_parameters_of_mixed_dtypes_under_autocast(poisoned):
    """Under autocast a module may hold bf16 and fp32 parameters side by side (autocast serves both):
    the fold promotes them, and the result matches eager autocast."""
    kernel_device("cpu")
    vals = _inputs(SHAPES["square"], seed=4)
    ours, eager = _leaves(vals, "cpu", torch.float32), _leaves(vals, "cpu", torch.float32)
    for leaves in (ours, eager):
        leaves["fuse1.bias"] = leaves["fuse1.bias"].detach().to(torch.bfloat16).requires_grad_()
        leaves["unify2.weight"] = leaves["unify2.weight"].detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dec_mod.compute_dtype(*_split(ours)) == torch.bfloat16
        out = dec_mod.decoder_mlp(*_split(ours))
        out_eager = eager_decoder_mlp(*_split(eager))
    out.backward(ours["g"].to(out.dtype))
    out_eager.backward(eager["g"].to(out_eager.dtype))
    assert_close(out, out_eager, 1e-2, "mixed parameters out")
    for name in ("fuse1.bias", "unify2.weight", "f2"):
        assert ours[name].grad.dtype == ours[name].dtype
        assert_close(ours[name].grad, eager[name].grad, 2e-2, f"mixed parameters d{name}")


def test_bad_arguments_are_named():
    kernel_device("cpu")
    vals = _leaves(_inputs(SHAPES["square"], seed=0), "cpu", torch.float32)
    features, p = _split(vals)
    with pytest.raises(ValueError, match="3 feature maps for 4 unify"):
        dec_mod.decoder_mlp(features[:3], p)
    with pytest.raises(ValueError, match="stage 2"):
        dec_mod.decoder_mlp([features[0], features[2], features[2], features[3]], p)
    with pytest.raises(ValueError, match="fuse Linears"):
        dec_mod.decoder_mlp(features, DecoderParams(p.unify_weights, p.unify_biases, p.fuse1_weight[:, :-1],
                                                    p.fuse1_bias, p.fuse2_weight, p.fuse2_bias))
    with pytest.raises(ValueError, match="dropout_p"):
        dec_mod.decoder_mlp(features, p, 1.0, training=True)
    for bad_seed in (torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32)):
        with pytest.raises(ValueError, match="seed must be one int64"):
            dec_mod.decoder_mlp(features, p, 0.1, training=True, seed=bad_seed)
