"""torch.compile predicted on the CPU (`msf.profiling.inductor`): Inductor's CUDA code is generated
for sm_90 / sm_80 without a GPU, and each of its launches is costed like this project's kernels.

Inductor's kernels must be compiled Triton functions, so the end-to-end checks run in one
subprocess without TRITON_INTERPRET (the test session has it on), which prints what it measured as
JSON; the assertions here compare that with counts made by hand:
- one pointwise kernel over N fp32 elements moves exactly 8·N bytes in N / XBLOCK programs;
- a row sum with rows longer than Inductor's largest reduction block runs a looped reduction,
  whose SASS loop gets ⌈r0_numel / R0_BLOCK⌉ trips, and reads its input once;
- a small training step (LayerNorm, a bf16 Linear, GELU, dropout) has Triton kernels forward and
  backward, a cuBLAS mm of 2·M·N·K FLOPs, and code generated for the target's compute capability;
- the triton model's step hands Inductor its fused ops as `msf::` operators, forward and backward.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from msf.profiling import inductor

from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, math, sys
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from msf.bench.eager_bytes import CudaAutocastEmulation
from msf.profiling import cost, inductor

out = {}
mode = FakeTensorMode()

def fake(*shape, grad=False):
    with mode:
        t = torch.empty(*shape)
    return t.requires_grad_(grad)

# 1. one pointwise kernel
n = 1_000_003
r = inductor.predict("pointwise", lambda x: x * 2 + 1, [fake(n)], cost.H100, log=lambda s: None)
out["pointwise"] = [{"bytes": k.dram_bytes, "programs": k.programs, "config": k.config, "pass": k.pass_}
                    for k in r.kernels]
out["pointwise_library"] = len(r.library)

# 2. a looped reduction (rows long enough for a SASS loop, unrolled by LLVM): each config of each launch
rows, cols = 1024, 1 << 20
with inductor.cuda_target(cost.H100):
    graphs = inductor.compile_graphs(lambda x: x.sum(dim=1), [fake(rows, cols)])
    calls = [c for g in graphs for c in inductor.record_calls(g)]
out["rowsum"] = []
for i, call in enumerate(calls):
    for launch in inductor.launches(call, "rowsum", "forward", 90):
        k = inductor.predict_launch(launch, cost.H100)
        out["rowsum"].append({"call": i, "r0_numel": launch.args.get("r0_numel"),
                              "R0_BLOCK": launch.args.get("R0_BLOCK"), "trips": [l[3] for l in k.loop_bodies],
                              "unmatched": k.unmatched_loops, "bytes": k.dram_bytes,
                              "sass_bytes": k.sass_bytes})

# 3. a small training step, on both targets
m, c, h = 512, 64, 128
def step(x, w, b, g):
    with CudaAutocastEmulation(torch.bfloat16):
        y = F.layer_norm(x, (c,), g, b)
        return F.dropout(F.gelu(F.linear(y, w)), 0.1, True).float().sum()
inputs = [fake(m, c, grad=True), fake(h, c, grad=True), fake(c, grad=True), fake(c, grad=True)]
for dev in (cost.H100, cost.A100):
    with inductor.cuda_target(dev):
        graphs = inductor.compile_graphs(step, inputs)
    out[f"sources_{dev.key}"] = [(g.pass_, "empty_strided_cuda" in g.source) for g in graphs]
    r = inductor.predict("step", step, inputs, dev, log=lambda s: None)
    out[f"step_{dev.key}"] = {
        "passes": sorted({k.pass_ for k in r.kernels}),
        "registers": min(k.registers for k in r.kernels),
        "unmatched": sum(k.unmatched_loops for k in r.kernels),
        "mm_flops": sorted(call.flops for _, call, _ in r.library if "mm" in call.op),
        "mm_low_precision": all(call.low_precision for _, call, _ in r.library if "mm" in call.op),
        "total": r.total(), "kernels": sum(k.predicted for k in r.kernels),
        "library": sum(t for *_, t in r.library)}
    out[f"arch_{dev.key}"] = all(f"cc={dev.arch}," in g.source for g in graphs)

# 4. the triton model's step: which msf:: operators Inductor is handed
fn, inputs = inductor.step_function("triton", batch=1, size=64)
with inductor.cuda_target(cost.H100):
    graphs = inductor.compile_graphs(fn, inputs)
    calls = {g.pass_: sorted({c.op for c in inductor.record_calls(g)
                              if isinstance(c, inductor.LibraryCall) and c.op.startswith("msf.")}) for g in graphs}
out["triton_step_operators"] = calls
print("PROBE" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def probe():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler for the fake CUDA device guard (msf.profiling.inductor.fake_cuda_guard)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


def _config(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if "=" in kv)}


def test_one_pointwise_kernel_moves_its_input_and_output_once(probe):
    n = 1_000_003
    (kernel,) = probe["pointwise"]
    assert probe["pointwise_library"] == 0
    assert kernel["bytes"] == 8 * n, kernel  # an fp32 read and an fp32 write per element
    xblock = _config(kernel["config"])["XBLOCK"]
    assert kernel["programs"] == -(-n // xblock), kernel


def test_looped_reduction_reads_its_input_once_and_loops_row_over_block(probe):
    """The SASS loop is found, tied to its header in the generated file and counted: the loads it
    issues (LDG width × lanes × warps × trips, + the peeled iterations) come to the input once."""
    rows, cols = 1024, 1 << 20
    launches = probe["rowsum"]
    assert any(k["trips"] for k in launches), f"no SASS loop among {launches}"
    read = 4 * rows * cols
    for k in launches:
        assert k["unmatched"] == 0, k
        assert k["R0_BLOCK"] and -(-k["r0_numel"] // k["R0_BLOCK"]) > 1, k
        assert read <= k["bytes"] <= read + 4 * rows, k           # one read of x, one write of the sums
        assert read <= k["sass_bytes"] <= 1.01 * read, k          # and that is what the SASS loads


def test_small_training_step_on_both_targets(probe):
    m, c, h = 512, 64, 128
    for dev in ("h100", "a100"):
        step = probe[f"step_{dev}"]
        assert step["passes"] == ["backward", "forward"], step
        assert step["registers"] > 0 and step["unmatched"] == 0
        # forward x·wᵀ, backward dx = dy·w and dw = dyᵀ·x: each 2·M·N·K
        assert step["mm_flops"] == [2 * m * c * h] * 3, step
        assert step["mm_low_precision"]
        assert step["total"] == pytest.approx(step["kernels"] + step["library"])
        assert all(cuda for _, cuda in probe[f"sources_{dev}"])
        assert probe[f"arch_{dev}"]  # Inductor's kernels carry the target's compute capability


def test_triton_step_hands_inductor_the_fused_operators(probe):
    ops = probe["triton_step_operators"]
    # (a stage's last FFN sublayer takes the stage's final norm in, both ways: ffn_stage_output; the patch
    # embeddings' norms are inside the blocks)
    fused = {"attention_block", "ffn_sublayer", "ffn_stage_output", "decoder_fold", "decoder_mlp", "head_loss", "lmsa_classifier"}
    assert {op.split(".")[1] for op in ops["forward"]} == fused, ops
    assert {op.split(".")[1] for op in ops["backward"]} == {f"{op}_backward" for op in fused}, ops


def test_loop_trip_counts_by_header():
    looped = inductor.InductorLoop("k", "    for r0_offset in tl.range(0, r0_numel, R0_BLOCK, num_stages=2):")
    assert looped.site_counts({"r0_numel": 1000, "R0_BLOCK": 128}, (0, 0, 0)) == [8]
    mixed = inductor.InductorLoop("k", "    for _ in tl.range(0, split_size, XBLOCK, num_stages=NUM_STAGES):")
    a = {"RSPLIT_SIZE": 64, "xnumel": 130, "XBLOCK": 8}
    assert [mixed.site_counts(a, (pid, 0, 0))[0] for pid in range(3)] == [8, 8, 1]  # the last program: 2 rows
    with pytest.raises(LookupError, match="no trip count"):
        inductor.InductorLoop("k", "    while True:").site_counts({}, (0, 0, 0))
    with pytest.raises(LookupError, match="no value for 'ks0'"):
        inductor.InductorLoop("k", "    for r0_offset in range(0, ks0, R0_BLOCK):").site_counts({"R0_BLOCK": 4},
                                                                                              (0, 0, 0))


def test_template_loops_take_their_trips_from_the_template_constants():
    """A template states its sizes as constants: the mm template's K loop runs ⌈K / BLOCK_K⌉ trips
    (÷ LLVM's unroll), FlexAttention's key loop with no block mask ⌈KV_LEN / BLOCK_N⌉; a template
    without them is an error, not a guess."""
    source = ("    K = 8192", "    BLOCK_K : tl.constexpr = 64", "    KV_LEN = 4096",
              "    BLOCK_N : tl.constexpr = 128", "    BLOCK_N : tl.constexpr = 64")  # (the first of a name counts)
    constants = inductor.template_constants(source)
    assert dict(constants) == {"K": 8192, "BLOCK_K": 64, "KV_LEN": 4096, "BLOCK_N": 128}
    k_loop = inductor.InductorLoop("k", "    for k_idx in range(0, tl.cdiv(K, BLOCK_K)):", constants=constants)
    assert k_loop.site_counts({}, (0, 0, 0)) == [128]
    assert inductor.InductorLoop("k", k_loop.header, unrolled=2, constants=constants).site_counts({}, (0, 0, 0)) == [64]
    flex = inductor.InductorLoop("k", "        for start_n in range(block_n_start, block_n_end):", constants=constants)
    assert flex.site_counts({}, (3, 0, 0)) == [32]
    with pytest.raises(LookupError, match="KV_LEN"):
        inductor.InductorLoop("k", flex.header).site_counts({}, (0, 0, 0))
    with pytest.raises(LookupError, match="no value"):
        inductor.InductorLoop("k", "    for k_idx in range(0, tl.cdiv(K, BLOCK_K)):").site_counts({}, (0, 0, 0))


def test_step_function_names_its_variants():
    with pytest.raises(ValueError, match="variant must be one of"):
        inductor.step_function("fused")


def test_unroll_factor_from_the_loads_of_a_loop_body():
    """A loop LLVM unrolled 42 times: 42 LDG.128 of line 36 per pass, each iteration's load a 1×2048
    fp32 block (8 KB) read by 16 warps × 32 lanes × 16 bytes = 8 KB per LDG: 42 iterations a pass."""
    from msf.profiling import cost
    ttir = "\n".join([
        "    %0 = tt.load %p, %m evictionPolicy = evict_first : tensor<1x2048x!tt.ptr<f32>> loc(#loc41)",
        "    %1 = tt.load %q : !tt.ptr<bf16> loc(#loc2)",
        '#loc1 = loc("/tmp/k.py":25:21)', '#loc2 = loc("/tmp/k.py":20:9)', '#loc11 = loc("/tmp/k.py":36:54)',
        '#loc26 = loc("xmask"(#loc1))', '#loc35 = loc("tmp0"(#loc11))', "#loc41 = loc(fused[#loc35, #loc26])"])
    loads = inductor.load_bytes_by_line(ttir)
    assert loads == {36: 1 * 2048 * 4, 20: 2}
    body = [cost.Instr(16 * i, "LDG.E.EF.128", "", "/tmp/k.py", 36) for i in range(42)]
    body += [cost.Instr(16 * 42, "FADD", "", "/tmp/k.py", 38), cost.Instr(16 * 43, "BRA", "", "/tmp/k.py", 30)]
    loop = cost.SassLoop(0, 16 * 43, "/tmp/k.py", 30)
    assert inductor.unroll_factor(loop, body, warps=16, loads=loads) == 42
    assert inductor.unroll_factor(loop, body[42:], warps=16, loads=loads) == 1  # no loads: 1, as far as known
    looped = inductor.InductorLoop("k", "    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):", unrolled=42)
    assert looped.site_counts({"r0_numel": 1 << 20, "R0_BLOCK": 2048}, (0, 0, 0)) == [512 // 42]


def test_library_flops_of_a_depthwise_convolution_and_its_backward():
    """Forward 2·N·H·W·C·k² for a depthwise k×k; each gradient asked for costs one forward (torch's own
    counter takes the backward of a grouped convolution for a dense one)."""
    import torch
    n, c, h, w, k = 2, 64, 32, 32, 7
    x, weight = torch.empty(n, c, h, w, device="meta"), torch.empty(c, 1, k, k, device="meta")
    forward = 2 * n * h * w * c * k * k
    out = torch.ops.aten.convolution(x, weight, None, [1, 1], [3, 3], [1, 1], False, [0, 0], c)
    assert inductor.library_flops(torch.ops.aten.convolution.default,
                                  (x, weight, None, [1, 1], [3, 3], [1, 1], False, [0, 0], c), {}, out) == forward
    args = (out, x, weight, None, [1, 1], [3, 3], [1, 1], False, [0, 0], c, [True, True, False])
    grads = torch.ops.aten.convolution_backward(*args)
    assert inductor.library_flops(torch.ops.aten.convolution_backward.default, args, {}, grads) == 2 * forward
    args = args[:-1] + ([False, True, False],)
    assert inductor.library_flops(torch.ops.aten.convolution_backward.default, args, {}, grads) == forward


def test_library_roofline():
    from msf.profiling import cost
    dense = inductor.LibraryCall("aten.mm.out", bytes=3_000_000, flops=8e9, low_precision=True)
    assert inductor.library_time(dense, cost.H100) == pytest.approx(8e9 / cost.H100.tc_bf16 + cost.LAUNCH_S)
    depthwise = inductor.LibraryCall("aten.convolution.default", bytes=3_000_000, flops=8e9, low_precision=True,
                                     tensor_cores=False)
    # H100: 132 SMs × 4 schedulers × 32 FP32 lanes × 2 × 1.755 GHz = 59.3 TFLOP/s
    assert inductor.simt_flops(cost.H100) == pytest.approx(59.3e12, rel=1e-3)
    assert inductor.library_time(depthwise, cost.H100) == pytest.approx(8e9 / 59.3e12 + cost.LAUNCH_S, rel=1e-3)
    streaming = inductor.LibraryCall("aten.mm.out", bytes=3e9, flops=1e9, low_precision=False)
    assert inductor.library_time(streaming, cost.A100) == pytest.approx(3e9 / cost.A100.bandwidth + cost.LAUNCH_S)


def test_a_stale_extension_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """torch's extension build waits for its lock file to go away, forever; a run killed mid-build
    leaves it. One older than any build is removed before the build; a fresh one (a build under way
    in another process) is left alone."""
    import time
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    lock = tmp_path / "guard" / "lock"
    lock.parent.mkdir()
    lock.touch()
    inductor._clear_stale_build_lock("guard")
    assert lock.exists(), "a lock younger than any build is another process's"
    old = time.time() - inductor._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    inductor._clear_stale_build_lock("guard")
    assert not lock.exists()
    inductor._clear_stale_build_lock("guard")  # no lock: nothing to do
