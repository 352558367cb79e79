"""The cost model against the calibration set (msf.profiling.calibrate): its pieces, and the whole
report where the bench extra (liger-kernel) is installed."""
from __future__ import annotations

import importlib.util
import json

import pytest

from msf.profiling import calibrate, cost


def test_access_widths_of_global_loads_and_stores():
    assert cost.global_access_bytes("LDG.E.128.CONSTANT") == 16
    assert cost.global_access_bytes("STG.E.64") == 8
    assert cost.global_access_bytes("LDG.E") == 4
    assert cost.global_access_bytes("LDG.E.U16.CONSTANT") == 2
    assert cost.global_access_bytes("STG.E.U8") == 1
    assert cost.global_access_bytes("LDGSTS.E.BYPASS.128") == 16
    assert cost.global_access_bytes("LDS.128") == 0 and cost.global_access_bytes("FFMA") == 0


def test_launch_fit_is_the_least_squares_line_through_the_empty_launches():
    rows = [{"op": "ceiling", "metric": "empty launch", "size": f"{n} programs", "p50": 3.0 + 0.001 * n}
            for n in (1, 132, 1056, 8448)] + [{"op": "x", "metric": "time", "size": "{}", "p50": 9.0}]
    base, per_program = calibrate.launch_fit(rows)
    assert base == pytest.approx(3.0e-6) and per_program == pytest.approx(1e-9)
    assert calibrate.launch_fit([]) == (0.0, 0.0)


def test_without_liger_it_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "liger_kernel", None)
    assert calibrate.main([]) == 2
    assert "run.py extra bench" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed (bench extra)")
