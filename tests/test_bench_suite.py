"""`msf bench` says exactly what ran (issue 27): one statistic in the console, the JSON and the
Markdown; ratios computed from the medians shown beside them; a fallback labelled as one; on a CPU,
a line on what it can measure and the cost model's predicted GPU speed-up, labelled as such; progress
on long runs; results outside the tracked tree by default."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from msf.bench import harness, suite
from msf.bench.predicted import CURRENT_COST_TABLE, COST_OPS, load_predictions

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PRESET = {"warmup": 0, "reps": 4}  # an even count: the median is the mean of the two middle calls


def stepping_case(durations_ms: dict[str, list[float]], fallbacks: dict[str, str] | None = None) -> suite.Case:
    """A case whose providers take known times: each call advances a fake clock by the next duration."""
    def builder(provider):
        def build():
            it = iter(durations_ms[provider])
            return lambda: clock.advance(next(it))
        return build
    return suite.Case("toy", "n=1", 1, {"fwd": {p: builder(p) for p in durations_ms}}, {}, fallbacks or {})


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def advance(self, ms: float) -> None:
        self.now += ms / 1e3

    def __call__(self) -> float:
        return self.now


clock = FakeClock()


@pytest.fixture
def fake_time(monkeypatch):
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    monkeypatch.setattr(suite.time, "perf_counter", clock)


def printed_medians(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"toy\s+(\S+(?: \(eager fallback\))?)\s+fwd\s+"
                                                                r"([\d.]+) ms median", out)}


def test_console_json_and_markdown_show_one_median(fake_time, tmp_path, capsys):
    case = stepping_case({"eager": [10, 40, 20, 30], "triton": [5, 7, 9, 100]})
    rows = suite.run_case(case, ["eager", "triton"], CPU, PRESET, {"device": "cpu"}, 1.0, deadline=float("inf"))
    shown = printed_medians(capsys.readouterr().out)
    # the interpolated median: (20 + 30) / 2 and (7 + 9) / 2; the upper median (30, 9) was the old console's
    assert shown == {"eager": 25.0, "triton": 8.0}
    times = {r["provider"]: r["p50"] for r in rows if r["metric"] == "time"}
    assert times == pytest.approx(shown, abs=5e-4)  # the console prints 3 decimals
    _, md = harness.write_results(rows, tmp_path, "t")
    table = md.read_text()
    assert "| toy | n=1 | eager | fwd | time | 25 | ms |" in table and "| toy | n=1 | triton | fwd | time | 8 | ms |" in table
    assert f"| {harness.STATISTIC} |" in table


@pytest.mark.parametrize("interleave", [False, True])
def test_a_ratio_is_the_ratio_of_the_medians_shown_beside_it(fake_time, capsys, interleave):
    case = stepping_case({"eager": [10, 40, 20, 30], "triton": [5, 7, 9, 100]})
    if interleave:
        rows = suite.run_case_interleaved(case, ["eager", "triton"], CPU, PRESET, {"device": "cpu"}, 1.0)
    else:
        rows = suite.run_case(case, ["eager", "triton"], CPU, PRESET, {"device": "cpu"}, 1.0, float("inf"))
    out = capsys.readouterr().out
    (ratio,) = [r for r in rows if r["metric"] == "speedup_vs_eager"]
    times = {r["provider"]: r["p50"] for r in rows if r["metric"] == "time"}
    assert (ratio["baseline_ms"], ratio["provider_ms"]) == (times["eager"], times["triton"])
    assert ratio["p50"] == times["eager"] / times["triton"] == pytest.approx(25.0 / 8.0)
    assert ratio["computed_as"] == "median eager ms / median triton ms"
    assert "3.125 x eager (= 25.000 / 8.000 ms" in out


def test_a_fallback_is_labelled_as_one(fake_time, capsys):
    case = stepping_case({"eager": [1, 1, 1, 1], "triton": [2, 2, 2, 2]}, {"triton": "fp32 at d=192: eager ran"})
    rows = suite.run_case(case, ["eager", "triton"], CPU, PRESET, {"device": "cpu"}, 1.0, float("inf"))
    out = capsys.readouterr().out
    labelled = {r["provider"] for r in rows}
    assert "triton" not in labelled and "triton (eager fallback)" in labelled
    assert all(r["fallback"] == "fp32 at d=192: eager ran" for r in rows
               if r["provider"] == "triton (eager fallback)" and r["metric"] == "time")
    assert "triton (eager fallback)" in out and "fp32 at d=192" in out


def test_the_attention_case_knows_when_triton_falls_back():
    """The model's stage 4 (head dim 192) in fp32 is served by the eager formula, in bf16 by the
    kernels: msf.kernels.attention.fused_supported decides, the bench asks it."""
    fp32 = {c.op: c for c in suite.attention_cases(1, 64, CPU, torch.float32)}
    bf16 = {c.op: c for c in suite.attention_cases(1, 64, CPU, torch.bfloat16)}
    assert set(fp32["attention/stage4"].fallbacks) == {"triton", "triton+compile"}
    assert not fp32["attention/stage1"].fallbacks and not bf16["attention/stage4"].fallbacks


def test_slow_calls_report_progress(fake_time, capsys):
    case = stepping_case({"eager": [3000, 1, 2500, 1]})
    suite.run_case(case, ["eager"], CPU, {"warmup": 1, "reps": 3}, {"device": "cpu"}, 1.0, float("inf"))
    out = capsys.readouterr().out
    assert "toy eager fwd: 1 warm-up + 3 timed calls" in out
    assert "call 1/4 took 3.0 s" in out and "call 3/4 took 2.5 s" in out and "call 2/4" not in out


def test_the_predictions_come_from_the_committed_cost_table():
    predictions = load_predictions()
    rows = json.loads(CURRENT_COST_TABLE.read_text())
    op_rows = {(r["op"], r["pass"], r["metric"]): r["value"] for r in rows
               if r["device"] == "h100" and r["kernel"] == "(op)"}
    head = predictions["head+ce_dice"]
    assert head.triton_s == pytest.approx(op_rows[("head_loss", "fwd", "fused_predicted")]
                                          + op_rows[("head_loss", "bwd", "fused_predicted")])
    assert head.eager_floor_s == pytest.approx(op_rows[("head_loss", "fwd", "eager_floor")]
                                               + op_rows[("head_loss", "bwd", "eager_floor")])
    assert set(predictions) == {op for op, target in COST_OPS.items() if not isinstance(target, str)}
    for p in predictions.values():  # (a prediction may be slower than eager's floor: FFN stage 4 is, 2026-12-04)
        assert p.triton_s > 0 and p.eager_floor_s > 0 and p.model_version == rows[0]["model_version"]
        assert "not a measurement" in p.line() and f"cost model {p.model_version}" in p.line()


def test_a_cost_table_without_its_model_version_is_refused(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"op": "lmsa", "kernel": "(op)", "pass": "fwd", "device": "h100",
                                "metric": "ratio", "value": 0.3}]))
    with pytest.raises(ValueError, match="model_version"):
        load_predictions(old)


def test_a_cpu_run_says_what_it_measures_and_shows_the_predicted_gpu_ratio(tmp_path, capsys):
    assert suite.main(["--suite", "ops", "--preset", "smoke", "--providers", "eager", "--reps", "1", "--warmup", "0",
                       "--device", "cpu", "--out", str(tmp_path), "--name", "b"]) == 0
    out = capsys.readouterr().out
    assert suite.CPU_NOTE in out
    assert re.search(r"lmsa: predicted on H100 .* \(cost model v\d+(?:\.\d+)?, not a measurement\): triton .* = [\d.]+x", out)
    assert "attention/stage1: no prediction" in out
    rows = json.loads((tmp_path / "b.json").read_text())
    predicted = [r for r in rows if r["metric"].startswith("predicted")]
    assert predicted and all("(cost model" in r["device"] and "predicted" in r["device"] for r in predicted)
    md = (tmp_path / "b.md").read_text()
    assert suite.CPU_NOTE in md and "predicted_speedup_vs_eager_floor" in md
    assert (tmp_path / "b.png").stat().st_size > 10_000  # the chart beside the table


def test_results_go_to_an_ignored_folder_by_default():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{suite.DEFAULT_OUT}/bench-smoke-cpu.json"], cwd=REPO)
    assert ignored.returncode == 0, f"{suite.DEFAULT_OUT} is not git-ignored"


def test_the_cost_chart_draws_every_kernel_of_the_committed_table(tmp_path):
    from msf.bench.plots import plot_cost
    rows = json.loads(CURRENT_COST_TABLE.read_text())
    plot_cost(rows, tmp_path / "cost.png", "test")
    from PIL import Image
    width, height = Image.open(tmp_path / "cost.png").size
    launches = sum(1 for r in rows if r["metric"] == "grid" and r["device"] == "h100")
    assert launches > 30 and height >= 20 * launches  # a row a kernel


def test_the_compile_chart_draws_the_committed_step_table(tmp_path):
    from msf.bench.plots import plot_compile
    rows = json.loads((CURRENT_COST_TABLE.parent / "compile-step.json").read_text())
    assert {r["provider"] for r in rows if r["op"].startswith("step")} == {
        "eager", "torch.compile", "triton", "triton+torch.compile"}
    plot_compile(rows, tmp_path / "compile.png", "test")
    assert (tmp_path / "compile.png").stat().st_size > 10_000


def test_rows_are_handed_out_after_each_provider(fake_time):
    """`run_case(on_rows=…)` sees the rows after every provider that finished, so a benchmark cut at
    a time cap (a lent GPU's stage) still leaves the providers it timed."""
    case = stepping_case({"eager": [10, 40, 20, 30], "triton": [5, 7, 9, 100]})
    seen = []
    rows = suite.run_case(case, ["eager", "triton"], CPU, PRESET, {"device": "cpu"}, 1.0, deadline=float("inf"),
                          on_rows=lambda so_far: seen.append({r["provider"] for r in so_far if r["metric"] == "time"}))
    assert seen == [{"eager"}, {"eager", "triton"}]
    assert {r["provider"] for r in rows if r["metric"] == "time"} == {"eager", "triton"}
