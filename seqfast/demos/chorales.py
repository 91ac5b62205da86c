"""Bach chorale melodies as note events, modelled by an LSTM.

Data: the 371 four-part chorales of music21's bundled corpus (`music21.corpus.chorales.Iterator`, Riemenschneider
numbering), soprano line only, each transposed by its key signature to C major / A minor. A note event is one
token, (MIDI pitch or rest, duration in quarters); a tie joins two notes into one event. The last 15 % of the
chorales (in Riemenschneider order) are held out. Figures: next-event accuracy and perplexity on them, against a
bigram model (interpolated with the unigram, its weight chosen on the last tenth of the training chorales) and
the unigram alone (add-one).
The model samples a new melody, written as MIDI through music21 and drawn as a piano roll.

The MusicXML files are read with the standard library's XML parser: music21's full parser takes most of a second
per chorale, which alone would take the demo past its time budget.
"""

from __future__ import annotations

import math
import time
import zipfile
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import torch
from torch import nn

from .. import LSTM
from .common import DemoOptions, DemoResult, backend_in_use, optimizer_step, pyplot, save_figure, seed_everything, train

HELD_OUT = 0.15
STEPS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
REST = -1
Event = tuple[int, float]  # (MIDI pitch or REST, duration in quarter notes)


def chorale_paths(limit: int | None = None) -> list[Path]:
    """The chorales' MusicXML files in Riemenschneider order (the corpus also holds Humdrum copies of some)."""
    from music21 import corpus

    names = list(corpus.chorales.Iterator(numberingSystem="riemenschneider", returnType="filename"))[:limit]
    by_stem: dict[str, list[Path]] = {}
    for path in corpus.getComposer("bach"):  # one listing; corpus.getWork searches the corpus on every call
        by_stem.setdefault(Path(path).stem, []).append(Path(path))
    paths = []
    for name in names:
        found = by_stem.get(name.rsplit("/", 1)[-1]) or corpus.getWork(name)
        found = [Path(p) for p in (found if isinstance(found, list) else [found])]
        paths.append(next(p for p in found if p.suffix in (".mxl", ".xml", ".musicxml")))
    return paths


def read_musicxml(path: Path) -> ElementTree.Element:
    if path.suffix == ".mxl":
        with zipfile.ZipFile(path) as archive:  # a compressed MusicXML file: the container names the score
            container = ElementTree.fromstring(archive.read("META-INF/container.xml"))
            name = container.find(".//rootfile").get("full-path")
            return ElementTree.fromstring(archive.read(name))
    return ElementTree.parse(path).getroot()


def soprano_events(root: ElementTree.Element) -> list[Event]:
    """The first part's first voice as events, transposed so that the key signature becomes C major / A minor."""
    part = root.find("part")
    divisions, shift, voice, events = 1, 0, None, []
    tied = False
    for measure in part.iter("measure"):
        for element in measure:
            if element.tag == "attributes":
                divisions = int(element.findtext("divisions", divisions))
                fifths = element.findtext("key/fifths")
                if fifths is not None and not events:
                    shift = -((int(fifths) * 7) % 12)
                    shift += 12 if shift < -6 else 0
            if element.tag != "note" or element.find("grace") is not None or element.find("chord") is not None:
                continue
            voice = voice or element.findtext("voice", "1")
            if element.findtext("voice", "1") != voice:
                continue
            length = int(element.findtext("duration", "0")) / divisions
            if element.find("rest") is not None:
                pitch = REST
            else:
                step, octave = element.findtext("pitch/step"), int(element.findtext("pitch/octave"))
                pitch = 12 * (octave + 1) + STEPS[step] + int(float(element.findtext("pitch/alter", "0"))) + shift
            ties = {tie.get("type") for tie in element.findall("tie")}
            if tied and "stop" in ties and events and events[-1][0] == pitch:
                events[-1] = (pitch, events[-1][1] + length)
            else:
                events.append((pitch, length))
            tied = "start" in ties
    return events


class MelodyModel(nn.Module):
    def __init__(self, vocab: int, hidden_size: int, embedding: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = LSTM(embedding, hidden_size, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(hidden_size, vocab)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None, state=None):
        out, state = self.lstm(self.embed(ids), state, lengths=lengths)  # zeros past each melody's length
        return self.head(self.drop(out)), state


def padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences])
    batch = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(sequences):
        batch[i, :len(s)] = torch.tensor(s)
    return batch, lengths


class Bigram:
    """P(next | previous) = w * counted bigram + (1 - w) * add-one unigram (w = 0: the unigram alone)."""

    def __init__(self, sequences: list[list[int]], vocab: int) -> None:
        counts = np.zeros((vocab, vocab))
        for s in sequences:
            np.add.at(counts, (s[:-1], s[1:]), 1.0)
        unigram = counts.sum(axis=0) + 1.0
        self.unigram = unigram / unigram.sum()
        self.conditional = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)

    def scores(self, sequences: list[list[int]], weight: float) -> tuple[float, float]:
        """(accuracy, perplexity) of next-event prediction over `sequences`."""
        prev = np.concatenate([s[:-1] for s in sequences])
        nxt = np.concatenate([s[1:] for s in sequences])
        probs = weight * self.conditional[prev] + (1 - weight) * self.unigram
        accuracy = (probs.argmax(axis=1) == nxt).mean()
        return float(accuracy), float(np.exp(-np.log(probs[np.arange(len(nxt)), nxt]).mean()))


