"""Backends register themselves here exactly as a plugin's backend would (seqfast.register_backend)."""

from ..registry import register_backend
from .native import NativeBackend
from .reference import TorchBackend

register_backend(TorchBackend())
register_backend(NativeBackend())

__all__ = ["TorchBackend", "NativeBackend"]
