"""NVTX ranges for Nsight Systems / the PyTorch profiler, free when nothing listens.

`nvtx_range("encoder/stage1")` pushes a named range around a block: through the `nvtx` package
when it imports, else `torch.cuda.nvtx` when CUDA is available; on a CPU-only run it is a no-op
context manager (no string formatting, no calls). Ranges also show in `torch.profiler` traces via
`torch.profiler.record_function`, which is cheap when no profiler is active.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

try:  # pragma: no cover - depends on the installation
    import nvtx as _nvtx_pkg

    _push: Callable[[str], object] | None = _nvtx_pkg.push_range
    _pop: Callable[[], object] | None = _nvtx_pkg.pop_range
except ImportError:
    _push = _pop = None


def _cuda_push_pop():
    if _push is not None:
        return _push, _pop
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    return None, None


_PUSH, _POP = _cuda_push_pop()


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    if _PUSH is None:
        with torch.profiler.record_function(name):
            yield
        return
    _PUSH(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        _POP()
