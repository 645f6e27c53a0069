"""Training checkpoints: the trainable adapters, optimizer state, step and RNG, saved with orbax.

A checkpoint is one orbax step directory with three items:

- ``state``: every array leaf of the train state, as a nested dict of string keys. The train state is flattened
  here rather than handed to orbax as is, because orbax's handling of ``None`` leaves (frozen parameters in the
  trainable tree) and of namedtuples (optax states) has changed between releases; a dict of arrays round-trips in
  all of them, and the tree structure is rebuilt from the caller's restore target.
- ``layout``: each leaf's path, shape and dtype (JSON), so a restore can check its target against the checkpoint
  and name the paths that differ before orbax reads a byte. It also lets a checkpoint written before the method
  registry, whose trained leaves had the names of :data:`jaxft.peft.lora.OLD_LEAF_NAMES` (``lora_a`` where today's
  tree holds ``lora/a``), restore into today's state: each target leaf missing from the layout is looked up under
  its old name.
- ``extra``: the caller's JSON (data-iterator state, run config, :func:`base_reference` of the frozen base).

The frozen base is never copied into a checkpoint: ``extra`` carries its path and a sha256 of each of its files'
bytes, and :func:`check_base` refuses to resume on a base that has changed.

Saves are asynchronous and collective: every process calls :meth:`Checkpointer.save` with the same step, each
writes the shards its devices hold, and training continues while the bytes reach disk. Orbax copies the arrays to
host memory before ``save`` returns, so the next (buffer-donating) train step cannot change what is written.

A save is atomic: orbax writes into ``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>`` only after
every process has finished writing (on object stores, where a rename is not atomic, a ``commit_success.txt`` written
last plays that part). A run killed mid-save leaves the temporary directory behind, which is never listed as a step,
so :meth:`Checkpointer.latest_step` is always a complete checkpoint, and the resumed run can save that step again.
A save that fails (disk full, no permission) raises :class:`CheckpointSaveError`, naming the step and the folder,
from the call that finds out: the next :meth:`~Checkpointer.save`, :meth:`~Checkpointer.wait` or
:meth:`~Checkpointer.close`.

Restores are sharding-aware: the target names a sharding per leaf, and each process reads only the chunks that
its devices hold, on the mesh of the checkpoint or on another one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxft.config import ModelConfig, to_dict
from jaxft.errors import JaxftError
from jaxft.hf.safetensors_io import CheckpointError
from jaxft.peft.lora import OLD_LEAF_NAMES
from jaxft.peft.tree import path_names

_STATE, _LAYOUT, _EXTRA = "state", "layout", "extra"


class BaseModelChanged(JaxftError, ValueError):
    """The frozen base model on disk is not the one a checkpoint's adapters were trained on."""


class CheckpointSaveError(JaxftError, OSError):
    """A checkpoint could not be written (disk full, no permission); the message names the step and the folder."""


class _QuietOrbax(logging.Filter):
    """Drops the log records about orbax that tell the caller nothing it does not learn otherwise: a failed
    asynchronous save, logged from each of orbax's threads (and by asyncio, for each write task whose error nobody
    awaited) with a traceback before the error reaches the caller, who gets it once as
    :class:`CheckpointSaveError`; and the notice that a read-only manager is read only."""

    checkpoint_folders: set[str] = set()  # every Checkpointer's folder in this process

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return not (record.exc_info and self._from_a_save(*record.exc_info))
        return "orbax" not in record.pathname or not (
            record.levelno >= logging.ERROR or str(record.msg).startswith("Given directory is read only"))

    @classmethod
    def _from_a_save(cls, _, error: BaseException | None, tb) -> bool:
        """A write task's error, known by orbax in its traceback or, when tensorstore set it on the future from C
        (no traceback at all), by a checkpoint folder in its message."""
        return (any("orbax" in frame.filename for frame in traceback.extract_tb(tb)) if tb is not None else
                any(folder in str(error) for folder in cls.checkpoint_folders))


