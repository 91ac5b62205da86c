"""Seq2Seq: an Encoder, an attentional Decoder and greedy / beam search, over padded batches of token ids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import CellSpec
from ._checks import check_backend, check_cell, check_choice
from .attention import ATTENTIONS
from .decoder import Decoder
from .encoder import BRIDGES, Encoder, EncoderOutput
from .search import beam_search, greedy_search


class Seq2Seq(nn.Module):
    """An attentional encoder-decoder over token ids, batch-first and padding-aware (no sorting needed).

    Args:
        src_vocab_size, tgt_vocab_size, embedding_dim, hidden_size: vocabularies and sizes (both sides).
        cell: "lstm", "gru" or any registered cell, for encoder and decoder.
        attention: "bahdanau", "luong_dot" or "luong_general"; input_feeding: Luong's input feeding.
        num_layers: depth of encoder and decoder. bidirectional_encoder: its memory is 2 * hidden_size wide and
            its final states reach the decoder through `bridge` ("sum" or "concat", see Encoder).
        dropout: on embeddings, between layers and on the decoder's attentional vectors.
        pad_id, bos_id, eos_id: special target ids (pad_id is the source's padding id too).
        backend: passed to every recurrent module (None: seqfast's usual selection).

    forward(src [B, S], src_lengths [B], tgt_in [B, T], teacher_forcing=1.0) -> logits [B, T, V]
        tgt_in starts with bos_id (the target shifted right); `src_mask` [B, S] (True = valid) may replace
        src_lengths; return_attention=True adds the attention weights [B, T, S].
    generate(src, src_lengths, max_len, beam_size=1, length_penalty=0.0, coverage_penalty=0.0,
             return_attention=False) -> (tokens [B, L], scores [B]) (+ attention [B, L, S])
        greedy at beam_size=1, batched beam search above; tokens are pad_id after eos_id; see seqfast.seq2seq.search.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, embedding_dim: int, hidden_size: int,
                 cell: str | CellSpec = "lstm", attention: str = "bahdanau", num_layers: int = 1,
                 bidirectional_encoder: bool = False, dropout: float = 0.0, pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2, *, input_feeding: bool = False, bridge: str = "sum",
                 backend: str | None = None) -> None:
        super().__init__()
        check_choice("attention", attention, ATTENTIONS)
        check_choice("bridge", bridge, BRIDGES)
        check_cell(cell)
        check_backend(backend)
        for name, value in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size),
                            ("embedding_dim", embedding_dim), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < tgt_vocab_size:
                raise ValueError(f"{name}: expected a token id in [0, {tgt_vocab_size}), got {value!r}")
        if pad_id >= src_vocab_size:
            raise ValueError(f"pad_id: the source pads with it too, so it must be below src_vocab_size "
                             f"({src_vocab_size}), got {pad_id}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.encoder = Encoder(hidden_size=hidden_size, vocab_size=src_vocab_size, embedding_dim=embedding_dim,
                               pad_id=pad_id, cell=cell, num_layers=num_layers, bidirectional=bidirectional_encoder,
                               dropout=dropout, bridge=bridge, decoder_hidden_size=hidden_size, backend=backend)
        self.decoder = Decoder(tgt_vocab_size, embedding_dim, hidden_size, self.encoder.memory_size, cell=cell,
                               num_layers=num_layers, attention=attention, input_feeding=input_feeding,
                               dropout=dropout, pad_id=pad_id, backend=backend)

    def encode(self, src: Tensor, src_lengths: Tensor | None = None, *,
               src_mask: Tensor | None = None) -> EncoderOutput:
        return self.encoder(src, src_lengths, mask=src_mask)

    def forward(self, src: Tensor, src_lengths: Tensor | None = None, tgt_in: Tensor | None = None,
                teacher_forcing: float = 1.0, *, src_mask: Tensor | None = None,
                return_attention: bool = False):
        if tgt_in is None:
            raise TypeError("tgt_in: required, the target shifted right ([B, T], starting with bos_id)")
        encoded = self.encode(src, src_lengths, src_mask=src_mask)
        logits, attention = self.decoder(tgt_in, self.decoder.init_state(encoded.state), encoded.memory,
                                         encoded.mask, teacher_forcing)
        return (logits, attention) if return_attention else logits

    def generate(self, src: Tensor, src_lengths: Tensor | None = None, max_len: int = 50, beam_size: int = 1,
                 length_penalty: float = 0.0, coverage_penalty: float = 0.0, return_attention: bool = False, *,
                 src_mask: Tensor | None = None):
        """Decode without gradients (works inside torch.inference_mode too); see the class docstring."""
        with torch.no_grad():
            encoded = self.encode(src, src_lengths, src_mask=src_mask)
            ids = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
            options = {"max_len": max_len, "length_penalty": length_penalty, "coverage_penalty": coverage_penalty,
                       "return_attention": return_attention}
            if beam_size == 1:
                result = greedy_search(self.decoder, encoded, **ids, **options)
            else:
                result = beam_search(self.decoder, encoded, beam_size=beam_size, **ids, **options)
        return tuple(result) if return_attention else (result.tokens, result.scores)
