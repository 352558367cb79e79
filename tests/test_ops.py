"""The fused ops as `torch.library` operators (kernels/ops.py): `torch.library.opcheck` on each
forward operator (schema, fake implementation against the real outputs, autograd registration,
AOTAutograd tracing with static and dynamic shapes), and the operators agree with the kernel
modules' autograd Functions, forward and every gradient, bit for bit.

Small fp32 shapes: on CPU the kernels run through Triton's interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from msf.kernels import ops  # noqa: E402
from msf.reference import AttentionBlockParams, DecoderParams, EmbedNorm, LMSAParams, StageNorm  # noqa: E402

pytestmark = pytest.mark.parity  # `run.py test -m parity`: the kernels against their references


def _randn(*shape, scale=1.0, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_(grad)


def _lmsa_params(c: int) -> list[torch.Tensor]:
    r = 3 * c // 8
    return ([_randn(c, 1, k, k, scale=1.0 / k, seed=k) for k in (3, 5, 7)]
            + [_randn(c, c, scale=c ** -0.5, seed=10 + i) for i in range(3)]
            + [_randn(c, scale=0.3, seed=20 + i) for i in range(3)]
            + [_randn(r, 3 * c, scale=3.0 * (3 * c) ** -0.5, seed=30), _randn(r, scale=0.3, seed=31),
               _randn(3 * c, r, scale=3.0 * r ** -0.5, seed=32), _randn(3 * c, scale=0.3, seed=33)])


def _case(name):
    """(operator, its args, a call of the public wrapper or module entry given as f) of op `name`, and
    where the call's inputs are not the operator's, the leaves the call differentiates."""
    if name == "attention":
        q, k, v = _randn(2, 9, 16), _randn(2, 5, 16, seed=1), _randn(2, 5, 16, seed=2)
        return ops.attention_op, (q, k, v), lambda f: f(q, k, v)
    if name == "attention_sublayer":
        x, r = _randn(2, 9, 16), _randn(2, 9, 16, seed=1)
        kv = _randn(2, 5, 32, seed=2)
        k, v = kv.chunk(2, dim=-1)  # views into one tensor, as the model passes them
        wq, wo = _randn(16, 16, scale=0.25, seed=3), _randn(16, 16, scale=0.25, seed=4)
        bq, bo = _randn(16, scale=0.1, seed=5), _randn(16, scale=0.1, seed=6)
        args = (x, r, k, v, wq, bq, wo, bo)
        return ops.attention_sublayer_op, args, lambda f: f(*args)
    if name in ("attention_block", "attention_block_embedded"):  # a 4×6 map, R = 2: 6 patches an image
        embedded = name == "attention_block_embedded"  # x: the patch embedding's map, its norm taken in
        x = _randn(2, 16, 4, 6).detach().to(torch.bfloat16, memory_format=torch.channels_last).requires_grad_() \
            if embedded else _randn(2, 24, 16)
        ws = [_randn(16, scale=0.2, seed=1) + 1, _randn(16, scale=0.2, seed=2),  # LN1
              _randn(16, 16, 2, 2, scale=0.12, seed=3), _randn(16, scale=0.1, seed=4),  # the convolution
              _randn(16, scale=0.2, seed=5) + 1, _randn(16, scale=0.2, seed=6),  # LN_sr
              _randn(32, 16, scale=0.25, seed=7), _randn(32, scale=0.1, seed=8),  # kv
              _randn(16, 16, scale=0.25, seed=9), _randn(16, scale=0.1, seed=10),  # q
              _randn(16, 16, scale=0.25, seed=11), _randn(16, scale=0.1, seed=12)]  # proj
        dt = torch.bfloat16 if embedded else torch.float32  # (the kernels take the norm in for 16-bit products)
        ws = [w.detach().to(dt).requires_grad_() for w in ws]
        p = AttentionBlockParams(*ws)
        if not embedded:
            args = (x, *ws, None, None, [4, 6], 2, 1e-5, 1e-5, torch.float32, 0.0, torch.float32)
            return ops.attention_block_op, args, lambda f: f(x, (4, 6), 2, p)
        pe = [(_randn(16, scale=0.2, seed=13) + 1).detach().to(dt).requires_grad_(),
              _randn(16, scale=0.2, seed=14).detach().to(dt).requires_grad_()]
        args = (x, *ws, *pe, [4, 6], 2, 1e-5, 1e-5, dt, 1e-5, dt)
        return ops.attention_block_op, args, lambda f: f(x, (4, 6), 2, p, embed_norm=EmbedNorm(*pe, 1e-5))
    if name == "map_layer_norm":  # a channels-last 2×16×3×5 map
        x = _randn(2, 16, 3, 5).detach().to(memory_format=torch.channels_last).requires_grad_()
        w, b = (_randn(16, scale=0.2, seed=1) + 1).detach().requires_grad_(), _randn(16, scale=0.2, seed=2)
        return ops.map_layer_norm_op, (x, w, b, 1e-5, torch.float32, None), lambda f: f(x, w, b, 1e-5)
    if name == "stage_output":  # 2×15×16 tokens of a 3×5 map; the operator checked with the bf16 copy
        tokens = _randn(2, 15, 16)
        w, b = (_randn(16, scale=0.2, seed=1) + 1).detach().requires_grad_(), _randn(16, scale=0.2, seed=2)
        x = tokens.detach().view(2, 3, 5, 16).permute(0, 3, 1, 2).requires_grad_()
        return (ops.map_layer_norm_op, (x, w, b, 1e-5, torch.float32, torch.bfloat16),
                lambda f: torch.cat([t.flatten() for t in f(tokens, (3, 5), w, b, 1e-5, True)]), [tokens, w, b])
    if name == "ffn_sublayer":
        x = _randn(18, 16)  # the operator takes tokens as rows × C (the wrapper flattens B×N×C)
        params = (_randn(16, scale=0.2, seed=1) + 1, _randn(16, scale=0.2, seed=2), _randn(32, 16, scale=0.25, seed=3),
                  _randn(32, scale=0.1, seed=4), _randn(16, 32, scale=0.2, seed=5), _randn(16, scale=0.1, seed=6))
        return (ops.ffn_sublayer_op, (x, *params, 1e-5, torch.float32),
                lambda f: f(x, *params, 1e-5))
    if name == "ffn_stage_output":  # a stage's last FFN sublayer with its final norm: 2×15×16 tokens of a 3×5 map
        x = _randn(2, 15, 16)
        params = (_randn(16, scale=0.2, seed=1) + 1, _randn(16, scale=0.2, seed=2), _randn(32, 16, scale=0.25, seed=3),
                  _randn(32, scale=0.1, seed=4), _randn(16, 32, scale=0.2, seed=5), _randn(16, scale=0.1, seed=6))
        sw, sb = (_randn(16, scale=0.2, seed=7) + 1).detach().requires_grad_(), _randn(16, scale=0.2, seed=8)
        x2 = x.detach().view(30, 16).requires_grad_()  # the operator takes rows × C; checked with the bf16 copy
        args = (x2, *params, 1e-5, torch.float32, sw, sb, 1e-5, [3, 5], torch.float32, torch.bfloat16)
        return (ops.ffn_stage_output_op, args,
                lambda f: torch.cat([t.flatten() for t in f(x, *params, 1e-5, StageNorm(sw, sb, 1e-5, (3, 5)))]),
                [x, *params, sw, sb])
    if name == "decoder_mlp":  # E = 16, C1 = 8, stage 1 4×6, stages 2-4 at 2×3, 2×3, 1×1; dropout on
        feats = [_randn(2, c, 4 // s, 6 // s, seed=s) for c, s in ((8, 1), (8, 2), (16, 2), (16, 4))]
        feats[3] = _randn(2, 16, 1, 1, seed=9)
        unify = [_randn(16, f.shape[1], scale=0.3, seed=10 + i) for i, f in enumerate(feats)]
        ubias = [_randn(16, scale=0.1, seed=20 + i) for i in range(4)]
        fuse = (_randn(16, 64, scale=0.15, seed=30), _randn(16, scale=0.1, seed=31),
                _randn(16, 16, scale=0.25, seed=32), _randn(16, scale=0.1, seed=33))
        p = DecoderParams(tuple(unify), tuple(ubias), *fuse)
        seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
        f1 = _randn(48, 8, seed=40)  # the operator takes stage 1 as rows × C1 tokens, stages 2-4 projected
        lows = [_randn(2, h, w, 16, seed=41 + h + w) for h, w in ((2, 3), (2, 3), (1, 1))]
        args = (f1, *lows, unify[0].detach().requires_grad_(), fuse[1], fuse[2], fuse[3], seed, 0.2, [4, 6],
                torch.float32, True)
        call_leaves = feats + unify + ubias + list(fuse)  # what the wrapper's call differentiates
        return ops.decoder_mlp_op, args, lambda f: f(feats, p, 0.2, True, seed=seed), call_leaves
    if name == "decoder_fold":  # E = 16, stage widths 8, 24, 16, 40; M_2..M_4 in bf16
        us = [_randn(16, c, scale=0.3, seed=50 + i) for i, c in enumerate((8, 24, 16, 40))]
        vs = [_randn(16, scale=0.1, seed=60 + i) for i in range(4)]
        w, b = _randn(16, 64, scale=0.15, seed=70), _randn(16, scale=0.1, seed=71)
        return ops.decoder_fold_op, (w, b, us, vs, torch.bfloat16), None
    if name == "head_loss":
        logits = _randn(2, 5, 3, 4)
        targets = torch.randint(0, 5, (2, 12, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        return ops.head_loss_op, (logits, targets, 1.0), lambda f: f(logits, targets, 1.0)
    if name == "lmsa":
        x = _randn(2, 16, 5, 6).detach().to(memory_format=torch.channels_last).requires_grad_()
        ps = _lmsa_params(16)
        p = LMSAParams(tuple(ps[0:3]), tuple(ps[3:6]), tuple(ps[6:9]), *ps[9:13])
        return ops.lmsa_op, (x, ps), lambda f: f(x, p)
    if name == "lmsa_classifier":  # LMSA with 19 classes' classifier inside (logits channels-last)
        x = _randn(2, 16, 5, 6).detach().to(memory_format=torch.channels_last).requires_grad_()
        ps = _lmsa_params(16)
        p = LMSAParams(tuple(ps[0:3]), tuple(ps[3:6]), tuple(ps[6:9]), *ps[9:13])
        w, b = _randn(19, 16, scale=0.25, seed=40), _randn(19, scale=0.1, seed=41)
        return ops.lmsa_classifier_op, (x, ps, w, b), lambda f: f(x, p, w, b)
    if name == "upsample_argmax":
        logits = _randn(2, 5, 3, 4, grad=False)
        return ops.upsample_argmax_op, (logits, [12, 16]), lambda f: f(logits, (12, 16))
    raise KeyError(name)


# every operator's public op, the attention half again as a stage's first block (x the patch
# embedding's map, its LayerNorm inside the operator) and the FFN sublayer as a stage's last (the
# stage's final norm inside its operator): case name → its op in the registry
_ENTRY_OF = {"attention_block_embedded": "attention_block", "ffn_stage_output": "ffn_sublayer"}
CASES = list(ops.REGISTRY) + list(_ENTRY_OF)


@pytest.mark.parametrize("name", CASES + ["decoder_fold"])  # (the fold: an operator of decoder_mlp's host half)
def test_opcheck(name):
    op, args, *_ = _case(name)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def _inputs_requiring_grad(args):
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else (arg,))]
    return [a for a in flat if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("name", CASES)
def test_operator_matches_the_module_entry_bitwise(name):
    """The operator path runs the same launches as the autograd Function: identical numbers."""
    _, args, call, *call_leaves = _case(name)
    fused_op = ops.REGISTRY[_ENTRY_OF.get(name, name)]
    entry, traced = fused_op.entry, fused_op.traced
    got, want = call(traced), call(entry)
    assert torch.equal(got, want), f"{name}: forward differs, max |Δ| {(got.double() - want.double()).abs().max()}"
    leaves = call_leaves[0] if call_leaves else _inputs_requiring_grad(args)
    if not got.is_floating_point():
        return
    seed = torch.randn(got.shape, generator=torch.Generator().manual_seed(7)).to(got)
    g_got = torch.autograd.grad(got, leaves, seed)
    g_want = torch.autograd.grad(want, leaves, seed)
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        assert torch.equal(a, b), f"{name}: gradient of input {i} differs, max |Δ| {(a - b).abs().max()}"
