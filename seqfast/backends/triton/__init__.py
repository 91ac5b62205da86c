"""The `triton` backend (GPU; CPU through TRITON_INTERPRET=1 for tests).

kernels.py  the forward and backward kernel templates (math and memory layout in its docstring)
codegen.py  a cell's pointwise code inlined into the templates, written to a cache file and imported
backend.py  TritonBackend: path selection (weights on chip or hidden dimension tiled), launches, dW_hh GEMM
coop_kernels.py  the cooperative kernel templates: hidden units split across SMs, a grid barrier per step (opt-in)
cooperative.py   their split per shape, co-residency guard and launches
aot.py      compiles the real kernels for a CUDA target without a GPU (python -m seqfast.backends.triton.aot)
Importing this package never imports triton.
"""

from .backend import KernelPlan, TritonBackend, interpreting
from .codegen import CodegenError, generate_source

__all__ = ["TritonBackend", "KernelPlan", "CodegenError", "generate_source", "interpreting"]
