"""Cleaning: Unicode normalization, filters, exact/near dedup.

Cleaning runs on canonical `Example`s before tokenization and is deterministic (the first occurrence of a
duplicate is kept, in path order), so every process of a multi-host run drops the same records before it
takes its shard. Every drop is counted in the `DataReport` with its reason and source.

Near-duplicates are found with MinHash over character 5-gram shingles and LSH banding, in numpy
(the `datasketch` scheme: `(a * h + b) mod (2^61 - 1)` per permutation), then confirmed by the estimated
Jaccard similarity, so the LSH bands only decide which pairs get compared. The filters (`filter_reason`), the dedup
key and `MinHashIndex` (incremental: one text at a time against the ones kept) are also the pretraining stream's
(`jaxft.data.text_cleaning`), so both paths drop the same texts for the same settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from jaxft.data.config import compile_drop_patterns
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

    Incremental: `add_unless_duplicate` compares one text with the texts added before it, so the in-memory SFT
    path and the pretraining stream (`jaxft.data.text_cleaning`) share it. Per added text it holds its signature
    (`num_perm` uint32s) in one array that grows by a quarter, and per band a 64-bit hash of the band's values with
    the text's number (12 bytes). The band hashes of older texts sit in one sorted array (searched with
    `np.searchsorted`); those of the texts added since its last rebuild, at most an eighth of all (and 1024), sit in
    a dict until the next rebuild. A band hash only proposes a candidate: the candidate's stored signature must
    equal the text's on a whole band, exactly as if the band's values themselves were the key.
    """

    def __init__(self, threshold: float, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.bands, self.rows = self._banding(threshold, num_perm)
        self._band_multipliers = rng.integers(1, 1 << 63, self.rows, dtype=np.uint64) | np.uint64(1)
        self._band_salts = rng.integers(0, 1 << 63, self.bands, dtype=np.uint64)
        self._signatures = np.empty((0, num_perm), dtype=np.uint32)
        self._count = 0
        self._sorted_keys = np.empty(0, dtype=np.uint64)  # band hashes of texts [0, _sorted_upto), sorted
        self._sorted_texts = np.empty(0, dtype=np.uint32)
        self._sorted_upto = 0
        self._recent: dict[int, int | list[int]] = {}  # band hash -> text number(s), texts since _sorted_upto
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

    def _band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """[..., bands] uint64 hashes of each band's values (a different hash per band)."""
        bands = signatures.reshape(*signatures.shape[:-1], self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (bands * self._band_multipliers).sum(axis=-1, dtype=np.uint64) ^ self._band_salts

    def add_unless_duplicate(self, text: str) -> int | None:
        """Number of an earlier text whose estimated Jaccard similarity to `text` reaches the threshold (the
        first such among those sharing an LSH band), or None, and then `text` is added to the index."""
        signature = self.signature(text)
        keys = self._band_keys(signature)
        candidates = self._candidates(keys)
        if candidates:
            numbers = np.array(sorted(candidates))
            equal = self._signatures[numbers] == signature
            shares_band = equal.reshape(len(numbers), self.bands, self.rows).all(axis=2).any(axis=1)
            similar = equal.mean(axis=1) >= self.threshold
            matches = numbers[shares_band & similar]
            if len(matches):
                return int(matches[0])
        self._append(signature, keys)
        return None

    def _candidates(self, keys: np.ndarray) -> set[int]:
        """Numbers of the texts with a band hash equal to one of `keys` (a superset of those sharing a band)."""
        found: set[int] = set()
        first = np.searchsorted(self._sorted_keys, keys, side="left")
        last = np.searchsorted(self._sorted_keys, keys, side="right")
        for lo, hi in zip(first[first < last].tolist(), last[first < last].tolist()):
            found.update(self._sorted_texts[lo:hi].tolist())
        for key in keys.tolist():
            held = self._recent.get(key, ())
            found.update((held,) if isinstance(held, int) else held)
        return found

    def _append(self, signature: np.ndarray, keys: np.ndarray) -> None:
        number = self._count
        if number == len(self._signatures):
            grown = np.empty((max(16, number + number // 4), self.num_perm), dtype=np.uint32)  # 1/4 spare
            grown[:number] = self._signatures
            self._signatures = grown
        self._signatures[number] = signature
        self._count += 1
        for key in keys.tolist():
            held = self._recent.setdefault(key, number)
            if isinstance(held, list):
                held.append(number)
            elif held != number:
                self._recent[key] = [held, number]
        if self._count - self._sorted_upto >= max(1024, self._count // 8):
            self._merge_recent()

    def _merge_recent(self) -> None:
        """Move the recent texts' band hashes from the dict into the sorted arrays."""
        recent = np.arange(self._sorted_upto, self._count, dtype=np.uint32)
        keys = np.concatenate([self._sorted_keys, self._band_keys(self._signatures[recent]).ravel()])
        texts = np.concatenate([self._sorted_texts, np.repeat(recent, self.bands)])
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_texts = keys[order], texts[order]
        self._sorted_upto, self._recent = self._count, {}


def clean(sources: Sequence[Sequence[Example]], *, normalize_unicode: str | None = "NFC", dedup: str | None = "exact",
          near_dup_threshold: float = 0.85, min_chars: int = 1, max_chars: int | None = None,
          max_bad_char_fraction: float = 0.1, drop_patterns: Sequence[str] = (),
          report: DataReport | None = None) -> list[list[Example]]:
    """Normalize, filter and deduplicate each source's examples (dedup also across sources, first one kept)."""
    report = report if report is not None else DataReport()
    patterns = compile_drop_patterns(drop_patterns)
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
