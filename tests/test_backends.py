"""Model-level parity: backend="triton" computes the eager model's function and gradients.

Runs on CUDA when present, else on CPU tensors through TRITON_INTERPRET=1 (`run.py test` sets it),
there at the H100's pinned tiles (`conftest.model_at_gpu_tiles`): the configurations the model runs
on a GPU; the interpreter's own small tiles are the op-level parity tests'.
"""
import os

import pytest
import torch

from conftest import assert_close, assert_grads_close, model_at_gpu_tiles

pytest.importorskip("triton")

from msf.backend import fused_op_names  # noqa: E402
from msf.model import MicroSegFormer  # noqa: E402

pytestmark = pytest.mark.parity  # `run.py test -m parity`: the kernels against their references

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def gpu_tiles():
    """The model's kernels at the H100's pinned tiles under the interpreter (`model_at_gpu_tiles`)."""
    with model_at_gpu_tiles(DEVICE):
        yield


def twin_models(lmsa: bool = True):
    torch.manual_seed(0)
    eager = MicroSegFormer(lmsa=lmsa).to(DEVICE).eval()  # eval: no dropout, so both see the same function
    fused = MicroSegFormer(lmsa=lmsa, backend="triton").to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def test_triton_backend_fuses_something():
    assert fused_op_names("eager") == []
    assert "head_loss" in fused_op_names("triton") and "attention" in fused_op_names("triton")


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("lmsa", [True, False])
def test_logits_loss_and_every_gradient_match_eager(lmsa):
    eager, fused = twin_models(lmsa)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 64, generator=g).to(DEVICE)
    masks = torch.randint(0, 19, (2, 32, 64), generator=g).to(DEVICE)
    masks[0, :, :] = masks[0, :, :] % 5  # image 0 lacks most classes: exercises absent-class Dice terms
    with torch.no_grad():
        assert_close(fused(images), eager(images), 1e-5, "logits")
    losses = []
    for model in (eager, fused):
        loss = model.loss(images, masks)
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], 1e-5, "loss")
    for (name, p_eager), p_fused in zip(eager.named_parameters(), fused.parameters()):
        assert p_fused.grad is not None, f"{name}: no gradient through the triton backend"
    # against the whole model's gradient: a tensor whose true gradient nearly cancels is not judged
    # by its own rounding noise (the per-tensor check of assert_grads_close still catches a dropped
    # or misscaled gradient)
    assert_grads_close({n: p.grad for n, p in fused.named_parameters()},
                       {n: p.grad for n, p in eager.named_parameters()}, 1e-4, 1e-5, "fp32 gradients")


def test_predictions_match_eager():
    eager, fused = twin_models()
    images = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    agree = (fused.predict(images) == eager.predict(images)).float().mean().item()
    assert agree > 0.999, f"only {agree:.4%} of pixels agree"


@pytest.fixture(scope="module")
def autocast_bf16_step():
    """One bf16 autocast forward+backward of `model.loss` on twin eager and triton models: the losses,
    both models' gradients by name, and the dtypes every fused attention-half call saw (x, the
    compute dtype). The eager fallbacks are made to fail, so every block must take the fused
    mixed-precision attention half."""
    import msf.kernels.attention_block as block_mod
    import msf.kernels.attention_sublayer as sub_mod

    def no_composition(*args, **kwargs):
        raise AssertionError(f"attention composed under autocast; dtypes {[getattr(t, 'dtype', t) for t in args]}")
    fused_calls = []
    forward = block_mod.AttentionBlockFunction.forward

    def recorded(ctx, x, *rest):
        # (x, compute dtype, the tokens' dtype where x is the patch embedding's map): rest ends with
        # cdt, embed = (eps_pe, tokens' dtype) or None, wg_chunk_rows
        fused_calls.append((x.dtype, rest[-3], None if rest[-2] is None else rest[-2][1]))
        return forward(ctx, x, *rest)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sub_mod, "_composed", no_composition)
        patch.setattr(block_mod, "eager_attention_block", no_composition)
        patch.setattr(block_mod.AttentionBlockFunction, "forward", staticmethod(recorded))
        eager, fused = twin_models()
        # the strides each gradient arrives in (a tensor hook runs before AccumulateGrad, which
        # copies a gradient into its parameter's layout where the two differ)
        arrivals = {}

        def arrival(name):
            def hook(grad):
                arrivals[name] = grad.stride()
            return hook
        for name, p in fused.named_parameters():
            p.register_hook(arrival(name))
        g = torch.Generator().manual_seed(3)
        images = torch.randn(2, 3, 32, 64, generator=g).to(DEVICE)
        masks = torch.randint(0, 19, (2, 32, 64), generator=g).to(DEVICE)
        losses, grads = [], []
        for model in (eager, fused):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = model.loss(images, masks)
            loss.backward()
            losses.append(loss.float())
            grads.append({name: p.grad for name, p in model.named_parameters()})
        layouts = {name: p.stride() for name, p in fused.named_parameters()}
    return {"losses": losses, "eager": grads[0], "fused": grads[1], "fused_calls": fused_calls, "layouts": layouts,
            "arrivals": arrivals}


# bf16 rounding of 100+ ops apart (the kernels' then truncating under the interpreter; since
# 2026-12-07 they round to nearest even there, as on a GPU: not re-measured). Measured 2026-11-29 on an AMD
# EPYC with native AVX512-BF16 and with it disabled (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2):
# whole-model relative error 1.14e-2 on both; per tensor, beyond 3% of its own norm, at most
# 1.5e-3 of its floor (a q.bias of norm 1e-6 misses its own 6e-2 by 9e-2 on one CPU and not the other).
AUTOCAST_GRAD_TOL, AUTOCAST_GRAD_FLOOR = 3e-2, 1e-2


