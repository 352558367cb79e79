"""Memory safety under Triton-Sanitizer (`python -m kernels.sanitize`, SPEC §7).

The sanitizer must run without TRITON_INTERPRET=1 and before the kernels are imported, so each
check runs the command in a fresh process (the test process has the interpreter switched on by
conftest). The CI subset is the ops whose cases triton-viz 3.0 can check (see the command's
docstring and the module list below); `python -m kernels.sanitize` runs every case of every op.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton_viz")

REPO = Path(__file__).resolve().parents[1]


def _sanitize(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "kernels.sanitize", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_out_of_bounds_toy_kernel_is_reported():
    """The check can fail: a load one element past the end is found, with its source line."""
    run = _sanitize("--op", "toy_oob")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Load out of bounds at kernels/sanitize.py" in run.stdout, run.stdout
    assert "tl.load(x_ptr + offs + 1" in run.stdout, run.stdout


def test_upsample_argmax_has_no_out_of_bounds_access():
    """Every upsample_argmax case (up/down-sampling, fp32/bf16/fp16, NCHW, channels-last, sliced view)."""
    run = _sanitize("--op", "upsample_argmax")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "zero out-of-bounds accesses" in run.stdout and run.stdout.count("ok ") == 3, run.stdout


def test_refuses_to_run_under_the_interpreter_variable():
    run = _sanitize("--op", "toy_oob", interpret=True)
    assert run.returncode != 0 and "unset TRITON_INTERPRET" in run.stderr, run.stdout + run.stderr
