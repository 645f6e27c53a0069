"""Pretraining rows streamed from documents: read, clean, shard, tokenize a buffer at a time, cut into rows.

Nothing holds a whole corpus: each source is read one document at a time (`jaxft.data.text_sources`), cleaned
(`jaxft.data.text_cleaning.TextCleaner`), and the documents this process keeps are tokenized a buffer at a time
(`TOKENIZE_BUFFER_DOCUMENTS` / `TOKENIZE_BUFFER_CHARS`) with the fast tokenizer's batch call, only as far ahead as
the next row needs.

Tokens. Each document is ``tokenizer(text)`` (BOS where the tokenizer adds one by default, as transformers'
``tokenizer(text)`` does) followed by EOS, and the documents of a source follow each other in one token stream.
Row k of a stream holds ``stream[kT:(k+1)T]`` with labels ``stream[kT+1:(k+1)T+1]``: every token but the first
is the target of exactly one position, rows overlap by nothing, and only the very end of a pass is padded.

Packing (``data.packing``). ``concat``: segment id 1 and positions ``0..T-1`` for the whole row, so attention
crosses document boundaries (GPT-2 / Llama pretraining). ``segments``: each document's piece of a row is its own
segment with positions from 0, a document cut at a row's end continues as a new segment in the next row (its
last token's label is still the document's next token), and a document's last token (EOS) has no target.

Sources. Without ``data.weights`` the sources are read one after another, and an epoch is one pass over all of
them: its last row is padded and its last batch filled with padding rows. With weights, row r is filled from the
source drawn by ``default_rng([seed, process_index, r])`` with the weights' probabilities, and each source cycles
on its own (a new pass, with a fresh cleaner, when it runs out), so rows never pad.

Processes. Every process reads and cleans every document (dedup is deterministic, so all agree), then keeps kept
document k of a source when ``k % process_count == process_index``; the tokenizing is what is split. A process
left without a document of a source (fewer kept documents than processes) is an error saying so
(`no_documents_error`).

Position. ``get_state()`` is per source its pass, the document number its next token is in, the token offset in
that document and the kept documents before it, plus the row number, the epoch and a fingerprint of the settings
and tokenizer (`stream_fingerprint`). ``set_state`` reopens each source at its document (text sources skip
documents without decoding where they can); with dedup on, the cleaner is first replayed over the documents
before the position (read and cleaned, not tokenized), so it drops exactly what it dropped before; a source whose
pass has ended (unweighted, before the current one) is not read again, since nothing of it is left to drop. A state
of other settings, tokenizer or process layout is refused naming what differs.

A cleaner (and its dedup memory) belongs to one pass of one source: a source's second pass is not all duplicates
of its first, and duplicates across sources are kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from jaxft.data.chat import IGNORE_INDEX, checked_pad_id, token_id_error
from jaxft.data.formats import DataError, DataReport
from jaxft.data.iterator import DataPipeline, check_state
from jaxft.data.text_cleaning import TextCleaner
from jaxft.data.text_config import TextDataConfig
from jaxft.data.text_sources import read_documents, source_signature

STATE_VERSION = 1
# One batch call of the tokenizer: this many documents, or fewer holding this many characters. Its Python lists of
# ids (about 15 bytes per character of text) are the stream's largest memory. On the stdlib corpus of
# scripts/bench_pretrain_data.py (whole source files, ~16K characters each) 2^18 characters gave 1.08M tokens/s
# against 0.82M with 2^16 (fewer documents per call leave the tokenizer's threads idle) at the same peak heap.
TOKENIZE_BUFFER_DOCUMENTS = 256
TOKENIZE_BUFFER_CHARS = 1 << 18
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")
_ROW_INDEPENDENT = ("batch_size", "store")  # settings that change batches or where rows are read, not the rows
_STATE_WHY = ("other files, cleaning, packing, tokenizer, seed or process layout would not resume at the same "
              "token; resume with the settings the run was started with")


class _Piece(NamedTuple):
    ids: np.ndarray  # consecutive tokens of one document
    ends_document: bool  # holds the document's last token (its EOS)


class _Kept(NamedTuple):
    number: int  # the document's number in its source
    kept: int  # its index among the source's kept documents (sharding)
    location: str
    text: str


class _Tokenized(NamedTuple):
    number: int
    kept: int
    ids: np.ndarray


def stream_fingerprint(cfg: TextDataConfig, tokenizer, *, source_files: bool = True) -> dict:
    """What decides a pass's rows, by name: every row-affecting ``data.*`` setting, the files each source reads
    (`jaxft.data.text_sources.source_signature`: a file added to a glob shifts the document numbers a position
    holds), a digest of the tokenizer's vocabulary, its special ids and the special tokens it adds to a text.
    JSON-able; compared key by key. ``source_files=False`` leaves the files out, for a reader that never opens
    them (a pre-tokenized store's rows are fixed when it is written)."""
    settings = {f"data.{key}": value for key, value in dataclasses.asdict(cfg).items()
                if key not in _ROW_INDEPENDENT}
    if source_files:
        settings["files of data.paths"] = {spec: source_signature(spec) for spec in cfg.paths}
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return json.loads(json.dumps({
        **settings,
        "tokenizer vocabulary": hashlib.sha1(vocabulary).hexdigest()[:16],
        "tokenizer bos id": tokenizer.bos_token_id, "tokenizer eos id": tokenizer.eos_token_id,
        "tokenizer pad id": tokenizer.pad_token_id,
        "tokenizer special tokens of an empty text": tokenizer.encode("", add_special_tokens=True),
    }))


def adds_eos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` already ends a text with EOS. Decided on a non-empty text: an empty one is fooled
    by a tokenizer whose BOS is its EOS (OPT's ``</s>``), whose lone special token is then read as a closing EOS."""
    eos = [tokenizer.eos_token_id]
    return (tokenizer.encode("a", add_special_tokens=True)[-1:] == eos
            and tokenizer.encode("a", add_special_tokens=False)[-1:] != eos)


def no_documents_error(paths: str, kept: int, stream: "TextStream") -> DataError:
    """Why this process got no document of ``paths`` (``kept`` documents of them survived cleaning) and what to do."""
    if not kept:
        return DataError(paths, "no documents", "no document is left after cleaning; check data.paths and the "
                         "cleaning settings (data.min_chars, the filters, dedup)")
    cfg = stream.cfg
    return DataError(paths, "no documents for this process", f"{kept} document(s) are left after cleaning "
                     f"(data.document: {cfg.document}), none for process {stream.process_index} of "
                     f"{stream.process_count}: each process tokenizes whole documents of every source, kept "
                     f"document k going to process k % {stream.process_count}; use data.document: line or "
                     "paragraph, or split the source into more files")


class _SourceCursor:
    """One source's token stream for this process, tokenized a buffer at a time; with ``cycle`` it starts the
    source's next pass when one ends."""

    def __init__(self, stream: "TextStream", index: int, position: dict | None, cycle: bool, scratch: bool = False,
                 finished: bool = False):
        self.stream, self.index, self.cycle, self.scratch = stream, index, cycle, scratch
        self.spec = stream.cfg.paths[index]
        self._open(position or {"pass": 0, "document": 0, "offset": 0, "kept": 0}, finished)

    def _open(self, position: dict, finished: bool = False) -> None:
        """Reopen at ``position``; ``finished``: the position is the end of its pass (nothing is left to read, so
        neither the reader nor the dedup memory matters, and the replay is skipped)."""
        cfg = self.stream.cfg
        self.pass_number = int(position["pass"])
        report = DataReport() if self.scratch else self.stream.report_for(self.index, self.pass_number)
        self.cleaner = TextCleaner(cfg, report)
        document, self.kept = int(position["document"]), int(position["kept"])
        self.buffer: deque[_Tokenized] = deque()
        self.offset = self.held = 0
        self.read, self.exhausted = document, finished
        if finished:
            self.reader: Iterator = iter(())
            return
        if cfg.dedup is not None and document:
            self.kept = self._replay(document)
        self.reader = read_documents(self.spec, text_field=cfg.text_field, document=cfg.document, start=document)
        offset = int(position["offset"])
        if offset:  # into the document the position names, which is then the first one buffered
            self._fill(1)
            if not self.buffer or self.buffer[0].number != document or offset >= len(self.buffer[0].ids):
                raise DataError(self.spec, "changed since the position was saved", f"document {document} (token "
                                f"{offset}) is no longer a kept document of this process; resume over the "
                                "files the run started with")
            self.offset, self.held = offset, self.held - offset

    def _replay(self, end: int) -> int:
        """Clean documents ``0..end-1`` (untokenized) so dedup remembers them; their kept count."""
        kept = 0
        cfg = self.stream.cfg
        reader = read_documents(self.spec, text_field=cfg.text_field, document=cfg.document)
        for _, document in zip(range(end), reader):
            kept += self.cleaner(document) is not None
        reader.close()
        return kept

    def _read_mine(self) -> list[_Kept]:
        """The next documents this process keeps, up to a tokenizer buffer's worth."""
        mine, chars = [], 0
        while len(mine) < TOKENIZE_BUFFER_DOCUMENTS and chars < TOKENIZE_BUFFER_CHARS:
            document = next(self.reader, None)
            if document is None:
                self.exhausted = True
                break
            self.read += 1
            text = self.cleaner(document)
            if text is None:
                continue
            self.kept += 1
            if (self.kept - 1) % self.stream.process_count == self.stream.process_index:
                mine.append(_Kept(self.read - 1, self.kept - 1, document.location, text))
                chars += len(text)
        return mine

    def _fill(self, need: int) -> None:
        """Tokenize until ``need`` tokens are buffered past the offset, or this pass of the source ends."""
        while self.held < need and not self.exhausted:
            for item in self.stream.tokenize(self._read_mine()):
                self.buffer.append(item)
                self.held += len(item.ids)

    def _next_pass(self) -> None:
        self._open({"pass": self.pass_number + 1, "document": 0, "offset": 0, "kept": 0})
        self._fill(1)
        if not self.buffer:
            raise no_documents_error(self.spec, self.kept, self.stream)

    def take(self, count: int) -> list[_Piece]:
        """Up to ``count`` next tokens as per-document pieces (fewer only where a pass ends without ``cycle``)."""
        pieces = []
        while count:
            self._fill(count + 1)  # one more: the label of the last token taken
            if not self.buffer:
                if not self.cycle:
                    break
                self._next_pass()
                continue
            document = self.buffer[0]
            piece = document.ids[self.offset:self.offset + count]
            self.offset += len(piece)
            self.held -= len(piece)
            count -= len(piece)
            ends = self.offset == len(document.ids)
            if ends:
                self.buffer.popleft()
                self.offset = 0
            pieces.append(_Piece(piece, ends))
        return pieces

    def peek(self) -> int | None:
        """The next token, without taking it; None where the pass ends (without ``cycle``)."""
        self._fill(1)
        if not self.buffer and self.cycle:
            self._next_pass()
        return int(self.buffer[0].ids[self.offset]) if self.buffer else None

    def position(self) -> dict:
        if self.buffer:
            first = self.buffer[0]
            return {"pass": self.pass_number, "document": first.number, "offset": self.offset, "kept": first.kept}
        return {"pass": self.pass_number, "document": self.read, "offset": 0, "kept": self.kept}

    def count_tokens(self, beyond: float = math.inf) -> int:
        """Tokens of the rest of this pass (consumes it), or, once the count passes ``beyond``, that far."""
        total = self.held
        while not self.exhausted and total <= beyond:
            total += sum(len(item.ids) for item in self.stream.tokenize(self._read_mine()))
        return total


def row_layout(pieces: list[_Piece], follow: int | None, length: int, pad_id: int, packing: str) -> dict:
    """One row's four arrays from its document pieces and the token after them (``follow``, None at the end)."""
    tokens = np.concatenate([p.ids for p in pieces]) if pieces else np.zeros(0, np.int32)
    n = len(tokens)
    row = {"input_ids": np.full(length, pad_id, np.int32), "labels": np.full(length, IGNORE_INDEX, np.int32),
           "segment_ids": np.zeros(length, np.int32), "positions": np.zeros(length, np.int32)}
    row["input_ids"][:n] = tokens
    row["labels"][:max(n - 1, 0)] = tokens[1:]
    if n and follow is not None:
        row["labels"][n - 1] = follow
    if packing == "concat":
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n)
        return row
    start = 0
    for segment, piece in enumerate(pieces, 1):
        end = start + len(piece.ids)
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(len(piece.ids))
        if piece.ends_document:
            row["labels"][end - 1] = IGNORE_INDEX  # a document's last token predicts nothing of the next one
        start = end
    return row


class TextStream:
    """Endless batches of ``data.batch_size`` rows of ``data.max_length`` tokens for one process (the
    `jaxft.data.iterator.DataIterator` protocol); see the module docstring for the rows and the position.

    With the model's ``vocab_size``, a token id without an embedding row is a DataError naming its document.
    """

    def __init__(self, cfg: TextDataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 report: DataReport | None = None, vocab_size: int | None = None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer", "no EOS token", "pretraining ends every document with EOS; use a "
                            "tokenizer whose special tokens name an eos_token")
        self.cfg, self.tokenizer, self.vocab_size = cfg, tokenizer, vocab_size
        self.process_index, self.process_count = process_index, process_count
        self.report = report if report is not None else DataReport()
        self.pad_id = checked_pad_id(tokenizer, vocab_size)
        self.fingerprint = stream_fingerprint(cfg, tokenizer)
        self._adds_eos = adds_eos(tokenizer)
        self.weights = None if cfg.weights is None else np.asarray(cfg.weights, np.float64) / sum(cfg.weights)
        self._reported: set[int] = set()
        self._rows_per_pass: int | None = None
        self._batches_up_to: dict[int, int] = {}
        self._restore(None)

    # ----- the pieces the sources use --------------------------------------------------------------------------
    def report_for(self, source: int, pass_number: int) -> DataReport:
        """The run's report for a source's first pass read from its start, a scratch one for any re-reading, so
        the report counts each document once."""
        if pass_number or source in self._reported:
            return DataReport()
        self._reported.add(source)
        return self.report

    def tokenize(self, documents: list[_Kept]) -> list[_Tokenized]:
        """``tokenizer(text) + [EOS]`` per document, in one batch call; ids checked against the model."""
        if not documents:
            return []
        eos = [] if self._adds_eos else [self.tokenizer.eos_token_id]
        encoded = self.tokenizer.encode_batch([d.text for d in documents], add_special_tokens=True)
        out = []
        for document, ids in zip(documents, encoded):
            array = np.asarray(ids + eos, np.int32)
            if self.vocab_size is not None and int(array.max()) >= self.vocab_size:
                raise token_id_error(document.location, int(array.max()), self.vocab_size, self.tokenizer,
                                     "found while streaming, so later documents were not checked")
            out.append(_Tokenized(document.number, document.kept, array))
        return out

    # ----- rows -------------------------------------------------------------------------------------------------
    def _take(self, count: int) -> tuple[list[_Piece], int | None]:
        """The next row's pieces and the token after them (None: the epoch ends there)."""
        if self.weights is not None:
            draw = np.random.default_rng([self.cfg.seed, self.process_index, self.row])
            cursor = self.cursors[int(draw.choice(len(self.weights), p=self.weights))]
            return cursor.take(count), cursor.peek()
        pieces = []
        while count and self.source < len(self.cursors):
            got = self.cursors[self.source].take(count)
            count -= sum(len(p.ids) for p in got)
            pieces += got
            if count:
                self.source += 1
        return pieces, self._follow()

    def _follow(self) -> int | None:
        """Without weights: the next token of the epoch's stream, moving past sources that have ended."""
        while self.source < len(self.cursors):
            token = self.cursors[self.source].peek()
            if token is not None:
                return token
            self.source += 1
        return None

    def _next_row(self) -> dict[str, np.ndarray]:
        pieces, follow = self._take(self.cfg.max_length)
        self.row += 1
        return row_layout(pieces, follow, self.cfg.max_length, self.pad_id, self.cfg.packing)

    def _epoch_over(self) -> bool:
        return self.weights is None and self._follow() is None

    def _start_epoch(self, epoch: int) -> None:
        self._restore({"epoch": epoch, "row": self.row, "source": 0,
                       "sources": [{"pass": epoch, "document": 0, "offset": 0, "kept": 0} for _ in self.cursors]})
        if self._epoch_over():  # a whole pass without a token: every source has been read to its end
            raise no_documents_error(", ".join(self.cfg.paths), sum(c.kept for c in self.cursors), self)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._epoch_over():
            self._start_epoch(self.epoch + 1)
        rows = []
        while len(rows) < self.cfg.batch_size:
            if self._epoch_over():  # the epoch's last batch: padding rows fill it
                rows.append(row_layout([], None, self.cfg.max_length, self.pad_id, self.cfg.packing))
            else:
                rows.append(self._next_row())
        return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}

    # ----- position ---------------------------------------------------------------------------------------------
    def _restore(self, state: dict | None) -> None:
        state = state or {"epoch": 0, "row": 0, "source": 0, "sources": [None] * len(self.cfg.paths)}
        self.epoch, self.row, self.source = int(state["epoch"]), int(state["row"]), int(state["source"])
        cycle = self.weights is not None
        # without weights the sources before the current one have ended their pass: nothing of them is read again
        self.cursors = [_SourceCursor(self, i, position, cycle, finished=not cycle and i < self.source)
                        for i, position in enumerate(state["sources"])]

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "kind": "text stream", "process_index": self.process_index,
                "process_count": self.process_count,
                "batch_size": self.cfg.batch_size, "fingerprint": self.fingerprint, "epoch": self.epoch,
                "row": self.row, "source": self.source, "sources": [c.position() for c in self.cursors]}

    def set_state(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, "kind": "text stream", "process_index": self.process_index,
                    "process_count": self.process_count, "batch_size": self.cfg.batch_size}
        check_state(state, expected, "data iterator state", "does not match this data", _STATE_WHY)
        check_state(state.get("fingerprint") or {}, self.fingerprint, "data iterator state",
                    "does not match this data", _STATE_WHY)
        self._restore(state)

    def rewind(self) -> None:
        """Back to the very start, so an evaluation reads the same batches each time."""
        self._restore(None)

    @property
    def rows_per_pass(self) -> int:
        """Rows of one pass over all sources for this process (one reading pass to count, then cached)."""
        if self._rows_per_pass is None:
            self._rows_per_pass = math.ceil(self._count_tokens() / self.cfg.max_length)
        return self._rows_per_pass

    def _count_tokens(self, beyond: float = math.inf) -> int:
        """Tokens of one pass over all sources for this process, counted only until the count passes ``beyond``."""
        total = 0
        for source in range(len(self.cfg.paths)):
            if total > beyond:
                break
            total += _SourceCursor(self, source, None, cycle=False, scratch=True).count_tokens(beyond - total)
        return total

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one pass over all sources for this process; the last one padded (see the module doc)."""
        return math.ceil(self.rows_per_pass / self.cfg.batch_size)

    def batches_up_to(self, n: int) -> int:
        """``min(n, batches_per_epoch)``, tokenizing only until the pass is known to hold ``n`` batches: what an
        evaluation of the first ``n`` batches needs, without a pass over a whole eval corpus."""
        if n <= 0:
            return 0
        if self._rows_per_pass is not None:
            return min(n, self.batches_per_epoch)
        if n not in self._batches_up_to:  # every evaluation asks again: counted once
            tokens_per_batch = self.cfg.batch_size * self.cfg.max_length
            beyond = (n - 1) * tokens_per_batch  # more tokens than this: at least n batches
            tokens = self._count_tokens(beyond=beyond)
            if tokens <= beyond:  # the count reached the end of the pass
                self._rows_per_pass = math.ceil(tokens / self.cfg.max_length)
            self._batches_up_to[n] = min(n, math.ceil(tokens / tokens_per_batch))
        return self._batches_up_to[n]

    def pass_rows(self) -> Iterator[dict[str, np.ndarray]]:
        """The rows of one pass from the very start, without the padding rows of its last batch (what
        `jaxft.data.token_store` writes); with weights, `rows_per_pass` rows drawn as training draws them. The
        stream is rewound before and after."""
        self.rewind()
        if self.weights is None:
            while not self._epoch_over():
                yield self._next_row()
        else:
            for _ in range(self.rows_per_pass):
                yield self._next_row()
        self.rewind()


def build_text_pipeline(cfg: TextDataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                        vocab_size: int | None = None) -> DataPipeline:
    """The batches of a pretraining run for one process: streamed from ``data.paths``, or read from the
    pre-tokenized folder ``data.store`` (`jaxft.data.token_store`) when one is named."""
    report = DataReport()
    if cfg.store is not None:
        from jaxft.data.token_store import StoredRows  # token_store builds on this module (its fingerprint)

        iterator = StoredRows(cfg, tokenizer, process_index=process_index, process_count=process_count,
                              vocab_size=vocab_size)
    else:
        iterator = TextStream(cfg, tokenizer, process_index=process_index, process_count=process_count,
                              report=report, vocab_size=vocab_size)
    return DataPipeline(iterator, report, None)
