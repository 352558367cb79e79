"""torch.compile's training step predicted on the CPU: Inductor's own CUDA kernels, generated for an
sm_90 / sm_80 GPU this machine does not have, built with ptxas and costed by `msf.profiling.cost`.

    python -m msf.profiling.inductor [--device h100 a100] [--variant paper h4 triton] [--ops]
                                     [--json PATH] [--md PATH] [--png PATH]

What it predicts (issue 24 item 4): `torch.compile` (Inductor, default mode: no max-autotune, no
CUDA graphs) of the eager model's training step, forward + backward of `model.loss` under bf16
autocast at B = 32, 512², and of each fused op's eager reference alone (`--ops`), beside the eager
byte floor and this project's fused kernels.

How Inductor's CUDA code is had without a GPU (torch 2.13 CPU build, triton 3.6); every piece is in
`cuda_target` and `compile_graphs`:
1. Trace on fake *CPU* tensors. AOTAutograd traces the joint forward/backward through autograd,
   and autograd cannot run on fake CUDA tensors in a CPU-only build (its engine asks for a CUDA
   device guard, then for an accelerator: "Cannot access accelerator device when none is
   available"). CUDA autocast does not apply to CPU tensors, so the traced function runs under
   `msf.bench.eager_bytes.CudaAutocastEmulation` (CUDA autocast's op lists, casts recorded as
   autograd records them). Inductor's outer passes (joint-graph patterns, the min-cut partition of
   forward and backward) do not depend on the device.
2. Retarget at the inner compiler. `compile_fx(..., inner_compile=...)` hands each partitioned graph
   (forward, backward) to `_inner`, which rewrites every `cpu` device in the graph (arguments and
   the fake values in node.meta) to `cuda:0`, makes fake CUDA example inputs of the same sizes,
   strides and dtypes, and calls Inductor's own `compile_fx_inner`: lowering, scheduling, fusion
   and Triton code generation then run for CUDA.
3. A GPU of the target's kind, as far as Inductor and Triton ask: `torch.cuda` and
   `CudaInterface` report one device with the `cost.Device`'s SM count and compute capability;
   Triton's active driver is a stub whose target is `GPUTarget("cuda", arch, 32)`;
   `AsyncCompile.triton` loads each kernel's source (a `CachingAutotuner` with its configs) without
   compiling or benchmarking it; Inductor's dropout seeds need CUDA's device guard in a meta
   function, so torch's own no-op guard is registered for CUDA (`fake_cuda_guard`: a C++ line,
   built once; needs a compiler). The generated wrapper then runs on fake CUDA tensors with every
   `CachingAutotuner.run` recorded instead of launched (`record_calls`).
4. Cost. Each recorded launch becomes a `cost.Launch` per config the autotuner carries (grid from
   Inductor's own `GridExpr`, arguments specialised by Triton's binder for the target), built for
   the target and predicted by `cost.predict` with the same model version and constants as this
   project's kernels. Inductor's loops (`InductorLoop`: the looped reduction's ⌈r0_numel / R0_BLOCK⌉
   trips, the mixed-order reduction's rows per program) are tied to their SASS loops by the line
   info; static shapes make their trip counts constant and LLVM unrolls the long ones k times
   (`unroll_factor`: the body's load bytes ÷ one iteration's), so a SASS loop runs T // k times
   and the T mod k peeled iterations are straight-line code. The autotuner's pick is the config the model predicts
   fastest (on a GPU Inductor benchmarks them; the model stands in for that benchmark). Library
   calls in the wrapper (cuBLAS mm / addmm / bmm, cuDNN convolutions, and any aten fallback) take
   max(bytes ÷ bandwidth, FLOPs ÷ peak) + one launch, bytes counted as `eager_bytes` counts an aten
   op, FLOPs from `torch.utils.flop_counter` (but a convolution's backward from its own formula,
   `library_flops`), the peak the tensor cores' or, for a grouped convolution, the FP32 pipes'.

Templates. The same route writes PyTorch's template kernels (the calibration set's mm template under
max-autotune and FlexAttention, `msf.profiling.calibrate`): a template launches on a fixed grid passed
after its arguments (`FixedGrid`), its loops take their trips from the constants its source states
(`InductorLoop`), and max-autotune's benchmark of each choice is stood in for by the model
(`predicted_autotune`: every Triton choice predicted, the least picked).

What this is not: a measurement. Inductor's choices that depend on a benchmark on the GPU (config
autotuning, and nothing else in default mode) are made by the cost model here; the band of every
figure is `cost.ERROR_BAND`, from kernels with measured times, none of them Inductor's pointwise
code.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import torch

from msf.profiling import cost

CUDA = torch.device("cuda", 0)
VARIANTS = ("paper", "h4", "triton")


# ----------------------------------------------------------------------------------------------
# a GPU of the target's kind, as Inductor and Triton see it
# ----------------------------------------------------------------------------------------------
def device_properties(device: cost.Device) -> types.SimpleNamespace:
    """What `torch.cuda.get_device_properties` would return on `device` (the fields Inductor reads)."""
    return types.SimpleNamespace(
        name=f"NVIDIA {device.name}", major=device.arch // 10, minor=device.arch % 10,
        multi_processor_count=device.sms, total_memory=80 * 2 ** 30, warp_size=32,
        max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=device.regs_per_sm,
        shared_memory_per_block_optin=device.smem_per_sm - 1024, shared_memory_per_multiprocessor=device.smem_per_sm,
        L2_cache_size=device.l2_bytes, gcnArchName="", is_integrated=False, uuid="predicted",
        clock_rate=int(device.clock_hz / 1e3))


class _StubDriver:
    """Triton's active driver for a GPU that is not here: it names the target and nothing else."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = types.SimpleNamespace()

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return CUDA

    def is_active(self):
        return True


