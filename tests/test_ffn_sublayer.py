"""Parity of the fused feed-forward sublayer (kernels/ffn_sublayer.py) with float64 and with eager.

out = x + fc2(GELU(fc1(LayerNorm(x)))); the output and the gradients of x, γ, β, w1, b1, w2, b2 are
compared with float64 autograd of the eager composition on the same (rounded) inputs, and under
autocast with eager autocast itself. On a CPU-only machine the kernels run under TRITON_INTERPRET=1;
on a CUDA machine the "cuda" cases run the compiled kernels and the "cpu" cases skip.
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

ffn_mod = importlib.import_module("msf.kernels.ffn_sublayer")
attn_mod = importlib.import_module("msf.kernels.attention")
norm_mod = importlib.import_module("msf.kernels.map_norm")
from conftest import KERNEL_DEVICES, assert_close, kernel_device, poison_new_buffers  # noqa: E402
from msf.reference import StageNorm  # noqa: E402

pytestmark = pytest.mark.parity

NAMES = ("x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
# (B, N, C, H): the model's four stages (C = 32..192, H = 2C) at a few dozen ragged tokens, and a
# C and H that are no power of two and no multiple of the 16-wide interpreter slices
SHAPES = {"C32": (2, 37, 32, 64), "C64": (2, 19, 64, 128), "C128": (1, 21, 128, 256), "C192": (1, 13, 192, 384),
          "C40-H56": (3, 7, 40, 56), "C48-H16": (2, 23, 48, 16)}
# relative-norm tolerances: fp32 products run as tf32x3; bf16 / fp16 as SPEC §7 (the kernels emulate
# round-to-nearest-even for bf16 under the interpreter, so the GPU's tolerance holds on the CPU too)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CASES = [("C32", torch.float32), ("C32", torch.bfloat16), ("C64", torch.float32), ("C64", torch.bfloat16),
         ("C128", torch.bfloat16), ("C192", torch.bfloat16), ("C40-H56", torch.float16),
         ("C40-H56", torch.float32),
         ("C48-H16", torch.bfloat16)]  # H within one 16-wide slice


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels fill (here, in the reused chunk-sum and the stage norm's backward) starts as NaN."""
    poison_new_buffers(monkeypatch, ffn_mod, attn_mod, norm_mod)


def _inputs(shape, seed: int) -> dict[str, torch.Tensor]:
    """Fresh random fp32 inputs and an output gradient g; LayerNorm's γ near 1, β and biases small."""
    b, n, c, h = shape
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {"x": rnd(b, n, c) * 2 + 0.5, "ln_weight": 1 + 0.2 * rnd(c), "ln_bias": 0.2 * rnd(c),
            "fc1_weight": rnd(h, c) * c ** -0.5, "fc1_bias": 0.2 * rnd(h),
            "fc2_weight": rnd(c, h) * h ** -0.5, "fc2_bias": 0.2 * rnd(c), "g": rnd(b, n, c)}


def _leaves(vals, device, dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(k != "g") for k, v in vals.items()}


def _run(leaves, fn, **kw) -> torch.Tensor:
    out = fn(*(leaves[k] for k in NAMES), **kw)
    out.backward(leaves["g"].to(out.dtype))
    return out


