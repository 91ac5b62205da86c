"""The translation (dates) and speech (digits-speech) demos: each `--quick` run end to end beats its trivial
baseline, and the pieces whose mistakes a quick run would not show (ambiguous data, the rule-based baseline, CTC
decoding, the error rate, the filterbank) are checked on their own."""

from __future__ import annotations

import datetime as dt
import math
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("babel", reason="the dates demo needs babel: pip install 'seqfast[demos]'")
pytest.importorskip("matplotlib", reason="the demos plot with matplotlib: pip install 'seqfast[demos]'")
pytest.importorskip("rich", reason="the demos report with rich: pip install 'seqfast[demos]'")

from seqfast.demos import DemoOptions, MissingDependencyError, dates, digits_speech, run_demo  # noqa: E402  # noqa: E402

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def check_quick_result(result, out) -> None:
    for row, values in result.table.items():
        assert all(math.isfinite(v) for v in values.values()), (row, values)
    assert result.beats(result.trivial), result.table
    assert result.epochs > 0 and result.seconds_per_epoch > 0
    assert result.files and all(p.parent == out and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result.files)


def test_dates_quick_beats_the_most_common_date(tmp_path):
    result = run_demo("dates", DemoOptions(quick=True, out=tmp_path, progress=False, threads=1))
    check_quick_result(result, tmp_path)
    assert result.beats(result.trivial) and result.value("same model, beam 4") > result.value(result.trivial)
    assert result.files[0].name == "dates_attention.png"


def test_every_written_date_names_one_date_per_locale():
    """The source (locale, text) must settle the date, or no model could reach 100 %: days <= 12 (day and month
    swap) and the two ends of the range (two-digit years) are where forms could collide."""
    days = [dt.date(year, month, day) for year in (1969, 2001, 2068) for month in (1, 2, 11, 12)
            for day in (1, 2, 11, 12)]
    seen: dict[tuple[str, str], dt.date] = {}
    for form in dates.forms():
        for day in days:
            key = (form[0], dates.write_date(day, form))
            assert seen.setdefault(key, day) == day, (form, key, seen[key], day)


@pytest.mark.parametrize("locale, text, iso", [
    ("en_US", "2/4/25", "2025-02-04"),
    ("es_ES", "4/2/25", "2025-02-04"),
    ("de_DE", "Dienstag, 4. Februar 2025", "2025-02-04"),
    ("fr_FR", "4 févr. 2025", "2025-02-04"),
    ("en_GB", "1/1/69", "1969-01-01"),
    ("en_GB", "31/12/68", "2068-12-31"),
])
def test_dateutil_baseline_reads_each_locale(locale, text, iso):
    assert dates.dateutil_parser(locale)(text) == iso


def test_dateutil_baseline_counts_a_text_it_cannot_parse_as_wrong():
    assert dates.dateutil_parser(None)("kein Datum") == ""
    assert dates.exact_match(["", "2025-02-04"], [dt.date(2025, 2, 4)] * 2) == 0.5


@needs_espeak
def test_digits_speech_quick_beats_a_constant_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQFAST_CACHE_DIR", str(tmp_path / "cache"))
    result = run_demo("digits-speech", DemoOptions(quick=True, out=tmp_path, progress=False, threads=1))
    check_quick_result(result, tmp_path)
    assert result.value() < 100.0  # below the empty answer's 100 %, whichever trivial answer is better
    assert list((tmp_path / "cache" / "digits_speech").glob("*.pt"))  # the synthesis is cached


@needs_espeak
def test_espeak_audio_and_features():
    samples = digits_speech.synthesise(shutil.which("espeak-ng"), "en+m1", 50, 170, "314")
    assert samples.dtype.name == "float32" and 0.3 * digits_speech.SAMPLE_RATE < len(samples)
    assert 0 < abs(samples).max() <= 1
    filterbank = digits_speech.mel_filterbank(digits_speech.N_MELS, digits_speech.N_FFT, digits_speech.SAMPLE_RATE)
    feats = digits_speech.log_mel(samples, filterbank)
    assert feats.shape[1] == digits_speech.N_MELS * digits_speech.STACK and torch.isfinite(feats).all()


@needs_espeak
def test_every_accent_and_variant_is_one_espeak_ng_has():
    """espeak-ng falls back to its default voice, silently, for a name it does not know."""
    def listed(kind: str, column: int) -> set[str]:
        out = subprocess.run(["espeak-ng", f"--voices={kind}"], capture_output=True, text=True, check=True).stdout
        return {line.split()[column] for line in out.splitlines()[1:]}

    assert set(digits_speech.ACCENTS) <= listed("en", 1)
    variants = {name.removeprefix("!v/") for name in listed("variant", 4)}
    assert set(digits_speech.TRAIN_VARIANTS + digits_speech.TEST_VARIANTS) <= variants
    assert not set(digits_speech.TRAIN_VARIANTS) & set(digits_speech.TEST_VARIANTS)


def test_digits_speech_without_espeak_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(digits_speech.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="apt-get install espeak-ng"):
        digits_speech.run(DemoOptions(quick=True, out=tmp_path, progress=False))
    assert not list(tmp_path.iterdir())


def test_mel_filterbank_covers_the_band_with_triangles():
    bank = digits_speech.mel_filterbank(10, 512, 16000, f_min=0.0, f_max=8000.0)
    assert bank.shape == (257, 10) and (bank >= 0).all() and (bank <= 1).all()
    peaks = bank.argmax(0)
    assert (peaks[1:] > peaks[:-1]).all()  # centres rise with the filter index


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    labels = torch.tensor([[0, 2, 2, 0, 2, 3, 3, 0, 1, 5], [4, 4, 4, 0, 0, 0, 0, 0, 0, 0]])  # 0 is blank, d -> d+1
    log_probs = torch.nn.functional.one_hot(labels, 11).float().log()
    assert digits_speech.greedy_ctc(log_probs, torch.tensor([9, 10])) == ["1120", "3"]


@pytest.mark.parametrize("hyp, ref, distance", [("", "123", 3), ("123", "123", 0), ("1243", "123", 1),
                                                ("321", "123", 2), ("9", "", 1)])
def test_edit_distance(hyp, ref, distance):
    assert digits_speech.edit_distance(hyp, ref) == distance


def test_digit_error_rate_is_errors_over_reference_digits():
    assert digits_speech.digit_error_rate(["12", "", "5"], ["123", "45", "5"]) == pytest.approx(3 / 6)