_GUARD_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
// CUDA's device guard, for a build of torch without CUDA: the no-op guard torch keeps for its own tests
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
int registered() { return 1; }
"""


@functools.lru_cache(maxsize=None)
def fake_cuda_guard() -> None:
    """Register a no-op CUDA device guard (a C++ extension, built once into torch's extension cache):
    some of Inductor's own meta functions (its dropout seeds: `inductor_lookup_seed`) index a fake
    CUDA tensor, which asks for the CUDA guard that a CPU-only build lacks."""
    if torch.backends.cuda.is_built():
        return
    from torch.utils.cpp_extension import load_inline
    _clear_stale_build_lock("msf_fake_cuda_guard")
    load_inline("msf_fake_cuda_guard", cpp_sources=[_GUARD_SOURCE], functions=["registered"])


_STALE_LOCK_S = 600  # the guard builds in under a minute on 2 cores


def _clear_stale_build_lock(name: str) -> None:
    """Remove the extension build's lock file when it is older than any build takes. torch's build
    baton waits for that file to go away, forever: a process killed mid-build (an interrupted first
    run) leaves it behind, and every later run then hangs on it without a word (seen 2026-12-05)."""
    import time
    try:
        from torch.utils.cpp_extension import _get_build_directory
        lock = Path(_get_build_directory(name, False)) / "lock"
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            print(f"removing a stale extension build lock ({lock}, {time.time() - lock.stat().st_mtime:.0f} s old)",
                  file=sys.stderr)
            lock.unlink(missing_ok=True)
    except (ImportError, OSError):  # no lock (the usual case), or torch moved its private helper
        return


def _load_kernel(self, kernel_name: str, source_code: str, device_str: str = "cuda"):
    """`AsyncCompile.triton` without the compile: the kernel's CachingAutotuner, configs attached."""
    from torch._inductor import codecache
    return getattr(codecache.PyCodeCache.load(source_code), kernel_name)


@contextlib.contextmanager
def cuda_target(device: cost.Device) -> Iterator[None]:
    """Within: Inductor generates Triton code for one CUDA GPU of `device`'s kind (see the module
    docstring, step 3); nothing is compiled or launched."""
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor import async_compile
    from torch._inductor.runtime import triton_helpers
    from triton.runtime import driver
    fake_cuda_guard()
    props = device_properties(device)
    # what both torch.cuda and Dynamo's CudaInterface (which bound torch.cuda's functions at import) answer
    both = dict(current_device=lambda: 0, set_device=lambda d: None, device_count=lambda: 1,
                synchronize=lambda d=None: None, get_device_properties=lambda d=None: props)
    answers = dict(
        both, is_available=lambda: True, get_device_capability=lambda d=None: (props.major, props.minor),
        get_device_name=lambda d=None: props.name, _lazy_init=lambda: None, is_initialized=lambda: True,
        _exchange_device=lambda d: 0, _maybe_exchange_device=lambda d: 0,
        get_rng_state=lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
        set_rng_state=lambda state, device="cuda": None)
    interface = dict(
        both, get_raw_stream=lambda d: 0, exchange_device=lambda d: 0, maybe_exchange_device=lambda d: 0,
        memory_allocated=lambda d=None: 0, is_bf16_supported=lambda *a, **k: True)
    with contextlib.ExitStack() as stack:
        for name, fn in answers.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, fn))
        for name, fn in interface.items():
            stack.enter_context(mock.patch.object(CudaInterface, name, staticmethod(fn)))
        for name in ("get_device_properties", "current_device"):
            stack.enter_context(mock.patch.object(CudaInterface.Worker, name, staticmethod(getattr(
                CudaInterface, name))))
        stack.enter_context(mock.patch.object(torch._C, "_cuda_getDevice", lambda: 0, create=True))
        stack.enter_context(mock.patch.object(torch._C, "_cuda_getCurrentRawStream", lambda d: 0, create=True))
        stack.enter_context(mock.patch.object(async_compile.AsyncCompile, "triton", _load_kernel))
        stack.enter_context(mock.patch.object(triton_helpers, "set_driver_to_gpu", lambda: None))
        previous = driver._active  # (None until a driver was asked for: asking would look for libcuda)
        driver.set_active(_StubDriver(device.arch))
        stack.callback(setattr, driver, "_active", previous)
        stack.enter_context(_inductor_settings())
        _forget_device()
        stack.callback(_forget_device)
        yield


def _forget_device() -> None:
    """Clear what Inductor caches of the GPU it saw (one process can predict for several devices)."""
    from torch._inductor import utils
    from torch._inductor.runtime.hints import DeviceProperties
    cached = [DeviceProperties.create] + [getattr(utils, name) for name in (
        "is_big_gpu", "get_max_num_sms", "using_b200", "get_backend_num_stages", "get_device_tflops",
        "get_gpu_dram_gbps") if hasattr(utils, name)]
    for fn in cached:
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


@contextlib.contextmanager
def _inductor_settings() -> Iterator[None]:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    # both graphs compiled at once (no backward to run), in this process, and never from a cache:
    # a cached graph would skip the code generation the recorder reads
    with functorch_config.patch(force_non_lazy_backward_lowering=True, enable_autograd_cache=False), \
            inductor_config.patch(compile_threads=1, fx_graph_cache=False, fx_graph_remote_cache=False,
                                  autotune_local_cache=False):
        yield


# ----------------------------------------------------------------------------------------------
# Inductor's graphs for a function of fake CPU tensors
# ----------------------------------------------------------------------------------------------
@dataclass
class Graph:
    """One graph Inductor compiled: its pass, its wrapper's source and fake CUDA example inputs."""
    pass_: str
    source: str
    inputs: list


def _retarget(value):
    if isinstance(value, torch.device) and value.type == "cpu":
        return CUDA
    if isinstance(value, (list, tuple)):
        return type(value)(_retarget(v) for v in value)
    if isinstance(value, dict):
        return {k: _retarget(v) for k, v in value.items()}
    return value


def _blank(t: torch.Tensor, device, mode=None) -> torch.Tensor:
    """An unfilled tensor of `t`'s sizes, strides and dtype on `device` (a fake one within `mode`)."""
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def _on_cuda(value, mode):
    """`value` with every tensor a fake CUDA one of its sizes, strides and dtype."""
    return _map_tensors(value, lambda t: _blank(t, CUDA, mode))


