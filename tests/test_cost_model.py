"""The cost model's trip-count formulas (`msf.profiling.cost.LOOPS`) against the loop iterations each
program really runs under the interpreter, its pinned-config table, and a one-kernel smoke run of
`python -m msf.profiling.cost` (one sm_90 build).

Counting: `InterpretedFunction.run` is wrapped to note each launch's arguments; during the launch
a `sys.settrace` tracer counts, per program (the interpreter's grid index), how often each loop's
counted line (`msf.profiling.cost.loop_lines`) executes. The kernels themselves are not touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from msf.kernels import configs
from msf.profiling import cost

from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


class LoopCounter:
    """Records [(kernel name, scalar args, grid, {pid: Counter((file, line))})] of every launch."""

    def __init__(self):
        self.launches = []
        self.lines = {}   # (file, counted line) -> (Loop, occurrence)
        for lp in cost.LOOPS:
            for i, (path, _, body) in enumerate(cost.loop_lines(lp)):
                self.lines[(os.path.realpath(path), body)] = (lp, i)
        self.files = {f for f, _ in self.lines}

        self._paths: dict = {}
        self._holds: dict = {}

    def path_of(self, code) -> str:
        path = self._paths.get(code.co_filename)
        if path is None:
            path = self._paths[code.co_filename] = os.path.realpath(code.co_filename)
        return path

    def holds_counted_line(self, code) -> bool:
        held = self._holds.get(code)
        if held is None:
            path = self.path_of(code)
            held = path in self.files and any((path, ln) in self.lines for _, _, ln in code.co_lines() if ln)
            self._holds[code] = held
        return held

    def __enter__(self):
        from triton.runtime import interpreter
        self._interp = interpreter
        self._run = interpreter.InterpretedFunction.run
        counter = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            named = {**dict(zip(fn_self.arg_names, args)), **kwargs}
            g = grid(named) if callable(grid) else grid
            g = tuple(g) + (1,) * (3 - len(g))
            per_pid: dict = defaultdict(Counter)
            scalars = {k: v for k, v in named.items() if isinstance(v, (int, float, bool))}
            counter.launches.append((fn_self.fn.__name__, scalars, g, per_pid))

            def local(frame, event, arg):
                if event == "line":
                    key = (counter.path_of(frame.f_code), frame.f_lineno)
                    if key in counter.lines:
                        per_pid[interpreter.interpreter_builder.grid_idx][key] += 1
                return local

            def global_trace(frame, event, arg):  # trace only the frames of functions holding a counted line
                return local if counter.holds_counted_line(frame.f_code) else None

            old = sys.gettrace()
            sys.settrace(global_trace)
            try:
                return counter._run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                sys.settrace(old)

        interpreter.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self._interp.InterpretedFunction.run = self._run


def mismatches(counter: LoopCounter, loops: list[cost.Loop]) -> tuple[list[str], set]:
    """Every (launch, program, loop) where the formula's total differs from the counted
    iterations; and the loops that were checked at least once with a non-zero count."""
    bad, checked = [], set()
    for kernel, a, grid, per_pid in counter.launches:
        for lp in loops:
            if kernel not in lp.kernels:
                continue
            lines = [(os.path.realpath(p), body) for p, _, body in cost.loop_lines(lp)]
            for x in range(grid[0]):
                for y in range(grid[1]):
                    for z in range(grid[2]):
                        seen = sum(per_pid[(x, y, z)][key] for key in lines)
                        want = sum(lp.site_counts(a, (x, y, z)))
                        if seen != want:
                            bad.append(f"{kernel} pid {(x, y, z)} {lp.func}: {lp.header!r}: formula {want}, ran {seen}")
                        elif seen:
                            checked.add((lp.module, lp.func, lp.header))
    return bad, checked


@pytest.fixture(scope="module")
def counted():
    """One small run of every fused op (forward and backward) with the loop counter on."""
    from msf.kernels import attention_sublayer as sub, ffn_sublayer as ffn, head_loss as hl, lmsa, upsample_argmax as ua
    from msf.model import LMSAParams
    g = torch.Generator().manual_seed(0)
    with LoopCounter() as counter:
        logits = torch.randn(2, 19, 6, 5, generator=g, requires_grad=True)
        hl.head_loss(logits, torch.randint(0, 19, (2, 24, 20), generator=g)).backward()   # row kernels
        ua.upsample_argmax(logits.detach(), (24, 20))
        ua.upsample_argmax(logits.detach(), (13, 9))                                      # generic kernels
        wide = torch.randn(1, hl.FAST_MAX_K + 1, 3, 2, generator=g, requires_grad=True)
        hl.head_loss(wide, torch.randint(0, hl.FAST_MAX_K + 1, (1, 9, 6), generator=g)).backward()
        c, n, m = 32, 40, 24
        x, r = torch.randn(1, n, c, generator=g), torch.randn(1, n, c, generator=g)
        k, v = torch.randn(1, m, c, generator=g), torch.randn(1, m, c, generator=g)
        ws = [torch.randn(c, c, generator=g) * 0.1, torch.randn(c, generator=g), torch.randn(c, c, generator=g) * 0.1,
              torch.randn(c, generator=g)]
        leaves = [t.requires_grad_() for t in (x, r, k, v, *ws)]
        sub.attention_sublayer(*leaves, bwd_chunk_rows=16, wg_chunk_rows=16).sum().backward()
        # attention half: R = 2 on a 6×8 map (12 patches, one 32-patch tile) and R = 1
        from msf.kernels import attention_block as blk
        from msf.reference import AttentionBlockParams
        for ratio in (2, 1):
            c = 16
            conv = [torch.randn(c, c, ratio, ratio, generator=g) * 0.1, torch.randn(c, generator=g),
                    1 + torch.randn(c, generator=g) * 0.1, torch.randn(c, generator=g)] if ratio > 1 else [None] * 4
            bp = [1 + torch.randn(c, generator=g) * 0.1, torch.randn(c, generator=g), *conv,
                  torch.randn(2 * c, c, generator=g) * 0.2, torch.randn(2 * c, generator=g),
                  torch.randn(c, c, generator=g) * 0.2, torch.randn(c, generator=g),
                  torch.randn(c, c, generator=g) * 0.2, torch.randn(c, generator=g)]
            bp = AttentionBlockParams(*(None if t is None else t.requires_grad_() for t in bp))
            xb = torch.randn(1, 48, c, generator=g, requires_grad=True)
            blk.attention_block(xb, (6, 8), ratio, bp).sum().backward()
        # map LayerNorm: 2 images × 2 token tiles (C = 32: 128 tokens a tile) walked 2 at a time
        from msf.kernels import map_norm as mn
        xm = torch.randn(2, 32, 12, 13, generator=g, requires_grad=True)
        mn.map_layer_norm(xm, torch.ones(32, requires_grad=True), torch.zeros(32, requires_grad=True)).sum().backward()
        # FFN: 7 row tiles of 16 over 3 dx programs (3, 3, 1 tiles), 2 hidden slices, 24-row wgrad chunks
        c, hid = 32, 24
        ps = [torch.randn(*shape, generator=g) * 0.2 for shape in ((c,), (c,), (hid, c), (hid,), (c, hid), (c,))]
        xf = torch.randn(1, 100, c, generator=g, requires_grad=True)
        ffn.ffn_sublayer(xf, *(t.requires_grad_() for t in ps), wg_chunk_rows=24).sum().backward()
        # decoder MLP: 96 pixels = 6 tiles of 16 over 3 backward programs, 32-row weight-gradient chunks, adjoint
        # windows at factors 2 and 4 (stages 3 and 4 both at 2×3: every tap near a border)
        from msf.kernels import decoder_mlp as dec
        from msf.reference import DecoderParams
        e = 16
        feats = [torch.randn(1, 8, 8 // s, 12 // s, generator=g, requires_grad=True) for s in (1, 2, 4, 4)]
        dp = DecoderParams(tuple(torch.randn(e, 8, generator=g) * 0.3 for _ in range(4)),
                           tuple(torch.randn(e, generator=g) * 0.1 for _ in range(4)),
                           torch.randn(e, 4 * e, generator=g) * 0.1, torch.randn(e, generator=g) * 0.1,
                           torch.randn(e, e, generator=g) * 0.2, torch.randn(e, generator=g) * 0.1)
        for t in (*dp.unify_weights, *dp.unify_biases, dp.fuse1_weight, dp.fuse1_bias):
            t.requires_grad_()  # (the fold's backward kernel runs for parameters that want gradients)
        dec.decoder_mlp(feats, dp, 0.2, True, seed=torch.tensor([1])).sum().backward()
        # and stages that halve exactly (8×16 down to 1×2) in bf16: the one-launch pyramid adjoint
        feats = [torch.randn(1, 8, 8 // s, 16 // s, generator=g).bfloat16().requires_grad_() for s in (1, 2, 4, 8)]
        dp = DecoderParams(tuple(t.bfloat16() for t in dp.unify_weights), tuple(t.bfloat16() for t in dp.unify_biases),
                           *(t.bfloat16() for t in (dp.fuse1_weight, dp.fuse1_bias, dp.fuse2_weight, dp.fuse2_bias)))
        dec.decoder_mlp(feats, dp).sum().backward()
        c = 16
        xl = torch.randn(1, c, 9, 11, generator=g, requires_grad=True)
        red = 3 * c // 8
        p = LMSAParams(dw_weights=tuple(torch.randn(c, 1, kk, kk, generator=g) * 0.1 for kk in (3, 5, 7)),
                       pw_weights=tuple(torch.randn(c, c, generator=g) * 0.1 for _ in range(3)),
                       pw_biases=tuple(torch.randn(c, generator=g) * 0.1 for _ in range(3)),
                       fc1_weight=torch.randn(red, 3 * c, generator=g) * 0.1, fc1_bias=torch.zeros(red),
                       fc2_weight=torch.randn(3 * c, red, generator=g) * 0.1, fc2_bias=torch.zeros(3 * c))
        lmsa.lmsa(xl, p).sum().backward()
        # and with the classifier inside (its own gram kernel)
        head = (torch.randn(5, c, generator=g) * 0.1, torch.zeros(5))
        lmsa.lmsa_classifier(xl, p, *head).sum().backward()
    return counter


def test_trip_count_formulas_match_the_interpreter(counted):
    bad, checked = mismatches(counted, cost.LOOPS)
    assert not bad, "\n".join(bad[:20])
    unchecked = {(lp.module, lp.func, lp.header) for lp in cost.LOOPS} - checked
    assert not unchecked, f"loops no launch exercised: {sorted(unchecked)}"


def test_a_wrong_formula_is_caught(counted):
    """The check can fail: each formula off by one iteration is reported."""
    for lp in cost.LOOPS:
        wrong = cost.Loop(lp.module, lp.func, lp.header,
                          lambda a, pid, t=lp.trips: [n + 1 for n in (t(a, pid) if isinstance(t(a, pid), list)
                                                                       else [t(a, pid)])],
                          lp.count, lp.kernels)
        bad, _ = mismatches(counted, [wrong])
        assert bad, f"an off-by-one {lp.func} {lp.header!r} formula went unnoticed"


def test_pinned_table_entries_are_allowed_configs():
    """Every sm_90 / sm_80 / default entry is in its kernel's allow-list for the class (the configs
    `python -m msf.profiling.report` builds spill-free), every class has one, and the interpreter's is
    each kernel's list head (the configuration the parity tests were written against)."""
    from msf import kernels  # noqa: F401  registers every PinnedKernel
    table = configs.load_table()
    assert set(table) == set(configs.REGISTRY)
    for name, pk in configs.REGISTRY.items():
        for cls in pk.classes:
            allowed = [configs.to_entry(c) for c in pk.allowed(cls)]
            for kind in ("sm_90", "sm_80", configs.DEFAULT_KIND):
                entry = table[name][cls][kind]
                assert entry in allowed, (name, cls, kind, entry)
        assert table[name][configs.ANY_CLASS]["interpreter"] == configs.to_entry(pk.configs[0])