def test_the_report_covers_every_forward_case(tmp_path):
    """Every forward case predicted on both cards from its recorded launches (no loop left without a
    trip formula), the host-bound ones marked by the rule the docstring states, and a spread per
    candidate over the rest."""
    out = tmp_path / "c.json"
    assert calibrate.main(["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    forward = [r for r in data["rows"] if r["pass"] == "forward"]
    assert forward and all(r["predicted_h200_us"] > 0 for r in forward)
    assert all(r["predicted_h100nvl_us"] > 0 for r in forward if r["published_us"])
    assert all(r["unmatched_loops"] == 0 for r in forward)
    # a tensor-core GEMM and an attention kernel (PyTorch's own Triton code) are among the predicted
    assert {"tensor-core GEMM", "attention"} <= {t for r in forward for t in r["traits"]}
    for r in forward:
        if r["published_us"] is None:
            assert not r["host_bound"] and len(r["ratios"][next(iter(calibrate.CANDIDATES))]) == 1
            continue
        assert r["host_bound"] == (r["measured_us"] is not None and r["measured_us"] > r["published_us"])
        # the H200 has more bandwidth than the H100 NVL: a byte-bound prediction is smaller there
        if r["bound"] == "bytes":
            assert r["predicted_h200_us"] < r["predicted_h100nvl_us"]
    assert data["spread"]["model_version"] == cost.MODEL_VERSION
    assert set(calibrate.CANDIDATES) <= set(data["spread"])
    # the model's stated band holds every ratio; the rows its constants were fitted on meet the
    # issue's target, and some rows were held out of that fit
    label = next(iter(calibrate.CANDIDATES))
    model = data["spread"][label]
    assert cost.ERROR_BAND[0] <= model["min"] + 1e-9 and model["max"] <= cost.ERROR_BAND[1] + 1e-9, model
    fitted, held = data["spread"][f"{label}, fitted rows"], data["spread"][f"{label}, held out rows"]
    assert calibrate.TARGET[0] <= fitted["min"] and fitted["max"] <= calibrate.TARGET[1], fitted
    assert held["ratios"] >= 10 and fitted["ratios"] + held["ratios"] == model["ratios"]


TTIR = """module {
  tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc)), %y_ptr: !tt.ptr<f32> loc("y_ptr"(#loc)), %idx_ptr: !tt.ptr<i32> loc("i"(#loc)), %unused: !tt.ptr<f32> loc("u"(#loc)), %n: i32 loc("n"(#loc))) attributes {noinline = false} {
    %offs = tt.make_range {end = 128 : i32, start = 0 : i32} : tensor<128xi32> loc(#loc1)
    %ip = tt.splat %idx_ptr : !tt.ptr<i32> -> tensor<128x!tt.ptr<i32>> loc(#loc2)
    %ip_1 = tt.addptr %ip, %offs : tensor<128x!tt.ptr<i32>>, tensor<128xi32> loc(#loc2)
    %idx = tt.load %ip_1 : tensor<128x!tt.ptr<i32>> loc(#loc3)
    %xp = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>> loc(#loc4)
    %xp_2 = tt.addptr %xp, %idx : tensor<128x!tt.ptr<f32>>, tensor<128xi32> loc(#loc4)
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %cst, %p = %xp_2) -> (tensor<128xf32>, tensor<128x!tt.ptr<f32>>) : i32 {
      %v = tt.load %p : tensor<128x!tt.ptr<f32>> loc(#loc5)
      %p_3 = tt.addptr %p, %offs : tensor<128x!tt.ptr<f32>>, tensor<128xi32> loc(#loc6)
      scf.yield %v, %p_3 : tensor<128xf32>, tensor<128x!tt.ptr<f32>> loc(#loc7)
    } loc(#loc8)
    tt.store %xp_2, %r#0 : tensor<128x!tt.ptr<f32>> loc(#loc9)
    %yp = tt.splat %y_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>> loc(#loc10)
    %w = arith.select %cond, %yp, %xp : tensor<128xi1>, tensor<128x!tt.ptr<f32>> loc(#loc11)
    tt.store %w, %r#0 : tensor<128x!tt.ptr<f32>> loc(#loc12)
    tt.return loc(#loc13)
  } loc(#loc)
} loc(#loc)
"""


def test_tensor_access_follows_pointers_not_indices():
    """Loads and stores walked back to their parameters: through splat / addptr (its pointer operand
    only: %idx, a loaded index, does not make idx_ptr stored), a loop-carried pointer, and both arms
    of a select; an unused pointer is not accessed."""
    access = cost.tensor_access(TTIR)
    assert access == {"idx_ptr": {"load"}, "x_ptr": {"load", "store"}, "y_ptr": {"store"}}


def test_dram_bytes_count_in_place_twice():
    import torch
    from types import SimpleNamespace
    args = {"x_ptr": torch.empty(1000, dtype=torch.float32), "y_ptr": torch.empty(500, dtype=torch.float32),
            "n": 7}
    launch = SimpleNamespace(args=args)
    # x read and written (4000 B twice), y written (2000 B)
    assert cost.dram_bytes(launch, {"x_ptr": {"load", "store"}, "y_ptr": {"store"}}) == 10000
    assert cost.dram_bytes(launch, {}) == 6000.0   # no access map: v1's floor


def test_l2_miss_fraction_ramps_over_the_reuse_distance(monkeypatch):
    monkeypatch.setattr(cost, "L2_RAMP", (0.5, 2.0))
    l2 = 1000
    assert cost.l2_miss_fraction(400, l2) == 0.0          # well inside L2: hits
    assert cost.l2_miss_fraction(1250, l2) == pytest.approx(0.5)
    assert cost.l2_miss_fraction(5000, l2) == 1.0         # far beyond it: every line from DRAM


def _loop(start, end):
    return cost.SassLoop(start, end, "k.py", 1)


def test_a_second_pass_misses_l2_only_when_the_reuse_distance_is_large(monkeypatch):
    """Two sibling loops each reading all of x (cross-entropy's two passes over a row): the second
    is a re-read that misses by the ramp of resident programs × one program's bytes; the same two
    passes inside an enclosing tile loop are one tile apart and hit; one region re-reading x many
    times (stencil taps) is never a second pass; nor are loops that different programs run
    (exclusive branches)."""
    monkeypatch.setattr(cost, "L2_RAMP", (0.5, 2.0))
    sizes = {"x": 4000}
    loops = [_loop(100, 200), _loop(300, 400)]
    passes = {frozenset({"x"}): {0: cost._Pass(120, 4000.0), 1: cost._Pass(320, 4000.0)}}
    every = {0: None, 1: None}
    args = dict(sizes=sizes, loops=loops, trips_total={0: 10, 1: 10}, runs=every, programs=10)
    # one pass = 8000 B over 10 programs: 800 B a program; 10 resident: 8000 B apart
    assert cost.repass_bytes(passes, **args, resident_programs=10, one_pass=8000, l2_bytes=10 ** 6) == 0.0
    assert cost.repass_bytes(passes, **args, resident_programs=10, one_pass=8000, l2_bytes=1000) == 4000.0
    half = cost.repass_bytes(passes, **args, resident_programs=10, one_pass=8000, l2_bytes=8000 // 1.25)
    assert half == pytest.approx(0.5 * 4000)
    # inside a tile loop of 100 trips a program: 8 B apart, hits
    tiled = loops + [_loop(50, 450)]
    assert cost.repass_bytes(passes, sizes=sizes, loops=tiled, trips_total={0: 10, 1: 10, 2: 1000},
                             runs={0: None, 1: None, 2: None}, programs=10, resident_programs=10,
                             one_pass=8000, l2_bytes=1000) == 0.0
    # exclusive branches: programs 0-4 run loop 0, programs 5-9 loop 1
    split = {0: {(i, 0, 0) for i in range(5)}, 1: {(i, 0, 0) for i in range(5, 10)}}
    assert cost.repass_bytes(passes, sizes=sizes, loops=loops, trips_total={0: 5, 1: 5}, runs=split, programs=10,
                             resident_programs=10, one_pass=8000, l2_bytes=1000) == 0.0
    # every program runs the first pass, half of them the second (which moved 2000 B): all of it counts
    half_later = {0: None, 1: {(i, 0, 0) for i in range(5)}}
    passes_half = {frozenset({"x"}): {0: cost._Pass(120, 4000.0), 1: cost._Pass(320, 2000.0)}}
    assert cost.repass_bytes(passes_half, sizes=sizes, loops=loops, trips_total={0: 10, 1: 5}, runs=half_later,
                             programs=10, resident_programs=10, one_pass=8000, l2_bytes=1000) == 2000.0
    # one region moving x many times over: no second pass
    stencil = {frozenset({"x"}): {0: cost._Pass(120, 49 * 4000.0)}}
    assert cost.repass_bytes(stencil, **args, resident_programs=10, one_pass=8000, l2_bytes=1000) == 0.0


TTIR_LOCS = """#loc = loc("/src/kern.py":10:0)
#loc1 = loc("/src/kern.py":12:20)
#loc2 = loc("/src/helper.py":40:16)
#loc3 = loc("v"(#loc1))
#loc4 = loc(callsite(#loc2 at #loc1))
module {
  tt.func public @k(%x_ptr: !tt.ptr<f32> loc("x_ptr"(#loc)), %w_ptr: !tt.ptr<f32> loc("w_ptr"(#loc))) {
    %xp = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>> loc(#loc1)
    %v = tt.load %xp : tensor<128x!tt.ptr<f32>> loc(#loc3)
    %wp = tt.splat %w_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>> loc(#loc1)
    %w = tt.load %wp : tensor<128x!tt.ptr<f32>> loc(#loc4)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
"""


def test_load_lines_tie_each_load_to_the_line_nvdisasm_reports():
    """A load's location resolved to (file base name, line): a named location to its target; an
    inlined helper's load to the helper's own line (nvdisasm's line info names the callee), which
    Inductor's resolver, caller first, reads as the caller's line."""
    assert cost.load_lines(TTIR_LOCS) == {("kern.py", 12): {"x_ptr"}, ("helper.py", 40): {"w_ptr"}}
    defs = {m.group(1): m.group(2) for m in map(cost.TTIR_LOC.match, TTIR_LOCS.splitlines()) if m}
    assert cost.loc_line("#loc4", defs, callee_first=False) == ("kern.py", 12)


TTIR_REUSED_NAMES = """module {
  tt.func public @k(%x_ptr: !tt.ptr<f32> loc("x_ptr"(#loc)), %y_ptr: !tt.ptr<f32> loc("y_ptr"(#loc)), %n: i32 loc("n"(#loc))) {
    %yp = tt.splat %y_ptr : !tt.ptr<f32> -> tensor<8x!tt.ptr<f32>> loc(#loc1)
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%arg5 = %yp) -> (tensor<8x!tt.ptr<f32>>) : i32 {
      tt.store %arg5, %cst : tensor<8x!tt.ptr<f32>> loc(#loc2)
      scf.yield %arg5 : tensor<8x!tt.ptr<f32>> loc(#loc3)
    } loc(#loc4)
    %xp = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<8x!tt.ptr<f32>> loc(#loc5)
    %1 = scf.for %j = %c0 to %n step %c1 iter_args(%arg5 = %xp) -> (tensor<8x!tt.ptr<f32>>) : i32 {
      %v = tt.load %arg5 : tensor<8x!tt.ptr<f32>> loc(#loc6)
      scf.yield %arg5 : tensor<8x!tt.ptr<f32>> loc(#loc7)
    } loc(#loc8)
    tt.return loc(#loc9)
  } loc(#loc)
} loc(#loc)
"""


def test_tensor_access_resolves_each_use_against_the_definitions_before_it():
    """MLIR reuses region-argument names (%arg5 in two loops here, %arg8 in every reduce region of
    a real kernel): each load or store is resolved when it is read, so the first loop's store
    stays y's and the second loop's load x's."""
    assert cost.tensor_access(TTIR_REUSED_NAMES) == {"y_ptr": {"store"}, "x_ptr": {"load"}}
