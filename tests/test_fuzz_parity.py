"""Property-based parity of every fused op against its float64 eager reference (hypothesis).

Each test draws shapes (odd sizes, 1s), memory layouts (NCHW, channels-last, sliced and transposed
views), dtypes (fp32 / bf16 / fp16, and autocast's mix for the attention sublayer) and input scales,
runs the fused forward and backward, and compares output and every gradient with the float64
reference of the op's parity test, at that test's per-dtype tolerance (`tests.conftest.assert_close`
or `tests.test_head_loss.rel_error`: relative norm of the whole result).

CI: a few examples per op, derandomized (the same examples every run), no deadline, no example
database. Longer run on demand: `MSF_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz_parity.py`
(random examples; a failure prints the seed and the `@reproduce_failure` blob to replay it).

Non-finite inputs (contracts stated in the kernels' docstrings):
- upsample_argmax: a pixel whose interpolated value (ATen's formula: a NaN tap at any weight, inf·0,
  inf − inf) is NaN in some class gets the lowest such class (torch.argmax's answer on a NaN row);
  pixels with finite taps match eager up to near-ties; other pixels with ±inf taps need only a
  valid label.
- head_loss: NaN anywhere in the logits gives a NaN loss (and NaN in the gradient); wherever
  float64 eager's loss is not finite the fused one is not either; where eager's is finite the fused
  loss is close to it or NaN (an inf times a weight-0 tap).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, assume, example, given, settings, strategies as st  # noqa: E402

from msf.kernels import attention as attn_mod  # noqa: E402
from msf.kernels import attention_sublayer as sub_mod  # noqa: E402
from msf.kernels import head_loss as hl_mod  # noqa: E402
from msf.kernels import lmsa as lmsa_mod  # noqa: E402
from msf.kernels.upsample_argmax import upsample_argmax  # noqa: E402
import test_attention as t_attn  # noqa: E402
import test_attention_sublayer as t_sub  # noqa: E402
import test_head_loss as t_hl  # noqa: E402
import test_lmsa as t_lmsa  # noqa: E402
from conftest import assert_close, assert_grads_close, poison_new_buffers  # noqa: E402

pytestmark = pytest.mark.parity  # `run.py test -m parity`: the kernels against their references

_ON_DEMAND = int(os.environ.get("MSF_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_ON_DEMAND or 8,
    derandomize=not _ON_DEMAND,          # CI: the same examples every run
    deadline=None,                       # the interpreter's speed varies with the machine's load
    database=None,                       # no .hypothesis/ folder in the checkout
    # CI reports the failing example as drawn (shrinking re-runs the interpreter for minutes);
    # the on-demand run shrinks it to a minimal one
    phases=[Phase.explicit, Phase.generate, Phase.shrink] if _ON_DEMAND else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SCALES = st.sampled_from([0.05, 1.0, 4.0, 12.0])
LOGIT_LAYOUTS = st.sampled_from(["nchw", "nhwc", "slice", "transposed"])


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels fill starts as NaN (head_loss: NaN / −1), so unwritten elements fail."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("CPU runs need TRITON_INTERPRET=1 set before `kernels` is imported")
    monkeypatch.setattr(hl_mod, "POISON_OUTPUTS", True)
    poison_new_buffers(monkeypatch, attn_mod, sub_mod, lmsa_mod)


def _scaled_logits(B, K, h, w, dtype, layout, scale, seed):
    x = t_hl.make_logits(B, K, h, w, dtype, layout, "cpu", seed=seed)
    with torch.no_grad():
        x.mul_(scale)                    # in place: keeps the view's strides
    return x


# ------------------------------------------------------------------------------------------------
# head_loss
# ------------------------------------------------------------------------------------------------
@FUZZ
@given(B=st.integers(1, 2), K=st.sampled_from([1, 2, 5, 19]), h=st.integers(1, 5), w=st.integers(1, 5),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dtype=DTYPES, layout=LOGIT_LAYOUTS,
       tdtype=st.sampled_from([torch.uint8, torch.int64]), tstrided=st.booleans(),
       eps=st.sampled_from([1.0, 1e-3]), scale=SCALES, seed=st.integers(0, 2**16))
def test_head_loss_fuzzed(B, K, h, w, sh, sw, dtype, layout, tdtype, tstrided, eps, scale, seed, poisoned):
    assume(layout == "nchw" or min(K, h, w) > 1)  # else the view is dense (make_logits asserts it is not)
    assume(not tstrided or min(sh * h, sw * w) > 1)  # likewise make_targets
    logits = _scaled_logits(B, K, h, w, dtype, layout, scale, seed)
    targets = t_hl.make_targets(B, K, sh * h, sw * w, tdtype, "cpu", strided=tstrided, seed=seed + 1)
    x = logits.detach().requires_grad_()
    loss = hl_mod.head_loss(x, targets, eps)
    loss.backward()
    x64 = logits.detach().double().requires_grad_()
    ref = t_hl.reference_loss(x64, targets, eps)
    ref.backward()
    tag = f"B{B} K{K} {h}x{w} s{sh}x{sw} {dtype} {layout} scale {scale}"
    # K = 1: every softmax is 1 and the loss's gradient is exactly 0 in float64; the kernels leave
    # fp32 rounding residue (3e-8 seen): judged against the size a gradient of this shape has
    t_hl.rel_error(loss, ref, f"loss ({tag})", t_hl.LOSS_TOL, scale=t_hl.LOSS_SCALE)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    t_hl.rel_error(x.grad, x64.grad, f"dlogits ({tag})", t_hl.GRAD_TOL[dtype],
                   scale=t_hl.gradient_scale(logits, targets))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@FUZZ
@given(K=st.sampled_from([2, 5]), h=st.integers(1, 4), w=st.integers(1, 4), s=st.integers(1, 3),
       dtype=DTYPES, bad=st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_head_loss_non_finite_logits(K, h, w, s, dtype, bad, seed, poisoned):
    """NaN in → NaN loss; ±inf → never a finite loss where float64 eager's is not finite."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(1, K, h, w, generator=g)).to(dtype)
    flat = logits.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[:len(bad)]
    flat[where] = torch.tensor(bad[:len(where)], dtype=dtype)
    targets = torch.randint(0, K, (1, s * h, s * w), generator=g, dtype=torch.uint8)
    x = logits.detach().requires_grad_()
    loss_t = hl_mod.head_loss(x, targets)
    loss_t.backward()
    loss = loss_t.item()
    ref = t_hl.reference_loss(logits.double(), targets, 1.0).item()
    if torch.isnan(logits).any():
        assert math.isnan(loss), f"NaN logits gave the loss {loss}"
        assert torch.isnan(x.grad).any(), "NaN logits gave an all-finite gradient"
    if not math.isfinite(ref):
        assert not math.isfinite(loss), f"fused loss {loss} is finite, float64 eager {ref}"
    elif not math.isnan(loss):  # NaN allowed: a weight-0 tap times an inf (head_loss docstring)
        assert abs(loss - ref) <= t_hl.LOSS_TOL * max(abs(ref), 1.0), f"fused loss {loss}, float64 eager {ref}"