def test_pin_weighs_each_op_by_its_calls_a_step(monkeypatch):
    """`--pin` sums a kernel's predicted time over the ops of one step, each as often as a step runs
    it: a class that a step op (the attention block) and an op no step runs (the standalone attention
    sublayer) both launch is pinned by the step op's timing, however much the other op prefers
    another configuration (an unweighted sum picks the other one here)."""
    from msf.profiling import tune
    in_block, alone = (configs.triton.Config({"B": 1}, num_warps=4, num_stages=1),
                       configs.triton.Config({"B": 2}, num_warps=8, num_stages=1))
    monkeypatch.setitem(configs.REGISTRY, "fake.kernel",
                        SimpleNamespace(shape_class=lambda args: "c", allowed=lambda cls: [in_block, alone]))
    # (stage 2: a step runs its second block as attention_block, its first as attention_block_embedded)
    monkeypatch.setattr(cost, "op_instances", lambda: [("attention_block", 2), ("attention_sublayer", 2)])
    chosen = {}

    @contextlib.contextmanager
    def running(name, cfg):
        chosen["B"] = cfg.kwargs["B"]
        yield

    seconds = {("attention_block", 1): 10e-6, ("attention_block", 2): 11e-6,  # B = 1 wins inside the block
               ("attention_sublayer", 1): 50e-6, ("attention_sublayer", 2): 5e-6}
    monkeypatch.setattr(cost, "_override", running)
    monkeypatch.setattr(cost, "capture", lambda op, device, stage=None: [SimpleNamespace(kernel="fake.kernel", args={},
                                                                                          op=op)])
    monkeypatch.setattr(cost, "predict", lambda launch, device: SimpleNamespace(
        predicted=seconds[(launch.op, chosen["B"])], spill_bytes=0))
    monkeypatch.setattr(configs, "load_table", lambda: {})
    monkeypatch.setattr(configs, "reload_table", lambda: None)
    written = {}
    monkeypatch.setattr(tune, "write", lambda table, path: written.update(table))
    picks = cost.pin([cost.H100], log=lambda *args: None)
    assert picks[("fake.kernel", "c", "sm_90")].kwargs == {"B": 1}
    assert written["fake.kernel"]["c"]["sm_90"] == configs.to_entry(in_block)


