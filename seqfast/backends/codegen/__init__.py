"""Code generation shared by the kernel backends (numba, triton): kernels are template files that read as the
kernels they become; `template.expand` repeats and unrolls their marked lines for a cell, and `loader.load_module`
writes the result to the cache directory under a hashed name and imports it.

    template.py  the template language (line markers, unrolled blocks, compile-time conditions, $TOKENS) and
                 CodegenError, the one error of code generation
    loader.py    the cache directory (SEQFAST_CACHE_DIR, one subdirectory per backend) and the module loader
"""

from __future__ import annotations

from .loader import cache_dir, cache_note, load_module
from .template import CodegenError, Markers, expand, read_template

__all__ = ["CodegenError", "Markers", "expand", "read_template", "cache_dir", "cache_note", "load_module"]
