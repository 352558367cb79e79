"""msf.kernels._interpreter: the interpreter's re-patching skipped on helper calls changes no result.

The wrap only removes work Triton 3.6's interpreter repeats (its module docstring): every kernel
must give the same bits with and without it, a helper that sees a language module the kernel did
not (`triton.language.core` only) must still run interpreted, and after a launch, normal or failed,
`triton.language` must hold its own functions again.
"""
import importlib
import os
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the wrap applies to TRITON_INTERPRET=1 only", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from msf.kernels import _interpreter  # noqa: E402

if not _interpreter.wanted():
    pytest.skip(f"the wrap is for Triton {_interpreter._FOR_TRITON} (here {triton.__version__}) or is "
                "switched off (MSF_PLAIN_INTERPRETER=1)", allow_module_level=True)


@pytest.fixture
def plain_interpreter():
    """Runs the body with Triton's own interpreter, then puts the wrap back."""
    _interpreter.uninstall()
    try:
        yield
    finally:
        assert _interpreter.install()


def test_the_kernels_import_installs_the_wrap():
    import msf.kernels  # noqa: F401
    assert interpreter._patch_lang is _interpreter._patch_lang_once
    assert interpreter._get_np_dtype is _interpreter._get_np_dtype_memo


@triton.jit
def _scaled(x, k: tl.constexpr):
    return x * k


@triton.jit
def _twice_scaled(x, k: tl.constexpr):
    return _scaled(x, k) + _scaled(x, k)  # a helper calling a helper


@triton.jit
def _helpers_kernel(X, Y, n, BLOCK: tl.constexpr, HELPER_MOD: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, 3):
        acc += _twice_scaled(x, 2.0) + i
    if HELPER_MOD:
        acc = _core_only.clamp_low(acc)
    tl.store(Y + offs, acc, mask=mask)


# a helper in a module that sees triton.language.core only (not triton.language as the kernel does)
_CORE_ONLY = textwrap.dedent('''
    import triton
    from triton.language import core


    @triton.jit
    def clamp_low(x):
        return core.where(x < 0.0, core.full(x.shape, 0.0, core.float32), x)
''')


@pytest.fixture(scope="module", autouse=True)
def core_only_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("core_only")
    (folder / "msf_test_core_only_helpers.py").write_text(_CORE_ONLY)
    sys.path.insert(0, str(folder))
    global _core_only
    _core_only = importlib.import_module("msf_test_core_only_helpers")
    yield
    sys.path.remove(str(folder))


def _run_helpers(helper_mod: bool) -> torch.Tensor:
    x = torch.randn(37, generator=torch.Generator().manual_seed(0))
    y = torch.empty_like(x)
    _helpers_kernel[(3,)](x, y, 37, BLOCK=16, HELPER_MOD=helper_mod)
    return y


@pytest.mark.parametrize("helper_mod", [False, True], ids=["same-module", "core-only-module"])
def test_helpers_compute_what_they_say(helper_mod):
    x = torch.randn(37, generator=torch.Generator().manual_seed(0))
    want = sum(4.0 * x + i for i in range(3))
    if helper_mod:
        want = want.clamp_min(0.0)
    torch.testing.assert_close(_run_helpers(helper_mod), want, rtol=1e-6, atol=1e-6)


def _language_is_restored():
    """triton.language and its core hold their own builtins, range and static_range again."""
    for module in (tl, tl.core, tl.math):
        for name in ("load", "store", "where", "full", "exp"):
            member = getattr(module, name, None)
            if member is not None:
                assert tl.core.is_builtin(member), f"{module.__name__}.{name} left patched: {member}"
    assert tl.range is tl.core.range and tl.static_range is tl.core.static_range
    assert not isinstance(tl.range, type(lambda: 0)), "tl.range left as the interpreter's range"


def test_a_launch_restores_the_language_after_it_ends_or_fails():
    _run_helpers(True)
    _language_is_restored()
    with pytest.raises(Exception):
        _helpers_kernel[(1,)](torch.randn(4), None, 4, BLOCK=16, HELPER_MOD=True)  # no output: fails inside
    _language_is_restored()
    assert _interpreter._Launch.langs is None
    _run_helpers(False)  # and the next launch runs as before
    _language_is_restored()


def _project_kernels_results():
    """Forward and every gradient of fused ops whose kernels call helpers in loops (LMSA, map norm,
    head + loss), on fixed inputs."""
    from msf.kernels import head_loss as hl, lmsa as lm, map_norm as mn
    from test_lmsa import _pack, _params  # LMSA's parity tests' parameters
    g = torch.Generator().manual_seed(1)
    c = 16
    x = torch.randn(1, c, 4, 5, generator=g).requires_grad_()
    ps = _params(c, torch.float32, "cpu", seed=1)
    out = lm.lmsa(x, _pack(ps))
    results = [out, *torch.autograd.grad(out, [x, *ps], torch.randn(out.shape, generator=g))]
    xm = torch.randn(1, c, 3, 5, generator=g).requires_grad_()
    w, b = (1 + torch.randn(c, generator=g) * 0.1).requires_grad_(), torch.randn(c, generator=g).requires_grad_()
    tokens = mn.map_layer_norm(xm, w, b)
    results += [tokens, *torch.autograd.grad(tokens, [xm, w, b], torch.randn(tokens.shape, generator=g))]
    logits = torch.randn(1, 19, 3, 5, generator=g).requires_grad_()
    loss = hl.head_loss(logits, torch.randint(0, 19, (1, 12, 20), generator=g))
    results += [loss, *torch.autograd.grad(loss, [logits])]
    return [r.detach() for r in results]


@pytest.fixture(scope="module")
def wrapped_results():
    return _project_kernels_results()


def test_the_project_kernels_give_the_same_bits_without_the_wrap(wrapped_results, plain_interpreter):
    plain = _project_kernels_results()
    assert len(plain) == len(wrapped_results)
    for i, (a, b) in enumerate(zip(wrapped_results, plain)):
        assert torch.equal(a, b), f"result {i}: max difference {(a - b).abs().max().item():.3e}"
