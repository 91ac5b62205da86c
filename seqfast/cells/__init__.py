"""Built-in cells: the math only. seqfast registers them through the same `register_cell` a plugin uses."""

from .common import TORCH_MATH, recurrent_term
from .gru import GRU
from .gru_reset_before import GRU_RESET_BEFORE, keras_gru_weights
from .lstm import LSTM
from .rnn import RNN_RELU, RNN_TANH

BUILTIN_CELLS = (RNN_TANH, RNN_RELU, LSTM, GRU, GRU_RESET_BEFORE)

__all__ = ["BUILTIN_CELLS", "TORCH_MATH", "recurrent_term", "RNN_TANH", "RNN_RELU", "LSTM", "GRU", "GRU_RESET_BEFORE",
           "keras_gru_weights"]
