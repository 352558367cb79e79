"""msf.nvtx: the `nvtx` package when it imports, else torch.cuda.nvtx on a GPU, else no NVTX at all;
`nvtx_range` pushes and pops around its body (also when the body raises) with whichever it has."""
import sys
import types

import pytest
import torch

from msf import nvtx as msf_nvtx


def recording_package(calls: list) -> types.ModuleType:
    package = types.ModuleType("nvtx")
    package.push_range = lambda message: calls.append(("push", message))
    package.pop_range = lambda: calls.append(("pop",))
    return package


def use(monkeypatch, selected) -> None:
    push, pop, source = selected
    monkeypatch.setattr(msf_nvtx, "_PUSH", push)
    monkeypatch.setattr(msf_nvtx, "_POP", pop)
    monkeypatch.setattr(msf_nvtx, "RANGE_SOURCE", source)


def test_the_installed_package_is_preferred():
    package = pytest.importorskip("nvtx")  # pinned in requirements.txt; the GPU image lacks it
    push, pop, source = msf_nvtx.select_range_functions()
    assert (push, pop, source) == (package.push_range, package.pop_range, "nvtx")
    assert msf_nvtx.RANGE_SOURCE == "nvtx"
    with msf_nvtx.nvtx_range("test/real-package"):  # no profiler attached: must simply run
        pass


def test_range_pushes_and_pops_through_the_package(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "nvtx", recording_package(calls))
    use(monkeypatch, msf_nvtx.select_range_functions())
    assert msf_nvtx.RANGE_SOURCE == "nvtx"
    with msf_nvtx.nvtx_range("outer"):
        with pytest.raises(ValueError), msf_nvtx.nvtx_range("inner"):
            raise ValueError("body failed")
    assert calls == [("push", "outer"), ("push", "inner"), ("pop",), ("pop",)]


def test_without_the_package_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # `import nvtx` now raises ImportError
    selected = msf_nvtx.select_range_functions()
    if torch.cuda.is_available():
        assert selected == (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop, "torch.cuda.nvtx")
    else:
        assert selected == (None, None, "none")
    use(monkeypatch, selected)
    entered = []
    with msf_nvtx.nvtx_range("fallback"):
        entered.append(True)
    assert entered == [True]
