"""msf.bench.compare: measured `msf bench` rows beside the committed predictions for the same card."""
from __future__ import annotations

import json

import pytest

from msf.bench import compare


def _measured(op, provider, pass_, ms, device="NVIDIA H100 80GB HBM3"):
    return {"op": op, "provider": provider, "pass": pass_, "metric": "time", "unit": "ms", "size": "B=32,512²",
            "p20": ms * 0.99, "p50": ms, "p80": ms * 1.01, "device": device, "versions": {"torch": "2.11"},
            "date": "2026-12-05"}


def _table(path):
    return json.loads(path.read_text())


def test_device_names_map_to_cost_model_keys():
    assert compare.device_key("NVIDIA H200") == "h200"
    assert compare.device_key("NVIDIA H100 NVL") == "h100nvl"
    assert compare.device_key("NVIDIA H100 80GB HBM3") == "h100"
    assert compare.device_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert compare.device_key("Tesla T4") is None


def test_each_measured_time_meets_its_committed_prediction(tmp_path):
    cost, comp = _table(compare.COST_TABLE), _table(compare.COMPILE_TABLE)
    measured = [_measured("train_step", p, "step", ms) for p, ms in
                (("eager", 80.0), ("compile", 40.0), ("triton", 12.0), ("triton+compile", 14.0))]
    measured += [_measured("ffn/stage4", "triton", "fwd+bwd", 0.2), _measured("lmsa", "compile", "fwd+bwd", 4.0),
                 _measured("attention/stage1", "triton", "fwd+bwd", 0.5),
                 _measured("train_step", "triton", "step", 9.0, device="Tesla T4"),
                 {**_measured("lmsa", "triton", "fwd+bwd", 1.0), "metric": "throughput", "unit": "images/s"}]
    rows, notes = compare.compare(measured, cost, comp)
    got = {(r["op"], r["provider"]): r for r in rows}
    assert set(got) == {("train_step", "eager"), ("train_step", "compile"), ("train_step", "triton"),
                        ("train_step", "triton+compile"), ("ffn/stage4", "triton"), ("lmsa", "compile")}

    def value(rows_, **match):
        (hit,) = [r["value"] for r in rows_ if all(r.get(k) == v for k, v in match.items())]
        return hit
    step_compile = value(comp, op="step (paper)", provider="torch.compile", metric="predicted", device="h100",
                         **{"pass": "fwd+bwd"})
    assert got[("train_step", "compile")]["predicted_ms"] == pytest.approx(step_compile * 1e3)
    assert got[("train_step", "compile")]["p50"] == pytest.approx(step_compile * 1e3 / 40.0)
    assert got[("train_step", "eager")]["within_band"] is None  # a floor, not a prediction
    ffn4 = sum(value(cost, op="ffn_sublayer[stage 4]", kernel="(op)", metric="fused_predicted", device="h100",
                     **{"pass": p}) for p in ("fwd", "bwd"))
    assert got[("ffn/stage4", "triton")]["predicted_ms"] == pytest.approx(ffn4 * 1e3)
    lo, hi = got[("ffn/stage4", "triton")]["error_band"]
    assert got[("ffn/stage4", "triton")]["within_band"] == (lo <= ffn4 * 1e3 / 0.2 <= hi)
    assert all(r["model_version"] == cost[0]["model_version"] for r in rows)
    assert any("attention/stage1" in n for n in notes) and any("Tesla T4" in n for n in notes)


def test_the_command_writes_json_and_markdown(tmp_path):
    measured = tmp_path / "bench-step.json"
    measured.write_text(json.dumps([_measured("train_step", "triton", "step", 12.0, device="NVIDIA H200")]))
    assert compare.main([str(measured), "--out", str(tmp_path), "--name", "mvp"]) == 0
    rows = json.loads((tmp_path / "mvp.json").read_text())
    assert [(r["op"], r["provider"], r["device_key"]) for r in rows] == [("train_step", "triton", "h200")]
    md = (tmp_path / "mvp.md").read_text()
    assert "| train_step | triton | step | 12.000 |" in md and "NVIDIA H200" in md


def test_unreadable_input_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json"):
        compare.main([str(bad), "--out", str(tmp_path)])
