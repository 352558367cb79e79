"""pytest-benchmark suites over the same cases as `msf bench`.

    pytest bench/ --benchmark-enable [--benchmark-json out.json]     # on a GPU: the paper's shapes

On a CPU the smoke preset runs (eager always; triton only under TRITON_INTERPRET=1); the figures
are then a smoke test of the harness, not timings to quote.
"""
import os

import pytest
import torch

from msf.bench import suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = suite.PRESETS["paper" if DEVICE.type == "cuda" else "smoke"]
TRITON_OK = DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def all_cases():
    b, s, dt = PRESET["batch"], PRESET["size"], PRESET["dtype"]
    return [suite.head_loss_case(b, s, DEVICE, dt), *suite.attention_cases(b, s, DEVICE, dt),
            suite.lmsa_case(b, s, DEVICE, dt),
            suite.lmsa_classifier_case(b, s, DEVICE, dt), suite.upsample_argmax_case(b, s, DEVICE, dt)]


CASES = {case.op: case for case in all_cases()}


def synchronized(fn):
    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    return call


@pytest.mark.parametrize("provider", ["eager", "triton"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_op(benchmark, op, provider):
    if provider == "triton" and not TRITON_OK:
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    case = CASES[op]
    (pass_, builders), = case.passes.items()
    benchmark.group = f"{op} {case.size} {pass_}"
    benchmark.extra_info.update(bytes_moved=case.bytes_moved.get(provider), device=str(DEVICE))
    benchmark(synchronized(builders[provider]()))
