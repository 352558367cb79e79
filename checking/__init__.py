"""Memory-safety checks of the Triton kernels, run on the CPU.

- `sanitize`: every load and store of every kernel launch of every op checked against the elements
  of the tensors the launch was given (`python -m msf.checking.sanitize`; the interpreter's concrete
  engine by default, Triton-Sanitizer's symbolic one on request).
- `bounds`: the interpreter-level access checker the concrete engine installs.

They live apart from `kernels/` because they must be importable without importing a kernel: the
symbolic engine replaces `triton.jit` before any kernel is defined.
"""
