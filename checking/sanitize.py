"""Memory-safety check of every fused op: every load and store of every kernel, forward and backward.

    python -m msf.checking.sanitize                     # every op, every case below (concrete engine)
    python -m msf.checking.sanitize --op head_loss      # one op (repeatable)
    python -m msf.checking.sanitize --quick             # the first case of each op
    python -m msf.checking.sanitize --list              # the case names
    python -m msf.checking.sanitize --engine symbolic   # Triton-Sanitizer (triton-viz) instead

Each case runs an op's forward and backward (every Triton kernel behind it) on small CPU tensors,
chosen to reach every dispatch branch: odd sizes, s = 1, d = 192, NCHW and channels-last, sliced
views, autocast mixes. The command prints one line per case and, for every bad access, the kernel
source line, the argument and the offending address; it exits 1 if there is any (or if a case fails
to run), 0 when every case is clean.

Two engines:
- `concrete` (default; `msf.checking.bounds`): runs the cases under Triton's interpreter and checks every
  address each access really computes, for every program, against the *elements* of the launch's
  tensor arguments (a sliced view's gaps count as outside). Exact at the shapes run, and it runs
  every case (about 15 s of CPU in all). It sets `TRITON_INTERPRET=1` itself. `tests/test_sanitize.py`
  runs every case this way in CI, plus three planted bad accesses that must be reported.
- `symbolic`: Triton-Sanitizer (triton-viz 3.0, SPEC §7) executes every launch symbolically and
  checks each masked address with an SMT solver for all programs at once. Stronger in principle,
  but 3.0 cannot run most of these kernels (below), so it is kept for the ops it can check.

Symbolic engine details. How it hooks in: like triton-viz's own `triton-sanitizer` command, it replaces `triton.jit` and
`triton.autotune` by wrappers that trace each kernel with a Sanitizer client *before* `kernels` is
imported, and it must run without `TRITON_INTERPRET=1` (the sanitizer drives Triton's interpreter
itself; with the variable set its autotune warm-up fails). `msf.kernels._common.INTERPRET` recognises
the wrapped `triton.jit`, so the kernels take their interpreter paths (bf16 dots upcast, one config).
Here the Sanitizer records accesses instead of aborting at the first one, so a run lists them all.

Values are symbolic under the sanitizer, so the numbers the ops return are meaningless here (parity
is the tests' job). One substitution: triton-viz 3.0 cannot evaluate `tl.argmax` on symbolic values
(its generic index reduction has no symbolic form), so during these runs `tl.argmax(x, axis)` is
replaced by an int32 tensor of the same shape as the reduction (`tl.max(x, axis)`); the argmax result
is only ever stored as data, never used in an address, so the checked addresses are unchanged.
One fix: triton-viz 3.0 computes the bounds of a non-contiguous view wrongly (`_row_segments`).

What triton-viz 3.0 can check here (measured 2026-11-29, 2-core CPU; the CI test runs toy_oob):
- upsample_argmax: clean on the generic kernel's cases; on the row kernels (same-size, s = 1 case)
  it fails ("SymbolicExprDataWrapper cannot coerce type z3 ArithRef to int").
- toy_oob: reported, with its source line.
- head_loss: no result; the smallest case ran over 4 minutes (its kernels loop with `while` on
  runtime bounds), so each case stops at --case-timeout and counts as a failure.
- attention, attention_sublayer: the sanitizer fails in the backward kernels: its symbolic
  `tl.trans` result has no shape, so the following `tl.dot` asserts ("input and other must have
  equal ranks >= 2").
- lmsa: runs, and reports accesses in `_depthwise`, the gram and dx kernels that are in bounds by
  inspection (e.g. `tl.load(w_ptr + t * C)`, t < KS², inside the KS²×C tap table, reported with one
  address for three different tables): the loop handling of triton-viz 3.0 mixes up helpers called
  with different arguments. Not trusted either way; the parity tests poison outputs instead.
So `--engine symbolic` fails (exit 1) on the full list today; it is the place to re-check when triton-viz
improves.

`--op toy_oob` runs three deliberately bad loads (one element past the end; the gap of a sliced view,
inside its storage; one view's pointer running into its neighbour): each must be reported (the test
suite checks that it is, so this check can fail). triton-viz reports the first.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Callable

import triton                  # patched by install(), before any kernel is defined
import triton.language as tl

def _engine(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--engine="):
            return arg.split("=", 1)[1]
        if arg == "--engine" and i + 1 < len(argv):
            return argv[i + 1]
    return "concrete"


if __name__ == "__main__":
    if _engine(sys.argv[1:]) == "concrete":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            # the kernels read the variable when imported: start again with it set
            os.execve(sys.executable, [sys.executable, "-m", "msf.checking.sanitize", *sys.argv[1:]],
                      {**os.environ, "TRITON_INTERPRET": "1"})
    else:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            sys.exit("msf.checking.sanitize: unset TRITON_INTERPRET (Triton-Sanitizer drives the interpreter itself "
                     "and its autotune warm-up fails under TRITON_INTERPRET=1)")
        if "kernels" in sys.modules:
            # `python -m msf.checking.sanitize` imported the package (and every kernel) before this line:
            # run this file again as a plain script, which imports nothing of `kernels` before install().
            os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

_SANITIZERS: list = []   # one Sanitizer client per traced kernel, in creation order


def install() -> None:
    """Wrap `triton.jit` / `triton.autotune` with Sanitizer tracing; must precede `import kernels`."""
    if "msf.kernels._common" in sys.modules:
        raise RuntimeError("msf.checking.sanitize.install() must run before the kernels are imported")
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interpreter
    import triton_viz
    from triton_viz import wrapper
    from triton_viz.clients import Sanitizer

    def trace(kernel):
        client = Sanitizer(abort_on_error=False)
        _SANITIZERS.append(client)
        return triton_viz.trace(client=client)(kernel)

    jit = wrapper.create_patched_jit(trace)        # defined in triton_viz: what _common checks
    triton.jit = tl.jit = interpreter.jit = jit
    triton.autotune = wrapper.create_patched_autotune(trace)

    def argmax_shape_only(input, axis, tie_break_left=True, keep_dims=False):
        # see the module docstring: same shape and dtype class, symbolic value
        return tl.max(input, axis, keep_dims=keep_dims).to(tl.int32)
    tl.argmax = argmax_shape_only

    import triton_viz.clients.sanitizer.sanitizer as symbolic_sanitizer
    symbolic_sanitizer.get_physical_addr_from_tensor_slice = _row_segments


def _row_segments(tensor) -> list[tuple[int, int]]:
    """First and last byte address of every innermost row of a strided view (unit inner stride).
    Replaces triton-viz 3.0's version, which adds the view's storage offset on top of data_ptr()
    (that already includes it), so it shifted the bounds of every sliced view and reported
    accesses to the view's last elements as out of bounds."""
    import itertools
    inner = min(range(tensor.dim()), key=tensor.stride)
    outer = [d for d in range(tensor.dim()) if d != inner]
    size, base = tensor.element_size(), tensor.data_ptr()
    segments = []
    for idx in itertools.product(*(range(tensor.size(d)) for d in outer)):
        offset = sum(i * tensor.stride(d) for i, d in zip(idx, outer))
        segments.append((base + offset * size, base + (offset + tensor.size(inner) - 1) * size))
    return segments


