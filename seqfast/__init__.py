"""seqfast: fast sequential models with interchangeable backends behind torch.nn-compatible modules."""

from . import backends as _backends  # noqa: F401  (registers the built-in backends)
from ._version import __version__
from .cells import BUILTIN_CELLS as _BUILTIN_CELLS
from .config import use_backend
from .functional import (
    BackendNotSupportedError,
    InputError,
    available_backends,
    current_backend,
    explain,
    scan,
    select_backend,
)
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, Recurrent, RecurrentCell, RNNCell, Stateful
from .registry import (
    Backend,
    CellSpec,
    ParamSpec,
    Pointwise,
    Query,
    Stack,
    Stage,
    Weights,
    get_backend,
    get_cell,
    register_backend,
    register_cell,
    registry,
)

for _spec in _BUILTIN_CELLS:  # through the same call a plugin's cells use
    register_cell(_spec)

__all__ = [
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "Recurrent",
    "RecurrentCell",
    "Stateful",
    "scan",
    "use_backend",
    "available_backends",
    "current_backend",
    "explain",
    "select_backend",
    "BackendNotSupportedError",
    "InputError",
    "Backend",
    "CellSpec",
    "ParamSpec",
    "Pointwise",
    "Stage",
    "Query",
    "Stack",
    "Weights",
    "register_cell",
    "register_backend",
    "get_cell",
    "get_backend",
    "registry",
    "__version__",
]

registry.load_plugins()
