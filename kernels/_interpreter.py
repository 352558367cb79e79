"""Triton 3.6's CPU interpreter without its redundant re-patching of `triton.language` (tests' speed).

Under `TRITON_INTERPRET=1` a launch swaps every builtin of `triton.language` (and of its `tensor`,
`math` and `core`) for an interpreted version, runs the programs and swaps them back
(`triton.runtime.interpreter._patch_lang`, then `scope.restore()`). Triton 3.6 also calls
`_patch_lang` on *every call of a `@triton.jit` helper* inside a program
(`InterpretedFunction.__call__`): it walks those modules with `inspect.getmembers` again, finds the
builtins already swapped (a swapped builtin is a plain lambda, no longer a builtin, so nothing is
wrapped twice), re-sets `range`, `static_range`, `multiple_of`, ... to equal replacements, and drops
the scope it made. Nothing changes, but the walk costs ~0.25 ms a call: with this project's helpers
called inside loops, 28 % of the interpreter's time on a model step (cProfile, 2026-12-07: 99 147
calls, 24 s of 84 s on the tests' tiny model).

`install()` wraps the launch and `_patch_lang`: inside a launch, a helper whose module sees no
language module the launch has not patched skips the call, which is all the real call amounts to.
Everything else goes to Triton's own `_patch_lang` unchanged, with one repair: a helper that sees a
module the kernel does not (`triton.language.core` alone) has its patch undone when the launch ends,
where Triton drops that scope and leaves the module patched for good. `_get_np_dtype` keeps its
answers (Triton's builds its table anew on every call: another 7 %). Together: the tests' tiny-model
step 28.1 → 18.1 s. It applies only to the Triton version it was read against (`_FOR_TRITON`) and only
where `TRITON_INTERPRET=1` starts the interpreter (not under triton-viz's sanitizer, which drives it
its own way); `MSF_PLAIN_INTERPRETER=1` turns it off. tests/test_interpreter_patch.py checks the
kernels give the same bits with and without it and that every launch leaves the language restored.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

_FOR_TRITON = "3.6.0"
_installed = None  # (Triton's _patch_lang, GridExecutor.__call__, _get_np_dtype) once install() has replaced them


class _Launch:
    """The running launch: the language modules patched so far (None: no launch is running) and the
    scopes of helpers' patches of modules the kernel did not see."""

    langs: "set[int] | None" = None
    helper_scopes: list = []


class _NothingToRestore:
    @staticmethod
    def restore() -> None:
        pass


class _LaunchScope:
    """The launch's own patch scope: restoring it first undoes the helpers' patches, newest first."""

    def __init__(self, scope):
        self.scope = scope

    def restore(self) -> None:
        while _Launch.helper_scopes:
            _Launch.helper_scopes.pop().restore()
        self.scope.restore()


_langs_of: dict = {}  # function -> ids of the language modules its globals hold (modules keep their imports)


def _language_modules(fn) -> set[int]:
    langs = _langs_of.get(fn)
    if langs is None:
        langs = _langs_of[fn] = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
    return langs


def _patch_lang_once(fn):
    langs = _language_modules(fn)
    if _Launch.langs is None:  # not inside a launch (Triton calls it in none such): as Triton does
        return _installed[0](fn)
    if langs and langs <= _Launch.langs:  # a helper inside the launch: its modules are patched already
        return _NothingToRestore
    scope = _installed[0](fn)
    first = not _Launch.langs  # the launch's own call (GridExecutor.__call__ restores what it returns)
    _Launch.langs |= langs
    if first:
        return _LaunchScope(scope)
    # a helper that sees a module the kernel does not (Triton drops this scope, leaving that module
    # patched after the launch): undone with the launch's
    _Launch.helper_scopes.append(scope)
    return scope


_np_dtypes: dict = {}  # Triton dtype -> numpy dtype, as Triton's _get_np_dtype maps it


def _get_np_dtype_memo(tt_dtype):
    """Triton's `_get_np_dtype` (which builds its 20-entry table anew on every call, ~0.03 ms, a few
    hundred thousand calls a model step), its answers kept: a block maps as its element type, a
    pointer (or a block of pointers) to uint64."""
    if isinstance(tt_dtype, tl.block_type):
        tt_dtype = tt_dtype.element_ty
    if isinstance(tt_dtype, tl.pointer_type):
        return _installed[2](tt_dtype)
    np_dtype = _np_dtypes.get(tt_dtype)
    if np_dtype is None:
        np_dtype = _np_dtypes[tt_dtype] = _installed[2](tt_dtype)
    return np_dtype


def _run_launch(self, *args, **kwargs):
    """GridExecutor.__call__ (one launch: its own _patch_lang, its programs, its restore) with the
    language modules it patches recorded while it runs."""
    _Launch.langs = set()
    try:
        return _installed[1](self, *args, **kwargs)
    finally:
        _Launch.langs = None


def wanted() -> bool:
    """The wrap applies: Triton 3.6.0's interpreter, started by TRITON_INTERPRET=1, not switched off."""
    return (triton.__version__ == _FOR_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
            and os.environ.get("MSF_PLAIN_INTERPRETER") != "1")


def install() -> bool:
    """Wrap the interpreter's `_patch_lang` and launch (once); True when the wrap is in place."""
    global _installed
    if _installed is not None:
        return True
    if not wanted():
        return False
    from triton.runtime import interpreter
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "GridExecutor", "_get_np_dtype")):
        return False
    _installed = (interpreter._patch_lang, interpreter.GridExecutor.__call__, interpreter._get_np_dtype)
    interpreter._patch_lang = _patch_lang_once
    interpreter.GridExecutor.__call__ = _run_launch
    interpreter._get_np_dtype = _get_np_dtype_memo
    return True


def uninstall() -> None:
    """Put Triton's own `_patch_lang` and launch back (the tests' comparison)."""
    global _installed
    if _installed is not None:
        from triton.runtime import interpreter
        interpreter._patch_lang, interpreter.GridExecutor.__call__, interpreter._get_np_dtype = _installed
        _installed = None
        _Launch.langs, _Launch.helper_scopes = None, []
