"""The `native` backend: torch.nn's own fused kernels (oneDNN on CPU, cuDNN on GPU) for the built-in cells.

These kernels own the input projection, so this backend runs whole modules (`run_stack`), not single-layer scans;
a single step (the cells) calls torch.nn's cell kernels (`_VF.lstm_cell`, ...), as torch.nn's cells do.
Variable lengths go through torch's PackedSequence path (sorting and unsorting internally), as torch.nn does.
"""

from __future__ import annotations

import torch
from torch import _VF, Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..registry import Backend, CellSpec, Query

_KERNELS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
_CELL_KERNELS = {"GRU": _VF.gru_cell, "RNN_TANH": _VF.rnn_tanh_cell, "RNN_RELU": _VF.rnn_relu_cell}


class NativeBackend(Backend):
    name = "native"
    description = "torch.nn's fused kernels (oneDNN / cuDNN), built-in cells only"
    devices = None
    dtypes = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
    priority = 10
    declined_options = {
        "return_states": "torch.nn's fused kernels return only the final states (no per-step c_t)",
        "recurrent_dropout": "torch.nn's fused kernels apply no mask to the recurrent input h",
        "zoneout": "torch.nn's fused kernels have no per-step mask to keep previous states",
    }

    def extra_reasons(self, query: Query) -> list[str]:
        if query.cell.native_mode not in _KERNELS:
            return [f"cell {query.cell.name!r} has no torch.nn fused kernel"]
        if query.level == "step" and query.proj_size:
            return ["torch.nn's cell kernels have no proj_size (weight_hr)"]
        return []

    def run_stack(self, cell: CellSpec, x: Tensor, lengths: Tensor | None, state0: tuple[Tensor, ...], params: list,
                  *, num_layers: int, bidirectional: bool, dropout: float, training: bool, proj_size: int
                  ) -> tuple[Tensor, tuple[Tensor, ...]]:
        mode = cell.native_mode
        kernel = _KERNELS[mode]
        flat = params[0] if len(params) == 1 else [p for layer in params for p in layer]
        has_bias = len(params[0]) - (1 if proj_size else 0) == 4
        hx = state0 if mode == "LSTM" else state0[0]
        if lengths is None:
            result = kernel(x, hx, flat, has_bias, num_layers, dropout, training, bidirectional, False)
            return result[0], result[1:]
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(h.index_select(1, order) for h in hx) if isinstance(hx, tuple) else hx.index_select(1, order)
        result = kernel(packed.data, packed.batch_sizes, hx, flat, has_bias, num_layers, dropout, training,
                        bidirectional)
        out, _ = pad_packed_sequence(PackedSequence(result[0], packed.batch_sizes, order, unorder),
                                     total_length=x.shape[0])
        return out, tuple(h.index_select(1, unorder) for h in result[1:])

    def step(self, cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], params, names) -> tuple[Tensor, ...]:
        return self.step_runner(cell, x.dtype, names)(x, state, params)

    def step_runner(self, cell: CellSpec, dtype: torch.dtype, names):
        # params are in torch.nn's order, which is the cell kernels' (w_ih, w_hh, b_ih, b_hh; no biases: None)
        if cell.native_mode == "LSTM":
            return _lstm_step
        kernel = _CELL_KERNELS[cell.native_mode]
        return lambda x, state, params: (kernel(x, state[0], *params),)


def _lstm_step(x: Tensor, state: tuple[Tensor, ...], params) -> tuple[Tensor, ...]:
    return _VF.lstm_cell(x, state, *params)
