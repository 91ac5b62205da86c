"""Turns a CellSpec into numba kernels: one generic forward scan and one generic backward scan per cell and dtype.

Math, per step k of each batch row b (t = k, or lengths[b] - 1 - k when reverse; steps k >= lengths[b] are
padding: output 0, state kept):
    forward   hg = h W_hh^T + b_hh (dense; diagonal: w_hh * h + b_hh; none: 0)      one GEMM per step, all rows
              (training saves h W_hh^T of every step, so the backward never repeats the GEMM)
              state_t = pointwise.forward(x_proj[t], hg, state_{t-1})               fused, vectorized over units
    backward  d_x[t], d_hg[t], d_state = pointwise.backward(..., d_state + (d_out[t], 0, ...))
              d_h += d_hg[t] W_hh                                                  one GEMM per step
              after the loop: d_W_hh = sum_t d_hg[t]^T h_{t-1}   one GEMM (d_b_hh = sum_t d_hg[t]: summed in the loop)
Memory layout: x_proj / d_x [T, B, G*H] with gate g of unit j at column g*H + j; states [B, H] each; everything
C-contiguous; the generated module's header lists the buffers.

The parts, by job: pointwise.py compiles the cell's pointwise functions (and decides what the backend can run),
layout.py holds the numbers kernels and callers share (scratch rows, arguments, block slots), assemble.py expands
the kernel templates (templates/*.py.tmpl) into a module, and this module loads it: through the shared loader
(seqfast/backends/codegen/loader.py) into the numba cache directory, under a name that hashes the source and what
it compiles with, with njit(cache=True) kernels, so a later process loads the machine code instead of compiling.
Each scan kernel also has `<kernel>_launch` and `<kernel>_entry`: the entry unpacks its arguments from an int64
block and calls the kernel, compiled as a cfunc (entry_address), so torch's OpenMP team runs the row ranges without
Python (see _team.py).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import ModuleType

from ...registry import CellSpec
from ..codegen import CodegenError, cache_dir, load_module
from ..codegen.loader import module_path
from .assemble import generate_projection_source, generate_source, generate_weight_grad_source
from .pointwise import check_cell, dx_is_dhg, per_unit_width, preactivation_only, step_supported, units_supported

TEMPLATE_VERSION = "27"
_HERE = Path(__file__).resolve().parent
_BACKEND = "numba"

_lock = threading.Lock()
_modules: dict[tuple, ModuleType] = {}


def _depends_on() -> tuple[str, ...]:
    """What a generated module's machine code depends on besides its source."""
    import numba

    return (TEMPLATE_VERSION, numba.__version__, sys.version,
            *((_HERE / name).read_text() for name in ("_math.py", "_blas.py", "_rows.py", "_team.py")))


def kernels(cell: CellSpec, dtype: str) -> ModuleType:
    """The compiled-on-demand kernel module (attributes `forward`, `backward`) of a cell for a dtype."""
    return _generated((cell, dtype), f"{cell.name}_{dtype}", lambda: generate_source(cell, dtype))


def weight_grad_kernels(dtype: str) -> ModuleType:
    """The compiled-on-demand module of `weight_grad` for a dtype (one for every cell)."""
    return _generated(("weight_grad", dtype), f"weight_grad_{dtype}", lambda: generate_weight_grad_source(dtype))


def projection_kernels(dtype: str) -> ModuleType:
    """The compiled-on-demand module of `project` (the small input projection) for a dtype."""
    return _generated(("project", dtype), f"project_{dtype}", lambda: generate_projection_source(dtype))


def _generated(key: tuple, prefix: str, source_of) -> ModuleType:
    """The generated module under `key`, loaded with numba's on-disk cache where it can keep one: the injected
    `_CACHE` chooses, and numba refuses to cache when it finds no writable place for its index, in which case
    the module is compiled uncached."""
    module = _modules.get(key)
    if module is not None:
        return module
    source, depends_on = source_of(), _depends_on()
    try:
        module = load_module(_BACKEND, prefix, source, depends_on=depends_on, inject={"_CACHE": True})
    except RuntimeError as exc:
        if "cannot cache" not in str(exc):
            raise
        module = load_module(_BACKEND, prefix, source, depends_on=depends_on, inject={"_CACHE": False},
                             variant="uncached")
    _modules[key] = module
    return module




def is_compiled(cell: CellSpec, dtype: str, kernel_names: tuple[str, ...]) -> bool:
    """Whether the named kernels of a cell can run without a JIT compile: compiled in this process, or held by
    numba's disk cache (loading from it takes a fraction of a second, compiling seconds). Scans ("forward",
    "backward", and their _units kernels) run as their cfunc entry and launcher, as does "forward_pipe" (the pipelined
    forward's entry and forward_pipelined); the one-step kernels ("step_forward", "step_backward") are called as they
    are."""
    launchers = {"forward": "forward_launch", "backward": "backward_launch", "forward_units": "forward_units_launch",
                 "backward_units": "backward_units_launch", "forward_pipe": "forward_pipelined"}
    functions = [f for k in kernel_names for f in ((f"{k}_entry", launchers[k]) if k in launchers else (k,))]
    module = _modules.get((cell, dtype))
    if module is not None and all((id(module), k) in _entries if k in launchers
                                  else bool(getattr(module, k).signatures) for k in kernel_names):
        return True
    path = module_path(_BACKEND, f"{cell.name}_{dtype}", generate_source(cell, dtype), _depends_on())
    index = cache_dir(_BACKEND) / "__pycache__"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return path.exists() and all(any(index.glob(f"{path.stem}.{f}-*.{tag}.nbi")) for f in functions)


_entries: dict[tuple[int, str], int] = {}


def entry_address(module: ModuleType, kernel: str) -> int:
    """The address of `<kernel>_entry` (the kernel as a cfunc taking the argument block), compiled on first use
    (or loaded from numba's cache): made at import, a cfunc would compile every kernel of a module up front."""
    key = (id(module), kernel)
    address = _entries.get(key)
    if address is None:
        from numba import cfunc, types

        with _lock:
            compiled = cfunc(types.void(types.voidptr), cache=module._CACHE, fastmath=module._FM,
                             error_model="numpy")(getattr(module, f"{kernel}_entry"))
            module.__dict__[f"_{kernel}_entry_cfunc"] = compiled  # kept alive with its module
            address = _entries[key] = compiled.address
    return address


__all__ = ["CodegenError", "check_cell", "dx_is_dhg", "per_unit_width", "preactivation_only", "step_supported",
           "units_supported",
           "generate_source", "generate_weight_grad_source", "kernels", "weight_grad_kernels", "projection_kernels",
           "is_compiled", "entry_address", "TEMPLATE_VERSION"]
