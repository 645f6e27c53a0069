"""Train-state checkpoints: bit-identical round trips and resumes, cadence and retention, resharding on restore,
atomicity under SIGKILL, and the frozen-base fingerprint."""
import hashlib
import logging
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from jaxft.errors import JaxftError
import jaxft.train.checkpoint as checkpoint
from jaxft.train.checkpoint import BaseModelChanged, Checkpointer, base_reference, check_base

OPT = optax.adam(1e-2)


def make_state(seed: int = 0, steps: int = 2) -> dict:
    """A train state with a frozen (None) leaf, a bf16 leaf and adam moments that are not all zero."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    trainable = {"layer": {"kernel": None,
                           "lora_a": jax.random.normal(keys[0], (8, 4)),
                           "lora_b": jax.random.normal(keys[1], (4, 8)).astype(jnp.bfloat16)}}
    opt_state = OPT.init(trainable)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, trainable)
        updates, opt_state = OPT.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    return {"step": jnp.int32(steps), "trainable": trainable, "opt_state": opt_state, "rng": keys[2]}


def assert_trees_bit_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        a_bytes, e_bytes = (np.atleast_1d(np.asarray(x)).view(np.uint8) for x in (a, e))
        np.testing.assert_array_equal(a_bytes, e_bytes)


def test_round_trip_is_bit_identical_for_params_adam_state_step_and_rng(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(2, state)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        restored, _ = ckpt.restore(make_state(seed=1, steps=0))
    assert_trees_bit_identical(restored, state)


def test_extra_round_trips_as_the_json_given_at_save_time(tmp_path):
    extra = {"iterator": {"epoch": 1, "offset": 37, "shuffle_seed": 5}, "config": {"lr": 2e-4}}
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, make_state(), extra)
        extra["iterator"]["offset"] = 999  # the loop moves on while the save is in flight
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        _, restored_extra = ckpt.restore(make_state())
    assert restored_extra == {"iterator": {"epoch": 1, "offset": 37, "shuffle_seed": 5}, "config": {"lr": 2e-4}}


def test_none_leaves_of_frozen_params_restore_as_none(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, make_state())
        restored, _ = ckpt.restore(make_state())
    assert restored["trainable"]["layer"]["kernel"] is None
    assert restored["opt_state"][0].mu["layer"]["kernel"] is None


def test_saves_only_on_multiples_of_save_every_unless_forced(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=3, keep_last=10) as ckpt:
        started = [ckpt.save(step, state, force=(step == 7)) for step in range(1, 8)]
        ckpt.wait()
        assert started == [False, False, True, False, False, True, True]
        assert ckpt.all_steps() == [3, 6, 7]


def test_forcing_a_step_the_cadence_already_saved_is_a_no_op(tmp_path):
    with Checkpointer(tmp_path, save_every=2) as ckpt:
        assert ckpt.save(4, make_state())
        assert not ckpt.save(4, make_state(), force=True)


def test_keeps_only_the_last_k_checkpoints(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, state)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]


def test_fresh_directory_has_no_latest_step(tmp_path):
    with Checkpointer(tmp_path / "new", save_every=1) as ckpt:
        assert ckpt.latest_step() is None


def test_save_snapshots_the_arrays_so_the_next_step_may_donate_them(tmp_path):
    state = make_state()
    expected = jax.tree.map(np.array, state)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state)
        jax.tree.map(lambda x: x.delete(), state)  # what buffer donation does to the saved arrays
        ckpt.wait()
        restored, _ = ckpt.restore(make_state(seed=3))
    assert_trees_bit_identical(restored, expected)


def test_restore_target_with_other_leaves_names_the_differing_paths(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, make_state())
        target = make_state()
        target["trainable"]["layer"]["kernel"] = jnp.zeros((8, 8))
        with pytest.raises(JaxftError, match=r"not in the checkpoint: \['trainable/layer/kernel'\]"):
            ckpt.restore(target)


def test_restore_into_a_different_dtype_is_refused(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, make_state())
        target = make_state()
        target["trainable"]["layer"]["lora_b"] = target["trainable"]["layer"]["lora_b"].astype(jnp.float32)
        with pytest.raises(JaxftError, match=r"trainable/layer/lora_b: target float32\[4, 8\], checkpoint bfloat16"):
            ckpt.restore(target)


def test_restore_target_leaf_without_a_sharding_is_refused(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, make_state())
        target = make_state()
        target["rng"] = np.asarray(target["rng"])
        with pytest.raises(ValueError, match="rng: no sharding"):
            ckpt.restore(target)


def test_restore_from_an_empty_directory_says_there_is_no_checkpoint(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
            ckpt.restore(make_state())


def test_non_json_extra_is_refused_when_saving(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(TypeError, match="extra must be JSON-serializable"):
            ckpt.save(1, make_state(), {"iterator": object()})


# --- meshes --------------------------------------------------------------------------------------------------

def sharded_state(mesh: Mesh) -> dict:
    """Params and moments sharded over both mesh axes; step and rng replicated."""
    def spec(x):
        return P(*mesh.axis_names) if x.ndim == 2 else P()
    state = make_state()
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), state)


@pytest.fixture
def mesh_2x4():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


@pytest.fixture
def mesh_8x1():
    return Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("data", "fsdp"))


def test_restore_onto_another_mesh_gives_equal_values_with_the_requested_shardings(tmp_path, mesh_2x4, mesh_8x1):
    state = sharded_state(mesh_2x4)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state)
    def spec_8x1(x):  # shard whichever axis has 8 rows over all 8 devices
        return P() if x.ndim < 2 else P("data", None) if x.shape[0] == 8 else P(None, "data")
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh_8x1, spec_8x1(x))), state)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        restored, _ = ckpt.restore(targets)
    assert_trees_bit_identical(restored, state)
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(targets)):
        assert leaf.sharding == target.sharding


def test_restore_from_a_tree_of_bare_shardings_takes_shapes_and_dtypes_from_the_checkpoint(tmp_path, mesh_2x4):
    state = sharded_state(mesh_2x4)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state)
        restored, _ = ckpt.restore(jax.tree.map(lambda x: x.sharding, state))
    assert_trees_bit_identical(restored, state)


def test_host_offloaded_optimizer_state_restores_into_host_memory(tmp_path):
    host = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P(), memory_kind="pinned_host")
    state = {"opt_state": jax.device_put(jnp.arange(8.0), host)}
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state)
        restored, _ = ckpt.restore({"opt_state": host})
    assert restored["opt_state"].sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(restored["opt_state"], np.arange(8.0))


# --- resume --------------------------------------------------------------------------------------------------

class CountingIterator:
    """A resumable data iterator: batch i is a deterministic function of i."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return jax.random.normal(jax.random.PRNGKey(1000 + self.position), (4, 8))

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]


