"""Attention over an encoder's memory, masked at padded source positions.

score(q, m_s) for a query q [Hq] and memory position m_s [D]:
    bahdanau (additive):        v^T tanh(W_q q + W_m m_s)
    luong_dot:                  q . m_s                     (needs Hq == D)
    luong_general:              q^T W m_s
weights = softmax over valid positions s; context = sum_s weights_s m_s.
The memory-side projection depends only on the source, so `keys(memory)` computes it once per source and every
decoder step reuses it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_choice


class Attention(nn.Module):
    """forward(query [B, Hq] or [B, T, Hq], keys, memory [B, S, D], mask [B, S]) -> (context, weights):
    context [B, D] or [B, T, D], weights [B, S] or [B, T, S] (zero at padded positions)."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.query_size, self.memory_size = query_size, memory_size

    def keys(self, memory: Tensor) -> Tensor:
        """The per-source part of the score, computed once per source."""
        return memory

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:  # query [B, T, Hq] -> [B, T, S]
        raise NotImplementedError

    def forward(self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query
        scores = self.scores(q, keys).masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights, memory)
        return (context.squeeze(1), weights.squeeze(1)) if single else (context, weights)

    def extra_repr(self) -> str:
        return f"query_size={self.query_size}, memory_size={self.memory_size}"


class BahdanauAttention(Attention):
    """Additive attention: v^T tanh(W_q q + W_m m_s)."""

    def __init__(self, query_size: int, memory_size: int, attention_size: int | None = None) -> None:
        super().__init__(query_size, memory_size)
        attention_size = attention_size or query_size
        self.query_proj = nn.Linear(query_size, attention_size, bias=False)
        self.memory_proj = nn.Linear(memory_size, attention_size, bias=True)
        self.v = nn.Linear(attention_size, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        return self.memory_proj(memory)  # [B, S, A]

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        hidden = torch.tanh(self.query_proj(query).unsqueeze(2) + keys.unsqueeze(1))  # [B, T, S, A]
        return self.v(hidden).squeeze(-1)


class LuongDotAttention(Attention):
    """Multiplicative attention without parameters: q . m_s."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        if query_size != memory_size:
            raise ValueError(f"attention='luong_dot' needs the query size (decoder hidden size, {query_size}) to "
                             f"equal the memory size ({memory_size}; a bidirectional encoder doubles it); "
                             "use attention='luong_general' or 'bahdanau'")
        super().__init__(query_size, memory_size)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))


class LuongGeneralAttention(Attention):
    """Multiplicative attention: q^T W m_s (W m_s precomputed as the keys)."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__(query_size, memory_size)
        self.memory_proj = nn.Linear(memory_size, query_size, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        return self.memory_proj(memory)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))


ATTENTIONS: dict[str, type[Attention]] = {
    "bahdanau": BahdanauAttention,
    "luong_dot": LuongDotAttention,
    "luong_general": LuongGeneralAttention,
}


def make_attention(name: str, query_size: int, memory_size: int) -> Attention:
    check_choice("attention", name, ATTENTIONS)
    return ATTENTIONS[name](query_size, memory_size)
