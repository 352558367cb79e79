"""Pinned launch configurations: one committed config per (kernel, shape class, device kind).

Every Triton kernel with more than one candidate configuration launches through a `PinnedKernel`.
It looks its configuration up in `kernels/configs.json`, keyed by

- the kernel's name ("attention.fwd", "lmsa.dx", ...),
- its shape class: what the old autotuner's pruning looked at (dot mode and d block for the
  attention kernels, "half" / "fp32" for LMSA, "any" for head + loss and the upsample-argmax),
- the device kind: "sm_90", "sm_80", ... from the CUDA capability, or "interpreter" under
  `TRITON_INTERPRET=1` (one entry per kernel under the shape class "*": small tiles that keep the
  CPU tests cheap and still cover their masks and loops).

Lookup order: (class, kind), then ("*", kind), then (class, "default"); no entry is an error that
names the kernel. So every process, every DDP rank and the cost model (`python -m msf.profiling.cost`)
run the same configuration: results are bitwise reproducible across runs, and the configuration
the cost model judges is the one that runs.

The sm_90 / sm_80 entries of the model's shape classes are the candidates the cost model predicts
fastest (`python -m msf.profiling.cost --pin` rewrites them); every other class takes its allow-list's
first entry (`python -m msf.profiling.tune --from-lists`). Every entry is a member of its kernel's
allow-list for that class, i.e. a configuration `python -m msf.profiling.report` builds without spills
(tests/test_configs.py checks it); an sm_90 / sm_80 entry on the report's build for that architecture
(a configuration may be allowed on one only: `AotSpec.archs` and `PinnedKernel.archs`; `report
--launches` checks the pins, `tune --from-lists` keeps such a tile to its architecture).

Autotuning is an explicit opt-in: with `MSF_AUTOTUNE=1` set before `kernels` is imported, each
kernel runs `triton.autotune` over its whole list (pruned to the class's allow-list) as before, and
`python -m msf.profiling.tune` (on a GPU) records what it picked into a new table.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import triton

from msf.kernels._common import INTERPRET

TABLE_PATH = Path(__file__).with_name("configs.json")
AUTOTUNE: bool = os.environ.get("MSF_AUTOTUNE", "0") == "1"
DEFAULT_KIND = "default"
ANY_CLASS = "*"

_table: dict | None = None
_forced_kind: str | None = None
_forced_sms: int | None = None
REGISTRY: dict[str, "PinnedKernel"] = {}
TUNED: dict[tuple[str, str, str], triton.Config] = {}  # what autotuning picked (MSF_AUTOTUNE=1)


def load_table(path: Path | None = None) -> dict:
    """{kernel: {shape class: {device kind: {"kwargs": {...}, "num_warps": n, "num_stages": s}}}}."""
    global _table
    if path is not None:
        return json.loads(Path(path).read_text())
    if _table is None:
        try:
            _table = json.loads(TABLE_PATH.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{TABLE_PATH}: cannot read the pinned kernel configurations ({exc})") from exc
    return _table


def reload_table() -> None:
    global _table
    _table = None


def device_kind(device=None) -> str:
    """"interpreter", or "sm_XY" of the current (or given) CUDA device; `for_device` overrides it."""
    if _forced_kind is not None:
        return _forced_kind
    if INTERPRET:
        return "interpreter"
    import torch
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def sm_count(device) -> int | None:
    """The SM count the host code sizes its grids and chunks by: `for_device`'s where it names one,
    else the CUDA device's (cached by torch, no sync), None for a CPU tensor's device."""
    if _forced_sms is not None:
        return _forced_sms
    if device.type != "cuda":
        return None
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count


@contextlib.contextmanager
def for_device(kind: str, sms: int | None = None):
    """Look configurations up as on device kind `kind` and, with `sms`, size the host code's grids
    and chunks for that many SMs (`sm_count`): a GPU's launches on any device (the cost model
    captures launches this way; the CPU tests run a GPU's tiles under the interpreter)."""
    global _forced_kind, _forced_sms
    old, (_forced_kind, _forced_sms) = (_forced_kind, _forced_sms), (kind, sms)
    try:
        yield
    finally:
        _forced_kind, _forced_sms = old


def to_config(entry: dict) -> triton.Config:
    return triton.Config(dict(entry["kwargs"]), num_warps=entry["num_warps"], num_stages=entry["num_stages"])


