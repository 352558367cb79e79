"""msf.profiling.ncu_compare (and msf.profiling.ncu_table's parser) on a small CSV in the exact layout of
`ncu --csv --page raw` (progress lines, the application's prints, a units line, thousands
separators, auto-scaled units) against cost-model rows in `msf.profiling.cost --json`'s long format."""
import json

import pytest

from msf.profiling import ncu_compare, ncu_table

from conftest import HANG_GUARD_S

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","dram__bytes.sum","gpu__time_duration.sum","sm__warps_active.avg.pct_of_peak_sustained_active",'
          '"smsp__inst_executed.sum","dram__bytes.sum.per_second","dram__throughput.avg.pct_of_peak_sustained_elapsed"')
UNITS = '"","","","","","","","","","","","Mbyte","usecond","%","inst","Gbyte/second","%"'


def launch(i, kernel, grid, mbytes, us, occ, inst):
    return (f'"{i}","4242","python3","127.0.0.1","{kernel}","1","7","(128, 1, 1)","{grid}","0","9.0",'
            f'"{mbytes}","{us}","{occ}","{inst}","1,000.00","40.0"')


CSV = "\n".join([
    "==PROF== Connected to process 4242 (/usr/bin/python3)",
    '==PROF== Profiling "_fwd_kernel" - 0: 0%....50%....100% - 9 passes',
    "1 steps of triton at B=32, 512²: last loss 3.1234",  # the application's own print
    HEADER, UNITS,
    launch(0, "_fwd_kernel", "(256, 4, 1)", "30.00", "12.50", "20.0", "1,000,000"),
    launch(1, "_fwd_kernel", "(256, 4, 1)", "34.00", "13.50", "30.0", "1,200,000"),
    launch(2, "_bwd_kernel", "(99, 1, 1)", "8.00", "4.00", "50.0", "400,000"),
    launch(3, "_other_kernel", "(1, 1, 1)", "0.01", "2.00", "3.0", "1,000"),
    "==PROF== Disconnected from process 4242",
])


def cost_rows():
    rows = []

    def add(op, kernel, pass_, metrics, device="h100"):
        for metric, value in metrics.items():
            rows.append({"op": op, "kernel": kernel, "pass": pass_, "device": device, "metric": metric,
                         "unit": "x", "value": value, "size": "B=32", "date": "2026-11-29", "versions": "v"})
    add("head_loss", "_fwd_kernel[BLOCK=64,w4,s2]", "fwd",
        {"grid": 1024, "warps": 4, "ctas_per_sm": 2, "dynamic_total": 2.2e6, "dram_bytes": 40e6, "predicted": 10e-6})
    add("head_loss", "_fwd_kernel[BLOCK=64,w4,s2]", "fwd", {"grid": 1024, "predicted": 99.0}, device="a100")
    add("head_loss", "_bwd_kernel[BLOCK=32,w8,s1]", "bwd",
        {"grid": 100, "warps": 8, "ctas_per_sm": 1, "dynamic_total": 4e5, "dram_bytes": 16e6, "predicted": 2e-6})
    rows.append({"op": "head_loss", "kernel": "(op)", "pass": "fwd", "device": "h100", "metric": "ratio",
                 "unit": "x", "value": 3.0})
    return rows


def by(rows, kernel, metric):
    (row,) = [r for r in rows if r["kernel"] == kernel and r["metric"] == metric]
    return row


def test_parser_skips_progress_and_application_lines_and_reads_units():
    rows, units = ncu_table.parse_with_units(CSV)
    assert [r["ID"] for r in rows] == ["0", "1", "2", "3"]
    assert units["gpu__time_duration.sum"] == "usecond" and units["dram__bytes.sum"] == "Mbyte"
    assert ncu_table.base_value(rows[0], "smsp__inst_executed.sum", units) == 1_000_000
    assert ncu_table.base_value(rows[0], "gpu__time_duration.sum", units) == pytest.approx(12.5e-6)
    text = ncu_table.table(rows, units)
    assert text.splitlines()[1].split()[:3] == ["_fwd_kernel", "2", "13.0"]  # mean µs, largest first
    with pytest.raises(ValueError, match="no ncu CSV table"):
        ncu_table.parse_with_units("==ERROR== ERR_NVGPUCTRPERM - no permission to access counters\n")


