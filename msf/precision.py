"""The convolutions' weights under autocast: autocast's own casts, one a tensor (the eager backend,
the paper's model as written), or all of a step's in one (the triton backend).

Under autocast a convolution casts its fp32 weight and bias to the 16-bit dtype as it runs: one
kernel launch a tensor, and one more in the backward, where the cast's gradient is widened back to
fp32. For the four patch embeddings and the classifier that is 20 launches a training step, each a
few microseconds of GPU time for under a megabyte in all. `grouped_autocast_copies` makes the same
copies with two launches each way:

    forward    flat = cat(master_i flattened in its memory order).to(16-bit);  copy_i = a view of flat
    backward   ∂flat = cat(∂copy_i) (the split's backward);  ∂master = ∂flat.to(fp32), sliced

Each copy is a view of `flat` with its master's strides (a channels-last master gives a
channels-last copy), so a gradient that arrives in its copy's layout reaches the cat as a free view
and its master as a view with the master's strides, which AccumulateGrad keeps without a copy.
The values are autocast's, bit for bit: `.to` rounds to nearest even, and widening back is exact.

The blocks' weight matrices are cast the other way round: the fused ops take the fp32 masters
(their gradients stay fp32 sums) and cast them inside, one launch an op (`msf.kernels.casts.cast_all`),
14 launches a training step. `step_weight_copies` makes all of a step's copies at once (one cat,
one cast, no autograd) and lends them for the duration of a `with`; `step_copy` is how the ops'
cast finds a master's copy there (the same values `.to` gives, a view with the tensor's strides).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

__all__ = ["as_they_are", "autocast_device_type", "autocast_dtype", "autocast_off", "autocast_on",
           "grouped_autocast_copies", "step_copy", "step_weight_copies"]


def autocast_device_type(device_type: str) -> str:
    """The device type whose autocast governs tensors of `device_type`. A meta tensor's is CUDA's:
    autocast itself never sees meta tensors, but `msf.bench.eager_bytes.CudaAutocastEmulation` casts
    them by CUDA's rules and sets CUDA's flag, so the fused ops' host code, asked on meta tensors,
    picks the dtypes it would pick on a GPU (the cost model's trace of the model relies on it)."""
    return "cuda" if device_type == "meta" else device_type


def autocast_on(device_type: str) -> torch.dtype | None:
    """Autocast's dtype where autocast is on for tensors of `device_type` (see `autocast_device_type`),
    else None."""
    dev = autocast_device_type(device_type)
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A region where autocast is off for tensors of `device_type` (a no-op where it has none)."""
    dev = autocast_device_type(device_type)
    return torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext()


def autocast_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The dtype a convolution under autocast casts these tensors to: autocast's 16-bit dtype when it
    is on for their device and every tensor is fp32 on that one device; None otherwise (nothing to cast)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return None
    cdt = autocast_on(next(iter(devices)).type)
    if cdt not in (torch.bfloat16, torch.float16) or any(t.dtype != torch.float32 for t in tensors):
        return None
    return cdt


def as_they_are(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The eager backend's `autocast_weights`: the tensors themselves (autocast casts each where it is used)."""
    return list(tensors)


def _memory_order(t: torch.Tensor) -> list[int] | None:
    """The permutation of t's dimensions that makes it contiguous (outermost stride first), or None
    if no permutation does (t overlaps itself or has gaps)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def grouped_autocast_copies(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The triton backend's `autocast_weights`: under autocast (`autocast_dtype`), the tensors' 16-bit
    copies, in their own layouts, from one cat and one cast (see the module docstring); None stays
    None. Otherwise, or if a tensor is not dense in some dimension order, the tensors themselves
    (autocast then casts each where it is used: the same values, a launch a tensor)."""
    present = [t for t in tensors if t is not None]
    cdt = autocast_dtype(present) if present else None
    if cdt is None:
        return list(tensors)
    orders = [_memory_order(t) for t in present]
    if any(o is None for o in orders):
        return list(tensors)
    flat = torch.cat([t.permute(o).reshape(-1) for t, o in zip(present, orders)]).to(cdt)
    pieces = iter(flat.split([t.numel() for t in present]))
    copies = iter([piece.view([t.shape[d] for d in o]).permute(_inverse(o))
                   for piece, t, o in zip(pieces, present, orders)])
    return [None if t is None else next(copies) for t in tensors]


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


# ----------------------------------------------------------------------------------------------
# the blocks' weight copies, made once a step
# ----------------------------------------------------------------------------------------------
# id(master) → (master, its version counter when copied, the copy with the master's strides)
_STEP_COPIES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("msf_step_copies", default=None)


@contextlib.contextmanager
def step_weight_copies(tensors: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Within: the 16-bit copies of `tensors` (fp32 masters under autocast, `autocast_dtype`; None
    skipped) made in one cat and one cast and lent to the fused ops' weight casts (`step_copy`). The
    copies are not differentiable: the ops take the masters as their inputs and give their
    gradients as before. Nothing is made where autocast is off, where a master is not dense in some
    dimension order, or while torch.compile traces (the compiled graph casts inside its operators)."""
    present = [t for t in tensors if t is not None]
    if not present or torch.compiler.is_compiling():
        yield
        return
    with torch.no_grad():  # the convolutions' grouped copies, without their autograd
        copies = grouped_autocast_copies(present)
    if copies[0] is present[0]:  # not cast (autocast off, or a master not dense): nothing to lend
        yield
        return
    table = {id(t): (t, t._version, copy) for t, copy in zip(present, copies)}
    token = _STEP_COPIES.set(table)
    try:
        yield
    finally:
        _STEP_COPIES.reset(token)


def step_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` as the current `step_weight_copies` holds it in `dtype`: a view of its master's copy with
    t's shape and strides, where t is a master lent there or a view of one (W_sr permuted), unchanged
    since (its version counter); else None."""
    table = _STEP_COPIES.get()
    if not table:
        return None
    entry = table.get(id(t)) or table.get(id(t._base))
    if entry is None:
        return None
    master, version, copy = entry
    if copy.dtype != dtype or t._version != version or t.dtype != master.dtype:
        return None
    offset = copy.storage_offset() + t.storage_offset() - master.storage_offset()
    return copy.as_strided(t.shape, t.stride(), offset)
