"""Environment reads for the hot path: getenv, os.environ.get through os.environ's own bytes dict."""

from __future__ import annotations

import os

from ._memo import memo

__all__ = ["getenv", "ENV_DATA"]

# Every module call resolves its backend, which reads several environment variables; os.environ.get encodes the
# name and decodes the value each time (~0.7 us). On POSIX CPython os.environ keeps its bytes dict in `_data`, kept
# in step by os.environ's own setters (and so by monkeypatch.setenv), which reads ~20x faster.
ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS: dict[str, bytes] = {}
_ENV_VALUES: dict[bytes, str] = {}  # decoded and stripped values, by their bytes (decoding costs ~0.3 us)


def getenv(name: str) -> str:
    """os.environ.get(name, "").strip(), fast."""
    if ENV_DATA is None:
        return os.environ.get(name, "").strip()
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = ENV_DATA.get(key)
    if value is None:
        return ""
    text = _ENV_VALUES.get(value)
    if text is None:
        text = memo(_ENV_VALUES, value, lambda: os.fsdecode(value).strip())
    return text
