from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, Recurrent, RecurrentCell, RNNCell, Stateful

__all__ = ["Recurrent", "RNN", "LSTM", "GRU", "RecurrentCell", "RNNCell", "LSTMCell", "GRUCell", "Stateful"]
