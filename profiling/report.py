"""Ahead-of-time build report: registers, shared memory and spills of every kernel (SPEC §7).

    python -m msf.profiling.report [--arch 80 90] [--json PATH] [--module kernels.NAME ...] [--only SUBSTRING]
                             [--skip-slow]

Imports every module of the `kernels` package, collects its `AOT_SPECS` (a list of
`msf.kernels._common.AotSpec`) and `AOT_SPECS_SLOW` (builds that take ptxas about a minute each, left
out by `--skip-slow`, which is what the CI test runs), compiles each spec with

    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32),
                   options={"num_warps": ..., "num_stages": ...})

for every requested compute capability — no GPU needed — writes the cubin to a temporary file and
reads its resource usage with the `cuobjdump --dump-resource-usage` shipped inside Triton's package.
Prints one row per kernel × config × arch: registers per thread, shared memory (Triton's dynamic
allocation from the compile metadata, plus any static shared memory cuobjdump reports), local
memory bytes and stack-frame bytes. ptxas places register spills in the per-thread stack frame
(cuobjdump's STACK; `ptxas -v` prints them as "bytes stack frame, N bytes spill stores"), so a
kernel counts as spilling when LOCAL or STACK is non-zero; the "spill B" column shows their sum.

Exit status: 0 when every spec compiled with no spill; 1 when any module failed to import, any
spec failed to compile, or any kernel spills; 2 when cuobjdump is missing.

`TRITON_INTERPRET=1` turns `@triton.jit` into interpreter objects that cannot be compiled (and flips
`msf.kernels._common.dot` to its interpreter path), so when it is set in the environment the report
re-runs itself in a subprocess with it removed.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, asdict
from pathlib import Path

DEFAULT_ARCHS = (80, 90)


@dataclass
class Row:
    module: str
    name: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool
    registers: int | None = None
    shared_bytes: int | None = None
    local_bytes: int | None = None
    stack_bytes: int | None = None
    spill_stores: int | None = None   # from `ptxas -v`, run only for kernels with local memory
    spill_loads: int | None = None
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.ok and ((self.local_bytes or 0) + (self.stack_bytes or 0)))


def cuobjdump_path() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes, tool: Path) -> dict[str, int]:
    """Parse `cuobjdump --dump-resource-usage` of one cubin (one kernel function in it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
    funcs = [m.groups() for m in _USAGE.finditer(out)]
    if not funcs:
        raise RuntimeError(f"no resource line in cuobjdump output:\n{out}")
    # Triton emits one kernel per cubin; take the largest numbers if there are several.
    reg, stack, shared, local = (max(int(f[i]) for f in funcs) for i in range(4))
    return {"registers": reg, "stack_bytes": stack, "static_shared": shared, "local_bytes": local}


def _unwrap(fn):
    """The JITFunction under autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def compile_spec(spec, arch: int, tool: Path) -> dict[str, int]:
    fn = _unwrap(spec.fn)
    signature = dict(spec.signature)
    constexprs = dict(spec.constexprs)
    for param in fn.params:  # a constexpr the spec leaves out takes its default, if it has one
        default = param._param.default
        if param.name not in signature and param.name not in constexprs and param.is_constexpr \
                and default is not inspect.Parameter.empty:
            constexprs[param.name] = default
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"AotSpec {spec.name} gives no type or value for arguments {missing}")
    # `attrs` (e.g. tt.divisibility of pointers and strides) is the specialisation Triton's launcher
    # applies at run time; a spec that states it is built as the GPU would build it.
    compiled = build(fn, signature, constexprs, spec.attrs or None, arch,
                     {"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    return usage_of(compiled, arch, tool)


def build(fn, signature: dict, constexprs: dict, attrs: dict | None, arch: int, options: dict):
    """`triton.compile` of a JITFunction for compute capability `arch` (no GPU needed); Triton's
    on-disk cache makes a repeated build cheap."""
    import triton
    from triton.backends.compiler import GPUTarget
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def usage_of(compiled, arch: int, tool: Path) -> dict[str, int]:
    """Registers, shared memory, local memory / stack (and ptxas' spill counts when any) of a build."""
    usage = resource_usage(compiled.asm["cubin"], tool)
    usage["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0) or 0) + usage["static_shared"]
    if usage["local_bytes"] or usage["stack_bytes"]:
        usage.update(ptxas_spills(compiled.asm["ptx"], arch, tool.parent))
    return usage


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(ptx: str, arch: int, bin_dir: Path) -> dict[str, int]:
    """Spill stores/loads of a kernel as `ptxas -v` reports them (what its stack frame holds)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(bin_dir / "ptxas"), "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                              str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True).stderr
    found = [tuple(map(int, m.groups())) for m in _SPILLS.finditer(log)]
    if not found:
        return {}
    return {"spill_stores": max(f[0] for f in found), "spill_loads": max(f[1] for f in found)}


def kernel_modules() -> list[str]:
    """Every module of the `kernels` package, found without importing them."""
    root = Path(__file__).resolve().parents[1] / "kernels"
    return [f"msf.kernels.{i.name}" for i in sorted(pkgutil.iter_modules([str(root)]), key=lambda i: i.name)
            if i.name != "configs"]


def collect_specs(only: str | None = None, modules: list[str] | None = None, slow: bool = True):
    """[(module name, spec)] for the kernels.* modules, plus [(module name, error)] for failures.
    A module's AOT_SPECS_SLOW (builds that take ptxas minutes) are included unless `slow` is False."""
    specs, failures = [], []
    for modname in modules or kernel_modules():
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:  # a broken module is a failure of the report, not a crash
            failures.append((modname, f"import failed: {exc!r}"))
            continue
        slow_specs = (getattr(mod, "AOT_SPECS_SLOW", []) or []) if slow else []
        for spec in [*(getattr(mod, "AOT_SPECS", []) or []), *slow_specs]:
            if only is None or only in spec.name:
                specs.append((modname, spec))
    return specs, failures


def run(archs, only=None, verbose_errors=False, modules=None, slow=True) -> tuple[list[Row], list[tuple[str, str]]]:
    tool = cuobjdump_path()
    specs, failures = collect_specs(only, modules, slow)
    rows = []
    for modname, spec in specs:
        for arch in filter(spec.builds_on, archs):
            row = Row(modname, spec.name, arch, spec.num_warps, spec.num_stages, ok=False)
            try:
                usage = compile_spec(spec, arch, tool)
                row.registers = usage["registers"]
                row.shared_bytes = usage["shared_bytes"]
                row.local_bytes = usage["local_bytes"]
                row.stack_bytes = usage["stack_bytes"]
                row.spill_stores = usage.get("spill_stores")
                row.spill_loads = usage.get("spill_loads")
                row.ok = True
            except Exception as exc:
                row.error = traceback.format_exc() if verbose_errors else f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows, failures


def format_table(rows: list[Row]) -> str:
    head = f"{'kernel / config':58} {'sm':>3} {'warps':>5} {'regs':>5} {'smem B':>7} {'spill B':>7} {'stack':>5}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.ok:
            status = "ok"
            if r.spills:
                status = "SPILL" if r.spill_stores is None else \
                    f"SPILL (ptxas: {r.spill_stores} B stores, {r.spill_loads} B loads)"
            lines.append(f"{r.name:58} {r.arch:>3} {r.num_warps:>5} {r.registers:>5} {r.shared_bytes:>7} "
                         f"{r.local_bytes + r.stack_bytes:>7} {r.stack_bytes:>5}  {status}")
        else:
            first = (r.error or "").strip().splitlines()[-1:] or [""]
            lines.append(f"{r.name:58} {r.arch:>3} {r.num_warps:>5} {'-':>5} {'-':>7} {'-':>7} {'-':>5}  "
                         f"FAILED: {first[0][:200]}")
    return "\n".join(lines)


def _rerun_without_interpreter(argv, module: str = "msf.profiling.report") -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([sys.executable, "-m", module, *argv], env=env, cwd=root)


def unreported_launches(archs) -> list[str]:
    """The launches of one training step at the paper's shapes (the cost model's capture, with each
    arch's pinned configurations) that no AOT spec builds: a spec of the same kernel with the same
    warps, stages and BLOCK_* sizes. Empty when "no spills" in the report covers what a GPU runs."""
    from msf.profiling import cost
    specs, failures = collect_specs()
    missing = [f"{modname}: {err}" for modname, err in failures]
    by_kernel: dict[int, list] = {}
    for _modname, spec in specs:
        by_kernel.setdefault(id(spec.fn), []).append(spec)
    per_arch: dict[int, cost.Device] = {}  # each arch's first device (its pins and SM count)
    for d in cost.DEVICES.values():
        if d.arch in archs:
            per_arch.setdefault(d.arch, d)
    for device in per_arch.values():
        for op, stage in cost.op_instances():
            for launch in cost.capture(op, device, stage):
                names = launch.fn.arg_names
                blocks = {names[i]: v for (i,), v in launch.constexprs.items() if names[i].startswith("BLOCK")}
                warps, stages = launch.options["num_warps"], launch.options["num_stages"]
                if not any(s.num_warps == warps and s.num_stages == stages and s.builds_on(device.arch)
                           and all(s.constexprs.get(k) == v for k, v in blocks.items())
                           for s in by_kernel.get(id(launch.fn), [])):
                    missing.append(f"sm_{device.arch} {cost.op_label(op, stage)} {launch.kernel} "
                                   f"{blocks} w{warps} s{stages}")
    return sorted(set(missing))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m msf.profiling.report", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities to build for (default: 80 90)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--module", nargs="+", metavar="kernels.NAME",
                        help="report only these modules (default: every module of kernels/)")
    parser.add_argument("--only", help="build only the specs whose name contains this substring")
    parser.add_argument("--skip-slow", action="store_true",
                        help="leave out the modules' AOT_SPECS_SLOW (ptxas minutes each; what CI does)")
    parser.add_argument("--verbose-errors", action="store_true", help="print full compile tracebacks")
    parser.add_argument("--launches", action="store_true",
                        help="build nothing; list the launches of a training step at the paper's shapes that no "
                             "spec covers (exit 1 if any)")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _rerun_without_interpreter(argv)
    if args.launches:
        missing = unreported_launches(args.arch)
        archs = " and ".join(f"sm_{a}" for a in args.arch)
        print("\n".join(missing) if missing else f"every launch of the step on {archs} has an AOT spec")
        return 1 if missing else 0

    tool = cuobjdump_path()
    if not tool.is_file():
        print(f"cuobjdump not found at {tool}: cannot read resource usage", file=sys.stderr)
        return 2

    rows, failures = run(args.arch, args.only, args.verbose_errors, args.module, not args.skip_slow)
    print(format_table(rows))
    for modname, err in failures:
        print(f"{modname}: {err}")
    n_fail = sum(not r.ok for r in rows) + len(failures)
    n_spill = sum(1 for r in rows if r.spills)
    print(f"\n{len(rows)} builds ({len({r.name for r in rows})} specs × {len(args.arch)} archs, less those "
          "allowed on one only): "
          f"{n_fail} failed, {n_spill} spill")
    if args.verbose_errors:
        for r in rows:
            if not r.ok:
                print(f"\n--- {r.name} sm_{r.arch}\n{r.error}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"archs": args.arch, "rows": [dict(asdict(r), spills=r.spills) for r in rows],
                                         "import_failures": [{"module": m, "error": e} for m, e in failures]},
                                        indent=1))
    return 1 if (n_fail or n_spill) else 0


if __name__ == "__main__":
    sys.exit(main())