class _SkipLateWriteCallbacks:
    """``sys.unraisablehook`` that drops one error: after a failed save, orbax closes the event loop of its save
    thread while tensorstore still finishes the other writes, and tensorstore's thread, telling that loop about each
    one (``call_soon_threadsafe``, called from C), reports ``RuntimeError: Event loop is closed`` with a traceback.
    The save's own error reaches the caller as :class:`CheckpointSaveError`; everything else goes to ``hook``."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and frames and frames[0].name == "call_soon_threadsafe"):
            self.hook(unraisable)


def _quiet_orbax() -> None:
    for logger in map(logging.getLogger, ("absl", "asyncio")):  # orbax logs through absl's Python logger
        if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
            logger.addFilter(_QuietOrbax())
    if not isinstance(sys.unraisablehook, _SkipLateWriteCallbacks):
        sys.unraisablehook = _SkipLateWriteCallbacks(sys.unraisablehook)


class Checkpointer:
    """Saves the train state every ``save_every`` steps (and when forced), keeping the newest ``keep_last``.

    The save cadence is decided here (``step % save_every == 0``) rather than by orbax, whose default policy has
    varied across releases (some also save the first step of every run). The decision depends only on ``step``,
    so every process of a multi-host run agrees on it, as the collective save requires.
    """

    def __init__(self, directory: str | Path, *, save_every: int = 1, keep_last: int = 3, read_only: bool = False):
        """``read_only`` opens existing checkpoints to list and restore them without creating or changing anything
        (a resume is checked before its run folder is touched)."""
        if save_every < 1:
            raise ValueError(f"Checkpointer: save_every must be >= 1 step, got {save_every}")
        if keep_last < 1:
            raise ValueError(f"Checkpointer: keep_last must be >= 1 checkpoint, got {keep_last}")
        self.directory = Path(directory).resolve()  # orbax rejects relative paths
        self.save_every = save_every
        self._in_flight: int | None = None
        options = (ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                                  save_interval_steps=0) if read_only else
                   ocp.CheckpointManagerOptions(max_to_keep=keep_last, enable_async_checkpointing=True, create=True))
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _LAYOUT: ocp.JsonCheckpointHandler(),
                    _EXTRA: ocp.JsonCheckpointHandler()}
        _quiet_orbax()
        _QuietOrbax.checkpoint_folders.add(str(self.directory))
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state: Any, extra: dict | None = None, *, force: bool = False) -> bool:
        """Starts saving ``state`` and ``extra`` as checkpoint ``step`` if the cadence (or ``force``) asks for it.

        Call it after every train step with the state *after* that step and the iterator state *after* the batches
        it consumed, so a resume from ``step`` replays nothing and skips nothing; pass ``force=True`` for the last
        step. Returns whether a save started. A step already on disk is not saved again, so forcing the final step
        is harmless when the cadence already saved it.
        """
        step = int(step)
        if not (force or step % self.save_every == 0):
            return False
        # orbax waits for the previous save before starting one anyway; waiting first means a step still in flight
        # is listed, whichever orbax release decides when a step joins all_steps().
        self.wait()
        if step in self._manager.all_steps():
            return False
        extra_json = _json_snapshot(extra or {})
        arrays, layout = _flatten_state(state)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(arrays), _LAYOUT: ocp.args.JsonSave(layout),
                                     _EXTRA: ocp.args.JsonSave(extra_json)})
        self._in_flight = step
        with self._save_errors():
            self._manager.save(step, args=args, force=True)
        return True

    def all_steps(self) -> list[int]:
        """The complete checkpoints on disk, oldest first (an interrupted save is not among them)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or ``None`` when there is none (a fresh run)."""
        return self._manager.latest_step()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Loads checkpoint ``step`` (default: the latest) into the structure and shardings of ``target``.

        ``target`` is a tree shaped like the saved state (``None`` where the state had ``None``) whose leaves say
        where each array goes: a ``jax.Array`` (its shape, dtype and sharding), a ``jax.ShapeDtypeStruct`` with a
        ``sharding``, or a bare ``jax.sharding.Sharding`` (shape and dtype then come from the checkpoint). The tree of
        shardings the run would place its initial state with is enough, so no memory is spent on a state that is
        about to be overwritten. Returns ``(state, extra)``.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            wanted = "" if step is None else f" for step {step}"
            raise FileNotFoundError(f"no complete checkpoint{wanted} in {self.directory}; complete steps: "
                                    f"{self.all_steps()}")
        layout = self._manager.restore(step, args=ocp.args.Composite(**{_LAYOUT: ocp.args.JsonRestore()}))[_LAYOUT]
        abstract, rebuild = _abstract_state(target, layout, f"{self.directory}/{step}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract), _EXTRA: ocp.args.JsonRestore()}))
        return rebuild(restored[_STATE]), restored[_EXTRA]

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is on disk and visible to :meth:`latest_step`."""
        with self._save_errors():
            self._manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Finishes the save in flight and releases orbax's background threads; call it before the process exits,
        or the last checkpoint may be lost. The threads are released even when that save failed."""
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _save_errors(self):
        """Orbax reports a failed write as the OSError of its Python writes or the ValueError of tensorstore's
        (``OUT_OF_RANGE: ... File too large``); either becomes one :class:`CheckpointSaveError` naming the step."""
        try:
            yield
        except (OSError, ValueError) as err:
            step, self._in_flight = self._in_flight, None
            with contextlib.suppress(Exception):  # release orbax's threads: the caller's run ends here
                self._manager.close()
            cause = " ".join(str(err).split()) or type(err).__name__
            complete = self.all_steps()
            raise CheckpointSaveError(
                f"could not save checkpoint step {step} to {self.directory / str(step)}: {cause}. The last complete "
                f"checkpoint is {f'step {complete[-1]}' if complete else 'none'}; free disk space or fix the "
                "folder's permissions, then continue with --resume (resume=True), which starts from it."
            ) from err

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _leaf_paths(tree: Any, is_leaf=None) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [path_names(path) for path, _ in path_leaves], [leaf for _, leaf in path_leaves], treedef


def _nest(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict:
    """A nested dict of the leaves: the one tree shape every orbax release saves and restores unchanged."""
    return traverse_util.unflatten_dict(dict(zip(paths, leaves)))


def _flatten_state(state: Any) -> tuple[dict, dict]:
    """The state's arrays as a nested dict, and the layout (path -> shape, dtype) that restore checks against."""
    paths, leaves, _ = _leaf_paths(state)
    layout = {"/".join(p): {"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for p, leaf in zip(paths, leaves)}
    return _nest(paths, leaves), layout


def _abstract_state(target: Any, layout: dict, where: str):
    """Orbax's restore target (ShapeDtypeStructs with shardings) and a function that puts the restored nested dict
    back into ``target``'s structure. Mismatches are reported all at once, by path."""
    paths, leaves, treedef = _leaf_paths(target, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    names = ["/".join(p) for p in paths]
    target_names = set(names)
    saved_paths = [_saved_path(p, layout, target_names) for p in paths]
    saved_names = ["/".join(p) for p in saved_paths]
    missing = [n for n, s in zip(names, saved_names) if s not in layout]
    restored_names = set(saved_names)
    unexpected = [n for n in layout if n not in restored_names]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where} does not fit the restore target: target leaves not in the "
                              f"checkpoint: {missing or 'none'}; checkpoint leaves not in the target: "
                              f"{unexpected or 'none'}. The trainable set (LoRA targets, rank) or the optimizer must "
                              "match the saved run's.")
    abstract, problems = [], []
    for name, saved_name, leaf in zip(names, saved_names, leaves):
        saved_shape, saved_dtype = tuple(layout[saved_name]["shape"]), layout[saved_name]["dtype"]
        if isinstance(leaf, jax.sharding.Sharding):
            leaf = jax.ShapeDtypeStruct(saved_shape, saved_dtype, sharding=leaf)
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            problems.append(f"{name}: no sharding (give a jax.Array, a ShapeDtypeStruct with sharding=, "
                            "or a Sharding)")
        elif (tuple(leaf.shape), str(leaf.dtype)) != (saved_shape, saved_dtype):
            problems.append(f"{name}: target {str(leaf.dtype)}{list(leaf.shape)}, "
                            f"checkpoint {saved_dtype}{list(saved_shape)}")
        abstract.append(jax.ShapeDtypeStruct(saved_shape, saved_dtype, sharding=sharding))
    if problems:
        raise CheckpointError(f"checkpoint {where} does not fit the restore target:\n  " + "\n  ".join(problems))

    def rebuild(nested: dict) -> Any:
        restored = []
        for path in saved_paths:
            node = nested
            for name in path:
                node = node[name]
            restored.append(node)
        return jax.tree_util.tree_unflatten(treedef, restored)

    return _nest(saved_paths, abstract), rebuild


def _saved_path(path: tuple[str, ...], layout: dict, target_names: set[str]) -> tuple[str, ...]:
    """Where the checkpoint holds the target leaf at ``path``: the same path, or in a checkpoint written before the
    method registry the leaf's old name in the same group (``.../q_proj/lora_a`` for ``.../q_proj/lora/a``). An old
    name that is itself a target leaf is that leaf's, never another's."""
    if "/".join(path) in layout:
        return path
    for old, new in OLD_LEAF_NAMES.items():
        tail = tuple(new.split("/"))
        former = (*path[:-len(tail)], old)
        if path[-len(tail):] == tail and "/".join(former) in layout and "/".join(former) not in target_names:
            return former
    return path


def _json_snapshot(extra: dict) -> dict:
    """A deep copy of ``extra`` taken now: the async write must not see later changes to the caller's dicts."""
    try:
        return json.loads(json.dumps(extra))
    except (TypeError, ValueError) as err:
        raise TypeError(f"Checkpointer.save: extra must be JSON-serializable (iterator state, config, base "
                        f"reference as plain dicts, lists, strings and numbers): {err}") from err


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read a chunk at a time. Weights changed in place keep their safetensors header
    (names, dtypes, shapes, offsets), so only the bytes themselves tell two bases apart. sha256 rather than blake2b:
    with the SHA instructions of current x86 and ARM CPUs it is the faster of the two (README: run folders)."""
    digest, buffer = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _header_fingerprint(path: Path) -> str:
    """What checkpoints of jaxft before byte hashing recorded per safetensors file: sha256 over the file size and
    the JSON header. Kept only to check those checkpoints' references."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 <= header_len <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (its header length field reads {header_len}, "
                             f"the file has {size} bytes)")
        header = f.read(header_len)
    return hashlib.sha256(struct.pack("<Q", size) + prefix + header).hexdigest()


