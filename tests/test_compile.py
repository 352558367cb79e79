"""torch.compile with dynamic shapes around the model's token ↔ map views (`msf.model.tokens_to_map`).

The smallest reproduction of the Inductor failure that `tokens_to_map` works around is kept here:
Conv2d → LayerNorm on its tokens → the channels-last view back to a map → Conv2d, with gradients,
compiled with dynamic=True. The whole model (a few minutes of compilation on 2 cores) runs when
MSF_COMPILE_TESTS=1.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from conftest import assert_close
from msf.model import MicroSegFormer, tokens_to_map


class EmbedNormReduce(nn.Module):
    """Stage 1's patch embedding, its LayerNorm and the SR conv of its first block, in miniature."""

    def __init__(self, as_map):
        super().__init__()
        self.embed, self.norm, self.sr = nn.Conv2d(3, 32, 7, 4, 3), nn.LayerNorm(32), nn.Conv2d(32, 32, 8, 8)
        self.as_map = as_map

    def forward(self, x):
        x = self.embed(x)
        h, w = x.shape[-2:]
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        return self.sr(self.as_map(tokens, h, w)).square().mean()


def plain_view(tokens, h, w):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def compiled_loss_and_grads(module, images):
    torch._dynamo.reset()
    loss = torch.compile(module, dynamic=True)(images)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return loss, grads


def inductor_vector_isa() -> str:
    from torch._inductor import cpu_vec_isa
    return str(cpu_vec_isa.pick_vec_isa())


# Seen 2026-11-29 (torch 2.13, AMD EPYC forced to ATEN_CPU_CAPABILITY=avx2): Inductor's AVX2 code for
# this graph with dynamic shapes and gradients returns NaN (static shapes, no gradients or AVX512:
# right). Not our code; recorded so that a machine with AVX2 only reports it rather than fails CI.
AVX2_NAN = pytest.mark.xfail(condition=inductor_vector_isa() == "avx2", strict=False,
                             reason="Inductor's AVX2 vector code, dynamic shapes + backward: NaN loss (torch 2.13)")


@AVX2_NAN
def test_tokens_to_map_compiles_with_dynamic_shapes_and_matches_eager():
    torch.manual_seed(0)
    module = EmbedNormReduce(tokens_to_map)
    for batch, size in ((2, 64), (3, 96)):
        images = torch.randn(batch, 3, size, size)
        loss, grads = compiled_loss_and_grads(module, images)
        eager_loss = module(images)
        eager_grads = torch.autograd.grad(eager_loss, list(module.parameters()))
        assert_close(loss, eager_loss, 1e-5, f"loss at {batch}×{size}²")
        for (name, _), g, e in zip(module.named_parameters(), grads, eager_grads):
            assert_close(g, e, 1e-4, f"grad {name} at {batch}×{size}²")


def test_the_plain_view_still_trips_inductor():
    """The PyTorch bug the workaround exists for (torch 2.13 here). When this starts to pass, a
    torch upgrade fixed it and `tokens_to_map` can return the view under compile too."""
    torch.manual_seed(0)
    with pytest.raises(Exception, match="cannot determine truth value of Relational"):
        compiled_loss_and_grads(EmbedNormReduce(plain_view), torch.randn(2, 3, 64, 64))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MSF_COMPILE_TESTS") != "1",
                    reason="compiles the whole model (minutes on 2 cores): set MSF_COMPILE_TESTS=1")
def test_compiled_model_survives_a_second_batch_and_image_size():
    torch.manual_seed(0)
    model = MicroSegFormer(paper_head_order=False, decoder_dropout=0.0)
    loss_fn = torch.compile(model.loss, dynamic=True)
    for batch, size in ((2, 64), (3, 64), (2, 96)):
        g = torch.Generator().manual_seed(batch * size)
        images, masks = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 19, (batch, size, size), generator=g)
        assert_close(loss_fn(images, masks), model.loss(images, masks), 1e-5, f"loss at {batch}×{size}²")
