"""NVTX ranges for Nsight Systems / Nsight Compute / the PyTorch profiler, free when nothing listens.

`nvtx_range("encoder/stage1")` pushes a named range around a block through the first of:
1. the `nvtx` package (NVIDIA's, pinned in requirements.txt): it installs on CPU-only machines and
   a push + pop costs well under a microsecond when no profiler is attached;
2. `torch.cuda.nvtx` when CUDA is available (the GPU image has no `nvtx` package);
3. nothing (a CPU run without the package).
`RANGE_SOURCE` says which ("nvtx", "torch.cuda.nvtx" or "none"). Ranges also show in
`torch.profiler` traces through `torch.profiler.record_function`, which is cheap when no profiler
is active. While torch.compile traces, `nvtx_range` is empty (pushing a range is a graph break).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

PushPop = tuple[Callable[[str], object] | None, Callable[[], object] | None, str]


def select_range_functions() -> PushPop:
    """(push, pop, source) of the first NVTX provider that loads (see the module docstring)."""
    try:
        import nvtx as package
    except ImportError:
        package = None
    if package is not None:
        return package.push_range, package.pop_range, "nvtx"
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop, "torch.cuda.nvtx"
    return None, None, "none"


_PUSH, _POP, RANGE_SOURCE = select_range_functions()


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    if torch.compiler.is_compiling():  # under torch.compile a range would break the graph: none
        yield
        return
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
