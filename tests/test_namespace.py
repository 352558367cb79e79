"""One import namespace (issue 25): the project installs and imports as `msf` alone, so it coexists
with PyPI's `kernels` (which transformers requires) and its other generic folder names; no module
is imported twice under two names."""
import importlib
import importlib.metadata
import os
import pkgutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "train", "bench", "profiling", "checking")


def test_only_msf_is_installed_at_the_top_level():
    dist = importlib.metadata.distribution("microsegformer-triton")
    assert dist.read_text("top_level.txt").split() == ["msf"]
    assert dist.entry_points.select(group="console_scripts", name="msf")[0].value == "msf.train.cli:main"


def test_outside_the_checkout_the_folders_are_not_top_level_modules(tmp_path):
    """From any other directory (where a user's code runs), `import kernels` must find PyPI's
    package or nothing, never this project's folder; `msf.kernels` is ours."""
    code = ("import importlib.util as u, msf.kernels; "
            f"print([n for n in {FOLDERS!r} if u.find_spec(n) is not None and "
            f"str(u.find_spec(n).origin).startswith({str(REPO)!r})]); print(msf.kernels.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-2000:]
    shadowing, ours = done.stdout.split("\n")[:2]
    assert shadowing == "[]" and ours == str(REPO / "kernels" / "__init__.py")


def test_no_module_is_imported_under_two_names():
    packages = [importlib.import_module(name) for name in ("msf", *(f"msf.{folder}" for folder in FOLDERS))]
    for package in packages:
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{package.__name__}."):
            if not info.name.rsplit(".", 1)[1].startswith(("__main__", "test_")):
                importlib.import_module(info.name)
    for name in ("msf.run", "msf.msf", "msf.tests"):  # the checkout's other files are not msf's
        with pytest.raises(ImportError):
            importlib.import_module(name)
    names_of = defaultdict(list)
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(REPO):
            relative = Path(path).resolve().relative_to(REPO)
            if relative.parts[0] in ("msf", "tests", *FOLDERS):  # the project's files, not .venv's
                names_of[Path(path).resolve()].append(name)
    twice = {str(p.relative_to(REPO)): names for p, names in names_of.items() if len(names) > 1}
    assert not twice, twice
    assert {f"msf.{folder}" for folder in FOLDERS} <= set(sys.modules)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MSF_COEXIST_TEST") != "1",
                    reason="builds a venv with transformers from PyPI (minutes, network): set MSF_COEXIST_TEST=1")
def test_a_fresh_venv_with_transformers_and_this_project(tmp_path):
    """The user's situation: transformers 5.25 (and so PyPI's `kernels`) and this project, installed
    as a wheel, in one environment: both import, the parser runs, `msf demo` runs."""
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [[sys.executable, "-m", "venv", str(venv)],
             pip + ["-r", str(REPO / "requirements.txt"), "transformers==5.25.0"],
             pip + ["--no-deps", str(REPO)]]
    for step in steps:
        subprocess.run(step, check=True, timeout=HANG_GUARD_S, cwd=tmp_path)
    check = ("import kernels, transformers, numpy as np, msf.kernels; from msf import FaceParser; "
             "assert 'site-packages/kernels' in kernels.__file__ and 'site-packages/msf/kernels' in msf.kernels.__file__; "
             "print(FaceParser.from_pretrained(engine='torch')(np.zeros((64, 64, 3), np.uint8)).shape)")
    done = subprocess.run([str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0 and "(64, 64)" in done.stdout, done.stderr[-2000:]
    demo = subprocess.run([str(venv / "bin" / "msf"), "demo", "--size", "64"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert demo.returncode == 0 and "MicroSegFormer" in demo.stdout, demo.stderr[-2000:]
