"""Streaming cleaning for pretraining (`TextCleaner`): normalization, PII scrubbing, each filter at its threshold,
exact and MinHash near dedup (against an exact Jaccard computed here), agreement with the SFT path's `clean`,
determinism, and the drop report."""
from __future__ import annotations

import random

import numpy as np
import pytest

from jaxft.config import ConfigError
from jaxft.data import DataReport, Example, clean
from jaxft.data.cleaning import MinHashIndex
from jaxft.data.text_cleaning import TextCleaner, scrub_pii
from jaxft.data.config import DataConfig
from jaxft.data.text_config import TextDataConfig
from jaxft.data.text_sources import Document

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _cleaner(**settings) -> tuple[TextCleaner, DataReport]:
    report = DataReport()
    return TextCleaner(TextDataConfig(paths=("corpus.txt",), **settings), report), report


def _clean(texts, **settings) -> tuple[list[str | None], DataReport]:
    cleaner, report = _cleaner(**settings)
    return [cleaner(Document(f"corpus.txt:{i + 1}", text)) for i, text in enumerate(texts)], report


def _kept_one(text, **settings) -> bool:
    (out,), _ = _clean([text], **settings)
    return out is not None


def _random_text(seed: int, words: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


# --- normalization and PII -------------------------------------------------------------------------------------

def test_unicode_normalization_and_its_off_switch():
    assert _clean(["cafe\u0301 \ufb01ne"])[0] == ["caf\u00e9 \ufb01ne"]
    assert _clean(["cafe\u0301 \ufb01ne"], normalize_unicode="NFKC")[0] == ["caf\u00e9 fine"]
    assert _clean(["cafe\u0301"], normalize_unicode=None)[0] == ["cafe\u0301"]


@pytest.mark.parametrize("pii, tag", [
    ("jane.doe+news@mail.example.co.uk", "<EMAIL>"),
    ("a_b@example.org", "<EMAIL>"),
    ("192.168.0.1", "<IP>"),
    ("8.8.8.8", "<IP>"),
    ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "<IP>"),
    ("2001:db8::1", "<IP>"),
    ("fe80::1ff:fe23:4567:890a", "<IP>"),
    ("+1 (555) 123-4567", "<PHONE>"),
    ("+44 20 7946 0958", "<PHONE>"),
    ("+49-30-1234567", "<PHONE>"),
    ("(555) 123-4567", "<PHONE>"),
    ("555-123-4567", "<PHONE>"),
    ("555.123.4567", "<PHONE>"),
    ("1-800-555-1234", "<PHONE>"),
])
def test_pii_is_replaced_by_its_tag(pii, tag):
    assert scrub_pii(f"reach me at {pii}, thanks") == f"reach me at {tag}, thanks"
    assert scrub_pii(f"({pii}).") == f"({tag})."


@pytest.mark.parametrize("text", [
    "Python 3.11.2 is out", "upgrade to 10.0.19045 now", "parts 1.2.3.4.5 of the spec", "octets 256.1.1.1",
    "on 2024-01-15 at 12:30:45", "on 15.01.2024", "on 01/15/2024", "id 1234567890 and 42", "total: 5551234567",
    "MAC 00:1a:2b:3c:4d:5e", "std::move(x) and ab::cd", "write to user@localhost", "@handle on the site",
    "ISBN 978-3-16-148410-0", "a ratio of 3:2 and 10:45",
])
def test_pii_patterns_leave_numbers_versions_dates_and_code_alone(text):
    assert scrub_pii(text) == text


def test_pii_scrubbing_runs_before_filters_and_dedup():
    outputs, report = _clean(["write to ann@example.com", "write to bob@example.net"], scrub_pii=True,
                             max_chars=20)
    assert outputs == ["write to <EMAIL>", None] and report.dropped == {"exact duplicate": 1}
    assert _clean(["write to ann@example.com"])[0] == ["write to ann@example.com"]  # off by default


# --- filters, each at its threshold on both sides ----------------------------------------------------------------

def _words(alpha: int, other: int) -> str:
    return " ".join(["word"] * alpha + ["1234"] * other)


