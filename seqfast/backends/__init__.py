"""Backends register themselves here exactly as a plugin's backend would (seqfast.register_backend).

numba and triton are imported lazily by their backends: registering them needs neither package.
"""

from ..registry import register_backend
from .native import NativeBackend
from .numba import NumbaBackend
from .reference import TorchBackend
from .triton import TritonBackend

register_backend(TorchBackend())
register_backend(NativeBackend())
register_backend(NumbaBackend())
register_backend(TritonBackend())

__all__ = ["TorchBackend", "NativeBackend", "NumbaBackend", "TritonBackend"]
