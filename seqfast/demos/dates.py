"""Date normalisation as translation: dates written by people in many forms and languages -> ISO 8601.

Data: Babel's CLDR formats (`full`, `long`, `medium`, `short`, skeletons such as `yMMMEd`, and a few custom
patterns) in twelve locales, read character by character after a token naming the locale (the locale settles what
an all-numeric form means: "4/2/25" is 2 April in en_US and 4 February in es_ES). Dates run from 1969 to 2068, so
a two-digit year reads the way POSIX strptime's %y reads it. Evaluation: exact match of the whole YYYY-MM-DD on
dates that never appear in training, in any form, against a rule-based parser (dateutil, given each locale's month
and weekday names from Babel and its day-first order) and the most common training answer.
The model: a seq2seq LSTM with a bidirectional encoder and Luong attention, decoded greedily and by beam search.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..seq2seq import Seq2Seq
from .common import DemoOptions, DemoResult, backend_in_use, optimizer_step, pyplot, save_figure, seed_everything, train

LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR", "sv_SE", "da_DK", "fi_FI",
           "pl_PL")
STANDARD_FORMATS = ("full", "long", "medium", "short")
SKELETONS = ("yMMMd", "yMd", "yMMMEd", "yMMMMd")
CUSTOM_PATTERNS = ("d MMMM y", "EEE d MMM y", "MMMM d, y", "d MMM. yy")
FIRST_DATE, LAST_DATE = dt.date(1969, 1, 1), dt.date(2068, 12, 31)  # %y: 69-99 -> 19xx, 00-68 -> 20xx
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TARGET_CHARS = "0123456789-"


def forms() -> list[tuple[str, str, str]]:
    """Every (locale, kind, pattern) a date is written in; kind is "format", "skeleton" or "pattern"."""
    kinds = [("format", f) for f in STANDARD_FORMATS] + [("skeleton", s) for s in SKELETONS] + [
        ("pattern", p) for p in CUSTOM_PATTERNS]
    return [(locale, kind, pattern) for locale in LOCALES for kind, pattern in kinds]


def write_date(date: dt.date, form: tuple[str, str, str]) -> str:
    from babel.dates import format_date, format_skeleton

    locale, kind, pattern = form
    if kind == "skeleton":
        return format_skeleton(pattern, date, locale=locale)
    return format_date(date, pattern, locale=locale)


@dataclass
class Split:
    locales: list[str]
    texts: list[str]
    dates: list[dt.date]


def make_split(dates: list[dt.date], n: int, rng: random.Random) -> Split:
    all_forms = forms()
    chosen = [(rng.choice(dates), rng.choice(all_forms)) for _ in range(n)]
    return Split([f[0] for _, f in chosen], [write_date(d, f) for d, f in chosen], [d for d, _ in chosen])


def split_dates(rng: random.Random, test_fraction: float) -> tuple[list[dt.date], list[dt.date]]:
    days = [FIRST_DATE + dt.timedelta(i) for i in range((LAST_DATE - FIRST_DATE).days + 1)]
    rng.shuffle(days)
    n_test = int(len(days) * test_fraction)
    return days[n_test:], days[:n_test]


class Vocabulary:
    """Source tokens: a token per locale, then the characters seen in training (others read as <unk>)."""

    def __init__(self, split: Split) -> None:
        chars = sorted({c for text in split.texts for c in text})
        self.tokens = [*SPECIALS, *(f"<{loc}>" for loc in LOCALES), *chars]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, locale: str, text: str) -> list[int]:
        return [self.index[f"<{locale}>"], *(self.index.get(c, UNK) for c in text)]


def source_tensors(vocab: Vocabulary, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [vocab.encode(loc, text) for loc, text in zip(split.locales, split.texts, strict=True)]
    lengths = torch.tensor([len(r) for r in rows])
    src = torch.full((len(rows), int(lengths.max())), PAD)
    for i, row in enumerate(rows):
        src[i, :len(row)] = torch.tensor(row)
    return src, lengths


def target_tensor(dates: list[dt.date]) -> torch.Tensor:
    """[N, 10] ids of YYYY-MM-DD (fixed length, so EOS always follows the 10th character)."""
    offset = len(SPECIALS)
    return torch.tensor([[offset + TARGET_CHARS.index(c) for c in d.isoformat()] for d in dates])


def decode_targets(tokens: torch.Tensor) -> list[str]:
    offset = len(SPECIALS)
    out = []
    for row in tokens.tolist():
        chars = []
        for t in row:
            if t == EOS or t == PAD:
                break
            chars.append(TARGET_CHARS[t - offset] if offset <= t < offset + len(TARGET_CHARS) else "?")
        out.append("".join(chars))
    return out


def dateutil_parser(locale_name: str | None):
    """dateutil configured for one locale: its month and weekday names (format and stand-alone, wide and
    abbreviated, from Babel), its day-first order, the words that sit between the parts, and %y's pivot.
    None: dateutil as it comes (English names, month first), with the same pivot."""
    from babel import Locale
    from dateutil import parser

    if locale_name is None:
        class PivotInfo(parser.parserinfo):
            def convertyear(self, year, century_specified=False):
                return _posix_year(year, century_specified)

        return _safe_parse(parser, PivotInfo())
    locale = Locale.parse(locale_name)
    months = [set() for _ in range(12)]
    weekdays = [set() for _ in range(7)]
    for context in ("format", "stand-alone"):
        for width in ("wide", "abbreviated"):
            for m, name in locale.months[context][width].items():
                months[m - 1].add(name.lower().rstrip("."))
            for d, name in locale.days[context][width].items():
                weekdays[d].add(name.lower().rstrip("."))
    short = locale.date_formats["short"].pattern
    day_first = short.index("d") < short.index("M")

    class LocaleInfo(parser.parserinfo):
        JUMP = [*parser.parserinfo.JUMP, "de", "den", "del"]
        MONTHS = [tuple(sorted(names)) for names in months]
        WEEKDAYS = [tuple(sorted(names)) for names in weekdays]

        def convertyear(self, year, century_specified=False):
            return _posix_year(year, century_specified)

    return _safe_parse(parser, LocaleInfo(dayfirst=day_first))


def _posix_year(year: int, century_specified: bool) -> int:
    if year < 100 and not century_specified:
        return year + (1900 if year >= 69 else 2000)
    return year


def _safe_parse(parser, info):
    def parse(text: str) -> str:
        """ISO 8601, or "" where the parser gives up (an unparsed date counts as wrong, like a wrong one)."""
        try:
            return parser.parse(text, parserinfo=info, default=dt.datetime(2000, 1, 1)).date().isoformat()
        except (ValueError, OverflowError):
            return ""

    return parse


def exact_match(predicted: list[str], dates: list[dt.date]) -> float:
    return sum(p == d.isoformat() for p, d in zip(predicted, dates, strict=True)) / len(dates)


def run(options: DemoOptions) -> DemoResult:
    rng = random.Random(options.seed)
    train_dates, test_dates = split_dates(rng, test_fraction=0.1)
    n_train, n_test = (3000, 300) if options.quick else (30000, 2000)
    embedding, hidden = (24, 48) if options.quick else (32, 96)
    epochs, batch = (3, 100) if options.quick else (6, 128)
    train_split, test_split = make_split(train_dates, n_train, rng), make_split(test_dates, n_test, rng)

    vocab = Vocabulary(train_split)
    src, src_lengths = source_tensors(vocab, train_split)
    tgt = target_tensor(train_split.dates)
    tgt_in = F.pad(tgt, (1, 0), value=BOS)
    tgt_out = F.pad(tgt, (0, 1), value=EOS)
    test_src, test_lengths = source_tensors(vocab, test_split)

    generator = seed_everything(options.seed)
    model = Seq2Seq(len(vocab), len(SPECIALS) + len(TARGET_CHARS), embedding, hidden, cell="lstm",
                    attention="luong_general", bidirectional_encoder=True, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2 if options.quick else 5e-3)
    steps = len(src) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, optimizer.param_groups[0]["lr"],
                                                   total_steps=epochs * steps)

    def step(epoch: int, i: int) -> float:
        if i == 0:
            step.order = torch.randperm(len(src), generator=generator)
        idx = step.order[i * batch:(i + 1) * batch]
        n = int(src_lengths[idx].max())
        logits = model(src[idx, :n], src_lengths[idx], tgt_in[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out[idx].flatten())
        return optimizer_step(loss, model, optimizer, schedule, 1.0)

    model.train()
    start = time.perf_counter()
    log = train(epochs, steps, step, options, "seq2seq LSTM")
    train_seconds = time.perf_counter() - start

    model.eval()
    max_len = len(TARGET_CHARS) + 1
    greedy, _ = model.generate(test_src, test_lengths, max_len=max_len)
    beam, _ = model.generate(test_src, test_lengths, max_len=max_len, beam_size=4)
    majority = Counter(d.isoformat() for d in train_split.dates).most_common(1)[0][0]
    parsers = {loc: dateutil_parser(loc) for loc in LOCALES}
    rule_based = [parsers[loc](text) for loc, text in zip(test_split.locales, test_split.texts, strict=True)]
    plain_parser = dateutil_parser(None)
    plain = [plain_parser(text) for text in test_split.texts]

    model_name = f"seq2seq LSTM (H={hidden}, attention), greedy"
    rows = {model_name: decode_targets(greedy), "same model, beam 4": decode_targets(beam),
            "dateutil, its defaults": plain, "dateutil + Babel's names, locale's day order": rule_based,
            "most common training date": [majority] * n_test}
    table = {name: {"exact match": exact_match(pred, test_split.dates)} for name, pred in rows.items()}

    plot = attention_figure(model, vocab, test_split, options)
    wrong = [f"  {loc} {text!r} -> {p!r} (true {d.isoformat()})" for loc, text, p, d in zip(
        test_split.locales, test_split.texts, rows[model_name], test_split.dates, strict=True) if p != d.isoformat()]
    notes = [f"{len(forms())} forms ({len(LOCALES)} locales); {n_train} training and {n_test} test examples",
             f"greedy errors: {len(wrong)}", *wrong[:5]]
    return DemoResult(
        name="dates",
        evaluation=f"{n_test} dates never seen in training, each in a random form",
        model=model_name, trivial="most common training date", primary="exact match", table=table,
        higher_is_better=frozenset({"exact match"}), backend=backend_in_use("lstm", hidden), epochs=epochs,
        seconds_per_epoch=log.seconds_per_epoch, train_seconds=train_seconds, files=[plot], notes=notes)


def attention_figure(model: Seq2Seq, vocab: Vocabulary, split: Split, options: DemoOptions):
    """Attention of the greedy decode of the longest test form of a few locales: output characters (rows) over
    source tokens."""
    picks = [max((i for i, loc in enumerate(split.locales) if loc == shown), key=lambda i: len(split.texts[i]))
             for shown in ("en_US", "de_DE", "fr_FR", "fi_FI") if shown in split.locales] or [0]
    plt = pyplot()
    fig, axes = plt.subplots(len(picks), 1, figsize=(9, 2.4 * len(picks)))
    for ax, i in zip(list(getattr(axes, "flat", [axes])), picks, strict=True):
        src, lengths = source_tensors(vocab, Split([split.locales[i]], [split.texts[i]], [split.dates[i]]))
        tokens, _, attention = model.generate(src, lengths, max_len=len(TARGET_CHARS) + 1, return_attention=True)
        out = decode_targets(tokens)[0]
        ax.imshow(attention[0, :len(out), :].numpy(), cmap="viridis", aspect="auto", vmin=0, vmax=1)
        ax.set_xticks(range(src.shape[1]), [f"<{split.locales[i]}>", *split.texts[i]], fontsize=7)
        ax.set_yticks(range(len(out)), list(out), fontsize=7)
        ax.set_title(f"{split.texts[i]!r} -> {out}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, options, "dates_attention.png")
