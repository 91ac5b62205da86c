"""seqfast.seq2seq: a teacher-forced training step, greedy and beam decoding of one batch, with the same model
built from torch.nn modules (torch.nn.LSTM encoder, torch.nn.LSTMCell decoder loop) as one more `backend`.

Shape: B 32, S = T = 20, V 500, E 64, H 128; beam 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from seqfast.seq2seq import Seq2Seq

    from .seq2seq_compare import torch_nn_twin
    _IMPORT_ERROR = None
except Exception as exc:  # a commit from before seqfast.seq2seq: every setup says so
    Seq2Seq = torch_nn_twin = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

TORCH_NN = "torch.nn"
BATCH, STEPS, VOCAB, EMBEDDING, HIDDEN, BEAM = 32, 20, 500, 64, 128, 4


class Seq2SeqSuite:
    params = ([TORCH_NN, "numba", "torch"], ["bahdanau", "luong_general"])
    param_names = ["backend", "attention"]
    rounds = 1
    repeat = (3, 10, 4.0)
    timeout = 300

    def setup(self, backend: str, attention: str) -> None:
        if Seq2Seq is None:
            raise NotImplementedError(_IMPORT_ERROR)
        torch.manual_seed(0)
        model = Seq2Seq(VOCAB, VOCAB, EMBEDDING, HIDDEN, attention=attention,
                        backend="numba" if backend == TORCH_NN else backend)
        self.model = torch_nn_twin(model) if backend == TORCH_NN else model
        self.src = torch.randint(3, VOCAB, (BATCH, STEPS))
        self.lengths = torch.randint(STEPS // 2, STEPS + 1, (BATCH,))
        self.tgt = torch.randint(3, VOCAB, (BATCH, STEPS + 1))
        self.tgt[:, 0] = 1
        for _ in range(2):  # JIT compilation and caches
            self.time_train(backend, attention)
            self.time_beam(backend, attention)

    def time_train(self, backend: str, attention: str) -> None:
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        logits = self.model(self.src, self.lengths, self.tgt[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), self.tgt[:, 1:].flatten()).backward()

    def time_greedy(self, backend: str, attention: str) -> None:
        self.model.eval()
        self.model.generate(self.src, self.lengths, max_len=STEPS)

    def time_beam(self, backend: str, attention: str) -> None:
        self.model.eval()
        self.model.generate(self.src, self.lengths, max_len=STEPS, beam_size=BEAM)