def test_lookup_falls_back_and_names_what_is_missing():
    table = {"k": {"a": {"sm_90": configs.to_entry(configs.triton.Config({"B": 1}, num_warps=4, num_stages=1)),
                         "default": configs.to_entry(configs.triton.Config({"B": 2}, num_warps=8, num_stages=1))}}}
    assert configs.lookup("k", "a", "sm_90", table).kwargs == {"B": 1}
    assert configs.lookup("k", "a", "sm_86", table).kwargs == {"B": 2}
    with pytest.raises(KeyError, match="'k'.*'b'"):
        configs.lookup("k", "b", "sm_90", table)
    with pytest.raises(KeyError, match="'nope'"):
        configs.lookup("nope", "a", "sm_90", table)


def test_cost_command_smoke(tmp_path):
    """`python -m msf.profiling.cost` for one kernel on one device: a complete row, JSON rows written."""
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, "-m", "msf.profiling.cost", "--device", "h100", "--op", "head_loss",
                           "--kernel", "head_loss.fwd", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    rows = json.loads(out.read_text())
    metrics = {r["metric"]: r["value"] for r in rows if r["kernel"].startswith("head_loss.fwd")}
    assert metrics["registers"] > 0 and metrics["grid"] > 0 and metrics["unmatched_loops"] == 0
    assert metrics["dynamic_total"] > metrics["sass_total"]  # the pixel loop runs many times
    assert metrics["predicted"] == pytest.approx(
        max(metrics["t_issue"], metrics["t_pipe"], metrics["t_bytes"], metrics["t_flops"])
        + metrics["t_latency"] + metrics["t_launch"]) and metrics["predicted"] > 0
    assert metrics["t_latency"] > 0 and metrics["load_waves"] >= 1   # it loads, so it waits at least once
    assert any(r["op"] == "head_loss" and r["kernel"] == "(op)" and r["metric"] == "fused_predicted" for r in rows)