_BYTES = "sha256 of the bytes"  # the reference's "weights" entry; references without it fingerprint headers only


def _base_fingerprints(model_dir: Path | ModelConfig, headers_only: bool = False) -> dict[str, str]:
    if isinstance(model_dir, ModelConfig):  # an inline config (a model trained from scratch) is its own base
        return {"model config": hashlib.sha256(json.dumps(to_dict(model_dir), sort_keys=True).encode()).hexdigest()}
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: expected a Hugging Face model folder as the base")
    files = {"config.json": hashlib.sha256(config.read_bytes()).hexdigest()}
    for path in sorted(model_dir.glob("*.safetensors")):
        files[path.name] = _header_fingerprint(path) if headers_only else _file_sha256(path)
    return files


def _combined(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def base_reference(model_dir: str | Path | ModelConfig) -> dict:
    """What a checkpoint records about its frozen base instead of a copy: the folder's absolute path, one sha256
    identifying it, and per-file fingerprints (the sha256 of config.json's and of each safetensors file's bytes).
    A model trained from scratch has no folder: its inline config is the base, fingerprinted whole."""
    model_dir = _base_location(model_dir)
    files = _base_fingerprints(model_dir)
    return {"path": str(model_dir), "sha256": _combined(files), "files": files, "weights": _BYTES}


def _base_location(model_dir: str | Path | ModelConfig) -> Path | ModelConfig:
    return model_dir if isinstance(model_dir, ModelConfig) else Path(model_dir).resolve()


def check_base(reference: dict, model_dir: str | Path | ModelConfig | None = None, *,
               current: dict | None = None) -> None:
    """Raises :class:`BaseModelChanged` unless ``model_dir`` (default: the recorded path) holds the base that
    ``reference`` (from :func:`base_reference`) describes. Adapters resumed onto another base train a different
    model without any error, so this check runs before a resume or an adapter merge. ``current``, the
    :func:`base_reference` of ``model_dir`` if the caller has it, saves reading every weight a second time.

    A reference written before weights were hashed (no ``weights`` entry) is checked as it was recorded, by
    config.json and the safetensors headers, with a warning that weights changed in place go unnoticed: refusing
    would strand every run started before, and the header check still catches another model or a re-quantization."""
    model_dir = _base_location(reference["path"] if model_dir is None else model_dir)
    headers_only = reference.get("weights") != _BYTES
    if headers_only:
        warnings.warn(f"the checkpoint's record of its base ({reference['path']}) predates hashing the weights, so "
                      "only config.json and the safetensors headers are compared: weights changed in place would go "
                      "unnoticed. The checkpoints this run saves from now on record the full hashes.", stacklevel=2)
    files = current["files"] if current and not headers_only else _base_fingerprints(model_dir, headers_only)
    if _combined(files) == reference["sha256"]:
        return
    recorded = reference["files"]
    changed = sorted(n for n in files.keys() & recorded.keys() if files[n] != recorded[n])
    missing = sorted(recorded.keys() - files.keys())
    added = sorted(files.keys() - recorded.keys())
    raise BaseModelChanged(
        f"the base model in {model_dir} is not the one these adapters were trained on (recorded from "
        f"{reference['path']}): changed files {changed or 'none'}, missing {missing or 'none'}, new {added or 'none'}. "
        "Point the run at the original base weights, or start a new run instead of resuming.")
