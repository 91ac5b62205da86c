"""Sequence to sequence with attention on seqfast's recurrent modules: batch-first, padding-aware.

    from seqfast.seq2seq import Seq2Seq
    model = Seq2Seq(src_vocab_size, tgt_vocab_size, embedding_dim=32, hidden_size=64, attention="luong_general")
    logits = model(src, src_lengths, tgt_in)                       # [B, T, V], teacher forced
    tokens, scores = model.generate(src, src_lengths, max_len=20, beam_size=4, length_penalty=0.6)
"""

from .attention import (
    ATTENTIONS,
    Attention,
    BahdanauAttention,
    LuongDotAttention,
    LuongGeneralAttention,
    make_attention,
)
from .decoder import Decoder, DecoderState
from .encoder import Encoder, EncoderOutput
from .model import Seq2Seq
from .schedules import ExponentialSchedule, InverseSigmoidSchedule, LinearSchedule
from .search import SearchResult, beam_search, gnmt_coverage_penalty, gnmt_length_penalty, greedy_search

__all__ = [
    "Seq2Seq",
    "Encoder",
    "EncoderOutput",
    "Decoder",
    "DecoderState",
    "Attention",
    "BahdanauAttention",
    "LuongDotAttention",
    "LuongGeneralAttention",
    "ATTENTIONS",
    "make_attention",
    "LinearSchedule",
    "ExponentialSchedule",
    "InverseSigmoidSchedule",
    "greedy_search",
    "beam_search",
    "SearchResult",
    "gnmt_length_penalty",
    "gnmt_coverage_penalty",
]
