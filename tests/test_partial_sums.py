"""`msf.kernels.partial_sums`: up to four partial-row buffers summed in one launch, against float64
sums of the same rows (under TRITON_INTERPRET=1 without a GPU)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import KERNEL_DEVICES, assert_close, kernel_device  # noqa: E402

from msf.kernels import partial_sums  # noqa: E402

pytestmark = pytest.mark.parity


# (rows, size) of each buffer: one buffer; four of mixed shapes (a single row, more rows than one
# 64-row step with a masked tail, sizes that end inside a program's element block, one wider than a
# 2048-element tile); two of few rows (the 4-row tile); every tile shape in one launch (4, 16, 32,
# 64 rows a step: 3, 11, 17 and 200 rows)
SHAPES = [
    [(5, 100)],
    [(1, 37), (130, 7), (64, 2049), (3, 1)],
    [(3, 33), (2, 5)],
    [(11, 300), (3, 1000), (200, 40), (17, 129)],
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "+".join(f"{n}x{k}" for n, k in s))
def test_sums_match_float64(shapes, device):
    """Each out is its buffer's column sums; a second launch gives the same bits (fixed order)."""
    device = kernel_device(device)
    g = torch.Generator().manual_seed(len(shapes))
    parts = [torch.randn(shape, generator=g).to(device) for shape in shapes]
    runs = []
    for _ in range(2):
        outs = [torch.full((shape[1],), float("nan"), device=device) for shape in shapes]
        partial_sums.sum_partials(*zip(parts, outs))
        runs.append(outs)
    for i, (got, part) in enumerate(zip(runs[0], parts)):
        assert_close(got, part.double().sum(0), 1e-6, f"buffer {i} of {len(shapes)} ({tuple(part.shape)})")
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_each_buffer_takes_its_own_tile():
    """A buffer's rows in one step up to 64 (the fewest of 4, 16, 32, 64), the element block filling
    the 2048-element tile, whatever the other buffers of the launch."""
    assert partial_sums.blocks(1) == (4, 512)
    assert partial_sums.blocks(11) == (16, 128)
    assert partial_sums.blocks(17) == (32, 64)
    assert partial_sums.blocks(64) == (64, 32)
    assert partial_sums.blocks(4096) == (64, 32)


@pytest.mark.parametrize("bad", ["none", "five", "fp16 part", "strided part", "short out", "bf16 out"])
def test_bad_buffers_are_refused(bad):
    """A wrong count, dtype, layout or size names the buffer instead of summing the wrong memory."""
    part, out = torch.zeros(4, 8), torch.zeros(8)
    pairs = {
        "none": [],
        "five": [(part, out)] * 5,
        "fp16 part": [(part.half(), out)],
        "strided part": [(torch.zeros(4, 16)[:, :8], out)],
        "short out": [(part, torch.zeros(7))],
        "bf16 out": [(part, out.bfloat16())],
    }[bad]
    with pytest.raises(ValueError, match="sum_partials"):
        partial_sums.sum_partials(*pairs)