def compile_graphs(fn: Callable, inputs: list[torch.Tensor]) -> list[Graph]:
    """Inductor's CUDA wrapper code for `fn(*inputs)` (forward, and backward where an input requires
    grad), `inputs` being fake CPU tensors; call within `cuda_target`."""
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    graphs: list[Graph] = []

    def inner(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        mode = detect_fake_mode(example_inputs)
        for node in gm.graph.nodes:
            node.args, node.kwargs = _retarget(node.args), _retarget(node.kwargs)
            if "val" in node.meta:
                node.meta["val"] = _on_cuda(node.meta["val"], mode)
        gm.recompile()
        cuda_inputs = [_on_cuda(t, mode) for t in example_inputs]
        compiled = compile_fx_inner(gm, cuda_inputs, **kwargs)
        graphs.append(Graph("backward" if kwargs.get("is_backward") else "forward", compiled.source_code,
                            cuda_inputs))
        return compiled

    # what Dynamo would hand Inductor: a graph of the inputs, here with `fn` as one opaque call that
    # AOTAutograd traces through (a submodule: any callable, a lambda or a closure, can be one)
    root = torch.nn.Module()
    root.fn = _Call(fn)
    graph = torch.fx.Graph()
    placeholders = [graph.placeholder(f"arg{i}") for i in range(len(inputs))]
    graph.output(graph.call_module("fn", tuple(placeholders)))
    compile_fx(torch.fx.GraphModule(root, graph), list(inputs), inner_compile=inner)
    return graphs


class _Call(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.call = fn

    def forward(self, *args):
        return self.call(*args)


# ----------------------------------------------------------------------------------------------
# what the wrapper launches
# ----------------------------------------------------------------------------------------------
@dataclass
class TritonCall:
    kernel: object          # CachingAutotuner
    args: tuple             # positional launch arguments (fake tensors, ints)


@dataclass
class LibraryCall:
    op: str                 # aten op name (mm, addmm, convolution, ...)
    bytes: int
    flops: float
    low_precision: bool     # bf16 / fp16 operands (tensor cores at the bf16 peak)
    tensor_cores: bool = True   # False: a grouped (depthwise) convolution, on the FP32 pipes


class _LibraryRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Every data-moving aten op the wrapper itself calls (what is not a Triton kernel)."""

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves
        from msf.bench import eager_bytes
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = eager_bytes.op_tensors(func, args, kwargs, out)
        written = eager_bytes._out_argument_names(func) or any(isinstance(t, torch.Tensor) for t in tree_leaves(out))
        if not tensors or not written:
            return out  # a view, an allocation, or a query (prim::device): nothing moves
        moved = sum(eager_bytes.tensor_bytes(t) for t in tensors)
        flops = library_flops(func, args, kwargs, out)
        low = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
        grouped = {torch.ops.aten.convolution: 8, torch.ops.aten.convolution_backward: 9}.get(func._overloadpacket)
        dense = grouped is None or args[grouped] == 1
        self.sink.append(LibraryCall(str(func), moved, flops, low, dense))
        return out


def library_flops(func, args: tuple, kwargs: dict, out) -> float:
    """FLOPs of one library call: `torch.utils.flop_counter`'s formulas, except the convolution
    backward's, which (torch 2.13) counts a grouped convolution's gradients as dense ones (a depthwise
    7×7 over 64 channels: 65× its forward); here each gradient asked for costs one forward."""
    from torch.utils.flop_counter import flop_registry
    if func._overloadpacket is torch.ops.aten.convolution_backward:
        grad_out, inp, weight = args[0], args[1], args[2]
        transposed, mask = args[7], args[10]
        per_pass = 2 * (inp if transposed else grad_out).numel() * weight.shape[1] * math.prod(weight.shape[2:])
        return float(per_pass * (int(mask[0]) + int(mask[1])))
    formula = flop_registry.get(func._overloadpacket)
    return float(formula(*args, **kwargs, out_val=out)) if formula is not None else 0.0


def record_calls(graph: Graph) -> list[TritonCall | LibraryCall]:
    """The launches of one graph's wrapper, in order, run on fake CUDA tensors (within `cuda_target`)."""
    from torch._guards import detect_fake_mode
    from torch._inductor import codecache
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    calls: list = []
    module = codecache.PyCodeCache.load(graph.source)
    fake = {
        "empty_strided_cuda": lambda size, stride, dtype: torch.empty_strided(size, stride, dtype=dtype, device=CUDA),
        "reinterpret_tensor": lambda t, size, stride, offset: t.as_strided(size, stride, t.storage_offset() + offset),
        "assert_size_stride": lambda *a, **k: None, "assert_alignment": lambda *a, **k: None,
        "copy_if_misaligned": lambda t: t, "get_raw_stream": lambda d: 0,
    }
    for name, value in fake.items():
        if hasattr(module, name):
            setattr(module, name, value)

    def run(self, *args, stream=None, **kwargs):
        calls.append(TritonCall(self, args))

    mode = detect_fake_mode(graph.inputs)
    with mock.patch.object(CachingAutotuner, "run", run), \
            mock.patch.object(torch.cuda, "_DeviceGuard", lambda index: contextlib.nullcontext()), \
            mock.patch.object(torch.cuda, "set_device", lambda d: None), mode, _LibraryRecorder(calls):
        module.call(list(graph.inputs))
    for call in calls:  # (made outside the fake mode: plain meta tensors, as cost.Launch expects)
        if isinstance(call, TritonCall):
            call.args = _map_tensors(call.args, lambda t: _blank(t, "meta"))
    return calls


# ----------------------------------------------------------------------------------------------
# cost
# ----------------------------------------------------------------------------------------------
_LOOP_HEADER = re.compile(r"^\s*for\s+(\w+)\s+in\s+(?:tl\.)?range\(\s*0\s*,\s*(\w+)\s*,\s*(\w+)")
_FLEX_KV_LOOP = re.compile(r"^\s*for\s+start_n\s+in\s+range\(\s*block_n_start\s*,\s*block_n_end\s*\)")
_TEMPLATE_CONST = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?::\s*tl\.constexpr)?\s*=\s*(\d+)\s*$")
_CDIV_LOOP = re.compile(r"^\s*for\s+\w+\s+in\s+(?:tl\.)?range\(\s*0\s*,\s*tl\.cdiv\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*\)")


@dataclass(frozen=True)
class InductorLoop:
    """A loop of Inductor's Triton code, from its header: `for r0_offset in range(0, r0_numel,
    R0_BLOCK)` (a looped reduction: ⌈r0_numel / R0_BLOCK⌉ trips), `for _ in tl.range(0, split_size,
    XBLOCK)` (a mixed-order reduction: each program walks RSPLIT_SIZE rows, the last one fewer), or a
    template's: `for k_idx in range(0, tl.cdiv(K, BLOCK_K))` (the mm template's K loop) and
    FlexAttention's key-block loop, their sizes from the integer constants the template's source
    states (`constants`: `template_constants`, derived once a build, not once a program)."""
    kernel: str
    header: str
    unrolled: int = 1     # source iterations in one pass of the SASS loop (`unroll_factor`)
    func: str = "inductor"
    constants: tuple = ()  # the template's (name, value) constants, `template_constants`

    def site_counts(self, a: dict, pid: tuple) -> list[int]:
        if _FLEX_KV_LOOP.match(self.header):
            return [self._flex_key_blocks()]
        m = _CDIV_LOOP.match(self.header)
        if m:   # a template's K loop: `for k_idx in range(0, tl.cdiv(K, BLOCK_K))`, both constants
            consts = {**dict(self.constants), **a}
            if m.group(1) not in consts or m.group(2) not in consts:
                raise LookupError(f"{self.kernel}: no value for the loop {self.header.strip()!r}")
            return [cost._cdiv(consts[m.group(1)], consts[m.group(2)]) // self.unrolled]
        m = _LOOP_HEADER.match(self.header)
        if m is None:
            raise LookupError(f"{self.kernel}: no trip count for the loop {self.header.strip()!r}")
        stop, step = m.group(2), m.group(3)
        if stop == "split_size":
            stop_value = min(a["RSPLIT_SIZE"], a["xnumel"] - pid[0] * a["RSPLIT_SIZE"])
        elif stop in a:
            stop_value = a[stop]
        else:
            raise LookupError(f"{self.kernel}: no value for {stop!r} in the loop {self.header.strip()!r}")
        # LLVM unrolls a loop of constant trip count T by k and peels T mod k iterations into
        # straight-line code (counted once): the SASS loop itself runs T // k times
        return [cost._cdiv(max(stop_value, 0), a[step]) // self.unrolled]

    def _flex_key_blocks(self) -> int:
        """FlexAttention's key-block loop with no block mask (the dense case, `flex_attention(q, k, v)`):
        the mask's one sparse block spans every key, so a query tile visits all ⌈KV_LEN / BLOCK_N⌉ key
        blocks (`block_n_end = min(kv_num_blocks · SPARSE_KV_MULTIPLE, ⌈KV_LEN / BLOCK_N⌉)`, the
        template's constants). A block-sparse mask visits fewer: its trips are data, not constants."""
        consts = dict(self.constants)
        if "KV_LEN" not in consts or "BLOCK_N" not in consts:
            raise LookupError(f"{self.kernel}: no KV_LEN / BLOCK_N constant for the loop {self.header.strip()!r}")
        return cost._cdiv(consts["KV_LEN"], consts["BLOCK_N"]) // self.unrolled


def template_constants(source_lines) -> tuple:
    """The integer constants a kernel's source states (`K = 8192`, `BLOCK_N : tl.constexpr = 128`) as
    (name, value) pairs, the first of each name."""
    consts: dict[str, int] = {}
    for line in source_lines:
        m = _TEMPLATE_CONST.match(line)
        if m and m.group(1) not in consts:
            consts[m.group(1)] = int(m.group(2))
    return tuple(consts.items())


_TTIR_LOAD = re.compile(r"= tt\.load .*?: (?:tensor<([0-9x]+)x)?!tt\.ptr<(\w+)>>?.* loc\((#loc\d*)\)")
_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1,
                  "u8": 1, "f8E4M3FN": 1, "f8E5M2": 1}


def load_bytes_by_line(ttir: str) -> dict[int, int]:
    """{source line: bytes one program's `tl.load`s on that line read per execution}, from the
    TTIR's load types (a [XBLOCK, R0_BLOCK] block of fp32 pointers: XBLOCK·R0_BLOCK·4)."""
    defs = {m.group(1): m.group(2) for m in map(cost.TTIR_LOC.match, ttir.splitlines()) if m}
    out: dict[int, int] = {}
    for text in ttir.splitlines():
        m = _TTIR_LOAD.search(text)
        # (Inductor's loads are in the kernel's own body: a call site resolves to its caller line)
        where = cost.loc_line(m.group(3), defs, callee_first=False) if m else None
        if where is None:
            continue
        line = where[1]
        numel = math.prod(int(d) for d in m.group(1).split("x")) if m.group(1) else 1
        out[line] = out.get(line, 0) + numel * _ELEMENT_BYTES.get(m.group(2), 4)
    return out


def unroll_factor(sl, instrs, warps: int, loads: dict[int, int]) -> int:
    """How many source iterations one pass of SASS loop `sl` holds: for each load line in its body,
    the bytes its LDGs move per pass (width × 32 lanes × warps) ÷ the bytes the load reads per
    iteration; the least over the lines (a load the layout replicates across threads only reads
    more), 1 when the body loads nothing the TTIR names."""
    per_line: dict[int, int] = {}
    for ins in instrs:
        width = cost.global_access_bytes(ins.op)
        if sl.start <= ins.addr <= sl.end and cost.is_global_load(ins.op) and width:
            per_line[ins.line] = per_line.get(ins.line, 0) + width * 32 * warps
    ratios = [round(moved / loads[line]) for line, moved in per_line.items() if loads.get(line)]
    return max(1, min(ratios)) if ratios else 1


def _loop_header(sl, source_lines: list[str]) -> str:
    """The `for` line of the generated source nearest above (or at) the SASS loop's branch line."""
    for line in range(min(sl.line, len(source_lines)), 0, -1):
        if _LOOP_HEADER.match(source_lines[line - 1]):
            return source_lines[line - 1]
    return source_lines[sl.line - 1] if 0 < sl.line <= len(source_lines) else ""


def launches(call: TritonCall, label: str, pass_: str, arch: int) -> list[cost.Launch]:
    """One `cost.Launch` per config of the call's autotuner, specialised as Triton would on `arch`."""
    from torch._inductor.runtime.triton_heuristics import GridExpr
    tuner = call.kernel
    fn = tuner.fn
    # the wrapper passes one value per signature entry, constexpr ones (a numel of 1) included, then
    # a template's fixed grid (`FixedGrid`: _grid_0, _grid_1, _grid_2)
    names = list(tuner.triton_meta["signature"]) + list(tuner.inductor_meta.get("extra_launcher_args", ()))
    named = dict(zip(names, call.args))
    out = []
    for cfg in tuner.configs:
        grid = GridExpr.from_meta(tuner.inductor_meta, cfg).eval_slow({**named, **cfg.kwargs})
        kwargs = {k: v for k, v in {**named, **tuner.triton_meta.get("constants", {}), **cfg.kwargs}.items()
                  if k in fn.arg_names}
        kwargs.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        bound, g, sig, const, attrs, opts = cost.specialise(fn, (), kwargs, tuple(grid), arch)
        launch = cost.Launch(label, pass_, fn.__name__, fn, g, bound, sig, const, attrs, opts)
        launch.config = dict(cfg.kwargs)  # (its block sizes, for the report: cost.Launch names only BLOCK_*)
        out.append(launch)
    return out


def predict_launch(launch: cost.Launch, device: cost.Device) -> cost.KernelCost:
    """`cost.predict`, with the loops of Inductor's code given their trip counts (`InductorLoop`)."""
    _, instrs, loops, _, _ = cost.compiled_kernel(launch, device.arch)
    if any(sl.loop is None for sl in loops):
        from msf.profiling.report import build  # (Triton's cache: the build above, its TTIR)
        built = build(launch.fn, launch.signature, launch.constexprs, launch.attrs, device.arch, launch.options)
        loads = load_bytes_by_line(built.asm["ttir"])
    for sl in loops:
        if sl.loop is None:
            source = Path(sl.file).read_text().splitlines() if Path(sl.file).is_file() else []
            sl.loop = InductorLoop(launch.kernel, _loop_header(sl, source),
                                   unroll_factor(sl, instrs, launch.options["num_warps"], loads),
                                   constants=template_constants(source))
    predicted = cost.predict(launch, device)
    blocks = ",".join(f"{k}={v}" for k, v in getattr(launch, "config", {}).items())
    return dataclasses.replace(predicted, config=",".join(filter(None, (blocks, predicted.config))))


def _as_list(meta) -> list:
    """A benchmark request's tensor metadata: one TensorMeta or a list of them (multi-output templates)."""
    return list(meta) if isinstance(meta, (list, tuple)) else [meta]


def predicted_autotune(device: cost.Device):
    """A stand-in for `AlgorithmSelectorCache.autotune` (max-autotune's benchmark of each template
    choice on the GPU): each Triton template choice's kernel, loaded from the module Inductor wrote
    for its benchmark, launched on meta tensors of its inputs' and output's sizes with its grid
    (`bmreq.extra_args`) and predicted; Inductor then picks the least, as it would the fastest. A
    choice the model cannot launch this way (an aten fallback) is never picked."""
    from torch._inductor import codecache

    def autotune(self, name, input_nodes, layout, input_gen_fns, choices, *args, **kwargs):
        times = {}
        for choice in choices:
            req = getattr(choice, "bmreq", None)
            if req is None or not hasattr(req, "module_path"):
                times[choice] = math.inf
                continue
            module = codecache.PyCodeCache.load_by_key_path(req.module_cache_key, req.module_path)
            metas = _as_list(req.input_tensor_meta) + _as_list(req.output_tensor_meta)
            tensors = [torch.empty_strided(m.sizes, m.strides, dtype=m.dtype, device="meta") for m in metas]
            call = TritonCall(getattr(module, req.kernel_name), (*tensors, *req.extra_args))
            costs = [predict_launch(launch, device) for launch in launches(call, name, "fwd", device.arch)]
            times[choice] = min(c.predicted for c in costs) * 1e3   # ms, as Inductor's timings
        return times
    return autotune


def simt_flops(device: cost.Device) -> float:
    """FP32 FMA throughput of the SIMT pipes: 32 lanes a scheduler on sm_90, 16 on sm_80 (SPEC §6c)."""
    lanes = 32 if device.arch >= 90 else 16
    return device.sms * device.schedulers * lanes * 2 * device.clock_hz


def library_time(call: LibraryCall, device: cost.Device) -> float:
    """A cuBLAS / cuDNN call at its roofline: max(bytes ÷ bandwidth, FLOPs ÷ peak) + one launch; the
    peak is the tensor cores' (bf16, else tf32), the SIMT pipes' for a grouped convolution."""
    if not call.tensor_cores:
        peak = simt_flops(device)
    else:
        peak = device.tc_bf16 if call.low_precision else device.tc_tf32
    return max(call.bytes / device.bandwidth, call.flops / peak) + cost.LAUNCH_S


@dataclass
class Predicted:
    """torch.compile of one function on one device: its kernels' picks and its library calls."""
    label: str
    device: str
    kernels: list[cost.KernelCost]          # the config predicted fastest, one per launch
    library: list[tuple[str, LibraryCall, float]]   # (pass, call, seconds)

    def total(self, pass_: str | None = None) -> float:
        k = sum(c.predicted for c in self.kernels if pass_ in (None, c.pass_))
        return k + sum(t for p, _, t in self.library if pass_ in (None, p))

    def bytes(self, pass_: str | None = None) -> float:
        return sum(c.dram_bytes for c in self.kernels if pass_ in (None, c.pass_)) + \
            sum(call.bytes for p, call, _ in self.library if pass_ in (None, p))


def predict(label: str, fn: Callable, inputs: list[torch.Tensor], device: cost.Device, log=print) -> Predicted:
    """Inductor's code for `fn(*inputs)` generated for `device`, every launch predicted."""
    with cuda_target(device):
        graphs = compile_graphs(fn, inputs)
        recorded = [(g.pass_, record_calls(g)) for g in graphs]
    kernels, library, fused, tried = [], [], [], 0
    for pass_, calls in recorded:
        for call in calls:
            if isinstance(call, LibraryCall) and call.op.startswith("msf."):
                fused.append((pass_, call.op))
                continue
            if isinstance(call, LibraryCall):
                library.append((pass_, call, library_time(call, device)))
                continue
            costs = [predict_launch(launch, device) for launch in launches(call, label, pass_, device.arch)]
            tried += len(costs)
            kernels.append(min(costs, key=lambda c: c.predicted))
    result = Predicted(label, device.key, kernels, library)
    log(f"  {label} on {device.key}: {len(kernels)} Triton launches ({tried} configs built), {len(library)} library "
        f"calls, {len(fused)} msf:: operator calls (not included), {result.total() * 1e3:.2f} ms")
    return result


# ----------------------------------------------------------------------------------------------
# the model's step and the fused ops' eager references, on fake CPU tensors
# ----------------------------------------------------------------------------------------------
def _map_tensors(value, fn: Callable[[torch.Tensor], object]):
    """`value` with every tensor inside its tuples, lists and dataclasses replaced by `fn(tensor)`,
    in a fixed order (depth first, fields in declaration order)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value)})
    return value


def _fake_like(value, mode):
    """`value` (meta tensors inside tuples / lists / dataclasses) rebuilt from fake CPU tensors."""
    return _map_tensors(value, lambda t: _blank(t, "cpu", mode).requires_grad_(t.requires_grad))


def _training(fn: Callable, args: tuple, dtype: torch.dtype):
    """(traced function, fake CPU inputs) of `fn(*args)` under emulated CUDA autocast. Its output's
    gradient is an input of the compiled backward (AOTAutograd's tangent), as the eager floor's
    backward is given one (`msf.bench.eager_bytes.count_op`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from msf.bench.eager_bytes import CudaAutocastEmulation
    mode = FakeTensorMode()
    fake_args = _fake_like(args, mode)
    leaves: list[torch.Tensor] = []
    _map_tensors(fake_args, leaves.append)

    def traced(*tensors):
        given = iter(tensors)
        with CudaAutocastEmulation(dtype):
            return fn(*_map_tensors(fake_args, lambda _: next(given)))

    return traced, leaves


def step_function(variant: str, batch: int = cost.BATCH, size: int = cost.SIZE, dtype=torch.bfloat16):
    """(fn, fake inputs) of one training step, `model.loss(images, masks)` with the parameters as
    inputs (as torch.compile's Dynamo lifts them). `paper` / `h4`: the eager model, classifier after
    or before the ×4 upsample. `triton`: the triton backend's model, its fused ops the `msf::`
    operators torch.compile traces (opaque nodes here: on a CPU build they are not `triton_op`s, so
    the wrapper calls them and `predict` leaves them to `msf.profiling.cost`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module

    from msf.bench.eager_bytes import CudaAutocastEmulation
    from msf.model import MicroSegFormer
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    with torch.device("meta"):  # (initialisation draws random numbers: not on fake tensors)
        model = MicroSegFormer(backend="triton" if variant == "triton" else "eager",
                               paper_head_order=(variant == "paper")).train()
    mode = FakeTensorMode()
    names = [n for n, _ in model.named_parameters()]
    params = [_fake_like(p.detach().requires_grad_(True), mode) for _, p in model.named_parameters()]
    with mode:
        images = torch.empty(batch, 3, size, size, dtype=dtype)  # as the device pipeline hands them under autocast
        masks = torch.empty(batch, size, size, dtype=torch.uint8)

    def step(*tensors):
        weights = dict(zip(names, tensors[:len(names)]))
        with _reparametrize_module(model, weights), CudaAutocastEmulation(dtype), _fused_ops_as_operators(variant):
            return model.loss(*tensors[len(names):])

    return step, params + [images, masks]


@contextlib.contextmanager
def _fused_ops_as_operators(variant: str) -> Iterator[None]:
    """For the triton model: its ops take their torch.compile path (the `msf::` operators), and see
    autocast on, as on CUDA (CPU autocast's lists lower no op CUDA's keep in fp32, and the emulation
    has already cast every argument CUDA's way)."""
    if variant != "triton":
        yield
        return
    from msf.kernels import attention, attention_block, attention_sublayer, decoder_mlp, ffn_sublayer, head_loss, \
        lmsa, map_norm
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.compiler, "is_compiling", lambda: True))
        # the host checks that the kernels can run here: they never run, only their fake kernels do
        for module in (attention, attention_block, attention_sublayer, decoder_mlp, ffn_sublayer, lmsa, map_norm):
            stack.enter_context(mock.patch.object(module, "INTERPRET", True))
        stack.enter_context(mock.patch.object(head_loss, "_check_device", lambda t, name: None))
        stack.enter_context(torch.autocast("cpu", torch.bfloat16))
        yield


def op_function(op: str, stage: int | None, batch: int = cost.BATCH, size: int = cost.SIZE, dtype=torch.bfloat16):
    """(fn, fake inputs) of fused op `op`'s eager reference with the arguments the model gives it
    (`msf.bench.eager_bytes._op_call`), forward + backward."""
    from msf.bench import eager_bytes
    fn, args, _ = eager_bytes._op_call(op, stage, batch, size, dtype)
    return _training(fn, args, dtype)


# ----------------------------------------------------------------------------------------------
# the project's side: fused ops (msf.profiling.cost) and eager floors (msf.bench.eager_bytes)
# ----------------------------------------------------------------------------------------------
# the ops whose weight matrices a training step lends as copies made once a step (the model's
# `weight_copies`); under torch.compile nothing is lent and they cast their own
LENT_WEIGHT_OPS = ("attention_block", "attention_block_embedded", "ffn_sublayer", "ffn_stage_output")


def fused_costs(device: cost.Device, log=print) -> list[cost.KernelCost]:
    """Every fused op's kernels at the model's shapes on `device` (as `python -m msf.profiling.cost`)."""
    log(f"  fused ops on {device.key} (msf.profiling.cost)")
    return [c for op, stage in cost.op_instances() for c in cost.cost_op(op, stage, device)]


def compiled_fused_costs(costs: list[cost.KernelCost], device: cost.Device, log=print) -> list[cost.KernelCost]:
    """`costs` as a torch.compile'd triton step runs them: the ops in `LENT_WEIGHT_OPS` again with their
    own weight casts (`msf.precision.step_weight_copies` lends nothing while Dynamo traces)."""
    log(f"  the blocks' ops on {device.key} casting their own weights (msf.profiling.cost)")
    lent = {cost.op_label(op, stage) for op, stage in cost.op_instances() if op in LENT_WEIGHT_OPS}
    return [c for c in costs if c.op not in lent] + [
        c for op, stage in cost.op_instances() if op in LENT_WEIGHT_OPS
        for c in cost.cost_op(op, stage, device, lend_weights=False)]


def fused_op_seconds(costs: list[cost.KernelCost], op: str, stage: int | None, pass_: str | None = None) -> float:
    label = cost.op_label(op, stage)
    return sum(c.predicted for c in costs if c.op == label and (pass_ is None or c.pass_ == pass_))


def fused_step_seconds(costs: list[cost.KernelCost]) -> float:
    """The fused ops of one training step: each op's kernels × its calls per step."""
    return sum(cost.calls_per_step(op, stage) * fused_op_seconds(costs, op, stage) for op, stage in cost.op_instances())


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _band(t: float | None) -> str:
    """A prediction with the measured times it allows (cost.ERROR_BAND is predicted ÷ measured)."""
    if t is None:
        return "n/a"
    lo, hi = cost.ERROR_BAND
    return f"{t * 1e3:.2f} ({t / hi * 1e3:.2f}-{t / lo * 1e3:.2f})"


def _ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t * 1e3:.2f}"


def step_rows(device: cost.Device, compiled: dict[str, Predicted], fused_s: float,
              compiled_fused_s: float | None = None) -> list[dict]:
    """One row per step variant on `device`: eager floor, compile, and the triton figures
    (`compiled_fused_s`: the fused ops as a compiled step runs them, default `fused_s`)."""
    rest_floor = cost.eager_step_floor("triton_rest", device)
    # the rest's bytes and a launch for each of its ops (cost.step_summary's rule)
    triton_s = fused_s + rest_floor + cost.eager_rest_launches() * cost.LAUNCH_S if rest_floor is not None else None
    triton_compiled = compiled.get("triton")
    compiled_fused_s = fused_s if compiled_fused_s is None else compiled_fused_s
    triton_compile_s = compiled_fused_s + triton_compiled.total() if triton_compiled else None
    rows = []
    for variant in ("paper", "h4"):
        if variant not in compiled:
            continue
        c = compiled[variant].total()
        rows.append({"variant": variant, "device": device.key, "eager_floor_s": cost.eager_step_floor(variant, device),
                     "compile_s": c, "compile_forward_s": compiled[variant].total("forward"),
                     "compile_backward_s": compiled[variant].total("backward"),
                     "compile_bytes": compiled[variant].bytes(), "compile_library_s":
                         sum(t for *_, t in compiled[variant].library),
                     "compile_triton_launches": len(compiled[variant].kernels),
                     "triton_s": triton_s, "triton_compile_s": triton_compile_s,
                     "triton_compile_rest_s": triton_compiled.total() if triton_compiled else None,
                     "fused_s": fused_s, "compiled_fused_s": compiled_fused_s})
    return rows


def step_table(rows: list[dict]) -> str:
    lines = ["| step (B = 32, 512², bf16 autocast, fwd + bwd) | device | eager floor ms | torch.compile ms "
             "(measured band) | triton ms (fused + eager rest: floor and launches) | triton + torch.compile ms (fused + Inductor "
             "rest) | triton ÷ compile | triton+compile ÷ compile |",
             "|---|---|---|---|---|---|---|---|"]

    def ratio(t):
        return "n/a" if t is None else f"{t / r['compile_s']:.2f}"
    for r in rows:
        order = "paper order" if r["variant"] == "paper" else "classifier at H/4"
        lines.append(f"| eager model, {order} | {r['device']} | {_ms(r['eager_floor_s'])} | {_band(r['compile_s'])} | "
                     f"{_ms(r['triton_s'])} | {_ms(r['triton_compile_s'])} | {ratio(r['triton_s'])} | "
                     f"{ratio(r['triton_compile_s'])} |")
    return "\n".join(lines)


def op_rows(device: cost.Device, compiled: dict[str, Predicted], costs: list[cost.KernelCost]) -> list[dict]:
    rows = []
    for op, stage in cost.op_instances():
        label = cost.op_label(op, stage)
        if label not in compiled:
            continue
        floor = cost.eager_op_floor(op, stage, device) or {}
        for pass_, long in (("fwd", "forward"), ("bwd", "backward")):
            rows.append({"op": label, "pass": pass_, "device": device.key, "eager_floor_s": floor.get(long),
                         "compile_s": compiled[label].total(long),
                         "fused_s": fused_op_seconds(costs, op, stage, pass_)})
    return rows


def op_table(rows: list[dict]) -> str:
    lines = ["| op | pass | device | eager floor µs | torch.compile µs | fused triton µs | fused ÷ compile |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['fused_s'] / r['compile_s']:.2f}" if r["compile_s"] else "n/a"
        eager = "n/a" if r["eager_floor_s"] is None else f"{r['eager_floor_s'] * 1e6:.1f}"
        lines.append(f"| {r['op']} | {r['pass']} | {r['device']} | {eager} | {r['compile_s'] * 1e6:.1f} | "
                     f"{r['fused_s'] * 1e6:.1f} | {ratio} |")
    return "\n".join(lines)


def kernel_table(results: list[Predicted], top: int = 10) -> str:
    out = []
    for r in results:
        if not r.label.startswith("step"):
            continue
        out += [f"\n{r.label} on {r.device}: the {top} slowest of {len(r.kernels)} Inductor kernel launches "
                f"(and {len(r.library)} library calls, {sum(t for *_, t in r.library) * 1e3:.2f} ms)\n",
                "| pass | kernel | config | µs | bound | GB | issue µs | bytes µs |",
                "|---|---|---|---|---|---|---|---|"]
        for k in sorted(r.kernels, key=lambda k: -k.predicted)[:top]:
            name = k.kernel if len(k.kernel) <= 60 else k.kernel[:57] + "..."
            out.append(f"| {k.pass_} | `{name}` | {k.config} | {k.predicted * 1e6:.1f} | {k.bound} | "
                       f"{k.dram_bytes / 1e9:.3f} | {k.t_issue * 1e6:.1f} | {k.t_bytes * 1e6:.1f} |")
    return "\n".join(out)


def library_table(results: list[Predicted]) -> str:
    """The library calls of each step, by aten op: where cuBLAS / cuDNN time goes."""
    out = []
    for r in results:
        if not r.label.startswith("step"):
            continue
        by_op: dict[str, list] = {}
        for pass_, call, t in r.library:
            row = by_op.setdefault(f"{call.op} ({pass_})", [0, 0, 0.0, 0.0])
            row[0] += 1
            row[1] += call.bytes
            row[2] += call.flops
            row[3] += t
        out += [f"\n{r.label} on {r.device}: library calls by op\n",
                "| op (pass) | calls | GB | GFLOP | predicted µs |", "|---|---|---|---|---|"]
        for name, (n, b, f, t) in sorted(by_op.items(), key=lambda kv: -kv[1][3]):
            out.append(f"| {name} | {n} | {b / 1e9:.3f} | {f / 1e9:.1f} | {t * 1e6:.1f} |")
    return "\n".join(out)


def long_rows(steps: list[dict], ops: list[dict]) -> list[dict]:
    date, versions = _dt.date.today().isoformat(), cost._versions()
    size = f"B={cost.BATCH},{cost.SIZE}x{cost.SIZE},bf16-autocast"
    rows = []

    def add(op, provider, pass_, device, value, metric="predicted", unit="s"):
        rows.append({"op": op, "provider": provider, "pass": pass_, "metric": metric, "unit": unit, "value": value,
                     "size": size, "device": device, "date": date, "versions": versions,
                     "model_version": cost.MODEL_VERSION, "error_band": list(cost.ERROR_BAND)})
    for r in steps:
        step = f"step ({r['variant']})"
        add(step, "eager", "fwd+bwd", r["device"], r["eager_floor_s"], "floor")
        add(step, "torch.compile", "fwd+bwd", r["device"], r["compile_s"])
        add(step, "torch.compile", "fwd", r["device"], r["compile_forward_s"])
        add(step, "torch.compile", "bwd", r["device"], r["compile_backward_s"])
        add(step, "torch.compile", "fwd+bwd", r["device"], r["compile_bytes"], "dram_bytes", "bytes")
        add(step, "torch.compile", "fwd+bwd", r["device"], r["compile_library_s"], "library_predicted")
        add("step (triton)", "triton", "fwd+bwd", r["device"], r["triton_s"])
        add("step (triton)", "triton+torch.compile", "fwd+bwd", r["device"], r["triton_compile_s"])
    for r in ops:
        add(r["op"], "eager", r["pass"], r["device"], r["eager_floor_s"], "floor")
        add(r["op"], "torch.compile", r["pass"], r["device"], r["compile_s"])
        add(r["op"], "triton", r["pass"], r["device"], r["fused_s"])
    return rows


def report(steps: list[dict], ops: list[dict], results: list[Predicted]) -> str:
    lo, hi = cost.ERROR_BAND
    head = (f"# torch.compile predicted, cost model {cost.MODEL_VERSION}, {_dt.date.today().isoformat()} "
            f"({cost._versions()})\n\n"
            "`python -m msf.profiling.inductor` on a CPU-only machine: Inductor's own CUDA kernels for each graph, "
            "generated for the GPU named (method: the module's docstring), built with ptxas and predicted by the "
            "cost model; library calls (cuBLAS / cuDNN) at max(bytes ÷ bandwidth, FLOPs ÷ tensor peak) + a launch. "
            f"Predictions, not measurements: the model's band is {lo}-{hi}× the measured time on the calibration set "
            "(none of it Inductor's code), so each compile figure carries the measured times that band allows. "
            "Eager floors: `msf.bench.eager_bytes`. Triton: `msf.profiling.cost` (fused ops) + the eager rest's byte "
            "floor and a launch for each of its ops; triton + torch.compile: the same fused ops (the blocks' casting "
            "their own weights: a compiled step lends no copies) + Inductor's predicted code for the rest.\n")
    parts = [head, "## Training step\n", step_table(steps)]
    if ops:
        parts += ["\n## Per op (each fused op's eager reference compiled alone)\n", op_table(ops)]
    parts += ["\n## Where torch.compile's step goes", kernel_table(results), library_table(results)]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", default=["h100", "a100"], choices=sorted(cost.DEVICES))
    parser.add_argument("--variant", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--ops", action="store_true", help="also each fused op's eager reference alone")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--png", type=Path, help="the step chart (msf.bench.plots.plot_compile)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # Inductor's kernels must stay JIT functions
        from msf.profiling.report import _rerun_without_interpreter
        return _rerun_without_interpreter(sys.argv[1:] if argv is None else argv, "msf.profiling.inductor")
    results, steps, ops = [], [], []
    for key in args.device:
        device = cost.DEVICES[key]
        compiled = {}
        for variant in args.variant:
            fn, inputs = step_function(variant)
            compiled[variant] = predict(f"step ({variant})", fn, inputs, device)
        if args.ops:
            for op, stage in cost.op_instances():
                if op == "upsample_argmax":  # inference only: not in a training step
                    continue
                fn, inputs = op_function(op, stage)
                compiled[cost.op_label(op, stage)] = predict(cost.op_label(op, stage), fn, inputs, device)
        costs = fused_costs(device)
        steps += step_rows(device, compiled, fused_step_seconds(costs),
                           fused_step_seconds(compiled_fused_costs(costs, device)))
        ops += op_rows(device, compiled, costs)
        results += compiled.values()
    text = report(steps, ops, results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(long_rows(steps, ops), indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    if args.png:
        from msf.bench.plots import plot_compile
        plot_compile(long_rows(steps, ops), args.png, f"torch.compile predicted (cost model {cost.MODEL_VERSION}, "
                     f"bars: the measured range its band allows), {_dt.date.today().isoformat()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
