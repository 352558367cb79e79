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
    assert forward and all(r["predicted_h200_us"] > 0 and r["predicted_h100nvl_us"] > 0 for r in forward)
    assert all(r["unmatched_loops"] == 0 for r in forward)
    for r in forward:
        assert r["host_bound"] == (r["measured_us"] > r["published_us"])
        # the H200 has more bandwidth than the H100 NVL: a byte-bound prediction is smaller there
        if r["bound"] == "bytes":
            assert r["predicted_h200_us"] < r["predicted_h100nvl_us"]
    assert data["spread"]["model_version"] == cost.MODEL_VERSION
    assert set(calibrate.CANDIDATES) <= set(data["spread"])
