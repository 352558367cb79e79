"""Every load and store of every kernel checked against the tensors it was given, under Triton's
interpreter (`TRITON_INTERPRET=1`): the concrete memory-safety check behind `python -m
msf.checking.sanitize` (its default engine) and `tests/test_sanitize.py`.

Why a checker of our own: the interpreter dereferences raw addresses, so an out-of-bounds load
reads whatever lies there and a parity test can pass over it. Triton-Sanitizer (triton-viz, SPEC
§7) proves bounds symbolically for all programs at once, but its 3.0 release cannot run most of
these kernels (see `msf.checking.sanitize`). This checker is exact instead of symbolic: it sees the
addresses the interpreter really computes, for every program of the grid, at the shapes a case
runs; a bug that only appears at other shapes needs a case at those shapes.

What "in bounds" means here
---------------------------
Each launch's tensor arguments (after the interpreter's host copy, so the addresses are the ones the
kernel uses) define the memory the kernel may touch: the *elements of each view*, not its storage
and not the span between its first and last element. A sliced view `x[:, 1:4]` of a contiguous
tensor owns three elements per row; an access to the fourth, which the storage holds and the span
covers, is reported. An address `a` belongs to a view with data pointer `p`, element size `e`,
sizes `n_d` and strides `s_d` when `a − p = e·Σ i_d·s_d` for some `0 ≤ i_d < n_d`; for layouts whose
strides nest (every stride ≥ the span of the smaller ones: contiguous, channels-last, slices,
permutes, the column halves of a split) the indices follow by dividing by the strides in decreasing
order, vectorised over the access. A layout that does not nest (overlapping strides) falls back to
its span.

An access (one `tl.load` / `tl.store`, every active lane under its mask) is clean when one argument
holds all of its addresses, each with its whole element (an access wider than the element, like a
bf16 pair loaded as one int32 word, must cover consecutive elements of one unit-stride row). Otherwise it is reported: "out of bounds"
when some address is in no argument, "spans tensors" when each address is in some argument but no
single argument holds them all (a pointer that ran off its tensor into a neighbour). The lanes
outside every argument are then switched off before the interpreter runs the access, so a reported
store cannot corrupt the checking process (a load gets 0 or its `other` there). Atomics and
block/descriptor pointers are refused outright: no kernel here uses them, so a new one must extend
this checker before it can pass.

Cost: a few numpy operations per access; the cases of `msf.checking.sanitize` run in under a minute.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
from typing import Iterator

import numpy as np

@dataclasses.dataclass(frozen=True)
class Extent:
    """The elements of one tensor argument: where they start, how big each is, and their layout."""
    name: str
    data_ptr: int
    itemsize: int
    sizes: tuple[int, ...]          # dims of size 1 or stride 0 dropped: they add no element
    strides: tuple[int, ...]        # in elements, decreasing
    nested: bool                    # strides nest, so membership is exact (else: span only)
    span: tuple[int, int]           # [first byte, last byte + 1) of the view

    @classmethod
    def of(cls, name: str, tensor) -> "Extent":
        dims = sorted(((n, s) for n, s in zip(tensor.shape, tensor.stride()) if n > 1 and s != 0),
                      key=lambda d: -abs(d[1]))
        itemsize, base = tensor.element_size(), tensor.data_ptr()
        if tensor.numel() == 0:
            return cls(name, base, itemsize, (), (), True, (base, base))
        lo = sum(min(0, (n - 1) * s) for n, s in dims)
        hi = sum(max(0, (n - 1) * s) for n, s in dims)
        nested, inner_span = all(s > 0 for _, s in dims), 1
        for n, s in reversed(dims):          # smallest stride first
            nested &= s >= inner_span
            inner_span = s * (n - 1) + inner_span
        return cls(name, base, itemsize, tuple(n for n, _ in dims), tuple(s for _, s in dims), nested,
                   (base + lo * itemsize, base + (hi + 1) * itemsize))

    def holds(self, addresses: np.ndarray, nbytes: int) -> np.ndarray:
        """For each address: is [address, address + nbytes) whole elements of this view? One
        element, or (an access wider than the element: a bf16 pair loaded as one int32 word)
        nbytes / itemsize consecutive elements of one innermost row of unit stride."""
        lo, hi = self.span
        inside = (addresses >= lo) & (addresses + nbytes <= hi)
        if not self.nested or not inside.any():
            return inside
        count, part = divmod(nbytes, self.itemsize)
        if part or count < 1 or (count > 1 and (not self.strides or self.strides[-1] != 1)):
            return np.zeros(addresses.shape, dtype=bool)
        rest = (addresses - self.data_ptr).astype(np.int64)
        exact = inside & (rest % self.itemsize == 0)
        rest //= self.itemsize
        index = np.zeros_like(rest)
        for n, s in zip(self.sizes, self.strides):
            index = rest // s
            exact &= index < n
            rest -= index * s
        if count > 1:  # the last element of the access in the same innermost row
            exact &= index + count <= self.sizes[-1]
        return exact & (rest == 0)


@dataclasses.dataclass
class Violation:
    kernel: str
    kind: str                       # "load" / "store"
    problem: str                    # "out of bounds" / "spans tensors"
    where: str                      # kernel source line
    address: int                    # the first offending address
    nearest: str                    # the argument whose span is nearest that address
    count: int                      # offending lanes in this access

    def __str__(self) -> str:
        return (f"{self.kind} {self.problem} in {self.kernel} at {self.where}: {self.count} lane(s), "
                f"first address 0x{self.address:x} (nearest argument: {self.nearest})")


class AccessChecker:
    """Patches the interpreter while active; `violations` collects what it found."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []
        self.accesses = 0
        self._launches: list[tuple[str, list[Extent]]] = []    # a stack: launches may nest

    # -- the interpreter's hooks ----------------------------------------------------------------
    def _check(self, kind: str, ptrs, mask):
        """Records a violation of this access, if any; returns the mask with the lanes that point
        outside every argument switched off (None when nothing changes), so that a reported store
        cannot corrupt the process that reports it."""
        self.accesses += 1
        if not self._launches:
            return None
        kernel, extents = self._launches[-1]
        all_addresses = np.asarray(ptrs.data, dtype=np.uint64).astype(np.int64)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), all_addresses.shape)
        addresses = all_addresses[active]
        if addresses.size == 0:
            return None
        nbytes = ptrs.get_element_ty().primitive_bitwidth // 8
        first = addresses[0]
        # the argument that holds the first address is the likely owner: try it first
        order = sorted(extents, key=lambda e: not (e.span[0] <= first < e.span[1]))
        anywhere = np.zeros(addresses.shape, dtype=bool)
        for extent in order:
            held = extent.holds(addresses, nbytes)
            if held.all():
                return None
            anywhere |= held
        problem = "spans tensors" if anywhere.all() else "out of bounds"
        bad = addresses[~anywhere] if not anywhere.all() else addresses
        nearest = min(extents, key=lambda e: 0 if e.span[0] <= bad[0] < e.span[1]
                      else min(abs(int(bad[0]) - e.span[0]), abs(int(bad[0]) - e.span[1])))
        self.violations.append(Violation(kernel, kind, problem, _kernel_line(), int(bad[0]),
                                         nearest.name, int(bad.size)))
        safe = active.copy()
        safe[active] = anywhere
        return safe

    def _push(self, name: str, args: dict) -> None:
        import torch
        extents = [Extent.of(arg, value) for arg, value in args.items() if isinstance(value, torch.Tensor)]
        self._launches.append((name, extents))

    @contextlib.contextmanager
    def active(self) -> Iterator["AccessChecker"]:
        import inspect
        from triton.runtime import interpreter

        builder_cls, executor_cls = interpreter.InterpreterBuilder, interpreter.GridExecutor
        saved = {(builder_cls, n): getattr(builder_cls, n) for n in
                 ("create_masked_load", "create_masked_store", "create_atomic_cas", "create_atomic_rmw",
                  "create_tensor_pointer_load", "create_tensor_pointer_store", "create_descriptor_load",
                  "create_descriptor_store") if hasattr(builder_cls, n)}
        saved[(executor_cls, "_init_args_hst")] = executor_cls._init_args_hst
        saved[(executor_cls, "__call__")] = executor_cls.__call__
        checker = self

        def safe_mask(kind, ptrs, mask):
            narrowed = checker._check(kind, ptrs, mask)
            return mask if narrowed is None else interpreter.TensorHandle(narrowed, mask.dtype.scalar)

        def masked_load(builder, ptrs, mask, other, *rest):
            mask = safe_mask("load", ptrs, mask)
            return saved[(builder_cls, "create_masked_load")](builder, ptrs, mask, other, *rest)

        def masked_store(builder, ptrs, value, mask, *rest):
            mask = safe_mask("store", ptrs, mask)
            return saved[(builder_cls, "create_masked_store")](builder, ptrs, value, mask, *rest)

        def unchecked(name):
            def refuse(*args, **kwargs):
                raise NotImplementedError(f"msf.checking.bounds cannot check {name}: extend it before using it")
            return refuse

        def init_args(executor, args_dev, kwargs):
            # the interpreter's host copies of the arguments: the addresses the kernel will use
            args_hst, kwargs_hst = saved[(executor_cls, "_init_args_hst")](executor, args_dev, kwargs)
            checker._push(executor.fn.__name__, inspect.getcallargs(executor.fn, *args_hst, **kwargs_hst))
            return args_hst, kwargs_hst

        def call(executor, *args, **kwargs):
            depth = len(checker._launches)
            try:
                return saved[(executor_cls, "__call__")](executor, *args, **kwargs)
            finally:
                del checker._launches[depth:]

        builder_cls.create_masked_load = masked_load
        builder_cls.create_masked_store = masked_store
        for name in ("create_atomic_cas", "create_atomic_rmw", "create_tensor_pointer_load",
                     "create_tensor_pointer_store", "create_descriptor_load", "create_descriptor_store"):
            if hasattr(builder_cls, name):
                setattr(builder_cls, name, unchecked(name))
        executor_cls._init_args_hst = init_args
        executor_cls.__call__ = call
        try:
            yield self
        finally:
            for (cls, name), fn in saved.items():
                setattr(cls, name, fn)


def _kernel_line() -> str:
    """The access's source line: the innermost frame outside Triton's package and this file."""
    import triton
    skip = (os.path.dirname(os.path.abspath(triton.__file__)), os.path.abspath(__file__))
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(skip):
            return f"{os.path.relpath(frame.filename)}:{frame.lineno} {(frame.line or '').strip()}"
    return "?"
