"""The pre-tokenized store: one pass of a pretraining stream's rows written once, read memory-mapped by every run.

Reading, cleaning and tokenizing a corpus each run costs CPU time the accelerators wait on; a store pays it once.
`write_token_store(cfg, tokenizer, folder)` writes the rows of one pass of `jaxft.data.text_stream.TextStream`
(one process, from the start) into a folder, atomically (`jaxft.files.atomic_dir`: whole or not at all, an
existing one replaced only with ``overwrite``):

| file               | content                                                                           |
|--------------------|-----------------------------------------------------------------------------------|
| ``rows-NNNNN.npy`` | int32 ``[rows, 4, max_length]``: ``input_ids``, ``labels``, ``segment_ids``, ``positions`` |
| ``manifest.json``  | format, version, the stream's fingerprint, rows, shapes, shards, the largest token id |

A run whose ``data.store`` names the folder reads rows from it (`StoredRows`, a `DataIterator`): each epoch a
permutation of all rows seeded by ``(data.seed, epoch)``, of which process ``p`` of ``n`` takes every ``n``-th
from ``p``, in batches of ``data.batch_size`` (the epoch's last batch filled with padding rows). Its position is
``{epoch, batch}``. The shards are memory-mapped, so a store larger than memory reads only the rows a batch takes.
A store whose fingerprint differs from the run's data settings and tokenizer is refused, naming each difference;
``data.seed`` counts only with ``data.weights`` (which it draws the rows by), since without them it only orders the
reading (`rows_fingerprint`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxft.data.chat import checked_pad_id, token_id_error
from jaxft.data.formats import DataError
from jaxft.data.iterator import check_state
from jaxft.data.text_config import TextDataConfig
from jaxft.data.text_stream import BATCH_KEYS, TextStream, row_layout, stream_fingerprint
from jaxft.files import atomic_dir

FORMAT = "jaxft token store"
FORMAT_VERSION = 1
STATE_VERSION = 1
MANIFEST = "manifest.json"
ROWS_PER_SHARD = 8192


def rows_fingerprint(fingerprint: dict, cfg: TextDataConfig) -> dict:
    """The part of a stream's fingerprint a run reading a store can check. The source files' signatures are left out:
    the store holds the rows, so a run need not have the corpus (the manifest still records them). Without weights
    ``data.seed`` decides only the order a run reads the rows in (`StoredRows`), so a store serves every seed; with
    weights it draws the rows."""
    ignored = {"files of data.paths", *(["data.seed"] if cfg.weights is None else [])}
    return {key: value for key, value in fingerprint.items() if key not in ignored}


def _shard_name(index: int) -> str:
    return f"rows-{index:05d}.npy"


def write_token_store(cfg: TextDataConfig, tokenizer, out_dir, *, overwrite: bool = False,
                      rows_per_shard: int = ROWS_PER_SHARD, vocab_size: int | None = None) -> dict:
    """Write one pass of ``cfg``'s rows into the folder ``out_dir``; its manifest. With the model's
    ``vocab_size``, a token id without an embedding row is a DataError naming its document."""
    stream = TextStream(cfg, tokenizer, vocab_size=vocab_size)
    shards, rows, highest = [], 0, -1
    with atomic_dir(out_dir, overwrite) as tmp:
        chunk: list[np.ndarray] = []
        for row in stream.pass_rows():
            chunk.append(np.stack([row[key] for key in BATCH_KEYS]))
            if len(chunk) == rows_per_shard:
                highest = max(highest, _save_shard(tmp, shards, chunk))
                rows, chunk = rows + len(chunk), []
        if chunk:
            highest = max(highest, _save_shard(tmp, shards, chunk))
            rows += len(chunk)
        if not rows:
            raise DataError(", ".join(cfg.paths), "no documents", "no document is left after cleaning: nothing "
                            "to store")
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": stream.fingerprint, "rows": rows,
                    "row_length": cfg.max_length, "keys": list(BATCH_KEYS), "dtype": "int32",
                    "max_token_id": highest, "shards": shards}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    return manifest


def _save_shard(folder: Path, shards: list[dict], chunk: list[np.ndarray]) -> int:
    """Save ``chunk``'s rows as the next shard, listed in ``shards``; the largest token id in it."""
    name = _shard_name(len(shards))
    array = np.stack(chunk)
    np.save(folder / name, array)
    shards.append({"file": name, "rows": len(chunk)})
    return int(array[:, 0].max())