def out_of_bounds_records() -> list[list]:
    """Each Sanitizer client's records so far (one list per traced kernel)."""
    return [list(getattr(client, "records", [])) for client in _SANITIZERS]


def _records_since(before: list[list]) -> list:
    now = out_of_bounds_records()
    return [r for i, records in enumerate(now) for r in records[len(before[i]) if i < len(before) else 0:]]


def _share_loop_patcher() -> None:
    """triton-viz rewrites `for` loops of every traced function to call `_triton_viz_loop_patcher`,
    but defines that name only in the launched kernel's module; a loop inside a @triton.jit helper
    of another module (the attention sweeps reused by attention_sublayer) then fails with a
    NameError. Give every kernel module the name."""
    from triton_viz.core.patch import _loop_patcher
    from msf import kernels  # noqa: F401  (imports every kernel module)
    for name, module in list(sys.modules.items()):
        if name.startswith("kernels.") and module is not None:
            module._triton_viz_loop_patcher = _loop_patcher


def describe(record) -> str:
    where = record.user_code_tracebacks[-1] if record.user_code_tracebacks else None
    place = f"{os.path.relpath(where.filename)}:{where.lineno} {where.line_of_code.strip()}" if where else "?"
    kind = getattr(record.op_type, "__name__", str(record.op_type))
    tensor = record.tensor
    return (f"{kind} out of bounds at {place} (tensor {record.tensor_name or '?'} "
            f"{tuple(tensor.shape)} {tensor.dtype} at 0x{tensor.data_ptr():x}, address 0x{record.violation_address:x})")


