"""Where a backend choice comes from, and every setting seqfast reads from the environment or its config file.

Precedence, first match wins:
    backend= argument > use_backend(...) > SEQFAST_BACKEND_<CELL> > SEQFAST_BACKEND > config file > "auto".
The config file is the one SEQFAST_CONFIG names, else ./seqfast.toml, else [tool.seqfast] in ./pyproject.toml:

    backend = "numba"            # every cell
    [backends]                   # ([tool.seqfast.backends] in pyproject.toml) per cell, beats `backend`
    gru = "native"
    calibrate = false            # auto: the static rule instead of timing (SEQFAST_CALIBRATE=0 beats the file)

SETTINGS declares every setting (its variable, config key, type, default, meaning) and `setting` reads one;
docs/settings.md is the same table for people.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ._env import ENV_DATA, getenv
from ._memo import memo
from .config_file import config_file_option, config_file_settings

__all__ = ["Choice", "use_backend", "resolve_choice", "config_file_settings", "getenv", "config_file_option",
           "calibration_setting", "cache_root", "Setting", "SETTINGS", "setting", "setting_with_source", "reader"]

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
    variables = _backend_variables.get(env_suffix) or _backend_variables_for(env_suffix)
    for var, key in variables:
        value = getenv(var) if ENV_DATA is None or key in ENV_DATA else ""  # unset, the usual case: one lookup
        if value:
            return _choice(value.lower(), "environment variable " + var)
    path, default, per_cell = config_file_settings()
    if cell_name in per_cell:
        return _choice(per_cell[cell_name], f"config file {path} [backends] {cell_name}")
    if default:
        return _choice(default, f"config file {path} backend")
    return _DEFAULT_CHOICE


_DEFAULT_CHOICE = Choice("auto", "default")

# per cell's env_suffix: ((variable, its name as os.environ's bytes keys), ...) in precedence order
_backend_variables: dict[str, tuple[tuple[str, bytes], ...]] = {}


def _backend_variables_for(env_suffix: str) -> tuple[tuple[str, bytes], ...]:
    names = ("SEQFAST_BACKEND_" + env_suffix, "SEQFAST_BACKEND")
    return memo(_backend_variables, env_suffix, lambda: tuple((n, os.fsencode(n)) for n in names), limit=1024)


_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


@dataclass(frozen=True)
class Setting:
    """One setting: read from its environment variable, else its config file key (where it has one), else the
    default. kind: "bool" (1/true/on/yes or 0/false/off/no), "int" (at least `minimum`), "str" or "path"."""

    env: str
    kind: str
    default: object
    description: str
    key: str | None = None  # top-level key of the config file
    minimum: int | None = None


# Every setting but the backend choices, which resolve_choice reads in its own precedence (docs/settings.md lists
# those too). TRITON_INTERPRET is triton's own variable, read here as triton reads it.
SETTINGS: Mapping[str, Setting] = MappingProxyType({
    "calibrate": Setting("SEQFAST_CALIBRATE", "bool", True, "auto times the candidate backends per shape bucket, "
                         "and numba its GEMM paths per shape (else the static rules)", key="calibrate"),
    "cache_dir": Setting("SEQFAST_CACHE_DIR", "path", None, "seqfast's cache directory (default: "
                         "$XDG_CACHE_HOME/seqfast, else ~/.cache/seqfast)"),
    "config": Setting("SEQFAST_CONFIG", "path", None, "the config file (default: ./seqfast.toml, else [tool.seqfast] "
                      "in ./pyproject.toml; looked for again at most once a second, at once when this variable "
                      "changes)"),
    "disable_plugins": Setting("SEQFAST_DISABLE_PLUGINS", "bool", False, "skip loading seqfast.plugins entry points"),
    "numba_threads": Setting("SEQFAST_NUMBA_THREADS", "int", None, "threads a numba scan may use (default: "
                             "torch.get_num_threads())", minimum=1),
    "numba_no_mkl": Setting("SEQFAST_NUMBA_NO_MKL", "bool", False, "numba GEMMs as numba loops, not torch's MKL"),
    "numba_mkl_kernels": Setting("SEQFAST_NUMBA_MKL_KERNELS", "bool", True, "numba may call MKL's AVX2/AVX-512 "
                                 "sgemm kernels directly on non-Intel CPUs"),
    "triton_tile": Setting("SEQFAST_TRITON_TILE", "int", None, "triton's hidden tile size (a power of two >= 16; "
                           "default: chosen per shape)", minimum=16),
    "triton_cooperative": Setting("SEQFAST_TRITON_COOPERATIVE", "bool", False, "triton splits each step's hidden "
                                  "units across the GPU's SMs (cooperative kernels, a grid barrier per step) where "
                                  "the grid can be resident", key="triton_cooperative"),
    "triton_interpret": Setting("TRITON_INTERPRET", "bool", False, "triton kernels run on CPU tensors through "
                                "Triton's interpreter (tests)"),
})

_parsed: dict[tuple[str, str], object] = {}  # (setting, raw text) -> value: a hot-path read is one dict lookup


def _parse(spec: Setting, raw: object, where: str, from_file: bool = False) -> object:
    """raw: an environment variable's text, or (from_file) a config file's TOML value, which must have the type."""
    if spec.kind == "bool":
        if isinstance(raw, bool) or from_file:
            if isinstance(raw, bool):
                return raw
            raise ValueError(f"{where} must be true or false, got {raw!r}")
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        expected = f"one of {', '.join(_TRUE + _FALSE)}"
    elif spec.kind == "int":
        typed = isinstance(raw, int) and not isinstance(raw, bool) if from_file else isinstance(raw, str)
        try:
            value = int(raw) if typed else None
        except ValueError:
            value = None
        if value is not None and (spec.minimum is None or value >= spec.minimum):
            return value
        expected = "an integer" + ("" if spec.minimum is None else f" >= {spec.minimum}")
    else:
        if isinstance(raw, str):
            return Path(raw) if spec.kind == "path" else raw
        expected = "a string"
    raise ValueError(f"{where}: expected {expected}, got {raw!r}")


def setting_with_source(name: str) -> tuple[object, str]:
    """(value, where it comes from) of the setting `name` of SETTINGS: its environment variable, else its config
    file key, else the default. An unparsable value raises ValueError naming the variable or key and the values
    expected."""
    spec = SETTINGS[name]
    raw = getenv(spec.env)
    if raw:
        key = (name, raw)
        value = _parsed.get(key, _parsed)
        if value is _parsed:
            value = _parsed[key] = _parse(spec, raw, spec.env)
        return value, "environment variable " + spec.env
    if spec.key is not None:
        path, value = config_file_option(spec.key)
        if path is not None:
            return _parse(spec, value, f"seqfast config {str(path)!r}: {spec.key!r}", True), \
                f"config file {path} {spec.key}"
    return spec.default, "default"


def setting(name: str) -> object:
    """The value of the setting `name` of SETTINGS; see setting_with_source. Cheap where it has no config key: one
    environment read and a dict lookup."""
    spec = SETTINGS[name]
    if spec.key is None:
        raw = getenv(spec.env)
        if not raw:
            return spec.default
        value = _parsed.get((name, raw), _parsed)
        if value is not _parsed:
            return value
    return setting_with_source(name)[0]


def reader(name: str) -> Callable[[], object]:
    """A function reading the setting `name` (one without a config key) as `setting` does, for hot paths: one
    environment read and, when set, a dict lookup."""
    spec = SETTINGS[name]
    if spec.key is not None:
        raise ValueError(f"reader: setting {name!r} has a config file key; read it with setting()")
    env, default, parsed = spec.env, spec.default, {}

    def read() -> object:
        raw = getenv(env)
        if not raw:
            return default
        value = parsed.get(raw, parsed)
        if value is parsed:
            value = parsed[raw] = _parse(spec, raw, env)
        return value

    read.__name__ = read.__qualname__ = f"read_{name}"
    return read


def calibration_setting() -> tuple[bool, str]:
    """(whether `auto` times the candidate backends, where that comes from): SEQFAST_CALIBRATE, else `calibrate`
    in the config file, else on."""
    return setting_with_source("calibrate")  # type: ignore[return-value]


def cache_root() -> Path:
    """seqfast's cache directory: SEQFAST_CACHE_DIR, else $XDG_CACHE_HOME/seqfast, else ~/.cache/seqfast."""
    root = setting("cache_dir")
    return root if root else Path(getenv("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqfast"
