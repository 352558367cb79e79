"""Model-level parity: backend="triton" computes the eager model's function and gradients.

Runs on CUDA when present, else on CPU tensors through TRITON_INTERPRET=1 (`run.py test` sets it).
"""
import os

import pytest
import torch

from conftest import assert_close

pytest.importorskip("triton")

from msf.backend import fused_op_names  # noqa: E402
from msf.model import MicroSegFormer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def twin_models(lmsa: bool = True):
    torch.manual_seed(0)
    eager = MicroSegFormer(lmsa=lmsa).to(DEVICE).eval()  # eval: no dropout, so both see the same function
    fused = MicroSegFormer(lmsa=lmsa, backend="triton").to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def test_triton_backend_fuses_something():
    assert fused_op_names("eager") == []
    assert "head_loss" in fused_op_names("triton") and "attention" in fused_op_names("triton")


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
        assert_close(p_fused.grad, p_eager.grad, 1e-4, f"grad {name}")


def test_predictions_match_eager():
    eager, fused = twin_models()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    agree = (fused.predict(images) == eager.predict(images)).float().mean().item()
    assert agree > 0.999, f"only {agree:.4%} of pixels agree"


def test_autocast_bf16_training_step_matches_eager(monkeypatch):
    """Under autocast the sublayer sees fp32 LayerNorm output, residual and weights beside bf16 k, v:
    the triton backend must then take the fused mixed-precision sublayer (never the composed
    fallback; fp32 residual) and still track eager AMP."""
    import kernels.attention_sublayer as sub_mod

    def no_composition(*args):
        raise AssertionError(f"sublayer composed under autocast; dtypes {[t.dtype for t in args]}")
    monkeypatch.setattr(sub_mod, "_composed", no_composition)
    fused_calls = []
    forward = sub_mod.AttentionSublayerFunction.forward
    monkeypatch.setattr(sub_mod.AttentionSublayerFunction, "forward",
                        staticmethod(lambda ctx, x, r, k, v, *rest: fused_calls.append((x.dtype, r.dtype, k.dtype))
                                     or forward(ctx, x, r, k, v, *rest)))
    eager, fused = twin_models()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 64, generator=g).to(DEVICE)
    masks = torch.randint(0, 19, (2, 32, 64), generator=g).to(DEVICE)
    losses = []
    for model in (eager, fused):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model.loss(images, masks)
        loss.backward()
        losses.append(loss.float())
    assert_close(losses[1], losses[0], 1e-3, "bf16 autocast loss")
    # every block's sublayer ran fused on autocast's mix: bf16 k, v beside fp32 x and residual on
    # CUDA (LayerNorm autocasts to fp32 there); CPU autocast keeps LayerNorm, hence x, in bf16
    act = torch.float32 if DEVICE == "cuda" else torch.bfloat16
    assert fused_calls and set(fused_calls) == {(act, act, torch.bfloat16)}, set(fused_calls)
    for (name, p_eager), p_fused in zip(eager.named_parameters(), fused.parameters()):
        assert p_fused.grad.dtype == p_eager.grad.dtype == torch.float32, name
        # bf16 rounding (truncating under the interpreter) of 100+ ops apart: measured ≤ 4.8e-2
        assert_close(p_fused.grad, p_eager.grad, 6e-2, f"bf16 autocast grad {name}")