def _compare(ours, ref, out, out_ref, tol: float, what: str) -> None:
    assert out.dtype == ours["x"].dtype or ours["x"].dtype == torch.float32, (out.dtype, ours["x"].dtype)
    assert_close(out, out_ref, tol, f"{what} out")
    for name in NAMES:
        assert_close(ours[name].grad, ref[name].grad, tol, f"{what} d{name}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in CASES])
def test_matches_float64(shape, dtype, device, poisoned):
    """One dtype throughout: the forward and all seven gradients against float64 on the same inputs."""
    kernel_device(device)
    vals = _inputs(SHAPES[shape], seed=zlib.crc32(shape.encode()) % 1000)
    rounded = {k: v.to(dtype) for k, v in vals.items()}
    ours, ref = _leaves(rounded, device, dtype), _leaves(rounded, device, torch.float64)
    out = _run(ours, ffn_mod.ffn_sublayer)
    out_ref = _run(ref, ffn_mod.ffn_sublayer_eager)
    assert out.dtype == dtype
    _compare(ours, ref, out, out_ref, TOL[dtype], f"{shape} {dtype}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", ["C32", "C192"])
def test_autocast_matches_eager_autocast(shape, device, poisoned):
    """The model's case: fp32 x and master weights under bf16 autocast. The kernels round where eager
    autocast rounds, so the forward matches eager autocast to within a few bf16 roundings (on a CPU
    it is bitwise) and the gradients as closely as eager's own bf16 weight gradients allow (eager
    rounds each weight gradient to bf16 before casting it back; the kernels keep fp32). Both are
    also checked against float64 at the bf16 tolerance."""
    kernel_device(device)
    vals = _inputs(SHAPES[shape], seed=11)
    ours, eager, ref = (_leaves(vals, device, torch.float32), _leaves(vals, device, torch.float32),
                        _leaves(vals, device, torch.float64))
    with torch.autocast(device, dtype=torch.bfloat16):
        assert ffn_mod.compute_dtype(*(ours[k] for k in NAMES)) == torch.bfloat16
        out = ffn_mod.ffn_sublayer(*(ours[k] for k in NAMES))
        out_eager = ffn_mod.ffn_sublayer_eager(*(eager[k] for k in NAMES))
    out.backward(ours["g"])
    out_eager.backward(eager["g"])
    out_ref = _run(ref, ffn_mod.ffn_sublayer_eager)
    assert out.dtype == out_eager.dtype == torch.float32
    assert_close(out, out_eager, 2e-3, f"{shape} autocast out vs eager autocast")
    for name in NAMES:
        assert_close(ours[name].grad, eager[name].grad, 5e-3, f"{shape} autocast d{name} vs eager autocast")
    _compare(ours, ref, out, out_ref, TOL[torch.bfloat16], f"{shape} autocast vs float64")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", ["C64", "C192"])
def test_autocast_weights_cast_once_and_kernels_take_either(shape, device):
    """Under autocast the Function casts w1 and w2 to bf16 once and saves the casts for the backward
    (the kernels would otherwise re-round them from fp32 every hidden slice of every row tile), and
    the kernels given fp32 masters, rounding them on load, compute bit for bit the same forward and
    backward as given the casts."""
    kernel_device(device)
    vals = {k: v.to(device) for k, v in _inputs(SHAPES[shape], seed=21).items()}
    c = vals["x"].shape[-1]
    x2, g = vals["x"].reshape(-1, c), vals["g"].reshape(-1, c)
    lnw, lnb, w1, b1, w2, b2 = (vals[k] for k in NAMES[1:])
    leaves = _leaves(vals, device, torch.float32)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ffn_mod.ffn_sublayer(*(leaves[k] for k in NAMES))
    node = out.grad_fn.next_functions[0][0]  # (out is a view of the Function's rows × C output)
    assert type(node).__name__ == "FFNSublayerFunctionBackward", type(node).__name__
    saved = node.saved_tensors
    saved_w = [t for t in saved if t.dim() == 2 and t.shape in (w1.shape, w2.shape) and t.shape != x2.shape]
    assert [t.dtype for t in saved_w] == [torch.bfloat16, torch.bfloat16], [(t.shape, t.dtype) for t in saved]
    out.backward(leaves["g"])
    assert leaves["fc1_weight"].grad.dtype == leaves["fc2_weight"].grad.dtype == torch.float32

    w1c, w2c = ffn_mod.compute_weights(torch.bfloat16, w1, w2)
    bf16 = torch.bfloat16
    fwd_cast = ffn_mod._forward(x2, lnw, lnb, w1c, b1, w2c, b2, 1e-5, bf16)
    fwd_master = ffn_mod._forward(x2, lnw, lnb, w1, b1, w2, b2, 1e-5, bf16)
    for name, a, b in zip(("out", "mean", "rstd"), fwd_cast, fwd_master):
        assert torch.equal(a, b), f"{shape} {name}: fp32 masters rounded on load differ from the casts by " \
                                  f"{(a - b).abs().max().item():.3g}"
    _, mean, rstd = fwd_cast
    bwd_cast = ffn_mod._backward(x2, lnw, lnb, w1c, b1, w2c, mean, rstd, g, bf16, b2.dtype, w_dtype=torch.float32)
    bwd_master = ffn_mod._backward(x2, lnw, lnb, w1, b1, w2, mean, rstd, g, bf16, b2.dtype)
    for name, a, b in zip(("dx", "dγ", "dβ", "dW1", "db1", "dW2", "db2"), bwd_cast, bwd_master):
        assert a.dtype == b.dtype and torch.equal(a, b), \
            f"{shape} {name}: fp32 masters rounded on load differ from the casts by {(a - b).abs().max().item():.3g}"


# the weight gradients' two routes (`stash_pays` picks one by C): each forced at a shape the other
# serves by default, so both run at small and large C, in every dtype class
ROUTE_CASES = [("C32", torch.float32, True), ("C64", torch.bfloat16, True), ("C40-H56", torch.float16, True),
               ("C48-H16", torch.bfloat16, True), ("C128", torch.bfloat16, False), ("C192", torch.bfloat16, False)]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape,dtype,stash", ROUTE_CASES,
                         ids=[f"{s}-{str(d)[6:]}-{'stash' if st else 'recompute'}" for s, d, st in ROUTE_CASES])
