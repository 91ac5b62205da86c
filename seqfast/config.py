"""Where a backend choice comes from.

Precedence, first match wins:
    backend= argument > use_backend(...) > SEQFAST_BACKEND_<CELL> > SEQFAST_BACKEND > config file > "auto".
The config file is the one SEQFAST_CONFIG names, else ./seqfast.toml, else [tool.seqfast] in ./pyproject.toml:

    backend = "numba"            # every cell
    [backends]                   # ([tool.seqfast.backends] in pyproject.toml) per cell, beats `backend`
    gru = "native"
    calibrate = false            # auto: the static rule instead of timing (SEQFAST_CALIBRATE=0 beats the file)
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ._memo import memo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Choice", "use_backend", "resolve_choice", "config_file_settings", "getenv", "config_file_option",
           "calibration_setting", "cache_root"]

# Every module call resolves its backend, which reads several environment variables; os.environ.get encodes the
# name and decodes the value each time (~0.7 us). On POSIX CPython os.environ keeps its bytes dict in `_data`, kept
# in step by os.environ's own setters (and so by monkeypatch.setenv), which reads ~20x faster.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS: dict[str, bytes] = {}
_ENV_VALUES: dict[bytes, str] = {}  # decoded and stripped values, by their bytes (decoding costs ~0.3 us)


def getenv(name: str) -> str:
    """os.environ.get(name, "").strip(), fast."""
    if _ENV_DATA is None:
        return os.environ.get(name, "").strip()
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENV_DATA.get(key)
    if value is None:
        return ""
    text = _ENV_VALUES.get(value)
    if text is None:
        text = memo(_ENV_VALUES, value, lambda: os.fsdecode(value).strip())
    return text

ALL_CELLS = "*"

# The active use_backend() mapping {cell name or "*": backend name}; a ContextVar so threads and asyncio tasks
# each see their own, and exiting the context restores the previous value with its token.
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "seqfast_backend", default=MappingProxyType({})
)


@dataclass(frozen=True)
class Choice:
    """A backend name and where it came from (for messages and `seqfast info`)."""

    name: str
    source: str


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"{what}: expected a backend name (str), got {name!r}")
    return name.strip().lower()


@contextlib.contextmanager
def use_backend(backend: str | Mapping[str, str]) -> Iterator[None]:
    """Choose backends inside a `with` block: a name for every cell, or a {cell: name} mapping.

    A name replaces any outer choice; a mapping is merged onto the outer choices. Names are checked on use,
    so an unknown one raises there with the list of known names.
    """
    if isinstance(backend, str):
        new = {ALL_CELLS: _check_name(backend, "use_backend")}
    elif isinstance(backend, Mapping):
        new = dict(_context.get())
        for cell, name in backend.items():
            new[_check_name(cell, "use_backend cell").replace("-", "_")] = _check_name(name, f"use_backend[{cell!r}]")
    else:
        raise TypeError("use_backend: expected a backend name or a {cell: backend} mapping, "
                        f"got {type(backend).__name__}")
    token = _context.set(MappingProxyType(new))
    try:
        yield
    finally:
        _context.reset(token)


def context_choices() -> Mapping[str, str]:
    return _context.get()


def _config_file() -> tuple[str, os.stat_result, bool] | None:
    """(the config file in force, its stat, named by SEQFAST_CONFIG?); None when there is none. Called on every
    selection: stat only."""
    named = getenv("SEQFAST_CONFIG")
    if named:
        try:
            return named, os.stat(named), True
        except OSError as exc:
            raise FileNotFoundError(f"SEQFAST_CONFIG names {named!r}, which cannot be read: {exc}") from exc
    for candidate in ("seqfast.toml", "pyproject.toml"):
        if not os.access(candidate, os.F_OK):  # absent, the usual case: no exception to build (~1.5 us)
            continue
        try:
            return candidate, os.stat(candidate), False
        except OSError:
            continue
    return None


_file_cache: dict[tuple, tuple[Path | None, str | None, dict[str, str]]] = {}


def config_file_settings() -> tuple[Path | None, str | None, dict[str, str]]:
    """(path, global backend, {cell: backend}) from the config file in force; cached until the file changes."""
    found = _config_file()
    if found is None:
        return None, None, {}
    name, st, named = found  # a named pyproject.toml is read whole, not as [tool.seqfast]
    key = (named, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)  # the file itself, wherever the cwd is
    if key not in _file_cache:
        path = Path(name).absolute()  # the cache is by file, which later calls may reach from another cwd
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"seqfast config file {str(path)!r} is not valid TOML: {exc}") from exc
        relevant = True
        if path.name == "pyproject.toml" and not named:
            relevant = "seqfast" in data.get("tool", {})  # a project's pyproject without [tool.seqfast]
            data = data.get("tool", {}).get("seqfast", {})
        default = data.get("backend")
        per_cell = data.get("backends", {})
        if default is not None and not isinstance(default, str):
            raise ValueError(f"seqfast config {str(path)!r}: 'backend' must be a string, got {default!r}")
        if not isinstance(per_cell, dict) or not all(isinstance(v, str) for v in per_cell.values()):
            raise ValueError(f"seqfast config {str(path)!r}: [backends] must map cell names to backend names")
        _file_cache[key] = (
            (path, default.strip().lower() if default else None,
             {k.lower(): v.strip().lower() for k, v in per_cell.items()}) if relevant else (None, None, {})
        )
    return _file_cache[key]


# Choices already made, by (name, source): every module call resolves one, and building the frozen dataclass
# cost about a microsecond each time
_choices: dict[tuple[str, str], Choice] = {}


def _choice(name: str, source: str) -> Choice:
    return memo(_choices, (name, source), lambda: Choice(name, source), limit=1024)


# The same for a module's backend= argument, by the argument as given (spared its checks and normalisation)
_argument_choices: dict[str, Choice] = {}


def resolve_choice(cell_name: str, env_suffix: str, argument: str | None = None) -> Choice:
    """The backend name requested for a cell, and its source, following the precedence above."""
    if argument is not None:
        choice = _argument_choices.get(argument) if type(argument) is str else None
        if choice is None:
            choice = _choice(_check_name(argument, "backend"), "backend= argument")
            if len(_argument_choices) >= 1024:
                _argument_choices.clear()
            _argument_choices[argument] = choice
        return choice
    ctx = _context.get()
    if ctx:
        if cell_name in ctx:
            return _choice(ctx[cell_name], f"use_backend({{{cell_name!r}: ...}})")
        if ALL_CELLS in ctx:
            return _choice(ctx[ALL_CELLS], "use_backend()")
    for var in ("SEQFAST_BACKEND_" + env_suffix, "SEQFAST_BACKEND"):
        value = getenv(var)
        if value:
            return _choice(value.lower(), "environment variable " + var)
    path, default, per_cell = config_file_settings()
    if cell_name in per_cell:
        return _choice(per_cell[cell_name], f"config file {path} [backends] {cell_name}")
    if default:
        return _choice(default, f"config file {path} backend")
    return _DEFAULT_CHOICE


_DEFAULT_CHOICE = Choice("auto", "default")


_option_cache: dict[tuple, tuple[Path | None, dict]] = {}


def config_file_option(key: str) -> tuple[Path | None, object]:
    """(path, value) of a top-level key of the config file in force (None where absent); read only when the file
    changes. For settings read when a decision is made, not on every call."""
    found = _config_file()
    if found is None:
        return None, None
    name, st, named = found
    cache_key = (named, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if cache_key not in _option_cache:
        path = Path(name).absolute()
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"seqfast config file {str(path)!r} is not valid TOML: {exc}") from exc
        if path.name == "pyproject.toml" and not named:
            data = data.get("tool", {}).get("seqfast", {})
        _option_cache.clear()  # one file is in force at a time
        _option_cache[cache_key] = (path, data)
    path, data = _option_cache[cache_key]
    return (path, data[key]) if key in data else (None, None)


_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def calibration_setting() -> tuple[bool, str]:
    """(whether `auto` times the candidate backends, where that comes from): SEQFAST_CALIBRATE, else `calibrate`
    in the config file, else on."""
    env = getenv("SEQFAST_CALIBRATE").lower()
    if env:
        if env not in _TRUE + _FALSE:
            raise ValueError(f"SEQFAST_CALIBRATE: expected one of {', '.join(_TRUE + _FALSE)}, got {env!r}")
        return env in _TRUE, "environment variable SEQFAST_CALIBRATE"
    path, value = config_file_option("calibrate")
    if path is not None:
        if not isinstance(value, bool):
            raise ValueError(f"seqfast config {str(path)!r}: 'calibrate' must be true or false, got {value!r}")
        return value, f"config file {path} calibrate"
    return True, "default"


def cache_root() -> Path:
    """seqfast's cache directory: SEQFAST_CACHE_DIR, else $XDG_CACHE_HOME/seqfast, else ~/.cache/seqfast."""
    env = os.environ.get("SEQFAST_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqfast"
