"""Cleaning: Unicode normalization, filters, exact/near dedup.

Cleaning runs on canonical `Example`s before tokenization and is deterministic (the first occurrence of a
duplicate is kept, in path order), so every process of a multi-host run drops the same records before it
takes its shard. Every drop is counted in the `DataReport` with its reason and source.

Near-duplicates are found with MinHash over character 5-gram shingles and LSH banding, in numpy
(the `datasketch` scheme: `(a * h + b) mod (2^61 - 1)` per permutation), then confirmed by the estimated
Jaccard similarity, so the LSH bands only decide which pairs get compared.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from jaxft.data.formats import DataReport, Example

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 32) - 1)
# Characters that signal broken text: the replacement character, C0 controls other than \t \n \r, DEL,
# and private-use code points.
_BAD_CHARS = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ue000-\uf8ff]")
_SPACES = re.compile(r"\s+")


def normalize_example(example: Example, form: str) -> Example:
    """The example with every text field in Unicode normal form `form` (NFC, NFKC, ...)."""
    def norm(text):
        return None if text is None else unicodedata.normalize(form, text)

    messages = None
    if example.messages is not None:
        messages = [{**m, "content": norm(m["content"])} for m in example.messages]
    return dataclasses.replace(example, messages=messages, prompt=norm(example.prompt),
                               completion=norm(example.completion), text=norm(example.text))


def bad_char_count(text: str) -> int:
    """Replacement, control (other than tab and newlines) and private-use characters in `text`."""
    return len(_BAD_CHARS.findall(text))


def filter_reason(text: str, *, min_chars: int, max_chars: int | None, max_bad_char_fraction: float | None,
                  patterns: Sequence[re.Pattern]) -> tuple[str, str] | None:
    """(reason, detail) of the first length / charset / pattern filter that drops `text`, or None; the filters
    both the SFT path (`clean`) and the pretraining stream (`jaxft.data.text_cleaning`) apply."""
    if len(text) < min_chars:
        return "too short", f"{len(text)} characters < min_chars {min_chars}"
    if max_chars is not None and len(text) > max_chars:
        return "too long", f"{len(text)} characters > max_chars {max_chars}"
    if max_bad_char_fraction is not None and text:
        bad = bad_char_count(text)
        if bad / len(text) > max_bad_char_fraction:
            return "bad characters", f"{bad}/{len(text)} replacement/control/private-use characters"
    for pattern in patterns:
        if pattern.search(text):
            return "matches drop pattern", f"matches {pattern.pattern!r}"
    return None


def dedup_key(text: str) -> str:
    """The text exact dedup compares (and MinHash shingles): lowercased, whitespace runs as one space."""
    return _SPACES.sub(" ", text.lower()).strip()


def dedup_digest(text: str) -> bytes:
    """SHA-1 of `dedup_key(text)`: what the exact-dedup index holds per kept text (20 bytes)."""
    return hashlib.sha1(dedup_key(text).encode("utf-8")).digest()


class MinHashIndex:
    """Near-duplicate detector: MinHash signatures of character shingles, LSH bands, Jaccard confirmation.

    Incremental: `add_unless_duplicate` compares one text against the texts added before it, so the in-memory
    SFT path and the pretraining stream share it. Per added text it holds the signature (`num_perm` uint32s, in
    one array that grows by doubling) and one entry per band: the band's bytes (`rows` uint32s) mapping to the
    text's number (a list only where texts share a band).
    """

    def __init__(self, threshold: float, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.bands, self.rows = self._banding(threshold, num_perm)
        self.buckets: list[dict[bytes, int | list[int]]] = [{} for _ in range(self.bands)]
        self._signatures = np.empty((0, num_perm), dtype=np.uint32)
        self._count = 0
        self.powers = np.uint64(1_000_003) ** np.arange(shingle, dtype=np.uint64)

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def _banding(threshold: float, num_perm: int) -> tuple[int, int]:
        """The most rows per band whose LSH candidate threshold `(1/b)^(1/r)` stays below `threshold` - 0.1,
        so true near-duplicates almost always share a band."""
        options = [(num_perm // r, r) for r in range(1, num_perm + 1) if num_perm % r == 0]
        good = [(b, r) for b, r in options if (1 / b) ** (1 / r) <= threshold - 0.1]
        return max(good, key=lambda br: br[1]) if good else options[0]

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of `text`'s character shingles (of `dedup_key(text)`): `num_perm` uint32s."""
        codes = np.frombuffer(dedup_key(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        if len(codes) < self.shingle:
            codes = np.pad(codes, (0, self.shingle - len(codes)))
        windows = np.lib.stride_tricks.sliding_window_view(codes, self.shingle)
        hashes = np.unique((windows * self.powers).sum(axis=1))
        hashes = (hashes >> np.uint64(32)) ^ (hashes & _MAX_HASH)
        with np.errstate(over="ignore"):
            permuted = ((hashes[:, None] * self.a + self.b) % _MERSENNE) & _MAX_HASH
        return permuted.min(axis=0).astype(np.uint32)  # below 2^32 after the mask: exact

    @staticmethod
    def jaccard_estimate(first: np.ndarray, second: np.ndarray) -> float:
        """The Jaccard similarity of two texts' shingle sets, estimated from their signatures."""
        return float(np.mean(first == second))

    def add_unless_duplicate(self, text: str) -> int | None:
        """Number of an earlier text whose estimated Jaccard similarity to `text` reaches the threshold (the
        first such among those sharing an LSH band), or None, and then `text` is added to the index."""
        signature = self.signature(text)
        keys = [signature[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = set()
        for band, key in zip(self.buckets, keys):
            held = band.get(key, ())
            candidates.update((held,) if isinstance(held, int) else held)
        for j in sorted(candidates):
            if self.jaccard_estimate(self._signatures[j], signature) >= self.threshold:
                return j
        self._append(signature, keys)
        return None

    def _append(self, signature: np.ndarray, keys: list[bytes]) -> None:
        index = self._count
        if index == len(self._signatures):
            grown = np.empty((max(16, 2 * index), self.num_perm), dtype=np.uint32)
            grown[:index] = self._signatures
            self._signatures = grown
        self._signatures[index] = signature
        self._count += 1
        for band, key in zip(self.buckets, keys):
            held = band.setdefault(key, index)
            if isinstance(held, list):
                held.append(index)
            elif held != index:
                band[key] = [held, index]


def clean(sources: Sequence[Sequence[Example]], *, normalize_unicode: str | None = "NFC", dedup: str | None = "exact",
          near_dup_threshold: float = 0.85, min_chars: int = 1, max_chars: int | None = None,
          max_bad_char_fraction: float = 0.1, drop_patterns: Sequence[str] = (),
          report: DataReport | None = None) -> list[list[Example]]:
    """Normalize, filter and deduplicate each source's examples (dedup also across sources, first one kept)."""
    report = report if report is not None else DataReport()
    patterns = [re.compile(p) for p in drop_patterns]
    seen: dict[bytes, str] = {}
    near = MinHashIndex(near_dup_threshold) if dedup == "near" else None
    kept_sources: list[list[Example]] = []
    near_sources: list[str] = []
    for examples in sources:
        kept = []
        for example in examples:
            if normalize_unicode:
                example = normalize_example(example, normalize_unicode)
            text = example.plain_text()
            reason = filter_reason(text, min_chars=min_chars, max_chars=max_chars,
                                    max_bad_char_fraction=max_bad_char_fraction, patterns=patterns)
            if reason is not None:
                report.drop(reason[0], f"{example.source}: {reason[1]}")
                continue
            if dedup is not None:
                key = dedup_digest(text)
                if key in seen:
                    report.drop("exact duplicate", f"{example.source}: duplicate of {seen[key]}")
                    continue
                seen[key] = example.source
            if near is not None:
                match = near.add_unless_duplicate(text)
                if match is not None:
                    report.drop("near duplicate", f"{example.source}: near-duplicate of {near_sources[match]}")
                    continue
                near_sources.append(example.source)
            kept.append(example)
        kept_sources.append(kept)
    report.kept["examples after cleaning"] = sum(len(k) for k in kept_sources)
    return kept_sources