def test_both_weight_gradient_routes(shape, dtype, stash, device, poisoned):
    """The route the default does not take at this C, against float64 like the default's."""
    kernel_device(device)
    _, _, c, h = SHAPES[shape]
    assert ffn_mod.stash_pays(c, h) != stash
    vals = _inputs(SHAPES[shape], seed=zlib.crc32(shape.encode()) % 1000 + 1)
    rounded = {k: v.to(dtype) for k, v in vals.items()}
    ours, ref = _leaves(rounded, device, dtype), _leaves(rounded, device, torch.float64)
    out = _run(ours, ffn_mod.ffn_sublayer, stash=stash)
    _compare(ours, ref, out, _run(ref, ffn_mod.ffn_sublayer_eager), TOL[dtype], f"{shape} {dtype} stash={stash}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("stash", [False, True], ids=["recompute", "stash"])
def test_weight_gradients_over_many_chunks(device, stash, poisoned):
    """Row chunks of 24 rows against 16-row tiles (recompute) or 32-row blocks (stash GEMM): every
    chunk ends inside a tile, the last one is ragged, and each chunk's rows must be summed exactly once."""
    kernel_device(device)
    vals = _inputs((2, 50, 32, 64), seed=3)
    ours, ref = _leaves(vals, device, torch.float32), _leaves(vals, device, torch.float64)
    out = _run(ours, ffn_mod.ffn_sublayer, wg_chunk_rows=24, stash=stash)
    _compare(ours, ref, out, _run(ref, ffn_mod.ffn_sublayer_eager), TOL[torch.float32], f"24-row chunks, stash={stash}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_strided_and_flat_tokens(device):
    """x as a non-contiguous view (tokens transposed in memory) and as a flat rows × C matrix: same
    results as eager, gradients in x's own layout, and the caller's x left as it was."""
    kernel_device(device)
    vals = _inputs((2, 9, 32, 64), seed=5)
    base = vals["x"].transpose(1, 2).contiguous().transpose(1, 2).to(device)  # B×N×C view of B×C×N storage
    assert not base.is_contiguous()
    for x in (base, base.reshape(-1, 32)):
        before = x.clone()
        ours = _leaves({**vals, "g": vals["g"].reshape(x.shape)}, device, torch.float32)
        ref = _leaves({**vals, "g": vals["g"].reshape(x.shape)}, device, torch.float64)
        ours["x"] = x.detach().requires_grad_()
        ref["x"] = x.detach().double().requires_grad_()
        out = _run(ours, ffn_mod.ffn_sublayer)
        _compare(ours, ref, out, _run(ref, ffn_mod.ffn_sublayer_eager), TOL[torch.float32], f"x {tuple(x.shape)}")
        assert ours["x"].grad.stride() == x.stride()
        assert torch.equal(x, before)


def test_unserved_cases_run_the_eager_composition(monkeypatch):
    """C > 256, fp32 at C > 64 and a dtype mix outside autocast take the eager path: identical to it,
    and no kernel launches."""
    kernel_device("cpu")
    monkeypatch.setattr(ffn_mod, "FFNSublayerFunction", None)  # any fused call would fail
    for shape, dtype in (((1, 3, 260, 8), torch.bfloat16), ((1, 3, 65, 8), torch.float32)):
        vals = _inputs(shape, seed=1)
        args = [vals[k].to(dtype) for k in NAMES]
        assert torch.equal(ffn_mod.ffn_sublayer(*args), ffn_mod.ffn_sublayer_eager(*args))
    small = _inputs((1, 3, 32, 64), seed=2)
    mixed = [small[k].to(torch.bfloat16) if k.startswith("fc") else small[k] for k in NAMES]
    assert ffn_mod.compute_dtype(*mixed) is None
    with pytest.raises(RuntimeError) as eager_error:  # eager refuses fp32 activations with bf16 weights
        ffn_mod.ffn_sublayer_eager(*mixed)
    with pytest.raises(RuntimeError, match=str(eager_error.value)[:30]):
        ffn_mod.ffn_sublayer(*mixed)


def test_bad_arguments_are_named():
    vals = _inputs((1, 4, 32, 64), seed=0)
    args = {k: vals[k] for k in NAMES}
    bad = [({"ln_weight": torch.ones(31)}, "LayerNorm weight"), ({"fc1_weight": torch.ones(64, 31)}, "fc1"),
           ({"fc2_weight": torch.ones(31, 64)}, "fc2"), ({"fc1_bias": torch.ones(63)}, "fc1")]
    for change, word in bad:
        with pytest.raises(ValueError, match=word):
            ffn_mod.ffn_sublayer(*{**args, **change}.values())
    with pytest.raises(ValueError, match="eps"):
        ffn_mod.ffn_sublayer(*args.values(), eps=0.0)


# ----------------------------------------------------------------------------------------------
# a stage's last block: the stage's final LayerNorm in the forward kernel (`stage_norm`)
# ----------------------------------------------------------------------------------------------
STAGE_NAMES = NAMES + ("stage_weight", "stage_bias")
# (B, h, w, C, H): ragged maps (h·w not a multiple of the row tiles) at the model's widths and an odd one
STAGE_SHAPES = {"C32": (2, 5, 7, 32, 64), "C64": (1, 3, 7, 64, 128), "C192": (1, 3, 5, 192, 384),
                "C40-H56": (2, 3, 3, 40, 56)}
STAGE_CASES = [("C32", torch.float32), ("C64", torch.bfloat16), ("C192", torch.bfloat16), ("C40-H56", torch.float16)]


def _stage_inputs(shape, seed: int) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """`_inputs` on B×(h·w)×C tokens, the stage norm's γ_s, β_s, and two map gradients (the decoder's
    g and the next convolution's g2), B×C×h×w."""
    b, h, w, c, hid = shape
    vals = _inputs((b, h * w, c, hid), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    vals.update(stage_weight=1 + 0.2 * torch.randn(c, generator=gen), stage_bias=0.2 * torch.randn(c, generator=gen),
                g=torch.randn(b, c, h, w, generator=gen), g2=torch.randn(b, c, h, w, generator=gen))
    return vals, (h, w)


STAGE_EPS = 1e-3  # not the sublayer's 1e-5: a kernel that took one eps for the other fails the fp32 cases


def _stage_run(leaves, fn, hw, feeds_next=True, decoder_linear=False):
    """fn's (decoder map, next map) for the leaves, and their backward from g, g2 (each in its map's dtype)."""
    norm = StageNorm(leaves["stage_weight"], leaves["stage_bias"], STAGE_EPS, hw, feeds_next, decoder_linear)
    y, y_next = fn(*(leaves[k] for k in NAMES), 1e-5, norm)
    outs, grads = [y], [leaves["g"].to(y.dtype)]
    if feeds_next:
        outs.append(y_next)
        grads.append(leaves["g2"].to(y_next.dtype))
    torch.autograd.backward(outs, grads)
    return y, y_next


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape,dtype", STAGE_CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in STAGE_CASES])
def test_stage_norm_matches_float64(shape, dtype, device, poisoned):
    """One dtype throughout: the stage's output map (what follows the sublayer, its final LayerNorm)
    and all nine gradients (x, the sublayer's six parameters, γ_s, β_s) against float64 autograd of
    the eager composition, the two maps' gradients both in play."""
    kernel_device(device)
    vals, hw = _stage_inputs(STAGE_SHAPES[shape], seed=zlib.crc32(shape.encode()) % 1000)
    rounded = {k: v.to(dtype) for k, v in vals.items()}
    ours, ref = _leaves(rounded, device, dtype), _leaves(rounded, device, torch.float64)
    for t in ("g", "g2"):
        ours[t], ref[t] = ours[t].detach(), ref[t].detach()
    y, y_next = _stage_run(ours, ffn_mod.ffn_sublayer, hw)
    y_ref, _ = _stage_run(ref, ffn_mod.ffn_sublayer_eager, hw)
    assert y.dtype == dtype and y.shape == y_ref.shape and y.stride() == y_ref.stride(), (y.dtype, y.stride())
    assert y_next.data_ptr() == y.data_ptr(), "one map for both readers where no cast is to be made"
    assert_close(y, y_ref, TOL[dtype], f"{shape} {dtype} stage map")
    for name in STAGE_NAMES:
        assert_close(ours[name].grad, ref[name].grad, TOL[dtype], f"{shape} {dtype} d{name}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("feeds_next,decoder_linear", [(True, True), (False, True), (True, False)],
                         ids=["stage1-3", "stage4", "fp32-decoder-map"])
@pytest.mark.parametrize("shape", ["C32", "C192"])
def test_stage_norm_under_autocast_is_the_two_ops(shape, feeds_next, decoder_linear, device, poisoned):
    """The model's case: fp32 tokens and master weights under bf16 autocast. The fused forward writes
    what the FFN sublayer followed by `stage_output` writes (the decoder's map in bf16 with
    `decoder_linear`, the next convolution's bf16 copy where a stage follows), from the same stored
    out: the maps agree to fp32 rounding of the norm's sums and the gradients (the same backward
    kernels on the same saved out) exactly; both against float64 at the bf16 tolerance."""
    kernel_device(device)
    vals, hw = _stage_inputs(STAGE_SHAPES[shape], seed=17)
    ours, apart, ref = (_leaves(vals, device, torch.float32), _leaves(vals, device, torch.float32),
                        _leaves(vals, device, torch.float64))

    def two_ops(*args):
        *ffn_args, eps, norm = args
        return norm.applied(ffn_mod.ffn_sublayer(*ffn_args, eps), norm_mod.stage_output)

    with torch.autocast(device, dtype=torch.bfloat16):
        y, y_next = _stage_run(ours, ffn_mod.ffn_sublayer, hw, feeds_next, decoder_linear)
        y_apart, y_next_apart = _stage_run(apart, two_ops, hw, feeds_next, decoder_linear)
    y_ref, _ = _stage_run(ref, ffn_mod.ffn_sublayer_eager, hw, feeds_next)
    assert (y.dtype, y_next.dtype) == (y_apart.dtype, y_next_apart.dtype), (y.dtype, y_next.dtype)
    assert y.dtype == (torch.bfloat16 if decoder_linear else torch.float32)
    assert y_next.dtype == (torch.bfloat16 if feeds_next else y.dtype)
    assert (y_next.data_ptr() != y.data_ptr()) == feeds_next
    assert_close(y, y_apart, 1e-5, f"{shape} decoder map vs the two ops")
    assert_close(y_next, y_next_apart, 1e-5, f"{shape} next map vs the two ops")
    assert_close(y, y_ref, TOL[torch.bfloat16], f"{shape} decoder map vs float64")
    for name in STAGE_NAMES:
        assert_close(ours[name].grad, apart[name].grad, 1e-6, f"{shape} d{name} vs the two ops")
        assert_close(ours[name].grad, ref[name].grad, TOL[torch.bfloat16], f"{shape} d{name} vs float64")


@pytest.mark.parametrize("shape,norm_kernel_runs", [("C32", False), ("C64", False), ("C192", True)])
def test_stage_norm_backward_runs_inside_the_dx_kernel_on_the_recompute_route(monkeypatch, shape, norm_kernel_runs):
    """On the recompute route (C ≤ 64) the stage norm's backward is the FFN dx kernel's (STAGE_NORM):
    `map_norm`'s backward kernel does not run and ∂L/∂out is never stored; on the stash route (C > 64)
    it runs first. The gradients themselves are checked by the tests above."""
    kernel_device("cpu")
    runs = []
    launch = norm_mod.backward_partials
    monkeypatch.setattr(norm_mod, "backward_partials", lambda *a, **k: runs.append(shape) or launch(*a, **k))
    vals, hw = _stage_inputs(STAGE_SHAPES[shape], seed=5)
    leaves = _leaves({k: v.to(torch.bfloat16) for k, v in vals.items()}, "cpu", torch.bfloat16)
    for t in ("g", "g2"):
        leaves[t] = leaves[t].detach()
    _stage_run(leaves, ffn_mod.ffn_sublayer, hw)
    assert bool(runs) == norm_kernel_runs, runs
    assert all(leaves[name].grad is not None for name in STAGE_NAMES)


def test_stage_norm_unserved_cases_run_the_two_ops(monkeypatch):
    """Where the kernels do not serve (fp32 at C > 64), the FFN sublayer and the stage norm run one after
    the other, each by its own dispatch: results as eager's, no fused stage-norm launch."""
    kernel_device("cpu")
    monkeypatch.setattr(ffn_mod, "FFNStageOutputFunction", None)
    vals, hw = _stage_inputs((1, 3, 3, 72, 16), seed=4)
    leaves = {k: v for k, v in vals.items() if k not in ("g", "g2")}
    norm = StageNorm(leaves["stage_weight"], leaves["stage_bias"], 1e-5, hw)
    got = ffn_mod.ffn_sublayer(*(leaves[k] for k in NAMES), 1e-5, norm)
    want = ffn_mod.ffn_sublayer_eager(*(leaves[k] for k in NAMES), 1e-5, norm)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-6, "unserved stage norm")


def test_stage_norm_bad_arguments_are_named():
    vals, hw = _stage_inputs((1, 2, 3, 32, 64), seed=0)
    args = [vals[k] for k in NAMES]
    good = dict(weight=vals["stage_weight"], bias=vals["stage_bias"], eps=1e-5, hw=hw)
    for change, word in (({"hw": (3, 3)}, "hw"), ({"weight": torch.ones(31)}, "stage norm's weight"),
                         ({"eps": 0.0}, "stage norm's eps")):
        with pytest.raises(ValueError, match=word):
            ffn_mod.ffn_sublayer(*args, 1e-5, StageNorm(**{**good, **change}))
    with pytest.raises(ValueError, match="tokens"):
        ffn_mod.ffn_sublayer(args[0].reshape(6, 32), *args[1:], 1e-5, StageNorm(**good))


def test_gelu_parts_matches_float64():
    """`_gelu_parts` (Φ and φ from one exponential and an erfc approximation) against float64 erf
    over h ∈ [−12, 12], zeros, tiny and huge |h| included, evaluated in fp32: |Φ error| under 5e-7
    (3.3e-7 measured: a few fp32 ulps near ½), |φ error| under 2e-7, GELU' within 5e-7 of 1 + |h|.
    (The interpreter's rsqrt is numpy's, correctly rounded: this checks the formula; the GPU's
    rsqrt.approx adds about 3 ulp of t, docs/ffn_sublayer.md.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def parts(H, CDF, PDF, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        cdf, pdf = ffn_mod._gelu_parts(tl.load(H + offs, mask=mask, other=0.0))
        tl.store(CDF + offs, cdf, mask=mask)
        tl.store(PDF + offs, pdf, mask=mask)

    h = torch.cat([torch.linspace(-12, 12, 4801), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])])
    cdf, pdf = torch.empty_like(h), torch.empty_like(h)
    parts[(triton.cdiv(h.numel(), 1024),)](h, cdf, pdf, h.numel(), BLOCK=1024)
    h64 = h.double()
    cdf64 = 0.5 * torch.erfc(-h64 / 2 ** 0.5)
    pdf64 = torch.exp(-h64 * h64 / 2) / (2 * torch.pi) ** 0.5
    assert (cdf.double() - cdf64).abs().max() < 5e-7, (cdf.double() - cdf64).abs().max()
    assert (pdf.double() - pdf64).abs().max() < 2e-7, (pdf.double() - pdf64).abs().max()
    dgelu = cdf.double() + h64 * pdf.double()
    assert ((dgelu - (cdf64 + h64 * pdf64)).abs() / (1 + h64.abs())).max() < 5e-7
