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

from conftest import assert_close, assert_grads_close, model_at_gpu_tiles
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
# right), and on other AVX2 machines it does not (an xfail XPASSed there, 2026-12-04). Not our code:
# on AVX2 a NaN loss is that bug and skips the test; any other result, and every result elsewhere,
# is checked in full.
def skip_on_inductor_avx2_nan(loss: torch.Tensor) -> None:
    if inductor_vector_isa() == "avx2" and torch.isnan(loss).any():
        pytest.skip("Inductor's AVX2 vector code, dynamic shapes + backward: NaN loss (torch 2.13 bug, not ours)")


def test_tokens_to_map_compiles_with_dynamic_shapes_and_matches_eager():
    torch.manual_seed(0)
    module = EmbedNormReduce(tokens_to_map)
    for batch, size in ((2, 64), (3, 96)):
        images = torch.randn(batch, 3, size, size)
        loss, grads = compiled_loss_and_grads(module, images)
        skip_on_inductor_avx2_nan(loss)
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


# ------------------------------------------------------------------------------------------------
# One graph: torch.compile(model.loss, fullgraph=True) on both backends (kernels/ops.py, msf/backend.py)
# ------------------------------------------------------------------------------------------------
# A model small enough for Triton's interpreter (every fused op still runs: four sublayers, LMSA,
# head + loss). CI compiles with backend="aot_eager": Dynamo and AOTAutograd build the same graphs
# as for Inductor (one forward, one backward, the msf:: operators in them), without Inductor's C++
# build of every kernel, minutes on 2 cores. MSF_COMPILE_TESTS=1 adds the Inductor variants.
TINY = dict(channels=(16, 16, 32, 32), depths=(1, 1, 1, 1), decoder_dim=16)
# (the tiny model is fp32: the blocks take no patch-embedding norm in, so the 4 map norms are those;
# each stage's one block is its last, whose FFN sublayer takes the stage's final norm in)
FUSED_IN_GRAPH = {"msf.attention_block": 4, "msf.map_layer_norm": 4, "msf.ffn_stage_output": 4,
                  "msf.decoder_fold": 1, "msf.decoder_mlp": 1, "msf.lmsa_classifier": 1, "msf.head_loss": 1}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CUDA the fused operators decompose into their Triton launches (kernels/ops.py): Inductor then
# compiles around the user kernels themselves, which is what the GPU check must see working.
COMPILERS = ["aot_eager"] + (["inductor"] if os.environ.get("MSF_COMPILE_TESTS") == "1" or DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def gpu_tiles():
    """The fused ops at the H100's pinned tiles under the interpreter (`conftest.model_at_gpu_tiles`)."""
    with model_at_gpu_tiles(DEVICE):
        yield


def _triton_runnable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


NEEDS_TRITON = pytest.mark.skipif(not _triton_runnable(), reason="needs triton + CUDA or TRITON_INTERPRET=1")
BACKENDS = ["eager", pytest.param("triton", marks=NEEDS_TRITON)]


def _tiny_model(backend):
    torch.manual_seed(0)
    return MicroSegFormer(backend=backend, paper_head_order=False, decoder_dropout=0.0, **TINY).to(DEVICE)


def _uncompiled_eager_twin(model):
    """The eager backend's model with `model`'s weights: the reference a compiled model is held to.
    For the triton backend this is test_backends' parity at the same tolerances, and it spares the
    interpreter an uncompiled triton step per shape (~20 s each)."""
    twin = _tiny_model("eager")
    twin.load_state_dict(model.state_dict())
    return twin


def _batch(batch, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, h, w, generator=g).to(DEVICE),
            torch.randint(0, 19, (batch, h, w), generator=g).to(DEVICE))


def _loss_and_grads(loss_fn, model, images, masks):
    loss = loss_fn(images, masks)
    return loss, dict(zip((n for n, _ in model.named_parameters()),
                          torch.autograd.grad(loss, list(model.parameters()))))


class GraphRecorder:
    """A torch.compile backend that counts the graphs Dynamo hands over and the msf:: operators in
    them, then compiles each with `compiler`."""

    def __init__(self, compiler):
        self.compiler, self.graphs, self.ops = compiler, 0, {}

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("msf."):
                name = str(node.target).removesuffix(".default")
                self.ops[name] = self.ops.get(name, 0) + 1
        return torch._dynamo.lookup_backend(self.compiler)(gm, example_inputs)


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_matches_uncompiled(backend, compiler):
    """One graph (fullgraph=True: a graph break is an error), holding the fused ops as msf::
    operators on the triton backend, and the loss and every gradient of the uncompiled eager model."""
    torch._dynamo.reset()
    model = _tiny_model(backend)
    images, masks = _batch(2, 32, 32)
    recorder = GraphRecorder(compiler)
    loss, grads = _loss_and_grads(torch.compile(model.loss, fullgraph=True, backend=recorder), model, images, masks)
    reference = _uncompiled_eager_twin(model)
    want_loss, want_grads = _loss_and_grads(reference.loss, reference, images, masks)
    assert recorder.graphs == 1
    assert recorder.ops == (FUSED_IN_GRAPH if backend == "triton" else {}), recorder.ops
    assert_close(loss, want_loss, 1e-5, f"{backend} loss")
    # some gradients of the tiny model are ~1e-15 (q projections at near-uniform attention): judged
    # against the whole model's gradient, not their own rounding noise
    assert_grads_close(grads, want_grads, 1e-4, 1e-5, f"{backend} gradients")


