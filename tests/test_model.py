import pytest
import torch
import torch.nn.functional as F

from msf.model import MicroSegFormer, count_parameters


def test_parameter_counts_match_spec():
    assert count_parameters(MicroSegFormer(lmsa=False)) == 1_721_939
    assert count_parameters(MicroSegFormer()) == 1_819_395
    assert count_parameters(MicroSegFormer()) < 1_821_085  # the hard limit


def test_token_and_kv_lengths_at_512(monkeypatch):
    import dataclasses
    import functools

    from msf import backend, model as model_mod
    from msf.reference import composed_attention_sublayer, eager_attention_block

    seen = []  # ("q" | "kv", tokens, channels) in call order: the sublayer's queries and its keys

    def sublayer(x_norm, residual, k, v, *weights):
        seen.append(("q", x_norm.shape[1], x_norm.shape[2]))
        seen.append(("kv", k.shape[1], k.shape[2]))
        return composed_attention_sublayer(x_norm, residual, k, v, *weights)
    table = dataclasses.replace(backend.get_ops("eager"),
                                attention_block=functools.partial(eager_attention_block, attention_sublayer=sublayer))
    monkeypatch.setattr(model_mod, "get_ops", lambda _backend: table)
    model = MicroSegFormer().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 512, 512))
    queries = [(n, c) for tag, n, c in seen if tag == "q"]
    keys = [(n, c) for tag, n, c in seen if tag == "kv"]
    # depths (1, 2, 2, 2): one block at stage 1, two at the others
    assert queries == [(16384, 32), (4096, 64), (4096, 64), (1024, 128), (1024, 128), (256, 192), (256, 192)]
    assert keys == [(256, 32), (256, 64), (256, 64), (256, 128), (256, 128), (256, 192), (256, 192)]


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 64)])
def test_output_shape(size):
    model = MicroSegFormer().eval()
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 19, *size)
    assert model.predict(torch.randn(1, 3, *size)).shape == (1, *size)


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 3, 64, 33), (1, 1, 64, 64), (3, 64, 64)])
def test_bad_image_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="multiples of 32|B×3×H×W"):
        MicroSegFormer()(torch.randn(*shape))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        MicroSegFormer(backend="cuda")


def test_loss_is_ce_plus_dice_of_full_resolution_logits():
    torch.manual_seed(0)
    model = MicroSegFormer().eval()
    images = torch.randn(2, 3, 64, 64)
    masks = torch.randint(0, 19, (2, 64, 64))
    logits = model(images).double()
    p = logits.softmax(1)
    onehot = F.one_hot(masks, 19).permute(0, 3, 1, 2).double()
    ce = -(onehot * logits.log_softmax(1)).sum(1).mean()
    dice = (2 * (p * onehot).sum((2, 3)) + 1.0) / (p.sum((2, 3)) + onehot.sum((2, 3)) + 1.0)
    expected = ce + 1 - dice.mean()
    assert torch.allclose(model.loss(images, masks).double(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        model.loss(images, masks[:, :32])


def test_classifier_commutes_with_upsample():
    torch.manual_seed(0)
    model = MicroSegFormer()
    f = torch.randn(2, 128, 9, 7, dtype=torch.float64)
    conv = model.classifier.double()
    up_then_conv = conv(F.interpolate(f, scale_factor=4, mode="bilinear", align_corners=False))
    conv_then_up = F.interpolate(conv(f), scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.allclose(up_then_conv, conv_then_up, atol=1e-12)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = MicroSegFormer()
    model.loss(torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


def test_low_res_head_order_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    paper = MicroSegFormer().double()
    low = MicroSegFormer(paper_head_order=False).double()
    low.load_state_dict(paper.state_dict())
    paper.eval(), low.eval()  # no dropout
    images, masks = torch.randn(2, 3, 64, 96, dtype=torch.float64), torch.randint(0, 19, (2, 64, 96))
    loss_paper, loss_low = paper.loss(images, masks), low.loss(images, masks)
    loss_paper.backward(), loss_low.backward()
    assert torch.allclose(loss_paper, loss_low, rtol=1e-12)
    for (name, a), b in zip(paper.named_parameters(), low.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-14), name