PLANTED_BUGS = {
    # a fused weight gradient half again too large (a partial buffer summed twice over a third)
    "kv.weight ×1.5": lambda g: g["stages.3.blocks.0.attn.kv.weight"].mul_(1.5),
    # a fused output-projection gradient 20% off in the first stage
    "proj.weight ×1.2": lambda g: g["stages.0.blocks.0.attn.proj.weight"].mul_(1.2),
    # a gradient never written (a partial buffer not reduced)
    "proj.bias zero": lambda g: g["stages.2.blocks.0.attn.proj.bias"].zero_(),
    # a sign error in the last block's output projection gradient
    "last block's proj.weight sign": lambda g: g["stages.3.blocks.1.attn.proj.weight"].neg_(),
    # every gradient 5% high (a loss scale or mean taken over the wrong count)
    "all ×1.05": lambda g: [t.mul_(1.05) for t in g.values()],
}


def test_autocast_bf16_training_step_matches_eager(autocast_bf16_step):
    """Under autocast the attention half sees the fp32 residual stream and fp32 master weights: the
    triton backend must then take the fused mixed-precision op (never an eager fallback) with bf16
    products and still track eager AMP, judged at the scale of the whole gradient."""
    step = autocast_bf16_step
    assert_close(step["losses"][1], step["losses"][0], 1e-3, "bf16 autocast loss")
    # every block ran fused on autocast's mix: bf16 products beside the residual stream, fp32 on
    # CUDA (LayerNorm autocasts to fp32 there); CPU autocast keeps the patch embedding's LayerNorm,
    # hence x, in bf16. A stage's first block takes the convolution's bf16 map and that LayerNorm.
    act = torch.float32 if DEVICE == "cuda" else torch.bfloat16
    want = {(act, torch.bfloat16, None), (torch.bfloat16, torch.bfloat16, act)}
    assert step["fused_calls"] and set(step["fused_calls"]) == want, set(step["fused_calls"])
    for name, grad in step["fused"].items():
        assert grad is not None, f"{name}: no gradient through the triton backend"
        assert grad.dtype == step["eager"][name].dtype == torch.float32, name
        # arrived in its parameter's layout (no copy into it): the convolutions' weights, cast together
        # (`msf.precision`), get theirs back through views of one widened buffer; W_sr's as the
        # fused backward's channels-last view of its sum
        assert step["arrivals"][name] == step["layouts"][name], (name, step["arrivals"][name], step["layouts"][name])
    for name in ("stages.1.embed.proj.weight", "stages.0.blocks.0.attn.sr.weight"):  # (`MicroSegFormer.__init__`)
        assert step["layouts"][name][1] == 1, f"{name} is not channels-last: {step['layouts'][name]}"
    assert_grads_close(step["fused"], step["eager"], AUTOCAST_GRAD_TOL, AUTOCAST_GRAD_FLOOR, "bf16 autocast grads")
    # and the same scale-aware comparison fails on a real mistake in the fused gradients (here, not
    # in tests of their own: pytest-xdist builds a module-scoped fixture once in every worker that
    # runs one of its tests, and this step is the module's costliest)
    let_through = []
    for bug, plant in PLANTED_BUGS.items():
        planted = {name: grad.clone() for name, grad in step["fused"].items()}
        plant(planted)
        try:
            assert_grads_close(planted, step["eager"], AUTOCAST_GRAD_TOL, AUTOCAST_GRAD_FLOOR, bug)
        except AssertionError:
            continue
        let_through.append(bug)
    assert not let_through, f"planted gradient bugs the comparison let through: {let_through}"


def test_the_blocks_weight_copies_change_nothing_but_the_casts(monkeypatch):
    """The triton model's bf16 autocast step with the blocks' weight matrices cast once for the step
    (`weight_copies`, `msf.precision.step_weight_copies`) and with each fused op casting its own: the
    same loss and every gradient bit for bit, and two cast launches fewer a block (its attention
    half's and its FFN sublayer's; the convolutions' and LMSA's casts are not the blocks'). On a
    narrow model with one block a stage but two in stage 2, so both a stage's first block (the
    patch embedding's norm inside) and a later one take the lent copies: the paper's widths and
    depths ran this at 230 s of the CPU suite for the same branches."""
    import dataclasses

    from msf import backend, model as model_mod
    from msf.kernels import casts
    kernel, launches = casts._cast_kernel, []

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(casts, "_cast_kernel", Counted())
    g = torch.Generator().manual_seed(5)
    images = torch.randn(1, 3, 32, 64, generator=g).to(DEVICE)
    masks = torch.randint(0, 19, (1, 32, 64), generator=g).to(DEVICE)
    narrow = dict(channels=(16, 16, 32, 32), depths=(1, 2, 1, 1), decoder_dim=16)
    runs = []
    for lend in (True, False):
        if not lend:  # the same table, the blocks' copies not made
            own = dataclasses.replace(backend.get_ops("triton"), weight_copies=backend.no_weight_copies)
            monkeypatch.setattr(model_mod, "get_ops", lambda name: own if name == "triton" else backend.get_ops(name))
        torch.manual_seed(0)
        fused = MicroSegFormer(backend="triton", **narrow).to(DEVICE).eval()
        launches.clear()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = fused.loss(images, masks)
        loss.backward()
        runs.append((loss.detach(), {name: p.grad for name, p in fused.named_parameters()}, len(launches)))
    (loss, grads, casts_lent), (loss_own, grads_own, casts_own) = runs
    assert torch.equal(loss, loss_own)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_own[name]), name
    assert casts_own - casts_lent == 2 * sum(narrow["depths"]), (casts_lent, casts_own)
