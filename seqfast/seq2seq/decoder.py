"""The attentional decoder: one recurrent step per target position, or one scan over the whole target when no
step's input depends on an earlier step's output (teacher forcing with Luong attention and no input feeding).

Per step t, with embedded input token e_t and top-layer hidden state h:
    bahdanau:  c_t = attend(h_{t-1});  h_t = cells([e_t; c_t (; a_{t-1})])
    luong_*:   h_t = cells([e_t (; a_{t-1})]);  c_t = attend(h_t)
    a_t = tanh(W_a [h_t; c_t]);  logits_t = W_o a_t
where a_{t-1} (the previous attentional vector) is fed only with input_feeding=True.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import BackendNotSupportedError, scan, select_backend
from ..nn import RecurrentCell
from ..registry import CellSpec, Query, Weights
from ._checks import check_backend, check_cell, check_tokens
from .attention import make_attention


class DecoderState(NamedTuple):
    cells: tuple[Tensor, ...]  # per state name (h, c, ...): [num_layers, B, H]
    feed: Tensor | None  # the previous attentional vector [B, H] with input feeding, else None

    def index_select(self, index: Tensor) -> DecoderState:
        """The states of rows `index` (beam reordering); works on every backend, being plain tensors."""
        return DecoderState(tuple(s.index_select(1, index) for s in self.cells),
                            None if self.feed is None else self.feed.index_select(0, index))


class Decoder(nn.Module):
    """An attentional recurrent decoder of any registered cell, stepping seqfast RecurrentCells.

    Args:
        vocab_size, embedding_dim, hidden_size: target vocabulary, embedding and recurrent sizes.
        memory_size: the encoder memory's feature size D.
        cell: "lstm", "gru" or any registered cell; num_layers: stacked cells, dropout between them and on the
            embeddings and attentional vectors.
        attention: "bahdanau", "luong_dot" or "luong_general".
        input_feeding: feed the previous attentional vector into the next step's input (Luong et al., 2015).
        backend: passed to every cell (None: seqfast's usual selection).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_size: int, memory_size: int, *,
                 cell: str | CellSpec = "lstm", num_layers: int = 1, attention: str = "bahdanau",
                 input_feeding: bool = False, dropout: float = 0.0, pad_id: int = 0,
                 backend: str | None = None) -> None:
        super().__init__()
        self.cell = check_cell(cell)
        check_backend(backend)
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.attention_kind, self.input_feeding, self.dropout = attention, input_feeding, float(dropout)
        self.attention = make_attention(attention, hidden_size, memory_size)
        self.attend_first = attention == "bahdanau"  # attention reads the previous state, before the cell
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        input_size = embedding_dim + (memory_size if self.attend_first else 0) + (hidden_size if input_feeding else 0)
        self.cells = nn.ModuleList(
            RecurrentCell(self.cell, input_size if layer == 0 else hidden_size, hidden_size, backend=backend)
            for layer in range(num_layers))
        self.combine = nn.Linear(hidden_size + memory_size, hidden_size, bias=False)
        self.output = nn.Linear(hidden_size, vocab_size)

    def init_state(self, encoder_state: tuple[Tensor, ...]) -> DecoderState:
        """The decoder's state from the encoder's bridged final state (one [num_layers, B, H] per state name)."""
        if len(encoder_state) != self.cell.num_states:
            raise ValueError(f"encoder_state: expected {self.cell.num_states} state tensor(s) "
                             f"{self.cell.state_names} for cell {self.cell.name!r}, got {len(encoder_state)}")
        batch = encoder_state[0].shape[1]
        for name, s in zip(self.cell.state_names, encoder_state, strict=True):
            if tuple(s.shape) != (self.num_layers, batch, self.hidden_size):
                raise ValueError(f"encoder_state: expected {name} of shape "
                                 f"{(self.num_layers, batch, self.hidden_size)}, got {tuple(s.shape)}")
        feed = encoder_state[0].new_zeros(batch, self.hidden_size) if self.input_feeding else None
        return DecoderState(tuple(encoder_state), feed)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def _readout(self, top: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        attentional = torch.tanh(self.combine(torch.cat([top, context], dim=-1)))
        return self.output(self._drop(attentional)), attentional

    def step_embedded(self, embedded: Tensor, state: DecoderState, memory: Tensor, keys: Tensor,
                      mask: Tensor) -> tuple[Tensor, DecoderState, Tensor]:
        """One step from an embedded input [B, E] -> (logits [B, V], new state, attention weights [B, S])."""
        inputs = [embedded]
        if self.attend_first:
            context, weights = self.attention(state.cells[0][-1], keys, memory, mask)
            inputs.append(context)
        if self.input_feeding:
            inputs.append(state.feed)
        x = torch.cat(inputs, dim=-1) if len(inputs) > 1 else inputs[0]
        new_layers = []
        for layer, cell in enumerate(self.cells):
            new = cell(x, tuple(s[layer] for s in state.cells))
            new = (new,) if isinstance(new, Tensor) else tuple(new)
            new_layers.append(new)
            x = self._drop(new[0])
        # one layer (the common case): unsqueeze is a view, where stack would copy
        cells = tuple(per_name[0].unsqueeze(0) if len(per_name) == 1 else torch.stack(per_name)
                      for per_name in zip(*new_layers, strict=True))
        top = new_layers[-1][0]
        if not self.attend_first:
            context, weights = self.attention(top, keys, memory, mask)
        logits, attentional = self._readout(top, context)
        return logits, DecoderState(cells, attentional if self.input_feeding else None), weights

    def step(self, token: Tensor, state: DecoderState, memory: Tensor, keys: Tensor,
             mask: Tensor) -> tuple[Tensor, DecoderState, Tensor]:
        """One step from input token ids [B] -> (logits [B, V], new state, attention weights [B, S])."""
        return self.step_embedded(self._drop(self.embedding(token)), state, memory, keys, mask)

    def forward(self, tgt_in: Tensor, state: DecoderState, memory: Tensor, mask: Tensor,
                teacher_forcing: float = 1.0, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decode a whole target. tgt_in [B, T] starts with BOS; -> (logits [B, T, V], attention [B, T, S]).

        teacher_forcing: the probability that a step reads the true previous token (per row and step); otherwise
        it reads the model's own previous prediction (argmax), as in scheduled sampling. Logits at padded target
        positions carry no meaning; a loss should ignore them (e.g. ignore_index=pad_id).
        """
        check_tokens("tgt_in", tgt_in, self.vocab_size, batch=memory.shape[0])
        if isinstance(teacher_forcing, bool) or not isinstance(teacher_forcing, (int, float)) \
                or not 0.0 <= teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing: expected a probability in [0, 1], got {teacher_forcing!r}")
        keys = self.attention.keys(memory) if keys is None else keys
        if teacher_forcing == 1.0 and not self.attend_first and not self.input_feeding and self._cells_scan(tgt_in):
            return self._forward_scan(tgt_in, state, memory, keys, mask)
        embedded = self._drop(self.embedding(tgt_in)) if teacher_forcing == 1.0 else None
        logits, weights = [], []
        token = tgt_in[:, 0]
        for t in range(tgt_in.shape[1]):
            if embedded is not None:
                x = embedded[:, t]
            else:
                if t > 0:
                    own = logits[-1].detach().argmax(-1)
                    forced = torch.rand(tgt_in.shape[0], device=tgt_in.device) < teacher_forcing
                    token = torch.where(forced, tgt_in[:, t], own)
                x = self._drop(self.embedding(token))
            step_logits, state, step_weights = self.step_embedded(x, state, memory, keys, mask)
            logits.append(step_logits)
            weights.append(step_weights)
        return torch.stack(logits, 1), torch.stack(weights, 1)

    def _cells_scan(self, tgt_in: Tensor) -> bool:
        """Whether every cell's backend runs a scan over time; those that run only whole modules (native) step."""
        for cell in self.cells:
            query = Query(cell=cell.cell, device=tgt_in.device.type, dtype=cell.weight_ih.dtype,
                          hidden_size=cell.hidden_size, input_size=cell.input_size, batch_size=tgt_in.shape[0],
                          seq_len=tgt_in.shape[1], requires_grad=torch.is_grad_enabled(), level="scan")
            try:
                select_backend(query, cell.backend)
            except BackendNotSupportedError:
                return False
        return True

    def _forward_scan(self, tgt_in: Tensor, state: DecoderState, memory: Tensor, keys: Tensor,
                      mask: Tensor) -> tuple[Tensor, Tensor]:
        """All target steps at once: each layer's cell as one scan over time (the cells' own weights and
        backend), then attention and readout for every step in batched products."""
        x = self._drop(self.embedding(tgt_in)).transpose(0, 1)  # [T, B, E]
        for layer, cell in enumerate(self.cells):
            params = dict(cell.named_parameters(recurse=False))
            weight_ih, bias_ih = params.pop("weight_ih"), params.pop("bias_ih", None)
            weights = Weights(weight_hh=params.pop("weight_hh", None), bias_hh=params.pop("bias_hh", None),
                              **params)
            out, _ = scan(cell.cell, F.linear(x, weight_ih, bias_ih), tuple(s[layer] for s in state.cells),
                          weights, backend=cell.backend)
            x = self._drop(out) if layer < self.num_layers - 1 else out
        top = x.transpose(0, 1)  # [B, T, H]
        context, weights = self.attention(top, keys, memory, mask)
        logits, _ = self._readout(top, context)
        return logits, weights