# ----------------------------------------------------------------------------------------------
# cases: (name, function running forward and backward); small shapes covering each dispatch branch
# ----------------------------------------------------------------------------------------------
def _rand(*shape, dtype=None, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype or torch.float32)


def _backward(out, leaves):
    import torch
    torch.autograd.grad(out.float().sum() if out.dim() == 0 else out, leaves,
                        None if out.dim() == 0 else torch.ones_like(out))


def _head_loss_case(b, k, h, w, sh, sw, dtype, layout="nchw", tdtype="uint8", sliced=False):
    def run():
        import torch
        from msf.kernels.head_loss import head_loss
        src = _rand(b, k + (3 if sliced else 0), h, w, dtype=dtype)
        logits = src[:, 1:1 + k] if sliced else src
        if layout == "channels_last":
            logits = logits.contiguous(memory_format=torch.channels_last)
        logits = logits.detach().requires_grad_()
        t = torch.randint(0, k, (b, h * sh + (2 if sliced else 0), w * sw), dtype=getattr(torch, tdtype))
        targets = t[:, 1:1 + h * sh] if sliced else t
        _backward(head_loss(logits, targets), [logits])
    return run


def _upsample_argmax_case(b, k, h, w, size, dtype, layout="nchw", sliced=False):
    def run():
        import torch
        from msf.kernels.upsample_argmax import upsample_argmax
        src = _rand(b, k, h, w + (4 if sliced else 0), dtype=dtype)
        logits = src[..., 2:2 + w] if sliced else src
        if layout == "channels_last":
            logits = logits.contiguous(memory_format=torch.channels_last)
        upsample_argmax(logits, size)
    return run


def _attention_case(b, n, m, d, dtype, allow_tf32=False, bwd_chunk_rows=None):
    def run():
        from msf.kernels.attention import attention
        q_wide = _rand(b, n, d + 8, dtype=dtype).requires_grad_()
        kv = _rand(b, m, 2 * d, dtype=dtype, seed=1).requires_grad_()
        k, v = kv.split(d, dim=-1)                 # column halves: strided views, as in the model
        out = attention(q_wide[..., 4:4 + d], k, v, allow_tf32=allow_tf32, bwd_chunk_rows=bwd_chunk_rows)
        _backward(out, [q_wide, kv])
    return run


def _sublayer_case(b, n, m, c, dtype, kv_dtype=None, bwd_chunk_rows=None, wg_chunk_rows=None):
    """`dtype` for x, residual and weights; `kv_dtype` (bf16/fp16) for the mixed-precision path."""
    def run():
        from msf.kernels.attention_sublayer import attention_sublayer
        x = _rand(b, n, c, dtype=dtype).requires_grad_()
        res = _rand(b, n, c, dtype=dtype, seed=1).requires_grad_()
        kv = _rand(b, m, 2 * c, dtype=kv_dtype or dtype, seed=2).requires_grad_()
        k, v = kv.split(c, dim=-1)
        ws = [(_rand(c, c, seed=3) * c ** -0.5).to(dtype).requires_grad_(), _rand(c, dtype=dtype, seed=4).requires_grad_(),
              (_rand(c, c, seed=5) * c ** -0.5).to(dtype).requires_grad_(), _rand(c, dtype=dtype, seed=6).requires_grad_()]
        out = attention_sublayer(x, res, k, v, *ws, bwd_chunk_rows=bwd_chunk_rows, wg_chunk_rows=wg_chunk_rows)
        _backward(out, [x, res, kv, *ws])
    return run


