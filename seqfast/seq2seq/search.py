"""Greedy and batched beam search over a Decoder, with GNMT's length and coverage penalties (Wu et al., 2016).

A hypothesis's score is
    log P(tokens) / lp(len) + cp,    lp(len) = ((5 + len) / 6) ** length_penalty,
    cp = coverage_penalty * sum over valid source positions s of log(min(total attention on s, 1)),
where len counts the generated tokens up to and including EOS (or all of them when no EOS came) and the total
attention sums the steps that produced those tokens. Both penalties are off at 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .decoder import Decoder
from .encoder import EncoderOutput


class SearchResult(NamedTuple):
    tokens: Tensor  # [B, L] int64, pad_id after EOS
    scores: Tensor  # [B]
    attention: Tensor | None  # [B, L, S] when asked for, zero after EOS


def gnmt_length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    return ((5.0 + lengths.to(torch.float32)) / 6.0) ** alpha


def gnmt_coverage_penalty(coverage: Tensor, mask: Tensor, beta: float) -> Tensor:
    """coverage [..., S] (attention summed over steps), mask [..., S] -> [...]."""
    if not beta:
        return coverage.new_zeros(coverage.shape[:-1])
    # clamp: a position attended with weight underflowing to 0 would give -inf
    logs = torch.log(coverage.clamp(min=1e-10, max=1.0)).masked_fill(~mask, 0.0)
    return beta * logs.sum(-1)


def sequence_score(log_prob: Tensor, lengths: Tensor, coverage: Tensor, mask: Tensor, length_penalty: float,
                   coverage_penalty: float) -> Tensor:
    return log_prob / gnmt_length_penalty(lengths, length_penalty) + gnmt_coverage_penalty(
        coverage, mask, coverage_penalty)


def _check_search_args(max_len, beam_size, length_penalty, coverage_penalty, vocab_size) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or not 1 <= beam_size <= vocab_size:
        raise ValueError(f"beam_size: expected an int in [1, {vocab_size}] (the target vocabulary), got {beam_size!r}")
    for name, value in (("length_penalty", length_penalty), ("coverage_penalty", coverage_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def greedy_search(decoder: Decoder, encoded: EncoderOutput, *, bos_id: int, eos_id: int, pad_id: int, max_len: int,
                  length_penalty: float = 0.0, coverage_penalty: float = 0.0,
                  return_attention: bool = False) -> SearchResult:
    """The most probable token at every step, all rows stepped together until each has produced EOS."""
    _check_search_args(max_len, 1, length_penalty, coverage_penalty, decoder.vocab_size)
    memory, mask = encoded.memory, encoded.mask
    batch = memory.shape[0]
    keys = decoder.attention.keys(memory)
    state = decoder.init_state(encoded.state)
    token = torch.full((batch,), bos_id, dtype=torch.long, device=memory.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=memory.device)
    log_prob = memory.new_zeros(batch)
    lengths = torch.zeros(batch, dtype=torch.long, device=memory.device)
    coverage = torch.zeros_like(mask, dtype=memory.dtype)
    tokens, attention = [], []
    for _ in range(max_len):
        logits, state, weights = decoder.step(token, state, memory, keys, mask)
        step_log_probs = torch.log_softmax(logits.float(), dim=-1)
        best, token = step_log_probs.max(-1)
        alive = ~finished
        token = token.masked_fill(finished, pad_id)
        log_prob = log_prob + best.to(log_prob.dtype) * alive
        lengths = lengths + alive
        weights = weights * alive[:, None]
        coverage = coverage + weights
        tokens.append(token)
        if return_attention:
            attention.append(weights)
        finished = finished | (token == eos_id)
        if bool(finished.all()):
            break
    scores = sequence_score(log_prob, lengths, coverage, mask, length_penalty, coverage_penalty)
    return SearchResult(torch.stack(tokens, 1), scores, torch.stack(attention, 1) if return_attention else None)


def beam_search(decoder: Decoder, encoded: EncoderOutput, *, beam_size: int, bos_id: int, eos_id: int, pad_id: int,
                max_len: int, length_penalty: float = 0.0, coverage_penalty: float = 0.0,
                return_attention: bool = False) -> SearchResult:
    """Batched beam search: the B * beam_size hypotheses step together as one batch.

    Candidates are ranked by their penalised score (module docstring). A hypothesis that produced EOS stays in
    its beam with its score frozen (it extends only with pad_id, at no cost), competing with the live ones, so
    search ends when every beam holds finished hypotheses or at max_len; each source returns its best beam.
    """
    _check_search_args(max_len, beam_size, length_penalty, coverage_penalty, decoder.vocab_size)
    memory, mask = encoded.memory, encoded.mask
    batch, steps, k, vocab = memory.shape[0], memory.shape[1], beam_size, decoder.vocab_size
    device = memory.device
    memory, mask = memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    keys = decoder.attention.keys(memory)
    state = decoder.init_state(encoded.state).index_select(torch.arange(batch, device=device).repeat_interleave(k))
    token = torch.full((batch * k,), bos_id, dtype=torch.long, device=device)
    # only the first beam of each source starts alive: the others are copies of it and must not be chosen twice
    log_prob = torch.full((batch, k), float("-inf"), device=device)
    log_prob[:, 0] = 0.0
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
    coverage = memory.new_zeros(batch, k, steps)
    beam_mask = mask.view(batch, k, steps)
    tokens = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    attention = memory.new_zeros(batch, k, 0, steps)
    # a finished hypothesis's only continuation: pad_id at no cost
    finished_row = torch.full((vocab,), float("-inf"), device=device)
    finished_row[pad_id] = 0.0
    source_offset = (torch.arange(batch, device=device) * k)[:, None]
    for _ in range(max_len):
        logits, state, weights = decoder.step(token, state, memory, keys, mask)
        step_log_probs = torch.log_softmax(logits.float(), dim=-1).view(batch, k, vocab)
        step_log_probs = torch.where(finished[..., None], finished_row, step_log_probs)
        alive = ~finished
        weights = weights.view(batch, k, steps) * alive[..., None]
        new_coverage = coverage + weights
        new_lengths = lengths + alive
        candidate_log_prob = log_prob[..., None] + step_log_probs  # [B, K, V]
        candidate_score = sequence_score(candidate_log_prob, new_lengths[..., None], new_coverage[:, :, None, :],
                                         beam_mask[:, :, None, :], length_penalty, coverage_penalty)
        _, flat = candidate_score.view(batch, k * vocab).topk(k, dim=-1)
        parent, token = flat // vocab, flat % vocab  # [B, K]
        log_prob = candidate_log_prob.view(batch, k * vocab).gather(1, flat)
        finished = finished.gather(1, parent)
        lengths = new_lengths.gather(1, parent)
        coverage = new_coverage.gather(1, parent[..., None].expand(-1, -1, steps))
        tokens = torch.cat([tokens.gather(1, parent[..., None].expand(-1, -1, tokens.shape[2])),
                            token[..., None]], dim=2)
        if return_attention:
            chosen = weights.gather(1, parent[..., None].expand(-1, -1, steps))
            attention = torch.cat([attention.gather(1, parent[..., None, None].expand(-1, -1, *attention.shape[2:])),
                                   chosen[:, :, None]], dim=2)
        finished = finished | (token == eos_id)
        state = state.index_select((source_offset + parent).view(-1))
        token = token.view(-1)
        if bool(finished.all()):
            break
    scores = sequence_score(log_prob, lengths, coverage, beam_mask, length_penalty, coverage_penalty)
    best_scores, best = scores.max(1)
    best_tokens = tokens.gather(1, best[:, None, None].expand(-1, 1, tokens.shape[2])).squeeze(1)
    best_attention = None
    if return_attention:
        best_attention = attention.gather(1, best[:, None, None, None].expand(-1, 1, *attention.shape[2:])).squeeze(1)
    return SearchResult(best_tokens, best_scores, best_attention)
