#!/usr/bin/env python3
"""Bootstrap and run the project with nothing but Python installed.

    python3 run.py train [--data DIR] [options]   # the main job (see `python3 run.py train --help`)
    python3 run.py test [pytest args]             # the test suite (kernels under TRITON_INTERPRET=1 without a GPU)
    python3 run.py msf <subcommand> ...           # any `msf` subcommand (eval, predict, bench, ...)
    python3 run.py extra sanitize|bench           # add an optional extra to .venv (see EXTRAS)

On first use (and whenever requirements.txt or pyproject.toml change) it creates `.venv/` beside
this file and installs the pinned dependencies plus the project itself in editable mode. It only
uses the standard library, so it runs before anything else is installed.

Then it replaces itself (exec) with the virtual environment's Python running the command, in the
caller's working directory: relative paths mean what they mean where you typed them, and a
signal sent to this process (Ctrl-C, kill -9) reaches the command itself, which has no parent
left to orphan it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".requirements.sha256"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


# Optional extras, not in the default environment: name -> (requirements file, file of packages
# installed without their declared dependencies).
EXTRAS = {"sanitize": ("requirements-sanitize.txt", "requirements-sanitize-nodeps.txt"),
          "bench": (None, "requirements-bench.txt")}


def _requirements_digest() -> str:
    digest = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _pip() -> list[str]:
    return [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]


def install_extra(name: str) -> int:
    """Install the optional extra `name` into .venv (made first if needed)."""
    if name not in EXTRAS:
        print(f"run.py extra: unknown extra {name!r}; choose from {', '.join(EXTRAS)}", file=sys.stderr)
        return 2
    ensure_venv()
    requirements, no_deps = EXTRAS[name]
    if requirements:
        subprocess.run(_pip() + ["-r", str(ROOT / requirements)], check=True)
    if no_deps:
        subprocess.run(_pip() + ["--no-deps", "-r", str(ROOT / no_deps)], check=True)
    print(f"[run.py] extra {name!r} installed in {VENV}")
    return 0


def ensure_venv() -> None:
    """Create or refresh the virtual environment when the pinned requirements changed."""
    wanted = _requirements_digest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not PYTHON.exists():
        print(f"[run.py] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("[run.py] installing pinned dependencies (first run takes a minute or two)", flush=True)
    pip = _pip()
    subprocess.run(pip + ["-r", str(ROOT / "requirements.txt")], check=True)
    subprocess.run(pip + ["--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True)
    STAMP.write_text(wanted + "\n")


# pytest-xdist workers at most: the suite is CPU-bound Python (the Triton interpreter) and each worker
# holds its own torch import (~1 GB with compile caches), so a few cores are what pays
MAX_TEST_WORKERS = 4


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 cpu.max, else v1's CFS quota), or
    None where there is none: a container may see every host core in its affinity yet get two."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            quota, period = fields[0], (fields[1] if period_file is None else Path(period_file).read_text().strip())
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            return int(quota) / int(period)
    return None


def worker_count() -> int:
    """The cores this process may run on (its affinity and its cgroup's quota, not the host's count),
    up to MAX_TEST_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, min(cores, MAX_TEST_WORKERS))


def pytest_args(args: list[str]) -> list[str]:
    """`args` with -q in front (a dot a test) unless they set the verbosity themselves (-v, -vv, -q,
    --verbose, --quiet): `run.py test -v` lists every test by name. On a machine with two or more
    cores the tests run in that many pytest-xdist workers (`--dist worksteal`: an idle worker takes
    queued tests from a busy one, so a few long tests do not leave a core idle at the end), unless
    the arguments choose (-n, --numprocesses, --dist, -p no:xdist)."""
    sets_verbosity = any(a in ("--verbose", "--quiet") or (len(a) > 1 and a[0] == "-" and a[1] != "-"
                                                          and set(a[1:]) <= {"v", "q"}) for a in args)
    out = list(args) if sets_verbosity else ["-q", *args]
    chooses_workers = any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist"
                          or a.startswith("-pno:xdist") for a in args)
    workers = worker_count()
    if workers > 1 and not chooses_workers:
        out = ["-n", str(workers), "--dist", "worksteal", *out]
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "extra":
        return install_extra(rest[0] if rest else "")
    ensure_venv()
    if command == "test":
        # tests/conftest.py turns on TRITON_INTERPRET=1 when there is no GPU; the suite runs from the checkout
        os.chdir(ROOT)
        cmd = [str(PYTHON), "-m", "pytest", *pytest_args(rest)]
    elif command == "msf":
        cmd = [str(PYTHON), "-m", "msf", *rest]
    else:  # train, eval, predict, bench, demo ... are msf subcommands
        cmd = [str(PYTHON), "-m", "msf", command, *rest]
    sys.stdout.flush()
    os.execv(str(PYTHON), cmd)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
