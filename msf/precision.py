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
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

__all__ = ["as_they_are", "autocast_device_type", "autocast_dtype", "autocast_off", "autocast_on",
           "grouped_autocast_copies"]


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