@pytest.mark.parametrize("settings, kept_text, dropped_text, reason", [
    ({"min_chars": 5}, "abcde", "abcd", "too short"),
    ({"max_chars": 5}, "abcde", "abcdef", "too long"),
    ({"max_bad_char_fraction": 0.2}, "abcdefgh\ufffd\x07", "abcdefg\ufffd\x07\x07", "bad characters"),
    ({"max_bad_char_fraction": 0.1}, "abcdefghi\ue000", "abcdefgh\ue000\ue000", "bad characters"),
    ({"max_symbol_fraction": 0.1}, _words(9, 0) + " #tag", _words(8, 0) + " #a #b", "too many symbols"),
    ({"max_symbol_fraction": 0.1}, _words(9, 0) + " so...", _words(8, 0) + " so... and\u2026", "too many symbols"),
    ({"min_alpha_word_fraction": 0.8}, _words(8, 2), _words(7, 3), "few alphabetic words"),
    ({"max_repeated_word_run": 3}, "a b b b c", "a b B b b c", "repeated words"),
    ({"max_duplicate_line_fraction": 0.3}, "a\nb\nc\nd\ne\nf\ng\na\nb\n\nc", "a\nb\nc\nd\ne\nf\na\nb\nc\nd",
     "duplicate lines"),
    ({"drop_patterns": (r"(?i)as an ai language model",)}, "as a language model", "As an AI language model, no",
     "matches drop pattern"),
])
def test_each_filter_keeps_its_boundary_and_drops_past_it(settings, kept_text, dropped_text, reason):
    outputs, report = _clean([kept_text, dropped_text], **settings)
    assert outputs == [kept_text, None]
    assert report.dropped == {reason: 1} and report.samples[reason][0].startswith("corpus.txt:2: ")


def test_gopher_filters_are_off_by_default_and_bad_characters_can_be_turned_off():
    gibberish = "# # # ... 1 2 3 4 x x x x x x\nsame\nsame\nsame\nsame"
    assert _kept_one(gibberish)
    assert not _kept_one("\ufffd" * 5) and _kept_one("\ufffd" * 5, max_bad_char_fraction=None)


def test_a_bad_drop_pattern_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"data.drop_patterns\[1\] '\(unclosed'"):
        _cleaner(drop_patterns=("fine", "(unclosed"))
    with pytest.raises(ConfigError, match=r"data.drop_patterns\[0\] '\(unclosed'"):  # chat data: the same check
        DataConfig(paths=("chats.jsonl",), drop_patterns=("(unclosed",))


# --- dedup -----------------------------------------------------------------------------------------------------

def test_exact_dedup_ignores_case_and_spacing_and_keeps_the_first():
    outputs, report = _clean(["Hello  World", "other", "hello world\n", "other!"])
    assert outputs == ["Hello  World", "other", None, "other!"]
    assert report.samples["exact duplicate"] == ["corpus.txt:3: repeats an earlier document: 'hello world'"]
    assert _clean(["same", "same"], dedup=None)[0] == ["same", "same"]


def _shingles(text: str, n: int = 5) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def _jaccard(a: str, b: str) -> float:
    return len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))


def _edited(words: list[str], edits: int, rng: random.Random) -> str:
    other = list(words)
    for i in rng.sample(range(len(words)), edits):
        other[i] = "replaced"
    return " ".join(other)


def test_near_dedup_agrees_with_the_exact_jaccard_similarity():
    threshold = 0.85
    above, below = 0, 0
    for seed in range(60):
        rng = random.Random(seed)
        words = _random_text(seed, 150).split()
        base, variant = " ".join(words), _edited(words, rng.choice([1, 2, 3, 6, 10, 20, 30, 40]), rng)
        similarity = _jaccard(base, variant)
        outputs, report = _clean([base, variant], dedup="near", near_dup_threshold=threshold)
        if similarity >= threshold + 0.08:
            above += 1
            assert outputs[1] is None and report.dropped == {"near duplicate": 1}, similarity
        elif similarity <= threshold - 0.15:
            below += 1
            assert outputs[1] == variant, similarity
    assert above >= 10 and below >= 10  # both sides of the threshold were exercised


