"""Shared test fixtures: the real data folder (skipped cleanly when absent) and tensor comparison."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; this must be decided
# before anything imports Triton (msf.kernels._common reads it at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`run.py test` runs a worker a core) each worker keeps to its share of the
# cores: torch's intra-op pool would otherwise start a thread a core in every worker.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // _WORKERS))

REPO = Path(__file__).resolve().parents[1]
# How long a test waits on a subprocess or a signal before calling it hung. A guard against a hang,
# never a budget: every such wait finishes in seconds to minutes alone, and a loaded machine makes it
# slower, not wrong (no test may fail because the machine is busy).
HANG_GUARD_S = 3600
# The shared data sits beside the checkout (../shared/data); MSF_DATA overrides it.
REAL_DATA = Path(os.environ.get("MSF_DATA", REPO.parent / "shared" / "data" / "celebamask-hq-mini"))


def pytest_runtest_logreport(report):
    """With MSF_FAILURE_LOG set, each failure's report is appended to that file as it happens (a
    GPU stage cut at its time cap loses pytest's end-of-session summary, never these). Under
    pytest-xdist this runs in the controller, once per report."""
    path = os.environ.get("MSF_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=True, scope="session")
def private_onnx_cache(tmp_path_factory):
    """ONNX exports (msf.export.cached_onnx) go to a folder of the test session's, not ~/.cache."""
    os.environ["MSF_CACHE"] = str(tmp_path_factory.mktemp("msf-cache"))
    yield


@pytest.fixture
def no_tf32():
    """fp32 parity on a GPU compares fp32 with fp32: cuDNN convolutions default to TF32 (10-bit
    mantissa, ~1e-3 relative error) on Ampere and later, which would put the eager reference
    itself outside a 1e-4 tolerance. Off for the test, restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "val" / "images").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (set MSF_DATA to its folder)")
    return REAL_DATA


def one_line_error(capsys, argv: list[str], *patterns: str, code: int = 2):
    """Run `msf ARGV`: it exits with `code` and says one line on stderr holding every pattern.
    Returns what it printed (`.out`, `.err`)."""
    from msf.train.cli import main
    assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    for pattern in patterns:
        assert pattern in err, err
    return captured


def make_mini(root: Path, n: int = 4, size: int = 32) -> Path:
    """A data folder in the mini layout (train and val: `n` synthetic faces each, size²)."""
    from PIL import Image
    from msf.data import SyntheticFaces, write_mask
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        faces = SyntheticFaces(n, size, seed=3)
        for i in range(n):
            image, mask = faces.load_pair(i)
            Image.fromarray(image).save(root / split / "images" / f"f{i}.jpg")
            write_mask(root / split / "masks" / f"f{i}.png", mask)
    return root


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "tensor") -> None:
    """Relative-norm comparison ‖a−e‖/‖e‖ ≤ rel, with a report of where the worst element is."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite elements"
    diff = (a - e).abs()
    err = (diff.norm() / e.norm().clamp(min=1e-30)).item()
    if err > rel:
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{name}: relative error {err:.3e} > {rel:.1e}; worst at {worst}: "
                             f"got {a[worst].item():.6g}, expected {e[worst].item():.6g}")


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float,
                       floor_rel: float, name: str = "gradients") -> None:
    """Compare two models' gradients (name → tensor) against the scale of the whole model's gradient.

    Two checks, both able to fail on a real bug:
    - the whole gradient (all tensors concatenated): ‖Δ‖ ≤ rel·‖g‖;
    - each tensor p of n_p of the model's n elements: ‖Δ_p‖ ≤ rel·‖g_p‖ + floor_rel·‖g‖·√(n_p/n),
      its own scale plus a floor tied to the share of the whole gradient's norm that n_p elements
      carry when spread evenly.
    The floor keeps a tensor whose true gradient nearly cancels (a bias of 1e-7 in a model whose
    gradient is ~0.2) from turning low-precision rounding into a failure that depends on which CPU
    rounds the bf16 arithmetic (native AVX512-BF16 or emulated); a dropped, sign-flipped or
    misscaled gradient of a tensor that matters to the update is still far outside it.
    """
    assert actual.keys() == expected.keys(), f"{name}: parameters differ: {sorted(actual.keys() ^ expected.keys())}"
    a = {k: v.detach().double().cpu().flatten() for k, v in actual.items()}
    e = {k: v.detach().double().cpu().flatten() for k, v in expected.items()}
    e_all = torch.cat(list(e.values()))
    whole, n_all = e_all.norm().item(), e_all.numel()
    assert_close(torch.cat(list(a.values())), e_all, rel, f"{name} (whole model, ‖g‖ = {whole:.3g})")
    failures = []
    for key in e:
        err, own = (a[key] - e[key]).norm().item(), e[key].norm().item()
        allowed = rel * own + floor_rel * whole * (e[key].numel() / n_all) ** 0.5
        if not err <= allowed:  # NaN fails too
            failures.append(f"{key}: ‖Δ‖ {err:.3e} > allowed {allowed:.3e} (own ‖g‖ {own:.3e})")
    assert not failures, f"{name}, {len(failures)} tensors: " + "; ".join(failures)


def kernel_device(name: str) -> str:
    """The device a kernel parity case runs on, or a skip saying why it cannot run here: "cuda"
    runs the compiled kernels (not under the interpreter), "cpu" runs them through the interpreter."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if interpret:
            pytest.skip("TRITON_INTERPRET=1: the compiled kernels are not exercised")
    elif not interpret:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return name


KERNEL_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

GPU_SMS = {"sm_90": 132, "sm_80": 108}  # H100 SXM, A100: the host code sizes its chunks by the SM count


@contextlib.contextmanager
def gpu_geometry(kind: str):
    """Under the interpreter, launch as on a GPU of device kind `kind`: each kernel takes its pinned
    configs.json entry for `kind` (`configs.for_device`) and the host code sizes its chunks and grids
    by that GPU's SM count. The model-level tests run here (`model_at_gpu_tiles`): the GPU's tiles are
    what the model runs on a GPU, and the interpreter runs them in about half the time of its own
    small tiles (fewer programs, each a few numpy operations on larger arrays), which the op-level
    parity tests keep covering."""
    from msf.kernels import configs
    with configs.for_device(kind, sms=GPU_SMS[kind]):
        yield


@contextlib.contextmanager
def model_at_gpu_tiles(device: str):
    """`gpu_geometry("sm_90")` where the model's kernels run through the interpreter (`device` "cpu");
    on a GPU the device's own configurations."""
    with gpu_geometry("sm_90") if device == "cpu" else contextlib.nullcontext():
        yield


def poison_new_buffers(monkeypatch, *kernel_modules) -> None:
    """Make every buffer the kernel modules allocate (through their `_new`) start as NaN, so an
    element a kernel should write but leaves unwritten fails the test instead of reading as 0."""
    def new(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    for module in kernel_modules:
        monkeypatch.setattr(module, "_new", new)
