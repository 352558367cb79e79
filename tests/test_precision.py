"""msf.precision: the convolutions' weights cast together under autocast (the triton backend's
`autocast_weights`) against autocast's own cast of each tensor: the same values bit for bit, in
their masters' layouts, gradients widened back exactly into those layouts, two launches each way."""
import pytest
import torch

from msf.bench import eager_bytes as eb
from msf.precision import as_they_are, autocast_dtype, grouped_autocast_copies

LOW = [torch.bfloat16, torch.float16]


def masters(seed: int = 0) -> list[torch.Tensor | None]:
    """fp32 leaves in the layouts the model and its users hand over: a contiguous conv weight of odd
    sizes, its bias, a channels-last conv weight, a transposed matrix, a 0-dim scale, and a gap (None)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g) * 3.0

    return [randn(5, 3, 7, 7).requires_grad_(), randn(5).requires_grad_(),
            randn(6, 5, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_(), None,
            randn(7, 5).t().detach().requires_grad_(), randn(()).requires_grad_()]


def copies_under_autocast(tensors, dtype):
    with torch.autocast("cpu", dtype=dtype):
        assert autocast_dtype([t for t in tensors if t is not None]) == dtype
        return grouped_autocast_copies(tensors)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_copies_are_autocasts_values_in_their_masters_layouts(dtype):
    ms = masters()
    cs = copies_under_autocast(ms, dtype)
    assert len(cs) == len(ms)
    for i, (m, c) in enumerate(zip(ms, cs)):
        if m is None:
            assert c is None
            continue
        want = m.detach().to(dtype)  # autocast's cast of one tensor
        assert c.dtype == dtype and c.shape == m.shape, (i, c.dtype, c.shape)
        assert c.stride() == m.stride(), f"tensor {i}: copy strides {c.stride()}, master {m.stride()}"
        bad = c.detach().reshape(-1) != want.reshape(-1)
        assert not bad.any(), f"tensor {i}: {int(bad.sum())} of {c.numel()} values differ from .to({dtype})"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_gradients_reach_the_masters_widened_exactly_in_their_layouts(dtype):
    """What autograd does with autocast's per-tensor casts (each 16-bit gradient widened to fp32),
    done for all at once: every master's gradient is its copy's gradient exactly (float64
    comparison), in the master's own strides (AccumulateGrad keeps such a gradient, no copy)."""
    ms = masters(1)
    cs = copies_under_autocast(ms, dtype)
    g = torch.Generator().manual_seed(2)
    grads = [None if c is None else torch.empty_like(c).copy_(torch.randn(c.shape, generator=g)) for c in cs]
    torch.autograd.backward([c for c in cs if c is not None], [d for d in grads if d is not None])
    for i, (m, d) in enumerate(zip(ms, grads)):
        if m is None:
            continue
        assert m.grad.dtype == torch.float32 and m.grad.stride() == m.stride(), (i, m.grad.stride(), m.stride())
        err = (m.grad.double() - d.double()).abs().max().item()
        assert err == 0.0, f"tensor {i}: gradient off its copy's by up to {err:.3g}"


def test_two_launches_each_way():
    """One cat and one cast a direction (autocast's own: one cast a tensor each way) when each
    gradient arrives in its copy's layout, as a convolution's weight gradient does."""
    ms = [t for t in masters(3) if t is not None and t.dim() > 0]
    with eb.ByteCounter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        cs = grouped_autocast_copies(ms)
        with counter.paused():
            grads = [torch.ones_like(c) for c in cs]  # (in the copies' layouts)
        counter.phase = "backward"
        torch.autograd.backward(cs, grads)
    calls = {key: row[1] for key, row in counter.rows.items()}
    assert calls == {("forward", "cat"): 1, ("forward", "_to_copy"): 1,
                     ("backward", "cat"): 1, ("backward", "_to_copy"): 1}, calls
    assert counter.launches == {"forward": 2, "backward": 2}


def test_tensors_come_back_as_they_are_where_autocast_would_not_cast_them():
    """Outside autocast, 16-bit masters, or a master that no dimension order makes dense (autocast
    then casts each where it is used: the same values): the tensors themselves. The eager backend's
    `as_they_are` always."""
    ms = masters(4)
    assert all(a is b for a, b in zip(grouped_autocast_copies(ms), ms))
    assert all(a is b for a, b in zip(as_they_are(ms), ms))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        halves = [torch.zeros(3, 3, dtype=torch.bfloat16), torch.zeros(3)]
        assert all(a is b for a, b in zip(grouped_autocast_copies(halves), halves))
        gapped = [torch.zeros(4, 6)[:, ::2], torch.zeros(3)]
        assert all(a is b for a, b in zip(grouped_autocast_copies(gapped), gapped))
        assert grouped_autocast_copies([None]) == [None] and grouped_autocast_copies([]) == []


def test_meta_tensors_follow_cuda_autocast():
    """Meta tensors (the byte counter's) are cast as CUDA tensors would be, under its emulation."""
    ms = [torch.empty(4, 2, 3, 3, device="meta"), torch.empty(4, device="meta")]
    assert autocast_dtype(ms) is None
    with eb.CudaAutocastEmulation(torch.bfloat16):
        cs = grouped_autocast_copies(ms)
    assert [c.dtype for c in cs] == [torch.bfloat16] * 2 and [c.shape for c in cs] == [m.shape for m in ms]
