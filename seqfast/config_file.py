"""The config file in force (SEQFAST_CONFIG, else ./seqfast.toml, else [tool.seqfast] in ./pyproject.toml): looked
for at most once every CONFIG_LOOK_SECONDS, read again only when it changes. seqfast.config says what it may hold."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from ._env import getenv

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["CONFIG_LOOK_SECONDS", "config_file_settings", "config_file_option", "forget_config_file"]

# The config file in force is looked up again at most this often (a changed or new file, or another working
# directory, applies from the next look; forget_config_file() makes the next selection look): a look is one to
# three system calls, which on every selection cost a cell step more than its own Python (RESULTS.md).
CONFIG_LOOK_SECONDS = 1.0
_clock = time.monotonic
_last_look: list = [None, -math.inf, None]  # [SEQFAST_CONFIG at the look, its time, what it found]


def _config_file() -> tuple[str, os.stat_result, bool] | None:
    """(the config file in force, its stat, named by SEQFAST_CONFIG?); None when there is none. Called on every
    selection: looked up again once CONFIG_LOOK_SECONDS have passed or SEQFAST_CONFIG changed."""
    named = getenv("SEQFAST_CONFIG")
    now = _clock()
    last = _last_look
    if last[0] == named and now - last[1] < CONFIG_LOOK_SECONDS:
        return last[2]
    found = _look_for_config_file(named)
    _last_look[:] = [named, now, found]
    return found


def _look_for_config_file(named: str) -> tuple[str, os.stat_result, bool] | None:
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


def forget_config_file() -> None:
    """Look for the config file again on the next selection (after writing one, or changing directory)."""
    _last_look[:] = [None, -math.inf, None]


_file_cache: dict[tuple, tuple[Path | None, str | None, dict[str, str]]] = {}


_NO_SETTINGS: tuple[None, None, Mapping[str, str]] = (None, None, MappingProxyType({}))
_settings_at_look: list = [None, _NO_SETTINGS]  # [what the last look found, its settings]


def config_file_settings() -> tuple[Path | None, str | None, Mapping[str, str]]:
    """(path, global backend, {cell: backend}) from the config file in force; cached until the file changes."""
    found = _config_file()
    if found is None:
        return _NO_SETTINGS
    if found is _settings_at_look[0]:  # the same look as the last call: its file, stat and settings
        return _settings_at_look[1]
    settings = _read_config_settings(found)
    _settings_at_look[:] = [found, settings]
    return settings


def _read_config_settings(found: tuple[str, os.stat_result, bool]) -> tuple[Path | None, str | None, dict[str, str]]:
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