def test_the_capture_hands_each_kernel_what_the_model_does():
    """`python -m msf.profiling.cost --trace-model`: the dtypes and layouts of every captured launch
    (what the predictions are built from) against a bf16-autocast training step and predict of the
    triton model on meta tensors (CUDA autocast emulated, the launches recorded, not run), both
    ways. Then the check is shown to bite: the attention block's W_sr captured NCHW, where the model
    keeps it channels-last, is a mismatch of the weight cast's source layout. (The capture records
    compiled launches: it runs without the interpreter, in a process of its own.)"""
    code = """if True:
        import json
        from msf.profiling import cost
        as_is = cost.trace_model()
        made = cost._block_params
        cost._block_params = lambda c, ratio, new: [p.contiguous() if p is not None and p.dim() == 4 else p
                                                    for p in made(c, ratio, new)]
        print(json.dumps([as_is, cost.trace_model()]))"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    as_is, nchw_sr = json.loads(proc.stdout.strip().splitlines()[-1])
    assert as_is == [], "\n".join(as_is)
    assert nchw_sr and all("_cast_kernel" in p and "S0" in p for p in nchw_sr), nchw_sr


def test_the_blocks_cast_their_own_weights_only_where_nothing_is_lent():
    """A training step lends the blocks' ops their weight copies (`msf.precision.step_weight_copies`):
    their captures hold no cast launch; as a torch.compile'd step runs them (nothing lent,
    `lend_weights=False`, what `msf.profiling.inductor` prices its triton + compile column with)
    each casts its own, in one launch; LMSA is the same either way. (The capture records compiled
    launches: a process of its own, without the interpreter.)"""
    code = """if True:
        import json
        from msf.profiling import cost
        names = {f"{op} {lend}": [launch.fn.fn.__name__ for launch in cost.capture(
                     op, cost.H100, None if op == "lmsa" else 2, batch=1, size=64, lend_weights=lend)]
                 for op in ("attention_block", "attention_block_embedded", "ffn_sublayer", "ffn_stage_output", "lmsa")
                 for lend in (True, False)}
        print(json.dumps(names))"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    for op in ("attention_block", "attention_block_embedded", "ffn_sublayer", "ffn_stage_output"):
        lent, own = names[f"{op} True"], names[f"{op} False"]
        assert lent and "_cast_kernel" not in lent and own.count("_cast_kernel") == 1, (op, lent, own)
        assert [k for k in own if k != "_cast_kernel"] == lent, op
    assert names["lmsa True"] == names["lmsa False"]


