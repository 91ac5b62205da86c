"""Where generated kernel modules are written, and how they are imported.

cache_dir(backend) is `<seqfast's cache directory>/<backend>` (SEQFAST_CACHE_DIR, else $XDG_CACHE_HOME/seqfast,
else ~/.cache/seqfast; see seqfast.config.cache_root), or a private temporary directory, with a warning, when that
is not writable. load_module writes a module's source there under a name that hashes the source and everything
else it depends on (never rewriting an existing file: numba's cache index is keyed on the file's mtime), and
imports it with the names the caller injects already set, so a module's choices (numba's on-disk caching,
Triton's compiler or interpreter) are made without touching the process environment. Loading is serialized by a
lock and memoized by module name: every thread gets the same module object.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType

from ...config import cache_root

_lock = threading.RLock()
_modules: dict[str, ModuleType] = {}
_dirs: dict[str, Path] = {}
_notes: dict[str, str] = {}


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_text("")
        probe.unlink()
        (path / "__pycache__").mkdir(exist_ok=True)
        return os.access(path / "__pycache__", os.W_OK)
    except OSError:
        return False


def cache_dir(backend: str) -> Path:
    """The directory of `backend`'s generated modules (and of numba's cache of their machine code)."""
    path = _dirs.get(backend)
    if path is not None:
        return path
    with _lock:
        if backend not in _dirs:
            chosen = cache_root() / backend
            if not _writable(chosen):
                _notes[backend] = (f"{chosen} is not writable: {backend} kernels are compiled in a temporary "
                                   "directory and not reused by later processes (set SEQFAST_CACHE_DIR to a "
                                   "writable directory)")
                warnings.warn(f"seqfast {backend} backend: {_notes[backend]}", RuntimeWarning, stacklevel=3)
                chosen = Path(tempfile.mkdtemp(prefix=f"seqfast-{backend}-"))
            _dirs[backend] = chosen
        return _dirs[backend]


def cache_note(backend: str) -> str:
    """Why `backend`'s kernels are not cached across processes ("" when they are)."""
    return _notes.get(backend, "")


def fingerprint(source: str, depends_on: tuple[str, ...] = ()) -> str:
    """A short hash of a module's source and of everything else that decides what it compiles to."""
    h = hashlib.sha256()
    for part in (source, *depends_on):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def module_path(backend: str, prefix: str, source: str, depends_on: tuple[str, ...] = ()) -> Path:
    """Where load_module keeps this source."""
    return cache_dir(backend) / f"{prefix}_{fingerprint(source, depends_on)}.py"


def load_module(backend: str, prefix: str, source: str, *, depends_on: tuple[str, ...] = (),
                inject: dict[str, object] | None = None, variant: str = "") -> ModuleType:
    """The module of `source`, written to `cache_dir(backend)` once and imported once per process.

    Args:
        backend: the cache subdirectory ("numba", "triton").
        prefix: the start of the file's name (the cell and dtype, say).
        source: the module's text.
        depends_on: other texts its compiled form depends on (library versions, helper sources): part of the name.
        inject: globals set before the module body runs (the module reads them as its configuration).
        variant: distinguishes imports of one file with different `inject` values (part of the module's name).
    Raises:
        whatever running the module body raises; the half-made module is then forgotten.
    """
    path = module_path(backend, prefix, source, depends_on)
    name = f"seqfast_{backend}_kernels.{path.stem}" + (f"_{variant}" if variant else "")
    module = _modules.get(name)
    if module is not None:
        return module
    with _lock:
        if name in _modules:
            return _modules[name]
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(source)
            os.replace(tmp, path)  # atomic: a concurrent process never imports a half-written file
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        module.__dict__.update(inject or {})
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _modules[name] = module
        return module


__all__ = ["cache_dir", "cache_note", "fingerprint", "module_path", "load_module"]