@jax.jit
def train_step(state, batch):
    rng, dropout_rng = jax.random.split(state["rng"])

    def loss_fn(trainable):
        keep = jax.random.bernoulli(dropout_rng, 0.8, batch.shape)
        hidden = jnp.where(keep, batch, 0.0) @ trainable["layer"]["lora_a"]
        return jnp.mean((hidden @ trainable["layer"]["lora_b"].astype(jnp.float32)) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["trainable"])
    updates, opt_state = OPT.update(grads, state["opt_state"], state["trainable"])
    new = {"step": state["step"] + 1, "trainable": optax.apply_updates(state["trainable"], updates),
           "opt_state": opt_state, "rng": rng}
    return new, loss


def run(state, data, ckpt, until):
    losses = []
    while int(state["step"]) < until:
        state, loss = train_step(state, next(data))
        losses.append(np.asarray(loss))
        if ckpt is not None:
            ckpt.save(int(state["step"]), state, {"iterator": data.get_state()})
    return losses


def test_resumed_run_reproduces_the_uninterrupted_losses_bit_for_bit(tmp_path):
    initial = make_state(steps=0)
    uninterrupted = run(initial, CountingIterator(), None, until=6)

    with Checkpointer(tmp_path, save_every=3) as ckpt:
        first_half = run(initial, CountingIterator(), ckpt, until=4)  # "killed" after step 4; last save is 3
    with Checkpointer(tmp_path, save_every=3) as ckpt:
        state, extra = ckpt.restore(make_state(seed=9, steps=0))
        data = CountingIterator()
        data.set_state(extra["iterator"])
        second_half = run(state, data, ckpt, until=6)
    np.testing.assert_array_equal(first_half[:3] + second_half, uninterrupted)


# --- atomicity -----------------------------------------------------------------------------------------------

KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import jax.numpy as jnp, numpy as np
    from jaxft.train.checkpoint import Checkpointer

    directory = Path(sys.argv[1])
    weights = np.random.default_rng(0).standard_normal(16 * 2**20, dtype=np.float32)  # 64 MiB: a slow write
    ckpt = Checkpointer(directory, save_every=1)
    ckpt.save(1, {"w": jnp.asarray(weights)}, {"step": 1})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.asarray(weights + 1)}, {"step": 2})
    deadline = time.monotonic() + 30
    while not any(p.name.startswith("2.") for p in directory.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.001)  # the async write of step 2 has started once its temporary directory exists
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.fixture(scope="module")
def killed_mid_save(tmp_path_factory) -> Path:
    """A checkpoint directory whose writer was SIGKILLed during the async save of step 2."""
    directory = tmp_path_factory.mktemp("killed")
    repo_root = Path(checkpoint.__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(directory)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    return directory


def test_sigkill_mid_save_leaves_an_unlisted_partial_and_the_previous_step_latest(killed_mid_save):
    assert any(p.name.startswith("2.") for p in killed_mid_save.iterdir())  # the save really was interrupted
    with Checkpointer(killed_mid_save, save_every=1) as ckpt:
        assert ckpt.all_steps() == [1]


def test_sigkill_mid_save_leaves_the_previous_step_loadable(killed_mid_save):
    target = {"w": jax.ShapeDtypeStruct((16 * 2**20,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    with Checkpointer(killed_mid_save, save_every=1) as ckpt:
        state, extra = ckpt.restore(target)
    weights = np.random.default_rng(0).standard_normal(16 * 2**20, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(state["w"]), weights)
    assert extra == {"step": 1}


def test_run_resumed_after_an_interrupted_save_can_save_that_step_again(killed_mid_save, tmp_path):
    directory = shutil.copytree(killed_mid_save, tmp_path / "ckpt")
    with Checkpointer(directory, save_every=1) as ckpt:
        assert ckpt.save(2, {"w": jnp.zeros((4,))}, {"step": 2})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]


# --- frozen base ---------------------------------------------------------------------------------------------

@pytest.fixture
def base_dir(tmp_path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"embed": np.zeros((4, 8), np.float32)}, str(base / "model-00001-of-00002.safetensors"))
    save_file({"lm_head": np.zeros((8, 4), np.float32)}, str(base / "model-00002-of-00002.safetensors"))
    return base


def test_unchanged_base_passes_the_check(base_dir):
    check_base(base_reference(base_dir))


def test_base_reference_records_the_absolute_path_and_a_sha256(base_dir):
    reference = base_reference(base_dir)
    assert reference["path"] == str(base_dir.resolve())
    assert len(reference["sha256"]) == 64


def test_replaced_safetensors_file_is_named_in_the_base_changed_error(base_dir):
    reference = base_reference(base_dir)
    save_file({"lm_head": np.zeros((8, 5), np.float32)}, str(base_dir / "model-00002-of-00002.safetensors"))
    with pytest.raises(BaseModelChanged, match=r"changed files \['model-00002-of-00002.safetensors'\]"):
        check_base(reference)


def test_edited_config_is_a_changed_base(base_dir):
    reference = base_reference(base_dir)
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    with pytest.raises(BaseModelChanged, match=r"changed files \['config.json'\]"):
        check_base(reference)


def test_missing_shard_is_a_changed_base(base_dir):
    reference = base_reference(base_dir)
    (base_dir / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(BaseModelChanged, match=r"missing \['model-00001-of-00002.safetensors'\]"):
        check_base(reference)


def test_weights_changed_in_place_under_the_same_config_and_header_are_a_changed_base(base_dir):
    reference = base_reference(base_dir)
    shard = base_dir / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    data[header_end:header_end + 4] = np.float32(1.0).tobytes()  # embed[0, 0]: 0 -> 1; names, shapes, offsets kept
    shard.write_bytes(data)
    with pytest.raises(BaseModelChanged, match=r"changed files \['model-00001-of-00002.safetensors'\]"):
        check_base(reference)


def test_the_fingerprint_is_the_sha256_of_each_files_bytes(base_dir):
    files = base_reference(base_dir)["files"]
    assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(base_dir.iterdir())}


def _header_reference(base_dir: Path) -> dict:
    """A base reference as checkpoints written before byte hashing recorded it: sha256 of config.json, and per
    safetensors file the sha256 of its size (u64 LE), header length field and JSON header."""
    files = {"config.json": hashlib.sha256((base_dir / "config.json").read_bytes()).hexdigest()}
    for path in sorted(base_dir.glob("*.safetensors")):
        raw = path.read_bytes()
        prefix = raw[:8]
        header = raw[8:8 + struct.unpack("<Q", prefix)[0]]
        files[path.name] = hashlib.sha256(struct.pack("<Q", len(raw)) + prefix + header).hexdigest()
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(base_dir.resolve()), "sha256": combined, "files": files}


def test_a_reference_from_before_byte_hashing_still_resumes_with_a_warning_and_still_checks_headers(base_dir):
    reference = _header_reference(base_dir)
    with pytest.warns(UserWarning, match="predates hashing the weights"):
        check_base(reference)
    save_file({"lm_head": np.zeros((8, 5), np.float32)}, str(base_dir / "model-00002-of-00002.safetensors"))
    with pytest.warns(UserWarning), pytest.raises(BaseModelChanged, match="model-00002-of-00002.safetensors"):
        check_base(reference)


def test_unretrieved_write_errors_of_a_save_are_not_logged_twice(tmp_path):
    """After a failed save, asyncio logs each write task's unretrieved error; tensorstore sets some of them on their
    futures from C, without a traceback. Those naming a checkpoint folder are dropped (the caller gets the error once
    as CheckpointSaveError); any other unretrieved error is still logged."""
    with Checkpointer(tmp_path / "checkpoints"):
        pass
    asyncio_log = logging.getLogger("asyncio")

    def logged(error: Exception) -> bool:
        record = asyncio_log.makeRecord("asyncio", logging.ERROR, __file__, 1, "Future exception was never retrieved",
                                        (), (type(error), error, None))
        return asyncio_log.filter(record)

    save_error = ValueError(f'Error writing "x" at local file "{tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"}"')
    assert not logged(save_error)
    assert logged(ValueError(f'Error writing "x" at local file "{tmp_path / "elsewhere"}"'))