# ------------------------------------------------------------------------------------------------
# upsample_argmax
# ------------------------------------------------------------------------------------------------
def _taps(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's bilinear source taps and the second tap's weight per output coordinate
    (align_corners=False), computed in fp32 as the kernel does."""
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * torch.tensor(n_in / n_out, dtype=torch.float32)
           - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(n_in - 1)
    return i0, (i0 + 1).clamp_max(n_in - 1), (src - i0).clamp(0, 1).double()


def _check_labels(got, logits, size, tag):
    """Labels are eager's argmax of the upsampled float64 logits up to near-ties at every pixel
    whose four taps are finite; a pixel whose interpolated value is NaN in some class gets exactly
    the lowest such class (the NaN contract in msf.kernels.upsample_argmax)."""
    B, K = logits.shape[:2]
    H, W = size
    assert got.dtype == torch.int64 and got.shape == (B, H, W), tag
    assert ((got >= 0) & (got < K)).all(), f"{tag}: unwritten (poisoned) or invalid labels"
    y0, y1, ly = _taps(H, logits.shape[2])
    x0, x1, lx = _taps(W, logits.shape[3])
    L = logits.double()
    taps = [L[:, :, ys][:, :, :, xs] for ys in (y0, y1) for xs in (x0, x1)]    # v00, v01, v10, v11
    wy, wx = ly[:, None], lx[None, :]
    # ATen's formula term by term (the kernel's): a NaN tap, inf·0 or inf − inf make the value NaN
    z = (1 - wy) * ((1 - wx) * taps[0] + wx * taps[1]) + wy * ((1 - wx) * taps[2] + wx * taps[3])
    nan_class = torch.isnan(z)                                                  # B×K×H×W
    nan_pixel = nan_class.any(dim=1)
    lowest_nan = torch.where(nan_class, torch.arange(K)[None, :, None, None], K).amin(dim=1)
    assert torch.equal(got[nan_pixel], lowest_nan[nan_pixel]), f"{tag}: NaN pixels not labelled with their lowest NaN class"
    taps = torch.stack(taps)
    finite = torch.isfinite(taps).all(dim=0).all(dim=1)
    up = F.interpolate(logits.double(), size=size, mode="bilinear", align_corners=False)
    best = up.amax(dim=1)
    chosen = up.gather(1, got[:, None]).squeeze(1)
    near = (chosen == best) | (best - chosen <= 2 * torch.finfo(logits.dtype).eps * up.abs().amax(dim=1))
    bad = finite & ~near
    assert not bad.any(), (f"{tag}: {int(bad.sum())} labels not a (near-)maximum, e.g. at "
                           f"{tuple(int(i) for i in torch.nonzero(bad)[0])}")


@FUZZ
@given(B=st.integers(1, 2), K=st.sampled_from([1, 3, 19]), h=st.integers(1, 6), w=st.integers(1, 6),
       H=st.integers(1, 14), W=st.integers(1, 14), dtype=DTYPES, layout=LOGIT_LAYOUTS, scale=SCALES,
       seed=st.integers(0, 2**16))
def test_upsample_argmax_fuzzed(B, K, h, w, H, W, dtype, layout, scale, seed, poisoned):
    assume(layout == "nchw" or min(K, h, w) > 1)
    logits = _scaled_logits(B, K, h, w, dtype, layout, scale, seed)
    _check_labels(upsample_argmax(logits, (H, W)), logits, (H, W), f"B{B} K{K} {h}x{w}->{H}x{W} {dtype} {layout}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@FUZZ
@given(K=st.sampled_from([2, 5]), h=st.integers(1, 4), w=st.integers(1, 4), H=st.integers(1, 9), W=st.integers(1, 9),
       dtype=DTYPES, bad=st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_upsample_argmax_non_finite_logits(K, h, w, H, W, dtype, bad, seed, poisoned):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(1, K, h, w, generator=g)).to(dtype)
    flat = logits.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[:len(bad)]
    flat[where] = torch.tensor(bad[:len(where)], dtype=dtype)
    _check_labels(upsample_argmax(logits, (H, W)), logits, (H, W), f"K{K} {h}x{w}->{H}x{W} {dtype} with {bad}")


# ------------------------------------------------------------------------------------------------
# attention, attention_sublayer, lmsa
# ------------------------------------------------------------------------------------------------
@FUZZ
@given(B=st.integers(1, 2), N=st.integers(1, 16), M=st.integers(2, 16), d=st.sampled_from([32, 48, 64, 192]),
       dtype=DTYPES, q_layout=st.sampled_from(["packed", "contiguous", "transposed"]),
       chunk=st.sampled_from([None, 4]), scale=st.sampled_from([0.1, 1.0, 3.0]), seed=st.integers(0, 2**16))
def test_attention_fuzzed(B, N, M, d, dtype, q_layout, chunk, scale, seed, poisoned):
    """M ≥ 2: at M = 1 the softmax is constant, dq is exactly 0 and a relative error is meaningless
    (the fused dq there is rounding noise, ~1e-7; tests/test_attention.py covers M = 1's output)."""
    q, k, v, do, _ = t_attn._inputs(B, N, M, d, dtype, "cpu", packed=q_layout != "contiguous", seed=seed)
    with torch.no_grad():
        q = (q * scale).to(dtype)
        if q_layout == "transposed":     # B×N×d view of a B×d×N tensor
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        elif q_layout == "packed":
            wide = torch.zeros(B, N, d + 8, dtype=dtype)
            wide[..., 4:4 + d] = q
            q = wide[..., 4:4 + d]
    # bf16: 2.5e-2 (test_attention.py's fixed shapes hold 7e-3). A drawn single query is the hard
    # case: the backward takes δ = Σ dO·O from the output rounded to bf16, as flash attention does,
    # and dS_j = P_j (dP_j − δ) cancels where dP_j ≈ δ (N = 1, M = 7, d = 192 at q × 3: one dk element
    # 11 % off, the three gradients 1.2e-2; 2026-12-07, with every rounding to nearest even)
    rel = 2.5e-2 if dtype == torch.bfloat16 else t_attn._tol(dtype, "cpu")
    # the gradients against the scale of all three as well as each one's: with two keys (or two equal
    # ones) dq and dk cancel to a small fraction of dv, and their own relative error is rounding noise
    # (2026-12-07, N = M = 2: dk 5e-2 of its own norm in bf16, 1.4e-2 in fp16)
    t_attn._check_all(q, k, v, do, dtype, rel=rel, floor_rel=rel, bwd_chunk_rows=chunk)


def _call_sublayer(leaves, fn, **kw):
    """k, v as the column halves of the packed kv leaf (a single-key kv makes them contiguous)."""
    k, v = leaves["kv"].chunk(2, dim=-1)
    return fn(leaves["x"], leaves["residual"], k, v, *(leaves[n] for n in ("wq", "bq", "wo", "bo")), **kw)


@FUZZ
@given(B=st.integers(1, 2), N=st.integers(1, 12), M=st.integers(2, 12), c=st.sampled_from([32, 64]),
       mode=st.sampled_from(["fp32", "bf16", "fp16", "fp32+bf16kv", "bf16act+bf16kv"]),
       chunks=st.sampled_from([(None, None), (4, 8)]), seed=st.integers(0, 2**16))
# found by this test: weight-gradient chunks shorter than the kernel's row block counted rows twice
@example(B=2, N=11, M=9, c=64, mode="fp32", chunks=(4, 8), seed=23655)
def test_attention_sublayer_fuzzed(B, N, M, c, mode, chunks, seed, poisoned):
    """M ≥ 2 for the reason given in test_attention_fuzzed (at M = 1, dq and so dx are exactly 0)."""
    vals, _ = t_sub._inputs(B, N, M, c, torch.float32, "cpu", seed=seed)
    if "+" in mode:   # autocast's mix: fp32 weights beside bf16 k, v (x, residual fp32 or bf16)
        act = torch.bfloat16 if mode.startswith("bf16act") else torch.float32
        ours = t_sub._mixed_leaves(vals, "cpu", torch.bfloat16, act)
        ref_fn, cdt = t_sub._amp_reference(torch.bfloat16, act), torch.bfloat16
    else:
        cdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        ours = t_sub._leaves(vals, "cpu", cdt)
        ref_fn = sub_mod.attention_sublayer_eager
    ref = {k: t.detach().double().requires_grad_(k != "g") for k, t in ours.items()}
    out = _call_sublayer(ours, sub_mod.attention_sublayer, bwd_chunk_rows=chunks[0], wg_chunk_rows=chunks[1])
    out_ref = _call_sublayer(ref, ref_fn)
    tol, tag = t_sub.TOL[cdt], f"B{B} N{N} M{M} C{c} {mode}"
    assert_close(out - ours["residual"], out_ref - ref["residual"], tol, f"out − residual ({tag})")
    out.backward(ours["g"])
    out_ref.backward(ref["g"])
    names = ("x", "residual", "kv", "wq", "bq", "wo", "bo")
    for name in names:
        assert ours[name].grad.dtype == ours[name].dtype, name
    # each gradient against its own scale plus a floor from the whole gradient's: with two keys and a
    # few queries dq (so dx, dwq, dbq) can cancel to ~1e-3 of the rest (‖dbq‖ 0.03 beside ‖dwo‖ 32,
    # 2026-12-07), where a relative error of that tensor alone measures rounding noise, not the kernels
    assert_grads_close({n: ours[n].grad for n in names}, {n: ref[n].grad for n in names}, tol, tol,
                       f"gradients ({tag})")


# LMSA's examples cost 10-13 s each under the interpreter (its three depthwise stencils a tap at a
# time): 4 in CI, where the other ops draw 8
@settings(FUZZ, max_examples=_ON_DEMAND or 4)
@given(B=st.integers(1, 2), c=st.sampled_from([16, 32]), H=st.integers(1, 10), W=st.integers(1, 10), dtype=DTYPES,
       layout=st.sampled_from(["nchw", "channels_last", "sliced"]), scale=st.sampled_from([0.1, 1.0, 5.0]),
       seed=st.integers(0, 2**16))
def test_lmsa_fuzzed(B, c, H, W, dtype, layout, scale, seed, poisoned):
    x, go = t_lmsa._inputs(B, c, H, W, dtype, "cpu", seed, layout="channels_last" if layout == "channels_last" else "nchw")
    with torch.no_grad():
        x = (x * scale).to(dtype)
        if layout == "sliced":           # channel slice of a wider tensor
            wide = torch.zeros(B, c + 4, H, W, dtype=dtype)
            wide[:, 2:2 + c] = x
            x = wide[:, 2:2 + c]
        elif layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    ps = t_lmsa._params(c, dtype, "cpu", seed + 1)
    # bf16: SPEC §7's 1e-2 (test_lmsa.py's fixed shapes hold 6e-3; at drawn shapes the gate's small
    # tensors, e.g. FC1's 12-element bias at C = 32, reached 4.7e-3 over 16 random cases, 2026-12-07)
    t_lmsa._run_case(x.requires_grad_(), ps, go, rel=1e-2 if dtype == torch.bfloat16 else None)
