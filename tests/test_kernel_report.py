"""The ahead-of-time report (`python -m msf.profiling.report`, SPEC §7) builds every kernel config of every
`kernels/` module for sm_80 and sm_90 on this CPU-only machine, with no register spill.

The report runs in one subprocess per architecture (and group of modules where there are more than
two cores) with TRITON_INTERPRET=1 in its environment, which also checks that the report takes
itself out of interpreter mode (it re-executes without the variable). Compiled kernels land in
Triton's cache, so reruns are quick (its key holds each kernel's line numbers: lines added above a
kernel build its specs again).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from msf.profiling import report

from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)


def test_parses_cuobjdump_resource_usage():
    sample = """
Resource usage:
 Common:
  GLOBAL:0
 Function _head_loss_bwd_kernel:
  REG:128 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:632 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    (reg, stack, shared, local), = [tuple(map(int, m.groups())) for m in report._USAGE.finditer(sample)]
    assert (reg, stack, shared, local) == (128, 16, 1024, 0)
    row = report.Row("m", "k", 90, 4, 1, ok=True, registers=reg, shared_bytes=shared,
                     local_bytes=local, stack_bytes=stack)
    assert row.spills  # a stack frame is where ptxas puts spills


def test_every_launch_of_the_step_is_a_reported_build():
    """What the model launches at the paper's shapes, with the sm_80 and sm_90 pins, is what the report
    builds and checks for spills: each launch has an AOT spec of its kernel with the same warps,
    stages and block sizes (`report --launches`; the attention block's kv launches once took Triton's
    default three stages where their specs said one, and spilled 8 B on sm_90 unseen)."""
    env = dict(os.environ, TRITON_INTERPRET="1")  # the command takes itself out of interpreter mode
    proc = subprocess.run([sys.executable, "-m", "msf.profiling.report", "--launches"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "has an AOT spec" in proc.stdout


@pytest.mark.parametrize("module", report.kernel_modules())
def test_aot_specs_mark_only_pointers_and_integers_divisible(module):
    """Each spec's `attrs` (the launcher's `tt.divisibility = 16`) names arguments of its signature that
    are pointers or integers, as Triton's launcher marks them: never a float scalar or a constexpr (the
    attention builds marked the fp32 softmax scales until 2026-12-07)."""
    specs = getattr(importlib.import_module(module), "AOT_SPECS", [])
    if not specs:
        pytest.skip(f"{module} declares no AOT_SPECS")
    wrong = []
    for spec in specs:
        names = spec.fn.arg_names
        for (index,) in spec.attrs:
            kind = spec.signature.get(names[index], "constexpr")
            if not (kind.startswith("*") or kind in ("i32", "i64")):
                wrong.append(f"{spec.name}: {names[index]} ({kind})")
    assert not wrong, "marked divisible but neither pointer nor integer:\n" + "\n".join(wrong[:20])


def _aot_modules() -> list[str]:
    return [m for m in report.kernel_modules() if getattr(importlib.import_module(m), "AOT_SPECS", [])]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{arch: [(completed process, JSON path)]}: `msf.profiling.report` subprocesses, each building a group
    of modules for one arch, as many at a time as there are cores (ptxas is single-threaded, and these
    builds are most of the suite's cold time). A group per arch on two cores: each subprocess imports
    torch and the kernels twice (it re-executes without TRITON_INTERPRET), ~4 s, which one per module
    and arch paid 22 times."""
    if not report.cuobjdump_path().is_file():
        pytest.skip(f"cuobjdump not shipped with this Triton ({report.cuobjdump_path()})")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    root = tmp_path_factory.mktemp("report")
    cores = max(1, os.cpu_count() or 1)
    # the modules dealt out by their spec counts, largest first, over the groups of each arch
    modules = sorted(_aot_modules(), key=lambda m: -len(importlib.import_module(m).AOT_SPECS))
    n_groups = max(1, cores // len(ARCHS))
    groups = [modules[i::n_groups] for i in range(n_groups)]

    def build(job):
        arch, index, group = job
        out = root / f"group{index}-sm{arch}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "msf.profiling.report", "--module", *group, "--arch", str(arch), "--skip-slow",
             "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        return arch, (proc, out)

    jobs = [(arch, i, group) for arch in ARCHS for i, group in enumerate(groups) if group]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), cores))) as pool:
        done: dict[int, list] = {arch: [] for arch in ARCHS}
        for arch, result in pool.map(build, jobs):
            done[arch].append(result)
        return done


@pytest.mark.slow
@pytest.mark.parametrize("module", report.kernel_modules())
def test_report_builds_every_spec_without_spills(module, builds):
    specs = getattr(importlib.import_module(module), "AOT_SPECS", [])
    if not specs:
        pytest.skip(f"{module} declares no AOT_SPECS")
    rows, procs = [], []
    for arch in ARCHS:
        for proc, out in builds[arch]:
            assert out.is_file(), f"report wrote no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            data = json.loads(out.read_text())
            assert not data["import_failures"], data["import_failures"]
            mine = [r for r in data["rows"] if r["module"] == module]
            rows += mine
            if mine:
                procs.append(proc)
    failed = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "compile failures:\n" + "\n".join(failed)
    spilled = [f"{r['name']} sm_{r['arch']}: local {r['local_bytes']} B, stack {r['stack_bytes']} B"
               for r in rows if r["spills"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    assert len(rows) == sum(s.builds_on(a) for s in specs for a in ARCHS), "not every spec × arch was built"
    assert all(r["registers"] <= 255 for r in rows)
    for proc in procs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
