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


# ----------------------------------------------------------------------------------------------
# the blocks' weight copies, made once a step (`step_weight_copies`, `step_copy`)
# ----------------------------------------------------------------------------------------------
def _no_cast_launch():
    """A stand-in for the cast kernel that fails if launched."""
    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the cast kernel was launched for a tensor the step had copied")
    return Refuse()


def test_step_copies_serve_the_fused_ops_casts(monkeypatch):
    """Inside `step_weight_copies`, `cast_all` hands back the step's copies (views with the asked-for
    tensor's strides: a master, or W_sr's channels-last view of one) without a launch, bit for bit
    what it would have cast; a master changed in place since (its version) or a dtype other than
    autocast's is cast again; outside the `with`, and without autocast, nothing is lent."""
    from msf.kernels import casts
    from msf.precision import step_copy, step_weight_copies
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 6, generator=g, requires_grad=True)
    sr = torch.randn(6, 2, 3, 3, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    want_w, want_sr = w.detach().to(torch.bfloat16), sr.detach().permute(0, 2, 3, 1).contiguous().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), step_weight_copies([w, None, sr]):
        with monkeypatch.context() as patch:
            patch.setattr(casts, "_cast_kernel", _no_cast_launch())
            got_w, got_sr = casts.cast_all(torch.bfloat16, w, sr.permute(0, 2, 3, 1))
        assert got_w.dtype == got_sr.dtype == torch.bfloat16 and got_w.is_contiguous() and got_sr.is_contiguous()
        assert torch.equal(got_w, want_w) and torch.equal(got_sr, want_sr)
        assert not got_w.requires_grad and step_copy(w, torch.float16) is None
        with torch.no_grad():
            w.add_(1.0)  # a master changed since: its copy is stale, the cast is made again
        assert step_copy(w, torch.bfloat16) is None
        assert torch.equal(casts.cast_all(torch.bfloat16, w)[0], w.detach().to(torch.bfloat16))
    assert step_copy(sr, torch.bfloat16) is None  # (outside the with)
    with step_weight_copies([w, sr]):  # autocast off: nothing made
        assert step_copy(w, torch.bfloat16) is None