# The eager backend's dynamic-shape recompile is what tripped Inductor (the tokens_to_map tests above
# and the whole-model one cover it); under aot_eager it only costs time, so it runs with the slow tests.
SLOW = pytest.mark.skipif(os.environ.get("MSF_COMPILE_TESTS") != "1", reason="set MSF_COMPILE_TESTS=1")


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", [pytest.param("eager", marks=SLOW), *BACKENDS[1:]])
def test_compiled_loss_survives_a_second_batch_and_image_size(backend, compiler):
    """Another batch size and image size after the first call: the recompile (with dynamic shapes,
    as torch.compile goes after a shape change) runs the fused operators with symbolic sizes and
    still gives the uncompiled eager model's loss and gradients. Both sizes change at once to keep CI to one
    recompile; MSF_COMPILE_TESTS=1 adds each change on its own."""
    torch._dynamo.reset()
    model = _tiny_model(backend)
    loss_fn = torch.compile(model.loss, fullgraph=True, backend=compiler)
    reference = _uncompiled_eager_twin(model)
    shapes = ((2, 32, 32), (1, 64, 32))
    if os.environ.get("MSF_COMPILE_TESTS") == "1":
        shapes = ((2, 32, 32), (1, 32, 32), (1, 64, 32))
    for batch, h, w in shapes:
        images, masks = _batch(batch, h, w, seed=batch * h + w)
        loss, grads = _loss_and_grads(loss_fn, model, images, masks)
        want_loss, want_grads = _loss_and_grads(reference.loss, reference, images, masks)
        assert_close(loss, want_loss, 1e-5, f"{backend} loss at {batch}×{h}×{w}")
        assert_grads_close(grads, want_grads, 1e-4, 1e-5, f"{backend} gradients at {batch}×{h}×{w}")


# ------------------------------------------------------------------------------------------------
# Use it: msf train --compile, msf eval/predict --compile (compile time reported apart)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def aot_eager_compile(monkeypatch):
    """torch.compile with backend="aot_eager" for the commands below (Inductor's build: minutes)."""
    import functools
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def test_train_compile_times_the_compile_apart(tmp_path, capsys, aot_eager_compile):
    import json

    from msf.train.config import TrainConfig
    from msf.train.loop import train
    run_dir = train(TrainConfig(image_size=32, synthetic_train_images=8, synthetic_val_images=4, train_eval_images=4,
                                batch_size=4, num_workers=0, threads=1, progress=False, out=str(tmp_path),
                                run_name="r", epochs=2, compile=True))
    out = capsys.readouterr().out
    assert "compiled, " in out and out.count("compiled the training step in") == 1, out
    first, second = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert first["compile_seconds"] > 0 and "compile_seconds" not in second
    assert first["images_per_s"] > 0 and json.loads((run_dir / "config.json").read_text())["compile"] is True


def test_eval_compile_reports_the_compile_apart(tmp_path, capsys, aot_eager_compile):
    """`msf eval --compile` (`msf predict --compile` shares `msf.train.cli._compile`): one compile with
    dynamic shapes before the timed scoring; a last batch of another size does not recompile."""
    import json

    from conftest import make_mini
    from msf.train.cli import main
    from msf.train.config import TrainConfig
    from msf.train.loop import train
    data = make_mini(tmp_path / "data", n=5)
    run_dir = train(TrainConfig(data=str(data), image_size=32, batch_size=2, epochs=1, train_eval_images=2,
                                num_workers=0, threads=1, progress=False, out=str(tmp_path), run_name="r"))
    capsys.readouterr()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # 5 images in batches of 3 and 2 (a batch of 1 would be a size Dynamo always specialises)
    assert main(["eval", "--data", str(data), "--checkpoint", str(run_dir / "best.pt"), "--batch-size", "3",
                 "--compile", "--json"]) == 0
    captured = capsys.readouterr()
    scores = json.loads(captured.out)
    assert scores["compile_seconds"] > 0 and 0 <= scores["f_score"] <= 1 and scores["images"] == 5
    assert "compiled the forward in" in captured.err
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])
