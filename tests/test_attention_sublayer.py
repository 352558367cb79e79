"""Parity of the fused attention sublayer (kernels/attention_sublayer.py) with a float64 reference.

out = residual + (softmax((x wqᵀ + bq) kᵀ/√C) v) woᵀ + bo; the output and the gradients of x,
residual, k, v, wq, bq, wo, bo are compared with float64 autograd on the same (rounded) inputs.
On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set here before Triton is
imported); on a CUDA machine the "cuda" cases run the compiled kernels and the "cpu" cases skip.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import importlib  # noqa: E402

sub_mod = importlib.import_module("msf.kernels.attention_sublayer")
attn_mod = importlib.import_module("msf.kernels.attention")
from conftest import KERNEL_DEVICES, assert_close, kernel_device, poison_new_buffers  # noqa: E402

pytestmark = pytest.mark.parity  # `run.py test -m parity`: the kernels against their references

# (N, M, C): the model's stages (16384/4096/1024/256 queries, 256 keys, C = 32/64/128/192) scaled down
STAGES = [(70, 48, 32), (40, 32, 64), (33, 20, 128), (17, 12, 192)]
STAGE_IDS = [f"N{n}-M{m}-C{c}" for n, m, c in STAGES]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Triton 3.6's interpreter converts fp32 → bf16 by truncation (round toward zero; checked: every
# element of a random fp32 vector matches the truncated value, half of them differ from torch's
# round-to-nearest-even), the GPU rounds to nearest even. Every rounding the kernels do goes through
# `_common._round`, which rounds to nearest even under the interpreter too (the core's P and dS as
# well since 2026-12-07; they truncated before, and CPU bf16 ran at 2.5e-2), so the CPU and the GPU
# share SPEC §7's 1e-2. Measured on CPU: bf16 mixed-precision cases at most 6.8e-3 against the
# autocast-rounded float64 reference.

NAMES = ("x", "residual", "k", "v", "wq", "bq", "wo", "bo")


DEVICES = KERNEL_DEVICES
_device = kernel_device


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels fill (here and in the reused core kernels) starts as NaN."""
    poison_new_buffers(monkeypatch, sub_mod, attn_mod)


