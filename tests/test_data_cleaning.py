"""Cleaning: Unicode normalization, filters, exact and MinHash near-duplicate removal, and the drop report."""
from __future__ import annotations

import random

import pytest

from jaxft.data import DataReport, Example, clean
from jaxft.data.cleaning import MinHashIndex

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _text(seed: int, words: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _examples(texts, prefix="f") -> list[Example]:
    return [Example(f"{prefix}:{i + 1}", text=t) for i, t in enumerate(texts)]


def _kept(texts, **kwargs) -> tuple[list[str], DataReport]:
    report = DataReport()
    kept, = clean([_examples(texts)], report=report, **kwargs)
    return [e.source for e in kept], report


def test_unicode_is_normalized_to_nfc():
    example, = clean([_examples(["cafe\u0301"])])[0]
    assert example.text == "caf\u00e9"


def test_unicode_normalization_applies_to_every_message():
    chat = Example("c:1", messages=[{"role": "user", "content": "ﬁne"}, {"role": "assistant", "content": "①"}])
    (example,), = clean([[chat]], normalize_unicode="NFKC")
    assert [m["content"] for m in example.messages] == ["fine", "1"]


def test_exact_duplicates_keep_the_first_occurrence_ignoring_case_and_spacing():
    kept, report = _kept(["Hello  World", "other", "hello world\n"])
    assert kept == ["f:1", "f:2"] and report.samples["exact duplicate"] == ["f:3: duplicate of f:1"]


def test_composed_and_decomposed_spellings_are_exact_duplicates_after_normalization():
    kept, _ = _kept(["caf\u00e9 au lait", "cafe\u0301 au lait"])
    assert kept == ["f:1"]


def test_duplicates_are_removed_across_sources():
    report = DataReport()
    first, second = clean([_examples(["shared text", "a"], "general"), _examples(["b", "shared text"], "domain")],
                          report=report)
    assert [e.source for e in second] == ["domain:1"] and report.dropped["exact duplicate"] == 1


def test_near_duplicates_are_removed_with_minhash():
    base = _text(0)
    edited = base.replace(base.split()[10], "changed", 1)
    kept, report = _kept([base, _text(1), edited], dedup="near", near_dup_threshold=0.8)
    assert kept == ["f:1", "f:2"] and report.samples["near duplicate"] == ["f:3: near-duplicate of f:1"]


def test_distinct_texts_survive_near_dedup():
    kept, _ = _kept([_text(seed) for seed in range(50)], dedup="near", near_dup_threshold=0.8)
    assert len(kept) == 50


def _shingles(text: str, n: int = 5) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


@pytest.mark.parametrize("edits", [2, 10, 30])
def test_minhash_estimates_jaccard_similarity(edits):
    index = MinHashIndex(0.8, num_perm=256)
    words = _text(3, 120).split()
    rng = random.Random(edits)
    other = list(words)
    for i in rng.sample(range(len(words)), edits):
        other[i] = "replacement"
    a, b = " ".join(words), " ".join(other)
    true = len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))
    estimate = (index.signature(a) == index.signature(b)).mean()
    assert abs(estimate - true) < 0.1


def test_length_filters_drop_short_and_long_examples():
    kept, report = _kept(["ok text", "x", "y" * 50], min_chars=2, max_chars=20)
    assert kept == ["f:1"] and report.dropped == {"too short": 1, "too long": 1}


def test_charset_filter_drops_mojibake():
    kept, report = _kept(["fine text", "broken \ufffd\ufffd\ufffd \x07\x07"], max_bad_char_fraction=0.2)
    assert kept == ["f:1"] and report.dropped["bad characters"] == 1


def test_regex_filter_drops_matching_examples():
    kept, report = _kept(["As an AI language model, I cannot", "sure, here it is"],
                         drop_patterns=(r"(?i)as an ai language model",))
    assert kept == ["f:2"] and "matches '(?i)as an ai language model'" in report.summary()


def test_report_counts_what_was_kept():
    _, report = _kept(["a", "b", "a"])
    assert report.kept["examples after cleaning"] == 2