def _ffn_case(rows, c, hid, dtype, autocast=False, wg_chunk_rows=None):
    """x as a column slice of a wider tensor (made contiguous by the op); `autocast`: fp32 x and
    parameters under CPU bf16 autocast (the mixed path)."""
    def run():
        import contextlib
        import torch
        from msf.kernels.ffn_sublayer import ffn_sublayer
        x = _rand(rows, c + 4, dtype=dtype)[:, 2:2 + c].detach().requires_grad_()
        ps = [_rand(c, seed=1), _rand(c, seed=2), _rand(hid, c, seed=3) * c ** -0.5, _rand(hid, seed=4),
              _rand(c, hid, seed=5) * hid ** -0.5, _rand(c, seed=6)]
        ps = [p.to(dtype).requires_grad_() for p in ps]
        mixed = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with mixed:
            out = ffn_sublayer(x, *ps, wg_chunk_rows=wg_chunk_rows)
        _backward(out, [x, *ps])
    return run


def _ffn_stage_case(b, h, w, c, hid, dtype, autocast=False, feeds_next=True):
    """A stage's last FFN sublayer with the stage's final norm (B×(h·w)×C tokens): the norm in the
    forward kernel and, at C ≤ 64, its backward in the dx kernel; both maps' gradients in play."""
    def run():
        import contextlib
        import torch
        from msf.kernels.ffn_sublayer import ffn_sublayer
        from msf.reference import StageNorm
        x = _rand(b, h * w, c, dtype=dtype).detach().requires_grad_()
        ps = [_rand(c, seed=1), _rand(c, seed=2), _rand(hid, c, seed=3) * c ** -0.5, _rand(hid, seed=4),
              _rand(c, hid, seed=5) * hid ** -0.5, _rand(c, seed=6), _rand(c, seed=7), _rand(c, seed=8)]
        ps = [p.to(dtype).requires_grad_() for p in ps]
        norm = StageNorm(ps[6], ps[7], 1e-5, (h, w), feeds_next, decoder_linear=True)
        mixed = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with mixed:
            y, y_next = ffn_sublayer(x, *ps[:6], 1e-5, norm)
        outs = [y, y_next] if feeds_next else [y]
        torch.autograd.grad(outs, [x, *ps], [torch.ones_like(t) for t in outs])
    return run


