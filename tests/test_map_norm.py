"""Parity of the fused map LayerNorm (kernels/map_norm.py: the patch embedding's norm) with float64 and eager.

y = LayerNorm over the channels of a B×C×h×w map, as B×(h·w)×C tokens. The output and the gradients
of x, γ, β are compared with float64 autograd of `eager_map_layer_norm` on the same (rounded)
inputs, for NCHW and channels-last maps, and under autocast with eager autocast. On a CPU-only
machine the kernels run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import importlib  # noqa: E402

norm_mod = importlib.import_module("msf.kernels.map_norm")
attn_mod = importlib.import_module("msf.kernels.attention")
from conftest import KERNEL_DEVICES, assert_close, kernel_device, poison_new_buffers  # noqa: E402
from msf.reference import eager_map_layer_norm  # noqa: E402

pytestmark = pytest.mark.parity

# (B, C, h, w): the model's four C (one tile of tokens and several, masked last tiles), a C that is
# no power of two, a map of one row
SHAPES = {"C32": (2, 32, 20, 14), "C64": (2, 64, 9, 10), "C128": (1, 128, 7, 9), "C192": (2, 192, 5, 7),
          "C48": (3, 48, 6, 5), "C40-row": (2, 40, 1, 37)}
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CASES = [("C32", torch.float32), ("C32", torch.bfloat16), ("C64", torch.float16), ("C128", torch.bfloat16),
         ("C192", torch.float32), ("C48", torch.bfloat16), ("C40-row", torch.float32)]


@pytest.fixture
def poisoned(monkeypatch):
    poison_new_buffers(monkeypatch, norm_mod, attn_mod)


def _inputs(shape, seed):
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, c, h, w, generator=gen) * 2 + 0.5, "w": 1 + 0.2 * torch.randn(c, generator=gen),
            "b": 0.2 * torch.randn(c, generator=gen), "g": torch.randn(b, h * w, c, generator=gen)}


def _leaves(vals, device, dtype, channels_last=False):
    out = {k: v.detach().to(device=device, dtype=dtype, copy=True) for k, v in vals.items()}
    if channels_last:
        out["x"] = out["x"].contiguous(memory_format=torch.channels_last)
    return {k: v.requires_grad_(k != "g") for k, v in out.items()}


def _run(leaves, fn):
    y = fn(leaves["x"], leaves["w"], leaves["b"], 1e-5)
    y.backward(leaves["g"].to(y.dtype))
    return y


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in CASES])
def test_matches_float64(shape, dtype, channels_last, device, poisoned):
    kernel_device(device)
    vals = {k: v.to(dtype) for k, v in _inputs(SHAPES[shape], seed=zlib.crc32(shape.encode()) % 997).items()}
    ours = _leaves(vals, device, dtype, channels_last)
    ref = _leaves(vals, device, torch.float64, channels_last)
    y, y_ref = _run(ours, norm_mod.map_layer_norm), _run(ref, eager_map_layer_norm)
    assert y.dtype == dtype and y.is_contiguous()
    assert ours["x"].grad.stride() == ours["x"].stride(), "dx keeps x's layout"
    assert_close(y, y_ref, TOL[dtype], f"{shape} out")
    for name in ("x", "w", "b"):
        assert_close(ours[name].grad, ref[name].grad, TOL[dtype], f"{shape} d{name}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_autocast_matches_eager_autocast(device, poisoned):
    """The model's case: the convolution's bf16 map and fp32 γ, β under bf16 autocast; the tokens come
    out in the dtype eager autocast gives them (fp32 on CUDA, the map's on the CPU), dx in bf16.
    dγ, dβ are fp32 sums here; eager's CPU LayerNorm sums bf16 gradients in bf16 (4 % off float64 on
    this map), so those two are held to float64, where eager itself would fail."""
    kernel_device(device)
    vals = _inputs(SHAPES["C64"], seed=4)
    ours, eager = _leaves(vals, device, torch.float32), _leaves(vals, device, torch.float32)
    for leaves in (ours, eager):
        leaves["x"] = leaves["x"].detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = norm_mod.map_layer_norm(ours["x"], ours["w"], ours["b"])
        y_eager = eager_map_layer_norm(eager["x"], eager["w"], eager["b"])
    assert y.dtype == y_eager.dtype
    y.backward(ours["g"].to(y.dtype))
    y_eager.backward(eager["g"].to(y_eager.dtype))
    ref = _leaves({**vals, "x": vals["x"].to(torch.bfloat16)}, device, torch.float64)
    _run(ref, eager_map_layer_norm)
    assert_close(y, y_eager, 4e-3, "autocast out vs eager autocast")
    assert_close(ours["x"].grad, eager["x"].grad, 1e-2, "autocast dx vs eager autocast")
    for name in ("x", "w", "b"):
        assert ours[name].grad.dtype == eager[name].grad.dtype
        assert_close(ours[name].grad, ref[name].grad, 1e-2, f"autocast d{name} vs float64")


def test_bad_arguments_name_what_is_wrong():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="B×C×h×w"):
        norm_mod.map_layer_norm(x[0], torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="C = 8"):
        norm_mod.map_layer_norm(x, torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match="eps"):
        norm_mod.map_layer_norm(x, torch.ones(8), torch.zeros(8), 0.0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", ["C32", "C192"])
def test_copy_for_the_next_convolution(shape, device, poisoned):
    """The stage-final norm: fp32 tokens (a channels-last map) under bf16 autocast give fp32 tokens for
    the decoder and the bf16 copy the next patch embedding's convolution would cast them to. Both
    outputs carry gradients (the copy's in bf16); the backward adds them in fp32, as autograd adds the
    fp32 cast of the copy's gradient. Against float64 with the same roundings."""
    kernel_device(device)
    vals = _inputs(SHAPES[shape], seed=6)
    g2 = torch.randn(vals["g"].shape, generator=torch.Generator().manual_seed(9))
    ours = _leaves(vals, device, torch.float32, channels_last=True)
    ref = _leaves(vals, device, torch.float64, channels_last=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, y2 = norm_mod.map_layer_norm(ours["x"], ours["w"], ours["b"], with_copy=True)
    assert y.dtype == torch.float32 and y2.dtype == torch.bfloat16
    torch.autograd.backward([y, y2], [ours["g"], g2.to(device, torch.bfloat16)])
    y_ref = eager_map_layer_norm(ref["x"], ref["w"], ref["b"], 1e-5)
    y_ref.backward(ref["g"] + g2.to(device, torch.bfloat16).double())
    assert_close(y, y_ref, TOL[torch.float32], f"{shape} tokens")
    assert_close(y2, y_ref, TOL[torch.bfloat16], f"{shape} bf16 copy")
    assert torch.equal(y2, y.to(torch.bfloat16)), "the copy is the tokens rounded, as autocast's cast"
    for name in ("x", "w", "b"):
        assert_close(ours[name].grad, ref[name].grad, 1e-5, f"{shape} d{name}")
    with torch.autocast(device, dtype=torch.bfloat16):
        y, same = norm_mod.map_layer_norm(ours["x"].detach().to(torch.bfloat16), ours["w"], ours["b"], with_copy=True)
    assert same is y, "no copy where the tokens already have the convolution's dtype"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("feeds_next", [True, False], ids=["stage2-3", "stage4"])
def test_decoder_map_cast_for_its_linear(feeds_next, device, poisoned):
    """`stage_output(decoder_linear=True)` (stages 2-4, whose maps the decoder reads only through a
    Linear) under bf16 autocast: the decoder's map is written in bf16, bit for bit the fp32 map
    rounded as the Linear's autocast cast rounds it, and apart from the next convolution's copy (so
    their gradients still meet in fp32). Its bf16 gradient gives bit for bit what the fp32 map's
    path gives for that gradient widened (the cast's backward)."""
    kernel_device(device)
    b, c, h, w = SHAPES["C64"]
    vals = _inputs((b, c, h, w), seed=8)
    tokens = vals["x"].flatten(2).transpose(1, 2).contiguous().to(device)  # B×N×C, as the residual stream
    g1 = vals["g"].to(device, torch.bfloat16)  # a Linear's input gradient under autocast: bf16
    g2 = torch.randn(vals["g"].shape, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    grads = {}
    outs = {}
    for lin in (False, True):
        leaves = {k: v.detach().to(device).requires_grad_() for k, v in
                  (("tokens", tokens), ("w", vals["w"]), ("b", vals["b"]))}
        with torch.autocast(device, dtype=torch.bfloat16):
            y, y_next = norm_mod.stage_output(leaves["tokens"], (h, w), leaves["w"], leaves["b"], 1e-5,
                                              feeds_next, decoder_linear=lin)
        if lin:
            assert y.dtype == torch.bfloat16, y.dtype
        else:
            assert y.dtype == torch.float32, y.dtype
        assert (y_next.data_ptr() != y.data_ptr()) == feeds_next, "the two maps share memory only without a copy"
        dec_grad = g1.view(b, h, w, c).permute(0, 3, 1, 2)
        if feeds_next:
            torch.autograd.backward([y, y_next], [dec_grad.to(y.dtype), g2.view(b, h, w, c).permute(0, 3, 1, 2)])
        else:
            y.backward(dec_grad.to(y.dtype))
        outs[lin] = (y, y_next)
        grads[lin] = [leaves[k].grad for k in ("tokens", "w", "b")]
    assert torch.equal(outs[True][0], outs[False][0].to(torch.bfloat16)), "the decoder's map is the fp32 map rounded"
    if feeds_next:
        assert torch.equal(outs[True][1], outs[False][1]), "the next convolution's copy is unchanged"
    for name, a, ref in zip(("d tokens", "dγ", "dβ"), grads[True], grads[False]):
        assert torch.equal(a, ref), f"{name}: {(a - ref).abs().max().item():.3g} from the fp32 map's path"
