"""Training checkpoints written before the method registry (jaxft b4e718f, tests/data/old_checkpoints) restore into
today's state, whose LoRA and trainable-token leaves moved under their method's namespace, and training goes on
as the old code went on."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from jaxft.hf.safetensors_io import CheckpointError
from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config
from jaxft.train.checkpoint import Checkpointer

OLD = Path(__file__).parent / "data" / "old_checkpoints"
RUNS = ("dora", "embedding")
# The oracle, written out leaf by leaf: each old trained leaf name and the path it has today.
TODAY = {"lora_a": ("lora", "a"), "lora_b": ("lora", "b"), "lora_magnitude": ("lora", "magnitude"),
         "lora_embedding_a": ("lora", "a"), "lora_embedding_b": ("lora", "b"),
         "trainable_rows": ("trainable_tokens", "rows")}


def _saved_arrays(run: str) -> dict[tuple, np.ndarray]:
    """The step-2 state as the old code wrote it, read with orbax alone: old path -> array."""
    state = ocp.StandardCheckpointer().restore((OLD / run / "checkpoints" / "2" / "state").resolve())
    return {path: np.asarray(x) for path, x in traverse_util.flatten_dict(state).items()}


def _today(path: tuple) -> tuple:
    return (*path[:-1], *TODAY.get(path[-1], (path[-1],)))


def _target(paths) -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return traverse_util.unflatten_dict({path: device for path in paths})


def test_the_old_checkpoints_hold_every_renamed_leaf_and_the_whole_trained_leaves():
    names = {path[-1] for run in RUNS for path in _saved_arrays(run)}
    assert set(TODAY) <= names
    assert {"bias", "kernel"} <= names  # bias="all" and modules_to_save=[lm_head]: paths unchanged
    # the old params' "trainable" marker dict held only None values: an empty subtree, never saved
    assert not [path for run in RUNS for path in _saved_arrays(run) if "trainable" in path[1:]]


@pytest.mark.parametrize("run", RUNS)
def test_an_old_checkpoint_restores_into_todays_paths_with_the_saved_values(run, tmp_path):
    saved = _saved_arrays(run)
    shutil.copytree(OLD / run / "checkpoints", tmp_path / "checkpoints")
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpoints:
        state, _ = checkpoints.restore(_target(map(_today, saved)))
    restored = traverse_util.flatten_dict(state)
    assert set(restored) == set(map(_today, saved))
    for path, array in saved.items():
        np.testing.assert_array_equal(np.asarray(restored[_today(path)]), array, err_msg="/".join(path))


def test_a_mismatch_the_renaming_does_not_explain_names_the_paths(tmp_path):
    paths = set(map(_today, _saved_arrays("dora")))
    paths.remove(("trainable", "layers", "q_proj", "lora", "magnitude"))
    paths.add(("trainable", "layers", "q_proj", "lora", "gate"))
    shutil.copytree(OLD / "dora" / "checkpoints", tmp_path / "checkpoints")
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpoints:
        with pytest.raises(CheckpointError) as err:
            checkpoints.restore(_target(paths))
    message = str(err.value)
    assert "target leaves not in the checkpoint: ['trainable/layers/q_proj/lora/gate']" in message
    assert "checkpoint leaves not in the target: ['trainable/layers/q_proj/lora_magnitude']" in message


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


@pytest.mark.parametrize("run", RUNS)
def test_resuming_an_old_run_trains_its_last_step_as_the_old_code_did(run, tmp_path, monkeypatch):
    """The old run went on to step 3 and exported; its step-3 checkpoint was removed, so today's code resumes from
    step 2: its step-3 loss and export match the old code's."""
    shutil.copytree(OLD, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # the run's config.yaml names its base, data and output_dir relative to the folder
    sft.run(load_run_config(f"{run}/config.yaml"), resume=True)
    assert sorted(_losses(tmp_path / run)) == [1, 2, 3]
    np.testing.assert_allclose(_losses(tmp_path / run)[3], _losses(OLD / run)[3], rtol=1e-5)
    old_export = load_file(OLD / run / "adapter" / "adapter_model.safetensors")
    new_export = load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")
    assert set(new_export) == set(old_export)
    for name, tensor in old_export.items():
        np.testing.assert_allclose(new_export[name], tensor, rtol=1e-5, atol=1e-6, err_msg=name)