def test_measured_over_predicted_per_kernel_and_grid():
    rows = ncu_compare.compare(CSV, cost_rows())
    time = by(rows, "_fwd_kernel", "gpu__time_duration.sum")
    assert (time["launches"], time["grid"], time["device"], time["match"]) == (2, 1024, "h100", "grid")
    assert time["measured"] == pytest.approx(13e-6) and time["predicted"] == 10e-6
    assert time["ratio"] == pytest.approx(1.3)
    assert by(rows, "_fwd_kernel", "smsp__inst_executed.sum")["ratio"] == pytest.approx(1.1e6 / 2.2e6)
    assert by(rows, "_fwd_kernel", "dram__bytes.sum")["ratio"] == pytest.approx(32e6 / 40e6)
    occupancy = by(rows, "_fwd_kernel", "sm__warps_active.avg.pct_of_peak_sustained_active")
    # 2 CTAs/SM (⌈1024 / 132⌉ = 8 waves' worth of programs) × 4 warps of 64 slots
    assert occupancy["predicted"] == pytest.approx(12.5) and occupancy["ratio"] == pytest.approx(25 / 12.5)
    bwd = by(rows, "_bwd_kernel", "gpu__time_duration.sum")
    assert bwd["match"] == "name only" and bwd["op"] == "head_loss" and bwd["ratio"] == pytest.approx(2.0)
    other = by(rows, "_other_kernel", "gpu__time_duration.sum")
    assert other["match"] == "unmatched" and other["predicted"] is None and other["ratio"] is None


def test_without_a_cost_model_measured_values_only(tmp_path, capsys):
    csv_path = tmp_path / "ncu.csv"
    csv_path.write_text(CSV)
    assert ncu_compare.main([str(csv_path), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp.json").read_text())
    assert rows and all(r["predicted"] is None and r["match"] == "no cost model" for r in rows)
    assert "measured values only" in (tmp_path / "cmp.md").read_text()
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps(cost_rows()))
    assert ncu_compare.main([str(csv_path), "--cost", str(cost), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert "| _fwd_kernel | head_loss | fwd | h100 | 1024 | 2 | 13.0 / 10.0 (×1.30) |" in table
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ncu_compare.main([str(tmp_path / "missing.csv")])
    assert "ncu CSV not found" in capsys.readouterr().err


def test_gpu_session_ncu_pass_never_fails_the_session(tmp_path):
    """`gpu_session.sh BUDGET ncu` on a machine without ncu or without CUDA: the pass says why it
    was skipped, the session exits 0 and the packed results hold the note."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(repo / "bench" / "gpu_session.sh"), "60", "ncu", str(tmp_path)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ncu skipped:" in done.stdout
    with tarfile.open(tmp_path / "gpu-results.tgz") as packed:
        notes = [m for m in packed.getnames() if m.endswith("ncu-skipped.txt")]
        assert len(notes) == 1
        assert "skipped" in packed.extractfile(notes[0]).read().decode()


def test_ncu_script_plumbing_with_a_stand_in_ncu(tmp_path):
    """profiling/ncu.sh with a stand-in `ncu` on PATH that records its arguments and writes the CSV
    above to --log-file: the script asks for the four metrics in raw CSV, then writes the table
    and the comparison against $COST_JSON."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "bin").mkdir()
    (tmp_path / "ncu.csv.in").write_text(CSV)
    fake = tmp_path / "bin" / "ncu"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_NCU_ARGS"\n'
                    'while [ $# -gt 0 ]; do [ "$1" = --log-file ] && cp "$FAKE_NCU_CSV" "$2"; shift; done\n')
    fake.chmod(0o755)
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps(cost_rows()))
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "FAKE_NCU_ARGS": str(tmp_path / "args.txt"), "FAKE_NCU_CSV": str(tmp_path / "ncu.csv.in"),
           "COST_JSON": str(cost)}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(repo / "profiling" / "ncu.sh"), str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    args = (tmp_path / "args.txt").read_text().split("\n")
    assert args[args.index("--page") + 1] == "raw" and "--csv" in args
    metrics = args[args.index("--metrics") + 1].split(",")
    assert {"smsp__inst_executed.sum", "sm__warps_active.avg.pct_of_peak_sustained_active", "dram__bytes.sum",
            "gpu__time_duration.sum"} <= set(metrics)
    assert args[args.index("--kernel-name") + 1].startswith("regex:_")
    assert "_fwd_kernel" in (out / "ncu-table.txt").read_text()
    assert "(×1.30)" in (out / "ncu-compare.md").read_text()