def to_entry(cfg: triton.Config) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def same_config(a: triton.Config, b: triton.Config) -> bool:
    return to_entry(a) == to_entry(b)


def lookup(name: str, shape_class: str, kind: str, table: dict | None = None) -> triton.Config:
    per_class = (table if table is not None else load_table()).get(name)
    if per_class is None:
        raise KeyError(f"{TABLE_PATH.name}: no pinned configuration for kernel {name!r}")
    for cls, knd in ((shape_class, kind), (ANY_CLASS, kind), (shape_class, DEFAULT_KIND)):
        entry = per_class.get(cls, {}).get(knd)
        if entry is not None:
            return to_config(entry)
    raise KeyError(f"{TABLE_PATH.name}: no pinned configuration for kernel {name!r}, shape class "
                   f"{shape_class!r}, device {kind!r} (nor a {DEFAULT_KIND!r} one)")


_T = TypeVar("_T")


def candidate_order(first: _T, *groups: Iterable[_T]) -> list[_T]:
    """A kernel's candidate configurations: `first` (the interpreter's, which must lead the list),
    then those of each group (its allow-lists, its sweep grid) not already listed, in order."""
    return list(dict.fromkeys(itertools.chain([first], *groups)))


class PinnedKernel:
    """A `@triton.jit` kernel launched with its pinned configuration: `kernel[grid](*args, **kw)`.

    `configs`: the kernel's whole candidate list (what autotuning searches); `allowed(cls)`: the
    candidates valid for a shape class (spill-free on sm_80 and sm_90); `shape_class(named_args)`:
    the class of a launch from its named arguments (constexprs included); `classes`: every class
    the kernel can be launched with; `archs(cls, config)`: the architectures an allowed configuration
    is limited to (e.g. (90,): it spills on sm_80), None where it is clean on both (the default).
    """

    def __init__(self, name: str, fn, configs: list[triton.Config], key: list[str],
                 shape_class: Callable[[dict], str], allowed: Callable[[str], list[triton.Config]],
                 classes: list[str], prune=None,
                 archs: Callable[[str, triton.Config], "tuple[int, ...] | None"] | None = None):
        self.name = name
        self.fn = fn  # the JITFunction (or the interpreter's function); `msf.profiling.report` unwraps to it
        self.configs = configs
        self.shape_class = shape_class
        self.allowed = allowed
        self.classes = classes
        self.archs = archs or (lambda cls, config: None)
        self._tuner = None
        if AUTOTUNE and not INTERPRET:
            self._tuner = triton.autotune(configs=configs, key=key,
                                          prune_configs_by={"early_config_prune": prune} if prune else None)(fn)
        REGISTRY[name] = self

    def first_allowed(self, cls: str, arch: int | None = None) -> triton.Config:
        """The class's first allowed configuration that builds clean on `arch` (None: on every
        architecture, as a "default" entry, which any other GPU falls back to, must)."""
        for cfg in self.allowed(cls):
            only = self.archs(cls, cfg)
            if only is None or (arch is not None and arch in only):
                return cfg
        raise ValueError(f"{self.name}: no configuration of class {cls!r} is allowed on "
                         f"{'every architecture' if arch is None else f'sm_{arch}'}")

    def named_args(self, args, kwargs) -> dict:
        return {**dict(zip(self.fn.arg_names, args)), **kwargs}

    def config(self, args, kwargs) -> triton.Config:
        return lookup(self.name, self.shape_class(self.named_args(args, kwargs)), device_kind())

    def pinned_kwarg(self, shape_class: str, key: str, device=None) -> int:
        """The constexpr `key` (a block size) of the configuration this kernel launches with for
        `shape_class` on `device` (a CUDA device, else the current kind): for host code that sizes
        grids or buffers by it before the launch."""
        cuda = device if device is not None and getattr(device, "type", None) == "cuda" else None
        return int(lookup(self.name, shape_class, device_kind(cuda)).kwargs[key])

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self._tuner is not None:
                out = self._tuner[grid](*args, **kwargs)
                cls = self.shape_class(self.named_args(args, kwargs))
                TUNED[(self.name, cls, device_kind())] = self._tuner.best_config
                return out
            cfg = self.config(args, kwargs)
            return self.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)
        return launch