def test_saved_for_backward_is_counted_and_no_fused_op_keeps_more_than_eager():
    """The saved-tensor accounting (issue 23 item 5) on a case counted by hand, then the claim itself.

    FFN stage 1 (524 288 rows, C = 32, H = 64): eager autocast keeps LN(x) in bf16 (2C bytes a row), fc1's
    output h and GELU's output A in bf16 (2H each) and the LayerNorm statistics (8), plus autocast's bf16
    copies of w1 and w2; the fused op keeps the statistics and the same bf16 copies of w1 and w2 (cast
    once in its forward for both passes)."""
    from msf.bench import eager_bytes as eb
    rows, c, hid = 32 * 128 * 128, 32, 64
    assert eb.eager_op_saved_bytes("ffn_sublayer", stage=1) == rows * (2 * c + 4 * hid + 8) + 2 * (2 * hid * c)
    assert cost.fused_saved_bytes("ffn_sublayer", cost.DEVICES["h100"], 1) == rows * 8 + 2 * (2 * hid * c)
    memory = cost.memory_summary(cost.DEVICES["h100"])
    assert {r["row"] for r in memory} >= {cost.op_label(op, st) for op, st in cost.op_instances()}
    for r in memory:
        assert r["fused_saved_bytes"] <= r["eager_saved_bytes"], r
    assert "saved for the backward" in cost.memory_text(memory)


def test_a_build_that_fits_no_cta_is_never_predicted_fast(monkeypatch):
    """Shared memory over an SM's (0 CTAs/SM): the launch would fail, so its prediction is infinite
    and `--pin` / `--sweep` never take it (it used to come out as the launch time alone)."""
    launch = cost.Launch("op", "fwd", "k", None, (4, 1, 1), {}, {}, {}, {}, {"num_warps": 4, "num_stages": 2})

    def built(shared):
        return lambda launch, arch: ({"registers": 32, "shared_bytes": shared, "local_bytes": 0, "stack_bytes": 0},
                                     [], [], {}, {})
    monkeypatch.setattr(cost, "compiled_kernel", built(300_000))
    too_big = cost.predict(launch, cost.DEVICES["h100"])
    assert too_big.ctas_per_sm == 0 and too_big.predicted == float("inf")
    monkeypatch.setattr(cost, "compiled_kernel", built(1024))
    fits = cost.predict(launch, cost.DEVICES["h100"])
    assert fits.ctas_per_sm > 0 and fits.predicted < 1e-3


