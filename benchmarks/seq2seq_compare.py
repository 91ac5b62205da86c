"""seqfast.seq2seq against the same model built from torch.nn modules: tokens per second.

The torch.nn model is a copy of the seqfast one with the same weights, its encoder a torch.nn.LSTM over a
PackedSequence and its decoder a loop of torch.nn.LSTMCell steps; attention, embeddings and readout are shared
code. Measured, interleaved (seqfast, torch.nn, seqfast, ...), as medians:
    train   target tokens per second of a teacher-forced forward + backward
    greedy  generated tokens per second (batch * steps run)
    beam    generated tokens per second of beam search (batch * steps run; the hypotheses are beam_size times more)

    python benchmarks/seq2seq_compare.py                       # bahdanau and luong_general, backends numba, auto
    python benchmarks/seq2seq_compare.py --attention luong_general --backends numba --repeats 20
    python benchmarks/seq2seq_compare.py --device cuda --backends triton,auto
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

if TYPE_CHECKING:  # imported where used: asv imports every file here, at commits from before seqfast.seq2seq too
    from seqfast.seq2seq import Seq2Seq

PAD, BOS, EOS = 0, 1, 2


class PackedLSTM(nn.Module):
    """torch.nn.LSTM with the `lengths=` call of seqfast's modules, through a PackedSequence."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, state


def torch_nn_twin(model: Seq2Seq) -> Seq2Seq:
    """The same model and weights with torch.nn.LSTM as the encoder and torch.nn.LSTMCell steps as the decoder."""
    twin = copy.deepcopy(model)
    rnn = model.encoder.rnn
    lstm = nn.LSTM(rnn.input_size, rnn.hidden_size, rnn.num_layers, batch_first=True, dropout=rnn.dropout,
                   bidirectional=rnn.bidirectional).to(rnn.weight_ih_l0)
    lstm.load_state_dict(rnn.state_dict())
    twin.encoder.rnn = PackedLSTM(lstm)
    cells = []
    for cell in model.decoder.cells:
        torch_cell = nn.LSTMCell(cell.input_size, cell.hidden_size).to(cell.weight_ih)
        torch_cell.load_state_dict(cell.state_dict())
        cells.append(torch_cell)
    twin.decoder.cells = nn.ModuleList(cells)
    twin.decoder._cells_scan = lambda tgt_in: False  # a torch.nn decoder steps its cells
    return twin


def batch(args, generator, device):
    lengths = torch.randint(args.src_len // 2, args.src_len + 1, (args.batch,), generator=generator)
    src = torch.randint(3, args.vocab, (args.batch, args.src_len), generator=generator)
    src = src.masked_fill(torch.arange(args.src_len)[None, :] >= lengths[:, None], PAD)
    tgt = torch.randint(3, args.vocab, (args.batch, args.tgt_len + 1), generator=generator)
    tgt[:, 0] = BOS
    return src.to(device), lengths.to(device), tgt[:, :-1].to(device), tgt[:, 1:].to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device) -> tuple[float, float]:
    """(seconds, tokens) of one call of fn, which returns the tokens it handled."""
    sync(device)
    start = time.perf_counter()
    tokens = fn()
    sync(device)
    return time.perf_counter() - start, tokens


def run(args) -> None:
    from seqfast.seq2seq import Seq2Seq

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    src, lengths, tgt_in, tgt_out = batch(args, generator, device)
    print(f"B={args.batch} S<={args.src_len} T={args.tgt_len} V={args.vocab} E={args.embedding} H={args.hidden} "
          f"beam={args.beam} device={device} torch threads={torch.get_num_threads()} torch {torch.__version__}")
    print(f"{'attention':<14} {'backend':<8} {'mode':<7} {'seqfast tok/s':>14} {'torch.nn tok/s':>15} {'speed-up':>9}")
    for attention in args.attention.split(","):
        for backend in args.backends.split(","):
            torch.manual_seed(0)
            model = Seq2Seq(args.vocab, args.vocab, args.embedding, args.hidden, attention=attention,
                            backend=None if backend == "auto" else backend).to(device)
            twin = torch_nn_twin(model)
            model.eval()
            twin.eval()
            with torch.no_grad():  # the two must be the same model
                torch.testing.assert_close(model(src, lengths, tgt_in), twin(src, lengths, tgt_in),
                                           atol=1e-4, rtol=1e-4)

            def train(m):
                m.train()
                m.zero_grad(set_to_none=True)
                logits = m(src, lengths, tgt_in)
                F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten()).backward()
                return tgt_out.numel()

            def decode(m, beam_size):
                m.eval()
                tokens, _ = m.generate(src, lengths, max_len=args.tgt_len, beam_size=beam_size)
                return tokens.numel()

            modes = {"train": train, "greedy": lambda m: decode(m, 1), "beam": lambda m: decode(m, args.beam)}
            for mode, fn in modes.items():
                for m in (model, twin):  # warm-up: JIT compilation, allocator
                    fn(m)
                rates = {"seqfast": [], "torch.nn": []}
                for _ in range(args.repeats):
                    for name, m in (("seqfast", model), ("torch.nn", twin)):
                        seconds, tokens = measure(lambda m=m, fn=fn: fn(m), device)
                        rates[name].append(tokens / seconds)
                ours, theirs = statistics.median(rates["seqfast"]), statistics.median(rates["torch.nn"])
                print(f"{attention:<14} {backend:<8} {mode:<7} {ours:>14,.0f} {theirs:>15,.0f} {ours / theirs:>8.2f}x",
                      flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default="bahdanau,luong_general")
    parser.add_argument("--backends", default="numba,auto", help="seqfast backends, comma-separated ('auto' too)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--src-len", type=int, default=30)
    parser.add_argument("--tgt-len", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--embedding", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
