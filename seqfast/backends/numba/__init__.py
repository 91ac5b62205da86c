"""The `numba` backend: fused CPU scans, forward and BPTT backward, for every cell with pointwise math.

Per step, one kernel call does the recurrent product (MKL ?gemm_ from libtorch, called from inside the numba loop;
no Python round trip) and the cell's pointwise math fused over every (row, unit). The input projection stays one
big GEMM over all steps (in FusedBackend.layer, without its bias, which the kernels add); the backward forms
dW_hh as one GEMM over all steps after the loop (gemm.weight_gradient). Kernels are generated per cell from
template files (templates/*.py.tmpl) and cached on disk across processes.

Threads (one pool for everything): the numba kernels are single-threaded (no parallel=True, so numba's threading
layer never starts). A scan splits its batch into row ranges, one per torch intra-op thread (torch.get_num_threads(),
or SEQFAST_NUMBA_THREADS), and runs them on torch's own OpenMP threads (schedule.py, _team.py); MKL is held to one
thread inside each range. numpy's OpenBLAS is never called, so its threads never spin against torch's.

The modules, by job:
    backend.py       NumbaBackend: what is supported (declarations) and short calls into the rest
    availability.py  whether numba can be imported, without importing it
    scan.py          the host side of the forward and backward scans (kernel arguments in, tensors out)
    schedule.py      threads, row ranges, per-shape plans, the launch on torch's OpenMP team or a thread pool
    gemm.py          the torch-side GEMMs: input projection, its gradients, the recurrent-weight gradient
    buffers.py       the pool of large kernel buffers
    views.py         numpy views of weights and states, placeholders for absent ones
    step.py          one step of a cell (RecurrentCell) as one kernel call each way
    codegen.py       the generated kernel modules: loading (shared loader, disk cache) and the team entries
    pointwise.py     the cell's pointwise functions compiled for numba, and what their source tells
    layout.py        scratch rows, kernel arguments and argument-block slots, shared by kernels and callers
    assemble.py      a cell's kernel module expanded from the templates in templates/
    _blas.py, _team.py, _math.py   numba intrinsics: the GEMMs, the OpenMP team, the float32 math
    tuning.py        where `auto` prefers numba

numba is imported only when a kernel is first needed, never by `import seqfast`.
"""

from __future__ import annotations

from .backend import NumbaBackend

__all__ = ["NumbaBackend"]