def read_manifest(folder) -> dict:
    """The manifest of a store folder; a DataError naming the file when it is missing or not a store's."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(str(path), "no token store", "data.store names a folder without manifest.json; write one "
                        "with jaxft.data.token_store.write_token_store (`jaxft data tokenize`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(str(path), "invalid JSON", str(e)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(str(path), "no token store", f"expected format {FORMAT!r}, got "
                        f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(str(path), "unknown version", f"expected version {FORMAT_VERSION}, got "
                        f"{manifest.get('version')!r}; write the store again with this jaxft")
    return manifest


class StoredRows:
    """Endless batches from a token store for one process (the `jaxft.data.iterator.DataIterator` protocol)."""

    def __init__(self, cfg: TextDataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 vocab_size: int | None = None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
        folder = Path(cfg.store)
        manifest = read_manifest(folder)
        self.fingerprint = stream_fingerprint(cfg, tokenizer, source_files=False)  # the corpus may be gone
        check_state(rows_fingerprint(manifest["fingerprint"], cfg), rows_fingerprint(self.fingerprint, cfg),
                    str(folder / MANIFEST),
                    "was written for other data settings or another tokenizer",
                    "its rows are not this run's; write the store again from this config, or run with the "
                    "settings and tokenizer it was written with")
        if vocab_size is not None and manifest["max_token_id"] >= vocab_size:
            raise token_id_error(str(folder), manifest["max_token_id"], vocab_size, tokenizer,
                                 "the store holds such ids")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.pad_id = checked_pad_id(tokenizer, vocab_size)
        self.shards = [self._open_shard(folder, shard, manifest["row_length"]) for shard in manifest["shards"]]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.rows = int(self.starts[-1])
        if self.rows != manifest["rows"]:
            raise DataError(str(folder / MANIFEST), "incomplete store", f"the shards hold {self.rows} rows, the "
                            f"manifest lists {manifest['rows']}")
        self.epoch, self.batch = 0, 0
        self._order = self._epoch_order(0)

    @staticmethod
    def _open_shard(folder: Path, shard: dict, row_length: int) -> np.ndarray:
        path = folder / shard["file"]
        if not path.is_file():
            raise DataError(str(path), "missing shard", f"{MANIFEST} lists it but the file is not there")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.shape != (shard["rows"], len(BATCH_KEYS), row_length) or array.dtype != np.int32:
            raise DataError(str(path), "bad shard", f"expected int32 [{shard['rows']}, {len(BATCH_KEYS)}, "
                            f"{row_length}], got {array.dtype} {list(array.shape)}")
        return array

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.cfg.seed, epoch, self.rows]).permutation(self.rows)
        return order[self.process_index::self.process_count]

    @property
    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(len(self._order) / self.cfg.batch_size))

    def batches_up_to(self, n: int) -> int:
        """``min(n, batches_per_epoch)`` (the store knows its row count: nothing is read)."""
        return max(0, min(n, self.batches_per_epoch))

    def __iter__(self) -> "StoredRows":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        size = self.cfg.batch_size
        picks = self._order[self.batch * size:(self.batch + 1) * size]
        self.batch += 1
        rows = [self._row(int(i)) for i in picks]
        padding = row_layout([], None, self.cfg.max_length, self.pad_id, self.cfg.packing)
        rows += [np.stack([padding[key] for key in BATCH_KEYS])] * (size - len(rows))
        stacked = np.stack(rows)
        return {key: np.ascontiguousarray(stacked[:, k]) for k, key in enumerate(BATCH_KEYS)}

    def _row(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard][index - self.starts[shard]]

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "kind": "token store", "process_index": self.process_index,
                "process_count": self.process_count,
                "batch_size": self.cfg.batch_size, "fingerprint": self.fingerprint, "epoch": self.epoch,
                "batch": self.batch}

    def set_state(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, "kind": "token store", "process_index": self.process_index,
                    "process_count": self.process_count, "batch_size": self.cfg.batch_size}
        why = "another store, tokenizer, batch size or process layout would not resume at the same row"
        check_state(state, expected, "data iterator state", "does not match this store", why)
        check_state(state.get("fingerprint") or {}, self.fingerprint, "data iterator state",
                    "does not match this store", why)
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._epoch_order(self.epoch)

    def rewind(self) -> None:
        self.epoch, self.batch = 0, 0
        self._order = self._epoch_order(0)