def _decoder_case(b, h, w, chans, factors, e, dtype, dropout_p=0.0, autocast=False):
    """The decoder MLP on four stage maps (stage 1 a channel slice of a wider map), dropout optional;
    `autocast`: fp32 maps and parameters under CPU bf16 autocast."""
    def run():
        import contextlib
        import torch
        from msf.kernels.decoder_mlp import decoder_mlp
        from msf.reference import DecoderParams
        feats = [_rand(b, c + 2, h // s, w // s, seed=i, dtype=dtype)[:, 1:1 + c] if i == 0 else
                 _rand(b, c, h // s, w // s, seed=i, dtype=dtype) for i, (c, s) in enumerate(zip(chans, factors))]
        feats = [f.detach().requires_grad_() for f in feats]
        ps = [_rand(e, c, seed=10 + i) * c ** -0.5 for i, c in enumerate(chans)]
        ps += [_rand(e, seed=20 + i) for i in range(4)]
        ps += [_rand(e, 4 * e, seed=30) * (4 * e) ** -0.5, _rand(e, seed=31), _rand(e, e, seed=32) * e ** -0.5,
               _rand(e, seed=33)]
        ps = [p.to(dtype).requires_grad_() for p in ps]
        params = DecoderParams(tuple(ps[:4]), tuple(ps[4:8]), *ps[8:])
        mixed = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with mixed:
            out = decoder_mlp(feats, params, dropout_p, training=True, seed=torch.tensor([3]))
        _backward(out, [*feats, *ps])
    return run


def _lmsa_case(b, c, h, w, dtype, layout="nchw", sliced=False, classes=0):
    """LMSA forward and backward; with `classes`, `lmsa_classifier` (the classifier inside its kernels)."""
    def run():
        import torch
        from msf.backend import LMSAParams
        from msf.kernels.lmsa import lmsa, lmsa_classifier
        r = 3 * c // 8
        ps = [_rand(c, 1, k, k, seed=k) / k for k in (3, 5, 7)] + [_rand(c, c, seed=10 + i) * c ** -0.5 for i in range(3)]
        ps += [_rand(c, seed=20 + i) * 0.3 for i in range(3)]
        ps += [_rand(r, 3 * c, seed=30), _rand(r, seed=31), _rand(3 * c, r, seed=32), _rand(3 * c, seed=33)]
        ps = [p.to(dtype).requires_grad_() for p in ps]
        src = _rand(b, c + (4 if sliced else 0), h, w, dtype=dtype)
        x = src[:, 2:2 + c] if sliced else src
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.detach().requires_grad_()
        params = LMSAParams(tuple(ps[0:3]), tuple(ps[3:6]), tuple(ps[6:9]), *ps[9:13])
        if classes:
            head = [(_rand(classes, c, seed=40) * c ** -0.5).to(dtype).requires_grad_(),
                    (_rand(classes, seed=41) * 0.3).to(dtype).requires_grad_()]
            _backward(lmsa_classifier(x, params, *head), [x, *ps, *head])
        else:
            _backward(lmsa(x, params), [x, *ps])
    return run


def _copy_shifted(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """The self-test's kernel body (jit-wrapped at run time, after install()): it loads one element
    past the end of its input."""
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs + 1, mask=offs < n), mask=offs < n)


def _copy_rows(x_ptr, y_ptr, n_rows, n_cols, stride_x, READ_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """The self-tests' second kernel: copies an n_rows × n_cols view row by row, reading READ_COLS
    columns of each row (more than n_cols is a bug)."""
    offs = tl.arange(0, BLOCK)
    row, col = offs // READ_COLS, offs % READ_COLS
    inside = row < n_rows
    value = tl.load(x_ptr + row * stride_x + col, mask=inside)
    tl.store(y_ptr + row * n_cols + col, value, mask=inside & (col < n_cols))


def _toy_oob_case():
    def run():
        import torch
        x, y = torch.zeros(13), torch.zeros(13)
        triton.jit(_copy_shifted)[(1,)](x, y, 13, BLOCK=16)
    return run


def _toy_gap_case():
    """Reads the fourth column of a 3-column slice of a 4×8 tensor: inside the storage and inside the
    view's span, outside its elements (a span or storage check passes it)."""
    def run():
        import torch
        view = torch.zeros(4, 8)[:, 2:5]
        triton.jit(_copy_rows)[(1,)](view, torch.zeros(4, 3), 4, 3, view.stride(0), READ_COLS=4, BLOCK=16)
    return run


def _toy_neighbour_case():
    """Reads 12 elements through the pointer of the first of two adjacent 6-element views of one buffer:
    every address belongs to some argument, none holds them all."""
    def run():
        import torch
        buf = torch.zeros(12)
        first, second = buf[:6], buf[6:]
        assert second.data_ptr() == first.data_ptr() + 24     # the neighbour is really there
        triton.jit(_copy_rows)[(1,)](first, second, 2, 3, 6, READ_COLS=6, BLOCK=16)
    return run


def cases() -> dict[str, list[tuple[str, Callable[[], None]]]]:
    """op → [(case name, run)]; the first case of each op is the CI subset (`--quick`)."""
    import torch
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return {
        "head_loss": [
            ("s4 odd 3x5 K5 fp32 nchw", _head_loss_case(2, 5, 3, 5, 4, 4, f32)),
            ("s1 K3 bf16 channels-last int64 targets", _head_loss_case(2, 3, 5, 3, 1, 1, bf16, "channels_last", "int64")),
            ("s2x3 K19 fp16 sliced logits and targets", _head_loss_case(1, 19, 3, 2, 2, 3, f16, sliced=True)),
        ],
        "upsample_argmax": [
            ("up 3x5->7x11 K5 fp32 nchw", _upsample_argmax_case(2, 5, 3, 5, (7, 11), f32)),
            ("down 6x7->3x4 K19 bf16 channels-last", _upsample_argmax_case(1, 19, 6, 7, (3, 4), bf16, "channels_last")),
            ("same 4x4 K3 fp16 sliced", _upsample_argmax_case(2, 3, 4, 4, (4, 4), f16, sliced=True)),
        ],
        "attention": [
            ("N9 M5 d32 fp32 packed", _attention_case(2, 9, 5, 32, f32)),
            ("N1 M1 d64 bf16", _attention_case(1, 1, 1, 64, bf16)),
            ("N17 M12 d192 bf16 chunked bwd", _attention_case(1, 17, 12, 192, bf16, bwd_chunk_rows=8)),
            ("N7 M33 d48 fp16", _attention_case(1, 7, 33, 48, f16)),
            ("N5 M3 d192 fp32 allow_tf32", _attention_case(1, 5, 3, 192, f32, allow_tf32=True)),
        ],
        "attention_sublayer": [
            ("N9 M5 C32 fp32", _sublayer_case(2, 9, 5, 32, f32)),
            ("N7 M3 C64 bf16 chunked bwd", _sublayer_case(1, 7, 3, 64, bf16, bwd_chunk_rows=4, wg_chunk_rows=4)),
            ("N5 M4 C32 fp32 x/weights + bf16 k,v (autocast mix)", _sublayer_case(1, 5, 4, 32, f32, kv_dtype=bf16)),
            ("N5 M4 C192 fp32 + fp16 k,v", _sublayer_case(1, 5, 4, 192, f32, kv_dtype=f16)),
            ("N3 M1 C32 bf16 + bf16 k,v act", _sublayer_case(1, 3, 1, 32, bf16)),
        ],
        "ffn_sublayer": [
            ("rows 37 C32 H64 fp32 sliced x", _ffn_case(37, 32, 64, f32)),
            ("rows 19 C40 H56 bf16", _ffn_case(19, 40, 56, bf16)),
            ("rows 13 C192 H384 bf16", _ffn_case(13, 192, 384, bf16)),
            ("rows 50 C32 H16 fp32 autocast, 24-row chunks", _ffn_case(50, 32, 16, f32, autocast=True, wg_chunk_rows=24)),
            ("stage norm 2x5x7 C32 H64 fp32 autocast, both maps", _ffn_stage_case(2, 5, 7, 32, 64, f32, autocast=True)),
            ("stage norm 1x3x3 C40 H56 bf16, one map", _ffn_stage_case(1, 3, 3, 40, 56, bf16, feeds_next=False)),
            ("stage norm 1x3x5 C192 H384 fp32 autocast (stash route)",
             _ffn_stage_case(1, 3, 5, 192, 384, f32, autocast=True)),
        ],
        "decoder_mlp": [
            ("8x12 E32 fp32 sliced stage 1, dropout",
             _decoder_case(2, 8, 12, (8, 16, 8, 8), (1, 2, 4, 4), 32, f32, 0.2)),
            ("6x9 E48 bf16 odd factors", _decoder_case(1, 6, 9, (20, 8, 8, 8), (1, 3, 3, 3), 48, bf16)),
            ("8x8 E128 fp32 autocast", _decoder_case(1, 8, 8, (32, 64, 128, 192), (1, 2, 4, 8), 128, f32, 0.15,
                                                       autocast=True)),
        ],
        "lmsa": [
            ("C16 5x6 fp32 nchw", _lmsa_case(2, 16, 5, 6, f32)),
            ("C16 9x8 bf16 channels-last", _lmsa_case(1, 16, 9, 8, bf16, "channels_last")),
            ("C32 1x1 fp16", _lmsa_case(1, 32, 1, 1, f16)),
            ("C16 7x3 fp32 sliced", _lmsa_case(1, 16, 7, 3, f32, sliced=True)),
        ],
        "lmsa_classifier": [
            ("C16 9x8 bf16 channels-last, 19 classes", _lmsa_case(1, 16, 9, 8, bf16, "channels_last", classes=19)),
            ("C32 5x7 fp32 sliced, 5 classes", _lmsa_case(2, 32, 5, 7, f32, sliced=True, classes=5)),
            ("C16 3x4 fp16, 33 classes", _lmsa_case(1, 16, 3, 4, f16, classes=33)),
        ],
    }


TOY = {"toy_oob": [("load one past the end", _toy_oob_case()),
                   ("load the gap of a sliced view", _toy_gap_case()),
                   ("load through one view into its neighbour", _toy_neighbour_case())]}


class _SymbolicFindings:
    """Triton-Sanitizer's records (one client per traced kernel), as lines since the last mark."""
    def mark(self) -> None:
        self._before = out_of_bounds_records()

    def watching(self):
        import contextlib
        return contextlib.nullcontext()

    def since_mark(self) -> list[str]:
        return [describe(record) for record in _records_since(self._before)]

    def checked(self) -> str:
        return ""


class _ConcreteFindings:
    """msf.checking.bounds' violations, as lines since the last mark."""
    def __init__(self) -> None:
        from msf.checking.bounds import AccessChecker
        self.checker = AccessChecker()

    def mark(self) -> None:
        self._seen = len(self.checker.violations)
        self._accesses = self.checker.accesses

    def watching(self):
        return self.checker.active()

    def since_mark(self) -> list[str]:
        return [str(v) for v in self.checker.violations[self._seen:]]

    def checked(self) -> str:
        return f"{self.checker.accesses - self._accesses} accesses, "


class CaseTimeout(Exception):
    pass


def _timed_out(signum, frame):
    raise CaseTimeout("no result within --case-timeout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msf.checking.sanitize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", help="op to check (repeatable; default: every op); toy_oob: the self-test")
    parser.add_argument("--quick", action="store_true", help="first case of each op only (the CI subset)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--engine", choices=("concrete", "symbolic"), default="concrete",
                        help="concrete: every address the interpreter computes, checked against the launch's "
                             "tensors (msf.checking.bounds; runs every case); symbolic: Triton-Sanitizer (triton-viz "
                             "3.0, all programs at once; cannot run most kernels, see above)")
    parser.add_argument("--case-timeout", type=int, default=120, metavar="S",
                        help="seconds before a case counts as failed (the sanitizer never ends some loops)")
    args = parser.parse_args(argv)

    if args.engine == "symbolic":
        try:
            import triton_viz  # noqa: F401
        except ImportError:
            parser.error("--engine symbolic needs the optional sanitize extra (triton-viz and what it imports): "
                         "python3 run.py extra sanitize")
        install()
        _share_loop_patcher()
        findings = _SymbolicFindings()
    else:
        findings = _ConcreteFindings()
    table = {**cases(), **TOY}
    ops = args.op or [op for op in table if op not in TOY]
    unknown = [op for op in ops if op not in table]
    if unknown:
        parser.error(f"unknown --op {', '.join(unknown)}; choose from {', '.join(table)}")
    selected = [(op, name, run) for op in ops for name, run in (table[op][:1] if args.quick else table[op])]
    if args.list:
        print("\n".join(f"{op}: {name}" for op, name, _ in selected))
        return 0

    failures = 0
    for op, name, run in selected:
        findings.mark()
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _timed_out)
        signal.alarm(args.case_timeout)
        try:
            with findings.watching():
                run()
        except Exception as exc:  # a case the sanitizer could not run is not a clean case
            failures += 1
            print(f"ERROR {op}: {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            continue
        finally:
            signal.alarm(0)
        new = findings.since_mark()
        failures += len(new)
        status = "ok   " if not new else f"OOB x{len(new)}"
        print(f"{status} {op}: {name} ({findings.checked()}{time.perf_counter() - start:.1f} s)", flush=True)
        for line in new:
            print("      " + line)
    print(f"{len(selected)} cases, {failures} out-of-bounds accesses or errors" if failures
          else f"{len(selected)} cases, zero out-of-bounds accesses")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
