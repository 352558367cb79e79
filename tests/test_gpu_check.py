"""bench/gpu_check.sh end to end on this machine: on a CPU its CUDA parts skip with a message, the
benchmark runs its smoke preset and the profiler writes a trace; every result file appears."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "1", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (out,) = list(tmp_path.glob("gpu-check-*"))
    info = json.loads((out / "env.json").read_text())
    assert info["torch"] and info["device"]
    bench_rows = json.loads(next(out.glob("bench-*.json")).read_text())
    timed = {(r["op"], r["provider"]) for r in bench_rows if r["metric"] == "time"}
    assert ("train_step", "eager") in timed and ("head+ce_dice", "eager") in timed
    assert all(r["p50"] > 0 for r in bench_rows if r["metric"] == "time")
    assert (out / "profile").is_dir() and list((out / "profile").glob("trace-*.json"))
    assert "status: 0" in (out / "summary.md").read_text()
    if not info["device"].startswith("no CUDA"):
        assert "passed" in (out / "parity.log").read_text()
    else:
        assert "skipped" in (out / "parity.log").read_text()



@pytest.mark.slow
def test_gpu_train_runs_end_to_end(tmp_path, real_data):
    env = {**os.environ, "PYTHON": sys.executable, "MSF_DATA": str(real_data), "MSF_RUNS": str(tmp_path / "runs")}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh"), "1", str(tmp_path / "results")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (out,) = list((tmp_path / "results").glob("gpu-train-*"))
    rows = json.loads((out / "train-speed.json").read_text())
    assert {r["provider"] for r in rows if r["op"] == "train step"} == {"eager/loader", "eager/device"}
    assert all(r["p50"] > 0 for r in rows)
    scores = json.loads((out / "eval-val.json").read_text())
    assert scores["images"] == 100 and scores["scored_at"] == [512, 512]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_f_score"] == pytest.approx(scores["f_score"], abs=1e-6)  # same model, same images
    assert (out / "reference.safetensors").stat().st_size > 1_000_000
    assert "status: 0" in (out / "summary.md").read_text()


def test_failures_are_written_as_they_happen(tmp_path, monkeypatch):
    """conftest's hook appends a failed report (node id, phase, traceback text) to MSF_FAILURE_LOG
    at once, and ignores passes: a GPU stage cut at its cap keeps the tracebacks it reached."""
    from types import SimpleNamespace
    import conftest
    log = tmp_path / "failures.log"
    monkeypatch.setenv("MSF_FAILURE_LOG", str(log))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, nodeid="t::ok", when="call", longreprtext=""))
    assert not log.exists()
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, nodeid="t::bad", when="call",
                                                      longreprtext="E   AssertionError: planted"))
    text = log.read_text()
    assert "=== t::bad (call)" in text and "AssertionError: planted" in text
