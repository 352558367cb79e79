"""`msf.kernels.casts.cast_all`: up to four tensors cast to one dtype in one launch, against `.to`.

Bit for bit: the kernel rounds to nearest even as `.to` does (ties, overflow to inf, signed zeros),
for permuted 4-D views (W_sr's R²×C×C layout), plain matrices, vectors and sizes that leave a
ragged last block. On a CPU-only machine the kernel runs under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import KERNEL_DEVICES, kernel_device  # noqa: E402
from msf.kernels import casts  # noqa: E402


def _sources(device) -> list[torch.Tensor]:
    """A conv weight seen as R×R×C×C (strided), a matrix, a vector of 1025 elements (one element past
    a block) and a 3-D transposed view; values in the normal range plus exact bf16 / fp16 ties,
    large values that overflow fp16, and signed zeros."""
    gen = torch.Generator().manual_seed(5)
    conv = torch.randn(48, 48, 2, 2, generator=gen)
    mat = torch.randn(37, 19, generator=gen) * 3
    vec = torch.randn(1025, generator=gen)
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -11, 1 + 3 * 2 ** -11, 7e4, -1e5,
                         0.0, -0.0, 3.4e38])
    vec[:len(ties)] = ties
    cube = torch.randn(5, 3, 7, generator=gen)
    return [conv.to(device).permute(2, 3, 0, 1), mat.to(device), vec.to(device), cube.to(device).transpose(0, 2)]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # (the interpreter's fp16 inf)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_all_equals_to_bit_for_bit(dtype, device):
    kernel_device(device)
    srcs = _sources(device)
    outs = casts.cast_all(dtype, *srcs)
    for i, (src, out) in enumerate(zip(srcs, outs)):
        want = src.to(dtype)
        assert out.dtype == dtype and out.shape == src.shape and out.is_contiguous(), (i, out.dtype, out.stride())
        same = (out.view(torch.int16) == want.contiguous().view(torch.int16))
        assert bool(same.all()), f"tensor {i}: {int((~same).sum())} of {same.numel()} elements differ in their bits"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_one_launch_for_all_and_none_for_what_needs_no_copy(device, monkeypatch):
    """The tensors that need a copy share one launch; a tensor already dense in the dtype comes back
    as itself and None as None; the caller's tensors are left as they were."""
    kernel_device(device)
    launches = []
    real = casts._cast_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    monkeypatch.setattr(casts, "_cast_kernel", Counting())
    srcs = _sources(device)
    before = [s.clone() for s in srcs]
    ready = torch.randn(4, 4, device=device).to(torch.bfloat16)
    outs = casts.cast_all(torch.bfloat16, srcs[0], None, ready, *srcs[1:])
    assert len(launches) == 1
    assert outs[1] is None and outs[2] is ready
    assert all(torch.equal(s, b) for s, b in zip(srcs, before))
    assert casts.cast_all(torch.bfloat16, ready, None) == [ready, None] and len(launches) == 1
    permuted = ready.t()  # the right dtype but not dense: copied
    out, = casts.cast_all(torch.bfloat16, permuted)
    assert out.is_contiguous() and torch.equal(out, permuted) and len(launches) == 2


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_what_the_kernel_does_not_serve_is_cast_one_by_one(device):
    """Five tensors, or sources of two dtypes: `.to` a tensor, the same results."""
    kernel_device(device)
    srcs = _sources(device)
    five = casts.cast_all(torch.bfloat16, *srcs, srcs[1] * 2)
    mixed = casts.cast_all(torch.bfloat16, srcs[1], srcs[2].double())
    for out, src in zip(five + mixed, [*srcs, srcs[1] * 2, srcs[1], srcs[2].double()]):
        assert torch.equal(out, src.to(torch.bfloat16))