def test_near_dedup_compares_each_document_with_every_kept_one():
    texts = [_random_text(seed, 120) for seed in range(30)]
    rng = random.Random(7)
    copies = [_edited(texts[i].split(), 2, rng) for i in (0, 13, 29)]
    outputs, report = _clean(texts + copies, dedup="near")
    assert outputs[:30] == texts and outputs[30:] == [None] * 3
    assert [s.split(": ")[1] for s in report.samples["near duplicate"]] == [
        "near-duplicate of kept document #0", "near-duplicate of kept document #13",
        "near-duplicate of kept document #29"]


# --- the SFT path, determinism, the report -----------------------------------------------------------------------

def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = [_random_text(rng.randrange(10_000), rng.randrange(1, 60)) for _ in range(40)]
    texts = []
    for _ in range(120):
        kind = rng.random()
        if kind < 0.2 and texts:
            texts.append(rng.choice(texts).upper())  # exact duplicate after lowercasing
        elif kind < 0.35 and texts:
            words = rng.choice(texts).split()
            texts.append(_edited(words, min(len(words), rng.randrange(1, 3)), rng))
        elif kind < 0.45:
            texts.append(rng.choice(["x", "cafe\u0301", "\ufffd\ufffd bad", "As an AI model", "\ufb01ne \u2460"]))
        else:
            texts.append(rng.choice(pool))
    return texts


@pytest.mark.parametrize("settings", [
    {},
    {"dedup": None, "min_chars": 3, "max_chars": 200},
    {"dedup": "near", "near_dup_threshold": 0.8, "normalize_unicode": "NFKC", "drop_patterns": ("(?i)as an ai",)},
    {"dedup": "near", "max_bad_char_fraction": 0.05, "normalize_unicode": None},
])
def test_the_stream_keeps_what_the_sft_cleaner_keeps(settings):
    texts = _corpus(len(settings))
    outputs, report = _clean(texts, **settings)
    sft_report = DataReport()
    kept, = clean([[Example(f"corpus.txt:{i + 1}", text=t) for i, t in enumerate(texts)]], report=sft_report,
                  **settings)
    assert [t for t in outputs if t is not None] == [e.text for e in kept]
    assert report.dropped == sft_report.dropped and len(kept) < len(texts)


def test_two_cleaners_given_the_same_documents_agree():
    texts = _corpus(3)
    settings = dict(dedup="near", scrub_pii=True, max_symbol_fraction=0.1, min_alpha_word_fraction=0.5)
    first, first_report = _clean(texts, **settings)
    second, second_report = _clean(texts, **settings)
    assert first == second and first_report.summary() == second_report.summary()


def test_the_report_names_reason_count_location_and_snippet():
    long_text = "word " * 40
    _, report = _clean(["ok", "ok", "OK", long_text], max_chars=100)
    assert report.dropped == {"exact duplicate": 2, "too long": 1}
    assert report.kept["documents after cleaning"] == 1
    start = " ".join(["word"] * 40)[:59]  # 60 characters on one line, the last one an ellipsis
    assert report.samples["too long"] == [f"corpus.txt:4: 200 characters > max_chars 100: '{start}\u2026'"]
    assert "dropped 2 (exact duplicate), e.g. corpus.txt:2: repeats an earlier document: 'ok'" in report.summary()


def test_the_minhash_index_finds_what_a_scan_of_every_kept_signature_finds():
    """Past 1024 texts the band hashes move into sorted arrays; the index must still answer as a plain scan of
    every kept signature for one sharing a whole band with an estimated Jaccard similarity >= the threshold."""
    index = MinHashIndex(0.85)
    rng = random.Random(11)
    texts = []
    for i in range(1400):
        if i > 50 and rng.random() < 0.15:
            texts.append(_edited(rng.choice(texts).split(), rng.randrange(1, 4), rng))
        else:
            texts.append(_random_text(1000 + i, 40))
    kept = np.empty((0, index.num_perm), dtype=np.uint32)
    matched = 0
    for text in texts:
        signature = index.signature(text)
        equal = kept == signature
        shares_band = equal.reshape(len(kept), index.bands, index.rows).all(axis=2).any(axis=1)
        scan = np.flatnonzero(shares_band & (equal.mean(axis=1) >= index.threshold))
        expected = int(scan[0]) if len(scan) else None
        assert index.add_unless_duplicate(text) == expected
        if expected is None:
            kept = np.vstack([kept, signature])
        else:
            matched += expected < 1024  # found in the sorted arrays
    assert len(index) == len(kept) > 1024 and matched > 20
