"""Streaming cleaning for pretraining: `TextCleaner` takes one document at a time, in stream order, and returns its
cleaned text or None (dropped, counted in the `DataReport` under its reason with the location and a snippet).

The stages, in order, each set by a field of :class:`~jaxft.data.text_config.TextDataConfig` (None: off):

1. Unicode normalization (``normalize_unicode``).
2. PII scrubbing (``scrub_pii``, :func:`scrub_pii`): e-mail addresses, IPv4 / IPv6 addresses and phone numbers
   become ``<EMAIL>``, ``<IP>``, ``<PHONE>``. The patterns are conservative: version numbers (3.11.2), dates,
   times, plain integers and MAC addresses stay as they are, at the price of missing phone numbers written
   without any separator or country code.
3. Filters on the scrubbed text: length, the bad-character fraction and drop patterns (shared with the SFT path,
   :func:`jaxft.data.cleaning.filter_reason`), then Gopher's quality rules (Rae et al. 2021, appendix A): the
   ``#`` / ellipsis to word ratio, the fraction of words with a letter, the longest run of one word repeated
   back to back, and the fraction of lines repeating an earlier line. Words are whitespace-separated.
4. Dedup against the documents kept before: ``exact`` (the SHA-1 of the lowercased, whitespace-collapsed text)
   and ``near``, which also runs ``exact`` first, then MinHash with LSH bands over character 5-grams
   (:class:`jaxft.data.cleaning.MinHashIndex`, the SFT path's implementation), confirmed by the estimated Jaccard
   similarity reaching ``near_dup_threshold``.

Determinism: the outcome for a document depends only on the settings and the documents before it, so every
process of a multi-host run (each reads all documents) keeps the same ones, and a resume rebuilds the dedup index
by replaying the cleaner over the documents before its position. Each document must be seen once: a second pass
over a source would find every document a duplicate of itself.

Memory: the dedup index grows with the kept documents, nothing else does. Per kept document, ``exact`` holds a
20-byte SHA-1 digest in a set (95 bytes with Python's overheads: tracemalloc, 200,000 kept documents); ``near`` adds
its MinHash signature (128 uint32s: 512 bytes) and per LSH band (16 at the default threshold 0.85) a 64-bit band
hash and the document's number (12 bytes), the newest eighth of the documents in a dict instead: about 1.1 KB per
kept document in all (1.06-1.09 KB measured at 20,000 and 60,000), so 10 million kept documents take about 11 GB.
Throughput on one core (README paragraphs of 850 characters): 32 MB/s with exact dedup, 7 MB/s with PII scrubbing
and every filter on, 1 MB/s with near dedup (the MinHash permutations dominate).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from jaxft.data.cleaning import MinHashIndex, dedup_digest, filter_reason
from jaxft.data.config import compile_drop_patterns
from jaxft.data.formats import DataReport
from jaxft.data.text_config import TextDataConfig
from jaxft.data.text_sources import Document

_SNIPPET_CHARS = 60
_SPACES = re.compile(r"\s+")

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}"
                    r"(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Exactly four octets: a dotted run of three (a version) or five parts, or a trailing ".digit", does not match.
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\w)")
_HEX = r"[0-9A-Fa-f]{1,4}"
# The eight-group form and the "::" compressed forms (RFC 4291 section 2.2); `_looks_like_ipv6` then asks for a
# digit and two groups, so C++ scopes (std::move, ab::cd) and the bare "::" stay.
_IPV6 = re.compile(r"(?<![\w:])(?:" + "|".join([
    rf"(?:{_HEX}:){{7}}{_HEX}",
    *(rf"(?:{_HEX}:){{1,{k}}}(?::{_HEX}){{1,{7 - k}}}" for k in range(1, 7)),
    rf"(?:{_HEX}:){{1,7}}:",
    rf":(?::{_HEX}){{1,7}}",
]) + r")(?![\w:]|\.\w)")
# A phone number has a country code ("+44 20 7946 0958", "+1 (555) 123-4567") or a North American shape:
# "(555) 123-4567", "555-123-4567", "555.123.4567", "1-800-555-1234" (one separator throughout). Dates
# (2024-01-15, 15.01.2024) and plain integers have neither.
_PHONE = re.compile(r"(?<![\w+.-])(?:"
                    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}"
                    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"
                    r"|\d{3}([.-])\d{3}\1\d{4}"
                    r"|1([.-])\d{3}\2\d{3}\2\d{4}"
                    r")(?!\w|[.-]\d)")
_PHONE_DIGITS = (7, 15)  # E.164 allows at most 15 digits
_IPV4_HINT = re.compile(r"\d\.\d")
_IPV6_FULL_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{1,4}:")  # the eight-group form; the others have "::"
_PHONE_HINT = re.compile(r"\d\d")


def _looks_like_ipv6(address: str) -> bool:
    return any(c.isdigit() for c in address) and len([g for g in address.split(":") if g]) >= 2


def _looks_like_phone(number: str) -> bool:
    digits = sum(c.isdigit() for c in number)
    return _PHONE_DIGITS[0] <= digits <= _PHONE_DIGITS[1]


def scrub_pii(text: str) -> str:
    """`text` with e-mail addresses, IP addresses and phone numbers replaced by ``<EMAIL>``, ``<IP>``, ``<PHONE>``.

    Each pattern runs only where a cheap test finds a part every match has: the patterns start with a lookbehind,
    which makes `re` try them at every position (3x slower on prose than a search led by a character class)."""
    if "@" in text:
        text = _EMAIL.sub("<EMAIL>", text)
    if _IPV4_HINT.search(text):
        text = _IPV4.sub("<IP>", text)
    if "::" in text or _IPV6_FULL_HINT.search(text):
        text = _IPV6.sub(lambda m: "<IP>" if _looks_like_ipv6(m.group()) else m.group(), text)
    if _PHONE_HINT.search(text):
        text = _PHONE.sub(lambda m: "<PHONE>" if _looks_like_phone(m.group()) else m.group(), text)
    return text


def symbol_reason(text: str, limit: float) -> tuple[str, str] | None:
    """Gopher: '#' per word, or ellipses ('...', '…') per word, above `limit`."""
    words = len(text.split())
    if not words:
        return None
    for name, count in (("'#'", text.count("#")), ("ellipses", text.count("...") + text.count("\u2026"))):
        if count / words > limit:
            return "too many symbols", f"{count} {name} per {words} words > max_symbol_fraction {limit}"
    return None


def alpha_word_reason(text: str, limit: float) -> tuple[str, str] | None:
    """Gopher: fewer than `limit` of the words contain a letter (tables of numbers, code dumps, symbol runs)."""
    words = text.split()
    alpha = sum(word.isalpha() or any(c.isalpha() for c in word) for word in words)  # the first test is fast
    if (alpha / len(words) if words else 0.0) < limit:
        return "few alphabetic words", f"{alpha}/{len(words)} words with a letter < min_alpha_word_fraction {limit}"
    return None


def repeated_word_reason(text: str, limit: int) -> tuple[str, str] | None:
    """The longest run of one word (case-insensitive) repeated back to back is longer than `limit`."""
    longest, run, previous, worst = 0, 0, None, None
    for word in text.lower().split():
        run = run + 1 if word == previous else 1
        previous = word
        if run > longest:
            longest, worst = run, word
    if longest > limit:
        return "repeated words", f"{worst!r} {longest} times in a row > max_repeated_word_run {limit}"
    return None


def duplicate_line_reason(text: str, limit: float) -> tuple[str, str] | None:
    """Gopher: the fraction of non-blank lines that repeat an earlier line (stripped) is above `limit`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    repeats = len(lines) - len(set(lines))
    if lines and repeats / len(lines) > limit:
        return "duplicate lines", f"{repeats}/{len(lines)} lines repeat an earlier one > " \
                                  f"max_duplicate_line_fraction {limit}"
    return None


