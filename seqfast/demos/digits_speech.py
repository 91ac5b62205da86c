"""Speech recognition of spoken digit strings, synthesised with espeak-ng, by a bidirectional GRU with CTC.

Data: random strings of 1-6 digits ("3 1 4" is read "three one four"), spoken by espeak-ng in seven English
accents (en, en-us, en-gb-x-rp, Scottish, Caribbean, Lancaster, West Midlands) with voice variants, each utterance
at a random pitch and speed. The audio is synthesised once and cached (keyed by everything that made it) in
seqfast's cache directory (`SEQFAST_CACHE_DIR`, else ~/.cache/seqfast). Features: log-mel spectra (torch.stft and a
triangular mel filterbank), 10 ms frames stacked in pairs. Evaluation: digit error rate (edit distance / reference
length) of greedy CTC decoding on voice variants that never speak in training, against the best constant answer (the
most common digit, repeated the most common length) and the empty answer (all deletions: 100 %); the better of the
two is the trivial baseline.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import os
import random
import shutil
import subprocess
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import GRU
from ..config import cache_root
from .common import (
    DemoOptions,
    DemoResult,
    MissingDependencyError,
    backend_in_use,
    optimizer_step,
    pyplot,
    save_figure,
    seed_everything,
    train,
)

ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m5", "m6", "m8", "f1", "f2", "f4", "adam", "linda", "john", "klatt")
TEST_VARIANTS = ("m4", "m7", "f3", "f5", "steph", "klatt3")
MAX_DIGITS = 6
SAMPLE_RATE = 22050
N_FFT, HOP, N_MELS, STACK = 512, 220, 40, 2  # 23 ms windows every 10 ms; pairs of frames -> 20 ms steps
BLANK = 0  # CTC's blank; digit d is label d + 1


def espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise MissingDependencyError(
            "demo 'digits-speech' synthesises its data with espeak-ng, which is not installed: "
            "apt-get install espeak-ng (Debian/Ubuntu), brew install espeak-ng (macOS), dnf install espeak-ng (Fedora)")
    return path


def synthesise(executable: str, voice: str, pitch: int, speed: int, digits: str) -> np.ndarray:
    """espeak-ng's WAV on stdout -> float32 samples in [-1, 1] (its header says 'unknown length': read to the end)."""
    text = " ".join(digits)
    wav = subprocess.run([executable, "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as reader:
        if reader.getframerate() != SAMPLE_RATE or reader.getsampwidth() != 2 or reader.getnchannels() != 1:
            raise RuntimeError(f"espeak-ng: expected 16-bit mono at {SAMPLE_RATE} Hz, got {reader.getsampwidth()} "
                               f"bytes x {reader.getnchannels()} channels at {reader.getframerate()} Hz")
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    return samples.astype(np.float32) / 32768.0


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 50.0, f_max: float = 8000.0):
    """[n_fft // 2 + 1, n_mels] triangular filters, evenly spaced on the mel scale (HTK's 2595 log10(1 + f/700))."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    return torch.tensor(np.maximum(0.0, np.minimum(rising, falling)).T, dtype=torch.float32)


def log_mel(samples: np.ndarray, filterbank: torch.Tensor) -> torch.Tensor:
    """[frames // STACK, N_MELS * STACK] log-mel features, normalised per utterance."""
    audio = torch.from_numpy(samples)
    spec = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs() ** 2
    mel = spec.T @ filterbank
    feats = torch.log(mel + 1e-4 * mel.max())  # a 40 dB floor: espeak-ng's pauses are exact zeros
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
    frames = feats.shape[0] // STACK * STACK
    return feats[:frames].reshape(frames // STACK, N_MELS * STACK)


def utterances(n: int, variants: tuple[str, ...], rng: random.Random) -> list[tuple[str, int, int, str]]:
    """(voice, pitch, speed, digits) for n random utterances."""
    out = []
    for _ in range(n):
        voice = f"{rng.choice(ACCENTS)}+{rng.choice(variants)}"
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, MAX_DIGITS)))
        out.append((voice, rng.randint(20, 80), rng.randint(130, 210), digits))
    return out


def cache_dir() -> Path:
    return cache_root() / "digits_speech"  # seqfast's cache directory (SEQFAST_CACHE_DIR, docs/settings.md)


def features(specs: list[tuple[str, int, int, str]], progress: bool) -> list[torch.Tensor]:
    """Log-mel features of every utterance, synthesised (two at a time) on the first call and cached after, keyed
    by espeak-ng's version, the utterances and the feature code."""
    executable = espeak()
    version = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True).stdout
    recipe = (version, specs, inspect.getsource(log_mel), inspect.getsource(mel_filterbank), N_FFT, HOP, N_MELS, STACK)
    key = hashlib.sha256(repr(recipe).encode()).hexdigest()[:16]
    path = cache_dir() / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    from rich.progress import track

    filterbank = mel_filterbank(N_MELS, N_FFT, SAMPLE_RATE)
    with ThreadPoolExecutor(2) as pool:
        audio = pool.map(lambda s: synthesise(executable, *s), specs)
        feats = [log_mel(a, filterbank) for a in track(audio, "espeak-ng", total=len(specs), disable=not progress)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(feats, tmp)
    tmp.replace(path)  # atomic: a concurrent run reads either nothing or the whole file
    return feats


class Recogniser(nn.Module):
    """Features -> per-step label log-probabilities: a bidirectional GRU and a linear read-out (blank + 10 digits)."""

    def __init__(self, n_features: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.gru = GRU(n_features, hidden_size, num_layers, batch_first=True, bidirectional=True,
                       dropout=0.1 if num_layers > 1 else 0.0)
        self.head = nn.Linear(2 * hidden_size, 11)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out).log_softmax(-1)


def pad(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(f) for f in feats])
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths


def greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best label per step, repeats merged, blanks dropped."""
    best = log_probs.argmax(-1)
    out = []
    for row, n in zip(best.tolist(), lengths.tolist(), strict=True):
        labels = [b for i, b in enumerate(row[:n]) if b != BLANK and (i == 0 or b != row[i - 1])]
        out.append("".join(str(b - 1) for b in labels))
    return out


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def digit_error_rate(hypotheses: list[str], references: list[str]) -> float:
    errors = sum(edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True))
    return errors / sum(len(r) for r in references)


def run(options: DemoOptions) -> DemoResult:
    rng = random.Random(options.seed)
    n_train, n_test = (300, 100) if options.quick else (3000, 500)
    hidden, layers = (48, 1) if options.quick else (64, 2)
    epochs, batch, lr = (20, 16, 1e-2) if options.quick else (6, 32, 5e-3)
    train_specs, test_specs = utterances(n_train, TRAIN_VARIANTS, rng), utterances(n_test, TEST_VARIANTS, rng)
    start = time.perf_counter()
    train_feats, test_feats = features(train_specs, options.progress), features(test_specs, options.progress)
    data_seconds = time.perf_counter() - start
    train_labels = [torch.tensor([int(d) + 1 for d in s[3]]) for s in train_specs]
    references = [s[3] for s in test_specs]

    generator = seed_everything(options.seed)
    model = Recogniser(N_MELS * STACK, hidden, layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = math.ceil(n_train / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps)
    ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)

    def step(epoch: int, i: int) -> float:
        if i == 0:
            step.order = torch.randperm(n_train, generator=generator).tolist()
        idx = step.order[i * batch:(i + 1) * batch]
        x, lengths = pad([train_feats[j] for j in idx])
        targets = [train_labels[j] for j in idx]
        log_probs = model(x, lengths)
        loss = ctc(log_probs.transpose(0, 1), torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]))
        return optimizer_step(loss, model, optimizer, schedule, 5.0)

    model.train()
    start = time.perf_counter()
    log = train(epochs, steps, step, options, "BiGRU + CTC")
    train_seconds = time.perf_counter() - start

    model.eval()
    x, lengths = pad(test_feats)
    with torch.no_grad():
        log_probs = model(x, lengths)
    hypotheses = greedy_ctc(log_probs, lengths)
    train_digits = "".join(s[3] for s in train_specs)
    common_digit = max("0123456789", key=train_digits.count)
    common_length = max(range(1, MAX_DIGITS + 1), key=[len(s[3]) for s in train_specs].count)
    model_name = f"BiGRU {layers}x{hidden} + CTC, greedy"
    constant = f"constant '{common_digit * common_length}'"
    table = {model_name: {"DER %": 100 * digit_error_rate(hypotheses, references)},
             constant: {"DER %": 100 * digit_error_rate([common_digit * common_length] * n_test, references)},
             "empty answer": {"DER %": 100 * digit_error_rate([""] * n_test, references)}}
    trivial = min((constant, "empty answer"), key=lambda row: table[row]["DER %"])

    plot = figure(log_probs, lengths, hypotheses, test_specs, x, options)
    wrong = [f"  {voice} p{pitch} s{speed} {ref!r} -> {hyp!r}"
             for (voice, pitch, speed, ref), hyp in zip(test_specs, hypotheses, strict=True) if hyp != ref]
    notes = [f"{n_train} training utterances ({len(ACCENTS)} accents x {len(TRAIN_VARIANTS)} variants), {n_test} "
             f"test utterances by unseen variants {', '.join(TEST_VARIANTS)}; synthesis and features "
             f"{data_seconds:.1f} s (cached in {cache_dir()})",
             f"utterances with an error: {len(wrong)} of {n_test}", *wrong[:5]]
    return DemoResult(
        name="digits-speech",
        evaluation=f"{n_test} digit strings spoken by held-out voice variants",
        model=model_name, trivial=trivial, primary="DER %", table=table, higher_is_better=frozenset(),
        backend=backend_in_use("gru", hidden), epochs=epochs, seconds_per_epoch=log.seconds_per_epoch,
        train_seconds=train_seconds, files=[plot], notes=notes)


def figure(log_probs, lengths, hypotheses, specs, x, options: DemoOptions):
    """One held-out utterance: its log-mel spectrogram above the CTC label posteriors over time."""
    i = max(range(len(specs)), key=lambda k: len(specs[k][3]))
    n = int(lengths[i])
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    top.imshow(x[i, :n, :N_MELS].T.numpy(), origin="lower", aspect="auto", cmap="magma")
    voice, pitch, speed, digits = specs[i]
    top.set(ylabel="mel bin", title=f"{voice}, pitch {pitch}, speed {speed}: {digits!r} -> {hypotheses[i]!r}")
    probs = log_probs[i, :n].exp().numpy()
    bottom.plot(probs[:, BLANK], color="lightgrey", label="blank")
    for d in range(10):
        bottom.plot(probs[:, d + 1], label=str(d))
    bottom.set(xlabel=f"step ({HOP * STACK / SAMPLE_RATE * 1000:.0f} ms)", ylabel="P(label)")
    bottom.legend(ncol=11, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    return save_figure(fig, options, "digits_speech.png")