def _inputs(batch, n, m, c, dtype, device, seed):
    """Fresh random inputs; k, v are the column halves of one packed B×M×2C tensor (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    s = c ** -0.5
    raw = {
        "x": torch.randn(batch, n, c, generator=g),
        "residual": torch.randn(batch, n, c, generator=g),
        "kv": torch.randn(batch, m, 2 * c, generator=g),
        "wq": torch.randn(c, c, generator=g) * s,
        "bq": torch.randn(c, generator=g) * 0.1,
        "wo": torch.randn(c, c, generator=g) * s,
        "bo": torch.randn(c, generator=g) * 0.1,
        "g": torch.randn(batch, n, c, generator=g),
    }
    return {k: t.to(dtype) for k, t in raw.items()}, device


def _run(leaves, fn, **kw):
    kv = leaves["kv"]
    k, v = kv.split(kv.shape[-1] // 2, dim=-1)
    assert not k.is_contiguous() and not v.is_contiguous()
    out = fn(leaves["x"], leaves["residual"], k, v, leaves["wq"], leaves["bq"], leaves["wo"], leaves["bo"], **kw)
    return out


def _leaves(vals, device, dtype):
    return {k: t.detach().to(device=device, dtype=dtype).requires_grad_(k != "g") for k, t in vals.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,c,dtype", [
    *[pytest.param(n, m, c, dt, id=f"{sid}-{dn}") for (n, m, c), sid in zip(STAGES, STAGE_IDS)
      for dt, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))],
    pytest.param(*STAGES[1], torch.float16, id=f"{STAGE_IDS[1]}-fp16"),
])
def test_sublayer_matches_float64(n, m, c, dtype, device, poisoned):
    device = _device(device)
    seed = 1000 * c + n + {torch.float32: 0, torch.bfloat16: 7, torch.float16: 13}[dtype]
    vals, _ = _inputs(2, n, m, c, dtype, device, seed)
    ours = _leaves(vals, device, dtype)
    ref = _leaves(vals, "cpu", torch.float64)  # the rounded inputs, in float64

    # short chunks so the dK/dV partials and the weight-gradient partials each span several chunks
    out = _run(ours, sub_mod.attention_sublayer, bwd_chunk_rows=16, wg_chunk_rows=32)
    out_ref = _run(ref, sub_mod.attention_sublayer_eager)
    tol = TOL[dtype]
    assert out.dtype == dtype
    fused = sub_mod.fused_supported(dtype, c)
    assert fused == (dtype != torch.float32 or c <= 128)
    assert ("AttentionSublayerFunction" in type(out.grad_fn).__name__) == fused
    assert_close(out, out_ref, tol, f"out (N={n} M={m} C={c} {dtype})")

    out.backward(ours["g"])
    out_ref.backward(ref["g"])
    for name in ("x", "residual", "kv", "wq", "bq", "wo", "bo"):
        assert ours[name].grad is not None, f"d{name} missing"
        assert ours[name].grad.dtype == dtype
        assert_close(ours[name].grad, ref[name].grad, tol, f"d{name} (N={n} M={m} C={c} {dtype})")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device, poisoned):
    """Two backward runs agree bit for bit (chunked partials, no atomics)."""
    device = _device(device)
    vals, _ = _inputs(1, 40, 20, 32, torch.bfloat16, device, seed=3)
    grads = []
    for _ in range(2):
        lv = _leaves(vals, device, torch.bfloat16)
        out = _run(lv, sub_mod.attention_sublayer, bwd_chunk_rows=16, wg_chunk_rows=16)
        out.backward(lv["g"])
        grads.append([lv[k].grad.clone() for k in ("x", "kv", "wq", "bq", "wo", "bo")])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradients_over_many_chunks(device, poisoned):
    """One-row weight-gradient chunks: 140 partials, summed 64 at a time by the 2-D chunk-sum (three
    steps, the last one masked), every gradient against float64."""
    device = _device(device)
    n, m, c, dtype = 70, 20, 32, torch.float32
    vals, _ = _inputs(2, n, m, c, dtype, device, seed=5)
    ours = _leaves(vals, device, dtype)
    ref = _leaves(vals, "cpu", torch.float64)
    assert sub_mod._wg_chunking(2 * n, c, None, 1) == (1, 140)
    out = _run(ours, sub_mod.attention_sublayer, wg_chunk_rows=1)
    out_ref = _run(ref, sub_mod.attention_sublayer_eager)
    out.backward(ours["g"])
    out_ref.backward(ref["g"])
    for name in ("x", "kv", "wq", "bq", "wo", "bo"):
        assert_close(ours[name].grad, ref[name].grad, TOL[dtype], f"d{name} (140 weight-gradient chunks)")


def test_weight_gradient_chunking():
    """About two programs per SM over the 64-wide output tiles, chunks of ≥ 2·C rows in multiples of
    128: at B = 32 on an H100, 256, 256, 64, 22 chunks for the four stages."""
    got = [sub_mod._wg_chunking(32 * n, c, 132)[1] for _, n, _, c in sub_mod.STAGES]
    assert got == [256, 256, 64, 22]
    for rows, c, sms in ((1000, 48, 132), (8192, 192, 108), (100, 256, 132)):
        chunk, nc = sub_mod._wg_chunking(rows, c, sms)
        assert chunk % 128 == 0 and nc == -(-rows // chunk) and (chunk >= 2 * c or nc == 1), (rows, c, sms)


def test_fp32_c192_composes_pieces():
    assert not sub_mod.fused_supported(torch.float32, 192)
    assert sub_mod.fused_supported(torch.bfloat16, 192) and sub_mod.fused_supported(torch.float32, 128)


def test_bytes_table_and_aot_specs():
    table = sub_mod.bytes_table()
    assert "fused" in table and len(table.splitlines()) >= 7
    for stage, n, m, c in sub_mod.STAGES:
        f_e, b_e = sub_mod.totals("eager", 32, n, m, c)
        f_f, _ = sub_mod.totals("fused", 32, n, m, c)
        assert f_f < f_e
        assert f_f <= 4 * 32 * n * c * 2 + 2 * 32 * m * c * 2 + 32 * n * 4 + 4 * c * (c + 1) * 2
    names = [s.name for s in sub_mod.AOT_SPECS]
    assert len(names) == len(set(names))
    for kname in ("fwd", "dq"):
        for mode, per_d in sub_mod._ALLOWED[kname].items():
            for block_d, cfgs in per_d.items():
                assert cfgs, (kname, mode, block_d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw,c,layout,res_dtype", [
    pytest.param((10, 7), 32, "nchw", torch.float32, id="10x7-C32-nchw-fp32"),
    pytest.param((6, 5), 64, "channels_last", torch.float32, id="6x5-C64-cl-fp32"),
    pytest.param((4, 4), 192, "channels_last", torch.bfloat16, id="4x4-C192-cl-bf16"),
])
def test_map_residual_is_the_block_input(hw, c, layout, res_dtype, device, poisoned):
    """The forward with its residual formed from the patch embedding's map (`MapResidual`: LN_pe
    from per-token mean and rstd, γ, β, rounded to the residual stream's dtype) against the same
    forward fed that residual as a token tensor: out agrees to fp32 rounding (the bf16 products are
    identical; only the residual's formation differs), O and lse exactly. The map in either layout,
    ragged token rows (35, 30 and 16 tokens an image), every column slice of C 192."""
    dev = _device(device)
    gen = torch.Generator().manual_seed(5)
    b, (h, w), m, cdt = 2, hw, 12, torch.bfloat16
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    fmap = (rnd(b, c, h, w) * 2 + 0.5).to(cdt)
    gamma, beta = 1 + 0.2 * rnd(c), 0.1 * rnd(c)
    tokens = fmap.float().flatten(2).transpose(1, 2)  # B×N×C
    mean = tokens.mean(-1)
    rstd = (tokens.var(-1, unbiased=False) + 1e-5).rsqrt()
    residual = ((tokens - mean[..., None]) * rstd[..., None] * gamma + beta).to(res_dtype).contiguous()
    stats = torch.stack([mean, rstd], -1).reshape(b * h * w, 2)
    if layout == "channels_last":
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    xn, k, v = rnd(b, h * w, c).to(cdt), rnd(b, m, c).to(cdt), rnd(b, m, c).to(cdt)
    wq, wo = (rnd(c, c) / c ** 0.5).to(cdt), (rnd(c, c) / c ** 0.5).to(cdt)
    bq, bo = 0.1 * rnd(c), 0.1 * rnd(c)
    args = [t.to(dev) for t in (xn, k, v, wq, bq, wo, bo)]
    want = sub_mod._forward(args[0], residual.to(dev), *args[1:])
    pe = sub_mod.MapResidual(fmap.to(dev), gamma.to(dev), beta.to(dev), stats.to(dev), w, res_dtype)
    got = sub_mod._forward(args[0], None, *args[1:], pe)
    assert got[0].dtype == res_dtype
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, msg="O differs")
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0, msg="lse differs")
    tol = 1e-6 if res_dtype == torch.float32 else 1e-2  # bf16: an ulp where the two roundings straddle
    assert_close(got[0].float(), want[0].float(), tol, f"out with the map residual ({layout}, {res_dtype})")


# ----------------------------------------------------------------------------------------------
# mixed precision: what autocast hands the block (fp32 x, residual and master weights; bf16 k, v)
# ----------------------------------------------------------------------------------------------
def _rnd(t, dtype):
    """t rounded to `dtype` in the forward, the identity in the backward (float64 stays float64)."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


def _amp_reference(cdt, out_dtype):
    """The float64 sublayer with autocast's roundings: x and the weights cast to cdt, q, O and y
    rounded to cdt (Linear / matmul outputs), the residual added in full precision, the sum rounded
    to out_dtype (the residual's)."""
    def ref(x, residual, k, v, wq, bq, wo, bo):
        q = _rnd(torch.nn.functional.linear(_rnd(x, cdt), _rnd(wq, cdt), _rnd(bq, cdt)), cdt)
        o = _rnd(attn_mod.attention_eager(q, k, v), cdt)
        return _rnd(residual + _rnd(torch.nn.functional.linear(o, _rnd(wo, cdt), _rnd(bo, cdt)), cdt), out_dtype)
    return ref


def _mixed_leaves(vals, device, cdt, act_dtype=torch.float32):
    """fp32 weights, kv in cdt, x / residual / g in act_dtype (values rounded to those dtypes)."""
    out = _leaves(vals, device, torch.float32)
    for name in ("kv",) + (("x", "residual", "g") if act_dtype != torch.float32 else ()):
        dt = cdt if name == "kv" else act_dtype
        out[name] = vals[name].detach().to(device=device, dtype=dt).requires_grad_(name != "g")
    return out


MIXED_CASES = [
    *[pytest.param(n, m, c, torch.bfloat16, torch.float32, id=f"{sid}-bf16") for (n, m, c), sid in zip(STAGES, STAGE_IDS)],
    pytest.param(*STAGES[3], torch.float16, torch.float32, id=f"{STAGE_IDS[3]}-fp16"),
    # CPU autocast's mix: LayerNorm stays in bf16 there, so x and the residual are bf16 too
    pytest.param(*STAGES[1], torch.bfloat16, torch.bfloat16, id=f"{STAGE_IDS[1]}-bf16-bf16act"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,c,cdt,act", MIXED_CASES)
def test_mixed_precision_matches_autocast_rounded_float64(n, m, c, cdt, act, device, poisoned):
    """fp32 weights (and x / residual in `act`) beside bf16 (fp16) k, v: fused, out in the residual's
    dtype, gradients in each input's dtype, against float64 with autocast's roundings of x, the
    weights, q, O and y."""
    device = _device(device)
    vals, _ = _inputs(2, n, m, c, torch.float32, device, seed=1000 * c + n + 29)
    ours = _mixed_leaves(vals, device, cdt, act)
    ref = {k: t.detach().double().cpu().requires_grad_(k != "g") for k, t in ours.items()}

    out = _run(ours, sub_mod.attention_sublayer, bwd_chunk_rows=16, wg_chunk_rows=32)
    assert "AttentionSublayerFunction" in type(out.grad_fn).__name__
    assert out.dtype == act
    out_ref = _run(ref, _amp_reference(cdt, act))
    tol = TOL[cdt]
    assert_close(out, out_ref, tol, f"out (N={n} M={m} C={c} mixed {cdt})")
    # the attention branch alone (out − residual), so the fp32 residual does not hide its error
    assert_close(out - ours["residual"], out_ref - ref["residual"], tol, f"y (N={n} M={m} C={c} mixed {cdt})")

    out.backward(ours["g"])
    out_ref.backward(ref["g"])
    for name in ("x", "residual", "kv", "wq", "bq", "wo", "bo"):
        grad = ours[name].grad
        assert grad is not None, f"d{name} missing"
        assert grad.dtype == ours[name].dtype, (name, grad.dtype)
        assert_close(grad, ref[name].grad, tol, f"d{name} (N={n} M={m} C={c} mixed {cdt})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,c", [pytest.param(*STAGES[0], id=STAGE_IDS[0]), pytest.param(*STAGES[3], id=STAGE_IDS[3])])
def test_mixed_precision_matches_eager_autocast(n, m, c, device, poisoned):
    """The model's entry under autocast takes the fused mixed path and tracks eager autocast (the
    plain sublayer under torch.autocast) in the output and every gradient."""
    device = _device(device)
    vals, _ = _inputs(2, n, m, c, torch.float32, device, seed=1000 * c + n + 31)
    runs = []
    for fn in (sub_mod.attention_sublayer_for_model, sub_mod.attention_sublayer_eager):
        lv = _mixed_leaves(vals, device, torch.bfloat16)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = _run(lv, fn)
        out.backward(lv["g"])
        runs.append((out, lv))
    (out, ours), (out_eager, eager) = runs
    assert "AttentionSublayerFunction" in type(out.grad_fn).__name__
    assert out.dtype == out_eager.dtype == torch.float32
    # two bf16 computations, each about one bf16 rounding chain off the truth: twice the tolerance
    tol = 2 * TOL[torch.bfloat16]
    assert_close(out - ours["residual"], out_eager - eager["residual"], tol, "y vs eager autocast")
    for name in ("x", "residual", "kv", "wq", "bq", "wo", "bo"):
        assert ours[name].grad.dtype == eager[name].grad.dtype, name
        assert_close(ours[name].grad, eager[name].grad, tol, f"d{name} vs eager autocast")


def test_model_entry_dispatch(monkeypatch):
    """attention_sublayer_for_model: one dtype or autocast's mix → fused; any other mix → composed."""
    def dtypes(x, r, kv, w):
        return {"x": x, "residual": r, "kv": kv, "wq": w, "bq": w, "wo": w, "bo": w}
    f32, b16, f16 = torch.float32, torch.bfloat16, torch.float16
    fused = [dtypes(f32, f32, f32, f32), dtypes(b16, b16, b16, b16),  # one dtype
             dtypes(f32, f32, b16, f32), dtypes(f32, f32, f16, f32),  # CUDA autocast's mix
             dtypes(b16, b16, b16, f32),  # CPU autocast's (bf16 LayerNorm outputs)
             dtypes(b16, f32, b16, f32), dtypes(f32, f32, b16, b16)]
    composed = [dtypes(b16, b16, f32, b16), dtypes(f16, f32, b16, f32), dtypes(f32, f32, b16, f16),
                dtypes(f16, f16, b16, f16), dtypes(f32, f32, f32, b16)]
    for case in fused + composed:
        assert (sub_mod._precision(*[torch.empty(1, dtype=case[k]) for k in
                                     ("x", "residual", "kv", "kv", "wq", "bq", "wo", "bo")]) is not None) \
            == (case in fused), case
    calls = []
    monkeypatch.setattr(sub_mod, "_composed", lambda *a: calls.append(a) or a[1])
    monkeypatch.setattr(sub_mod, "attention_sublayer", lambda *a: a[1])
    for case in fused + composed:
        g = torch.Generator().manual_seed(0)
        t = {k: torch.randn(1, 3, 32, generator=g).to(dt) for k, dt in case.items() if k in ("x", "residual")}
        kv = torch.randn(1, 2, 64, generator=g).to(case["kv"])
        k, v = kv.split(32, dim=-1)
        w = [torch.randn(*s, generator=g).to(case["wq"]) for s in ((32, 32), (32,), (32, 32), (32,))]
        n_before = len(calls)
        sub_mod.attention_sublayer_for_model(t["x"], t["residual"], k, v, *w)
        assert (len(calls) > n_before) == (case in composed), case


def test_weight_gradient_launch_takes_one_to_three_groups():
    """`launch_wgrad` refuses a launch of no group or of more than the kernel's three slots, and
    `wgrad_group` a second product whose shapes differ from the first's (both before any launch)."""
    a, b = torch.zeros(8, 4), torch.zeros(8, 4)
    part = torch.zeros(1, 4 * 4 + 4)
    group = sub_mod.wgrad_group(a, b, part, 8)
    with pytest.raises(ValueError, match="1 to 3 groups a launch, got 0"):
        sub_mod.launch_wgrad([], False)
    with pytest.raises(ValueError, match="1 to 3 groups a launch, got 4"):
        sub_mod.launch_wgrad([group] * 4, False)
    with pytest.raises(ValueError, match="second product's shapes"):
        sub_mod.wgrad_group(a, b, part, 8, second=(torch.zeros(8, 5), b, part))