def snippet(text: str, chars: int = _SNIPPET_CHARS) -> str:
    """The start of `text` on one line, for reports."""
    flat = _SPACES.sub(" ", text).strip()
    return flat if len(flat) <= chars else flat[:chars - 1] + "\u2026"


class TextCleaner:
    """Normalize, scrub, filter and deduplicate documents one at a time, in stream order (see the module doc)."""

    def __init__(self, cfg: TextDataConfig, report: DataReport):
        self.cfg, self.report = cfg, report
        self._filters = self._quality_filters(cfg)
        self._seen: set[bytes] = set()
        self._near = MinHashIndex(cfg.near_dup_threshold) if cfg.dedup == "near" else None

    @staticmethod
    def _quality_filters(cfg: TextDataConfig) -> list[Callable[[str], tuple[str, str] | None]]:
        patterns = compile_drop_patterns(cfg.drop_patterns)
        filters = [lambda text: filter_reason(text, min_chars=cfg.min_chars, max_chars=cfg.max_chars,
                                              max_bad_char_fraction=cfg.max_bad_char_fraction, patterns=patterns)]
        gopher = ((cfg.max_symbol_fraction, symbol_reason), (cfg.min_alpha_word_fraction, alpha_word_reason),
                  (cfg.max_repeated_word_run, repeated_word_reason),
                  (cfg.max_duplicate_line_fraction, duplicate_line_reason))
        for limit, check in gopher:
            if limit is not None:
                filters.append(lambda text, limit=limit, check=check: check(text, limit))
        return filters

    def __call__(self, doc: Document) -> str | None:
        """The cleaned text (normalized, PII scrubbed) or None when a filter or dedup drops it (counted in the
        report under its reason, with the location and a snippet)."""
        text = doc.text
        if self.cfg.normalize_unicode:
            text = unicodedata.normalize(self.cfg.normalize_unicode, text)
        if self.cfg.scrub_pii:
            text = scrub_pii(text)
        for check in self._filters:
            reason = check(text)
            if reason is not None:
                return self._drop(doc, text, *reason)
        if self.cfg.dedup is not None:
            digest = dedup_digest(text)
            if digest in self._seen:
                return self._drop(doc, text, "exact duplicate", "repeats an earlier document")
            self._seen.add(digest)
        if self._near is not None:
            match = self._near.add_unless_duplicate(text)
            if match is not None:
                return self._drop(doc, text, "near duplicate", f"near-duplicate of kept document #{match}")
        self.report.kept["documents after cleaning"] += 1
        return text

    def _drop(self, doc: Document, text: str, reason: str, detail: str) -> None:
        self.report.drop(reason, f"{doc.location}: {detail}: {snippet(text)!r}")
        return None
