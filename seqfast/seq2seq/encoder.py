"""The encoder: embeddings (or features) -> a recurrent stack over padded sources -> memory and bridged state."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..functional import InputError
from ..nn import Recurrent
from ..registry import CellSpec
from ._checks import check_backend, check_cell, check_choice, check_tokens, padding_mask, resolve_lengths

BRIDGES = ("sum", "concat")


class EncoderOutput(NamedTuple):
    memory: Tensor  # [B, S, D], zeros past each source's length; D = hidden_size * directions
    mask: Tensor  # [B, S] boolean, True at valid source positions
    state: tuple[Tensor, ...]  # the decoder's initial state: one [num_layers, B, decoder_hidden_size] per state name
    lengths: Tensor  # [B] int64


class Encoder(nn.Module):
    """A batch-first recurrent encoder over padded sources; no sorting needed.

    Encoder(input_size, hidden_size, ...) reads features [B, S, input_size];
    Encoder(hidden_size=..., vocab_size=V, embedding_dim=E, pad_id=0) reads token ids [B, S] through an embedding.

    Args:
        cell: "lstm", "gru" or any registered cell name (or a CellSpec).
        num_layers, dropout: the stack's depth; dropout applies to the embeddings and between layers.
        bidirectional: the memory is then [B, S, 2 * hidden_size].
        bridge: how the final states become the decoder's initial state of size decoder_hidden_size:
            "sum": forward + backward direction (identity for a unidirectional encoder); needs
            decoder_hidden_size == hidden_size.
            "concat": both directions concatenated, then one Linear per state (h, c) to decoder_hidden_size.
        decoder_hidden_size: defaults to hidden_size.
        backend: passed to the recurrent stack (None: seqfast's usual selection).

    forward(src, lengths=None, *, mask=None) -> EncoderOutput(memory, mask, state, lengths); `mask` [B, S]
    (boolean, True = valid) is accepted instead of `lengths`.
    """

    def __init__(self, input_size: int | None = None, hidden_size: int | None = None, *,
                 vocab_size: int | None = None, embedding_dim: int | None = None, pad_id: int = 0,
                 cell: str | CellSpec = "lstm", num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, bridge: str = "sum", decoder_hidden_size: int | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if hidden_size is None:
            raise TypeError("Encoder: hidden_size is required")
        tokens = vocab_size is not None or embedding_dim is not None
        if tokens == (input_size is not None):
            raise TypeError("Encoder: give either input_size (feature inputs) or vocab_size and embedding_dim "
                            f"(token inputs), got input_size={input_size}, vocab_size={vocab_size}, "
                            f"embedding_dim={embedding_dim}")
        if tokens and (vocab_size is None or embedding_dim is None):
            raise TypeError(f"Encoder: token inputs need both vocab_size and embedding_dim, got "
                            f"vocab_size={vocab_size}, embedding_dim={embedding_dim}")
        check_choice("bridge", bridge, BRIDGES)
        self.cell = check_cell(cell)
        check_backend(backend)
        self.hidden_size, self.num_layers, self.bidirectional = hidden_size, num_layers, bidirectional
        self.decoder_hidden_size = hidden_size if decoder_hidden_size is None else decoder_hidden_size
        self.bridge, self.pad_id, self.vocab_size = bridge, pad_id, vocab_size
        if bridge == "sum" and self.decoder_hidden_size != hidden_size:
            raise ValueError(f"Encoder: bridge='sum' needs decoder_hidden_size == hidden_size, got "
                             f"{self.decoder_hidden_size} and {hidden_size}; use bridge='concat'")
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id) if tokens else None
        self.input_size = embedding_dim if tokens else input_size
        self.dropout = nn.Dropout(dropout)
        self.rnn = Recurrent(self.cell, self.input_size, hidden_size, num_layers=num_layers, batch_first=True,
                             dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional,
                             backend=backend)
        directions = 2 if bidirectional else 1
        self.memory_size = hidden_size * directions
        self.bridges = nn.ModuleList(
            nn.Linear(self.memory_size, self.decoder_hidden_size) for _ in self.cell.state_names
        ) if bridge == "concat" else None

    def forward(self, src: Tensor, lengths: Tensor | None = None, *, mask: Tensor | None = None) -> EncoderOutput:
        if self.embedding is not None:
            check_tokens("src", src, self.vocab_size)
            x = self.dropout(self.embedding(src))
        else:
            if not isinstance(src, Tensor) or src.dim() != 3:
                got = f"{src.dim()}-D" if isinstance(src, Tensor) else type(src).__name__
                raise InputError(f"src: expected a 3-D [B, S, {self.input_size}] tensor, got {got}")
            x = self.dropout(src)
        batch, steps = x.shape[0], x.shape[1]
        if steps == 0:
            raise InputError("src: expected at least one source position, got S = 0")
        lengths = resolve_lengths(lengths, mask, batch, steps, x.device, ("src_lengths", "src_mask"))
        memory, final = self.rnn(x, lengths=lengths)
        final = (final,) if isinstance(final, Tensor) else tuple(final)
        return EncoderOutput(memory, padding_mask(lengths, steps), self.bridge_state(final), lengths)

    def bridge_state(self, final: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """[layers * directions, B, H] per state -> [layers, B, decoder_hidden_size] per state."""
        directions = 2 if self.bidirectional else 1
        out = []
        for index, s in enumerate(final):
            s = s.view(self.num_layers, directions, *s.shape[1:])
            if self.bridges is None:
                out.append(s.sum(1))
            else:
                out.append(self.bridges[index](torch.cat(s.unbind(1), dim=-1)))
        return tuple(out)

    def extra_repr(self) -> str:
        return f"bridge={self.bridge!r}, memory_size={self.memory_size}"