def _latency_case(monkeypatch, body_ops: list[str], trips: int = 8, programs: int = 264):
    """A synthetic build: one straight-line LDG, then a loop of `trips` trips a program whose body
    holds `body_ops`; 4 warps, 32 registers (16 CTAs an SM fit), `programs` programs."""
    instrs = [cost.Instr(0x00, "LDG.E", "", "k.py", 5)]
    instrs += [cost.Instr(0x10 * (i + 1), op, "", "k.py", 10) for i, op in enumerate(body_ops)]
    end = 0x10 * (len(body_ops) + 1)
    branch = cost.Instr(end, "BRA", "", "k.py", 9)
    branch.target = 0x10
    instrs.append(branch)
    loop = cost.SassLoop(0x10, end, "k.py", 9, loop=cost.Loop("m", "k", "for i in range(n):", lambda a, pid: trips))
    usage = {"registers": 32, "shared_bytes": 0, "local_bytes": 0, "stack_bytes": 0}
    monkeypatch.setattr(cost, "compiled_kernel", lambda launch, arch: (usage, instrs, [loop], {}, {}))
    launch = cost.Launch("op", "fwd", "k", None, (programs, 1, 1), {}, {}, {}, {}, {"num_warps": 4, "num_stages": 1})
    return cost.predict(launch, cost.H100)


def test_exposed_latency_counts_the_waves_a_round_waits(monkeypatch):
    """264 programs on 132 SMs with room for 16 CTAs each: one round of 2 resident CTAs. The first
    wave (the straight-line load) is exposed whole, each later one 1/2: a loop with a barrier in its
    body waits once a trip (1 + 8/2 = 5 waves' latency); without the barrier, or fed by asynchronous
    copies (LDGSTS), the loop waits once (1 + 1/2)."""
    wave = cost.LATENCY_LOAD_CYCLES / cost.H100.clock_hz
    synced = _latency_case(monkeypatch, ["LDG.E", "BAR.SYNC", "FADD"])
    assert synced.load_waves == 9 and synced.t_latency == pytest.approx(5 * wave)
    drifting = _latency_case(monkeypatch, ["LDG.E", "FADD"])
    assert drifting.load_waves == 2 and drifting.t_latency == pytest.approx(1.5 * wave)
    copies = _latency_case(monkeypatch, ["LDGSTS.E.BYPASS.128", "BAR.SYNC"])
    assert copies.load_waves == 2 and copies.t_latency == pytest.approx(1.5 * wave)
    # 16 resident CTAs and 32 programs an SM: two rounds, each waiting its waves
    assert _latency_case(monkeypatch, ["LDG.E", "BAR.SYNC"], programs=2 * 132 * 16).t_latency == \
        pytest.approx(2 * (1 + 8 / 16) * wave)
    assert synced.predicted == pytest.approx(max(synced.t_issue, synced.t_pipe, synced.t_bytes, synced.t_flops)
                                             + synced.t_latency + synced.t_launch)


def test_the_narrow_pipes_floor_fp32_on_the_a100_and_mufu_everywhere(monkeypatch):
    """FP32 issues at the full rate on sm_90 (128 lanes an SM) but holds an sm_80 scheduler two cycles
    (64 lanes); MUFU (16 lanes) is 8× an issue slot on both (CUDA C Programming Guide's table)."""
    usage = {"registers": 32, "shared_bytes": 0, "local_bytes": 0, "stack_bytes": 0}

    def pipe(op, device):
        instrs = [cost.Instr(0x10 * i, op, "", "k.py", 1) for i in range(100)]
        monkeypatch.setattr(cost, "compiled_kernel", lambda launch, arch: (usage, instrs, [], {}, {}))
        c = cost.predict(cost.Launch("op", "fwd", "k", None, (device.sms, 1, 1), {}, {}, {}, {},
                                     {"num_warps": 4, "num_stages": 1}), device)
        return c.t_pipe * device.clock_hz, c.t_issue * device.clock_hz   # cycles of the busiest SM
    # one program an SM, 4 warps × 100 instructions: 400 warp-instructions an SM
    assert pipe("FFMA", cost.H100)[0] == pytest.approx(100)                         # 128 lanes: the issue rate
    assert pipe("FFMA", cost.A100)[0] == pytest.approx(200)                         # 64 lanes: 2 cycles each
    assert pipe("MUFU.EX2", cost.H100)[0] == pytest.approx(800)                     # 16 lanes: 2 cycles a warp, an SM