@torch.no_grad()
def model_scores(model: MelodyModel, sequences: list[list[int]]) -> tuple[float, float]:
    ids, lengths = padded(sequences)
    logits, _ = model(ids[:, :-1], lengths - 1)
    mask = torch.arange(ids.shape[1] - 1) < (lengths - 1)[:, None]
    logits, targets = logits[mask], ids[:, 1:][mask]
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    return accuracy, math.exp(nn.functional.cross_entropy(logits, targets).item())


@torch.no_grad()
def generate(model: MelodyModel, start: int, end: int, max_events: int, temperature: float,
             generator: torch.Generator) -> list[int]:
    tokens, state = [start], None
    logits, state = model(torch.tensor([[start]]), state=state)
    while len(tokens) <= max_events:
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        probs[start] = 0.0
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        if nxt == end:
            break
        tokens.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state=state)
    return tokens[1:]


def write_midi(events: list[Event], path: Path) -> Path:
    from music21 import meter, note, stream, tempo

    melody = stream.Stream([tempo.MetronomeMark(number=72), meter.TimeSignature("4/4")])
    for pitch, length in events:
        melody.append(note.Rest(quarterLength=length) if pitch == REST else note.Note(pitch, quarterLength=length))
    melody.write("midi", fp=str(path))
    return path


def run(options: DemoOptions) -> DemoResult:
    paths = chorale_paths(30 if options.quick else None)
    melodies = [events for events in (soprano_events(read_musicxml(p)) for p in paths) if len(events) > 4]
    n_test = max(2, round(len(melodies) * HELD_OUT))
    train_melodies, test_melodies = melodies[:-n_test], melodies[-n_test:]

    counts = Counter(event for m in train_melodies for event in m)
    vocabulary = ["<start>", "<end>", "<other>", *sorted(counts)]  # <other>: an event the training part never has
    index = {event: i for i, event in enumerate(vocabulary)}
    encode = lambda m: [0, *(index.get(e, 2) for e in m), 1]  # noqa: E731
    train_ids, test_ids = [encode(m) for m in train_melodies], [encode(m) for m in test_melodies]

    n_val = max(1, len(train_ids) // 10)
    held_in = Bigram(train_ids[:-n_val], len(vocabulary))
    weight = float(min(np.linspace(0.5, 0.99, 12), key=lambda w: held_in.scores(train_ids[-n_val:], w)[1]))
    bigram = Bigram(train_ids, len(vocabulary))
    bigram_accuracy, bigram_perplexity = bigram.scores(test_ids, weight)
    unigram = bigram.scores(test_ids, 0.0)

    hidden, epochs, batch, lr = (64, 10, 8, 1e-2) if options.quick else (128, 60, 16, 5e-3)
    generator = seed_everything(options.seed)
    model = MelodyModel(len(vocabulary), hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    per_epoch = math.ceil(len(train_ids) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * per_epoch)

    order: list[int] = []

    def step(epoch: int, i: int) -> float:
        if i == 0:
            order[:] = torch.randperm(len(train_ids), generator=generator).tolist()
        ids, lengths = padded([train_ids[j] for j in order[i * batch:(i + 1) * batch]])
        model.train()
        logits, _ = model(ids[:, :-1], lengths - 1)
        mask = torch.arange(ids.shape[1] - 1) < (lengths - 1)[:, None]
        loss = nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask])
        return optimizer_step(loss, model, optimizer, schedule, 1.0)

    start = time.perf_counter()
    log = train(epochs, per_epoch, step, options, f"melody LSTM H={hidden}")
    train_seconds = time.perf_counter() - start
    model.eval()
    accuracy, perplexity = model_scores(model, test_ids)

    generated = [vocabulary[t] for t in generate(model, 0, 1, 64, 0.8, generator) if t > 2]
    options.out.mkdir(parents=True, exist_ok=True)
    midi = write_midi(generated, options.out / "chorale.mid")
    plot = piano_roll(generated, test_melodies[0], options)

    name = f"melody LSTM (H={hidden})"
    table = {name: {"accuracy": accuracy, "perplexity": perplexity},
             f"bigram (w={weight:.2f})": {"accuracy": bigram_accuracy, "perplexity": bigram_perplexity},
             "unigram": {"accuracy": unigram[0], "perplexity": unigram[1]}}
    return DemoResult(
        name="chorales",
        evaluation=f"next note event in {len(test_ids)} held-out soprano lines, trained on {len(train_ids)}",
        model=name, trivial="unigram", primary="perplexity", table=table,
        higher_is_better=frozenset({"accuracy"}), backend=backend_in_use("lstm", hidden), epochs=epochs,
        seconds_per_epoch=log.seconds_per_epoch, train_seconds=train_seconds, files=[plot, midi],
        notes=[f"vocabulary: {len(vocabulary)} events; generated melody: {len(generated)} events"])


def piano_roll(generated: list[Event], real: list[Event], options: DemoOptions) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, events, title in ((axes[0], generated, "generated"), (axes[1], real, "a held-out chorale")):
        onset = 0.0
        for pitch, length in events:
            if pitch != REST:
                ax.broken_barh([(onset, length * 0.95)], (pitch - 0.4, 0.8), color="C0" if ax is axes[0] else "C1")
            onset += length
        ax.set(xlabel="quarter notes", title=f"soprano, {title} (in C / a)")
        ax.grid(axis="y", lw=0.3)
    axes[0].set_ylabel("MIDI pitch")
    return save_figure(fig, options, "chorales.png")
