"""seqfast modules trained under DistributedDataParallel (gloo, two CPU processes on loopback) match one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import seqfast
from seqfast.registry import registry

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

BACKENDS = ["torch", "native", "numba"]
MODELS = ["lstm", "bigru_lengths", "seq2seq"]

# Run as a script: two ranks train every (backend, model) with the Trainer on their half of each batch, then one
# process trains the same models on the whole batches; every final state_dict is saved for the test to compare.
_SCRIPT = r'''
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import seqfast
from seqfast.seq2seq import Seq2Seq
from seqfast.training import Trainer

OUT, PORT, BACKENDS, ROOT = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
WORLD, STEPS, BATCH = 2, 3, 4
MODELS = ("lstm", "bigru_lengths", "seq2seq")


class Net(torch.nn.Module):
    def __init__(self, kind, backend):
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.rnn = seqfast.LSTM(3, 5, batch_first=True, backend=backend)
            self.head = torch.nn.Linear(5, 1)
        elif kind == "seq2seq":
            self.model = Seq2Seq(src_vocab_size=7, tgt_vocab_size=7, embedding_dim=4, hidden_size=5, cell="lstm",
                                 attention="bahdanau", pad_id=0, bos_id=1, eos_id=2, backend=backend)
        else:
            self.rnn = seqfast.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
            self.head = torch.nn.Linear(8, 1)

    def forward(self, *batch):
        """The batch's loss."""
        if self.kind == "seq2seq":
            src, src_lengths, tgt_in, tgt_out = batch
            logits = self.model(src, src_lengths, tgt_in)
            # summed over tokens, divided by rows x steps: a rank's half batch then weighs half, as DDP averages
            total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=0,
                                                      reduction="sum")
            return total / tgt_out.numel()
        x, lengths, y = batch
        if self.kind == "lstm":
            out, _ = self.rnn(x)
            return torch.nn.functional.mse_loss(self.head(out[:, -1]), y)
        out, h = self.rnn(x, lengths=lengths)
        pred = self.head(torch.cat([h[-2], h[-1]], 1)) + out.sum((1, 2), keepdim=True).mul(0.1).squeeze(2)
        return torch.nn.functional.mse_loss(pred, y)


def batches(kind):
    g = torch.Generator().manual_seed(1)
    if kind != "seq2seq":
        return [(torch.randn(BATCH, 6, 3, generator=g), torch.randint(1, 7, (BATCH,), generator=g),
                 torch.randn(BATCH, 1, generator=g)) for _ in range(STEPS)]
    out = []
    for _ in range(STEPS):  # reverse digit strings: tokens 3..6, 0 pad, 1 bos, 2 eos
        lengths = torch.randint(2, 6, (BATCH,), generator=g)
        src = torch.randint(3, 7, (BATCH, 5), generator=g).masked_fill(torch.arange(5) >= lengths[:, None], 0)
        tgt = torch.stack([torch.nn.functional.pad(s[:n].flip(0), (0, 5 - n)) for s, n in zip(src, lengths)])
        tgt_in = torch.nn.functional.pad(tgt, (1, 0), value=1)
        tgt_out = torch.nn.functional.pad(tgt, (0, 1)).scatter(1, lengths[:, None], 2)
        out.append((src, lengths, tgt_in, tgt_out))
    return out


def step(model, batch):
    return model(*batch)


def train(kind, backend, model_wrap, rows):
    torch.manual_seed(0)
    net = Net(kind, backend)
    model = model_wrap(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [tuple(t[rows] for t in b) for b in batches(kind)]
    history = Trainer(model, opt, step, patience=1, progress=False).fit(data[:2], epochs=2, val=data[2:])
    return {"state": net.state_dict(), "history": history}


def worker(rank):
    assert seqfast.__file__.startswith(ROOT), f"rank {rank} imported {seqfast.__file__}, not the one under test"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{PORT}", rank=rank, world_size=WORLD)
    half = BATCH // WORLD
    for backend in BACKENDS:
        for kind in MODELS:
            state = train(kind, backend, torch.nn.parallel.DistributedDataParallel,
                          slice(rank * half, (rank + 1) * half))
            torch.save(state, os.path.join(OUT, f"rank{rank}-{backend}-{kind}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    for backend in BACKENDS:
        for kind in MODELS:
            state = train(kind, backend, lambda net: net, slice(None))
            torch.save(state, os.path.join(OUT, f"single-{backend}-{kind}.pt"))
            torch.manual_seed(0)
            torch.save({"state": Net(kind, backend).state_dict()}, os.path.join(OUT, f"init-{backend}-{kind}.pt"))
    print("ok")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runnable(backend: str) -> bool:
    return registry.backends[backend].unavailable_reason() is None


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Runs the script once for every available backend; returns the folder of saved state_dicts."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "ddp_train.py").write_text(_SCRIPT)
    root = os.path.dirname(os.path.dirname(seqfast.__file__))  # the seqfast under test, in the spawned ranks too
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQFAST_BACKEND") and k != "SEQFAST_CONFIG"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               SEQFAST_CALIBRATE="0", MASTER_ADDR="127.0.0.1")
    backends = ",".join(b for b in BACKENDS if _runnable(b))
    result = subprocess.run([sys.executable, str(out / "ddp_train.py"), str(out), str(_free_port()), backends,
                             root],
                            capture_output=True, text=True, env=env, cwd=out, timeout=240)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]
    return out


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.skipif(not _runnable(b), reason=str(registry.backends[b].unavailable_reason())))
    for b in BACKENDS])
def test_ddp_ranks_agree_with_one_process_on_the_whole_batch(ddp_results, backend, kind):
    """Both ranks end with identical parameters and metrics, equal to one process trained on the combined batches."""
    rank0, rank1, single, initial = (torch.load(ddp_results / f"{who}-{backend}-{kind}.pt", weights_only=True)
                                     for who in ("rank0", "rank1", "single", "init"))
    # the epoch metrics are averaged over the ranks: the same on both, the whole batches' own
    assert rank0["history"] == rank1["history"] and len(rank0["history"]) == len(single["history"])
    for got, expected in zip(rank0["history"], single["history"], strict=True):
        assert got == pytest.approx(expected, rel=1e-5), "DDP metrics vs one process"
    rank0, rank1, single, initial = rank0["state"], rank1["state"], single["state"], initial["state"]
    assert list(rank0) == list(single) and len(rank0) > 4
    assert all(not torch.equal(single[name], initial[name]) for name in single if "weight" in name), "no training"
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}, DDP vs one process: {m}")