def test_host_side_torch_ops_are_launches_of_the_step(monkeypatch):
    """The aten ops a fused op's host code runs between its kernels count a launch each (views and
    bare allocations none), and the step's triton figure includes them and a launch for each op of
    the eager rest."""
    counts = {}
    with cost._counting_host_ops(counts, ["fwd"]):
        t = torch.zeros(4, 6)  # a fill: one launch
        t.view(6, 4).t()[1:].unsqueeze(0)  # views: none
        torch.empty(8)  # an allocation alone: none
        (t + 1).sum()  # two
    assert counts == {"fwd": 3}
    # the counts at the model's shapes: a capture records the launches only outside the interpreter
    code = ("import json; from msf.profiling import cost; print(json.dumps([cost.host_launches('lmsa', None), "
            "cost.host_launches('head_loss', None), cost.host_launches('attention_block', 2), "
            "cost.step_host_launches()]))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    lmsa, head, block, n = json.loads(out.stdout.strip().splitlines()[-1])
    assert lmsa["fwd"] > 0 and lmsa["bwd"] > 0 and not head  # LMSA's fills and sums; head + loss has none
    # an attention block has none either: its weights' casts are one kernel (`casts.cast_all`) and
    # dW_sr is handed over in the model's W_sr layout, not copied (R = 4 here)
    assert not sum(block.values()), block
    assert n >= lmsa["fwd"] + lmsa["bwd"]  # the step's include LMSA's
    monkeypatch.setattr(cost, "step_host_launches", lambda: n)
    monkeypatch.setattr(cost, "eager_step_floor", lambda variant, device: 1e-3)  # (the real one takes minutes)
    monkeypatch.setattr(cost, "eager_rest_launches", lambda: 7)
    rows = {r["row"].split(" (")[0]: r for r in cost.step_summary([], cost.DEVICES["h100"])}
    host = rows["their host-side torch ops"]
    assert host["row"] == f"their host-side torch ops ({n} launches)"
    assert host["seconds"] == pytest.approx(n * cost.LAUNCH_S)
    assert rows["eager rest's launches"]["seconds"] == pytest.approx(7 * cost.LAUNCH_S)
    assert rows["triton step"]["seconds"] == pytest.approx(rows["fused ops predicted"]["seconds"]
                                                           + host["seconds"] + 1e-3 + 7 * cost.LAUNCH_S)


def test_exclusive_branches_charge_only_the_programs_that_run_them():
    """A partial_sums program runs one of four tile-shape branches (each an inlined copy of one
    helper: set-up, row loop, tl.sum's tree, store), picked by its buffer's row count. Each program
    is charged the straight-line code of its own branch only (`cost.branch_owners`): charging every
    program all four (what a count blind to the branches does) would charge it about four times the
    straight-line code it runs. One sm_90 build, in a process without the interpreter (the capture
    records compiled launches)."""
    script = """
import json, torch
from msf.kernels import partial_sums
from msf.profiling import cost
out = []
for rows in (3, 11, 17, 200):
    launches = []
    with cost.recording(cost.H100, launches, "partial_sums", ["bwd"]), torch.no_grad():
        partial_sums.sum_partials((torch.empty(rows, 4096), torch.empty(4096)))
    (launch,) = launches
    kc = cost.predict(launch, cost.H100)
    out.append({"rows": rows, "entered": sum(1 for *_, trips, _ in kc.loop_bodies if trips > 0),
                "loop": sum(body * trips for _, _, body, trips, _ in kc.loop_bodies),
                "static": kc.static["total"] - sum(body for _, _, body, _, _ in kc.loop_bodies),
                "charged": kc.dynamic["total"] / kc.programs / kc.warps})
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for case in json.loads(proc.stdout.splitlines()[-1]):
        straight = case["charged"] - case["loop"]
        assert case["entered"] == 1, case
        assert 0 < straight < 0.5 * case["static"], (
            f"{case['rows']} rows: {straight:.0f} straight-line instructions charged a program, of "
            f"{case['static']} in the four branches")


def test_a_runtime_unrolled_loop_is_charged_its_trips_once(monkeypatch):
    """LLVM unrolls a short loop by U at run time: a loop holding U copies of the body's loads and a
    one-copy remainder, two SASS loops of one source loop. Together they run the formula's T trips
    (⌊T / U⌋ and T mod U), not T each (`cost._mark_runtime_unroll`)."""
    def instr(addr, op, target=None):
        ins = cost.Instr(addr, op, "", "k.py", 7)
        ins.target = target
        return ins
    instrs = [instr(0x10 * i, "LDG.E") for i in range(1, 5)] + [instr(0x50, "BRA", 0x10),
                                                                instr(0x60, "LDG.E"), instr(0x70, "BRA", 0x60)]
    source = cost.Loop("m", "k", "while i < n:", lambda a, pid: 10)
    main = cost.SassLoop(0x10, 0x50, "k.py", 7, loop=source)
    rest = cost.SassLoop(0x60, 0x70, "k.py", 7, loop=source, site=1)
    cost._mark_runtime_unroll([main, rest], [main, rest], instrs)
    usage = {"registers": 32, "shared_bytes": 0, "local_bytes": 0, "stack_bytes": 0}
    monkeypatch.setattr(cost, "compiled_kernel", lambda launch, arch: (usage, instrs, [main, rest], {}, {}))
    launch = cost.Launch("op", "fwd", "k", None, (8, 1, 1), {}, {}, {}, {}, {"num_warps": 4, "num_stages": 1})
    kc = cost.predict(launch, cost.H100)
    assert kc.dynamic["total"] / kc.programs / kc.warps == 5 * (10 // 4) + 2 * (10 % 4)
    assert kc.dynamic["ldg"] / kc.programs / kc.warps == 10  # each trip's one load, once


def test_opcode_text_counts_each_loops_instructions_by_opcode_and_line(monkeypatch):
    """`--opcodes` (`opcode_text`): a loop's instructions grouped by base opcode and by source line,
    each build once however many launches share it."""
    instrs = [cost.Instr(0x00, "LDG.E", "", "/a/k.py", 5)]
    body = [("FFMA", 10), ("FFMA", 10), ("MOV", 11), ("IMAD.MOV.U32", 11), ("LDG.E.128", 12)]
    instrs += [cost.Instr(0x10 * (i + 1), op, "", "/a/k.py", line) for i, (op, line) in enumerate(body)]
    end = 0x10 * (len(body) + 1)
    instrs.append(cost.Instr(end, "BRA", "", "/a/k.py", 9))
    loop = cost.SassLoop(0x10, end, "/a/k.py", 9, loop=cost.Loop("m", "f", "for i in range(n):", lambda a, pid: 1))
    usage = {"registers": 32, "shared_bytes": 0, "local_bytes": 0, "stack_bytes": 0}
    monkeypatch.setattr(cost, "compiled_kernel", lambda launch, arch: (usage, instrs, [loop], {}, {}))
    launch = cost.Launch("op", "fwd", "k", None, (1, 1, 1), {}, {}, {}, {}, {"num_warps": 4, "num_stages": 1})
    text = cost.opcode_text([launch, launch], 90)
    assert text.count("instructions") == 1  # one build, one loop
    assert "f: for i in range(n): #0: 6 instructions" in text
    assert "by opcode: FFMA 2, MOV 1, IMAD 1, LDG 1, BRA 1" in text
    assert "by line:   k.py:10 2, k.py:11 2, k.py:12 1, k.py:9 1" in text
    # an enclosing loop counts its own instructions only, as the loop table's bodies do
    outer_end = end + 0x10
    outer_branch = cost.Instr(outer_end, "BRA", "", "/a/k.py", 8)
    outer = cost.SassLoop(0x00, outer_end, "/a/k.py", 8, loop=cost.Loop("m", "f", "for j in range(m):",
                                                                        lambda a, pid: 1))
    instrs.append(outer_branch)
    monkeypatch.setattr(cost, "compiled_kernel", lambda launch, arch: (usage, instrs, [outer, loop], {}, {}))
    text = cost.opcode_text([launch], 90)
    assert "f: for j in range(m): #0: 2 instructions" in text and "by opcode: LDG 1, BRA 1" in text
    assert "f: for i in range(n): #0: 6 instructions" in text
