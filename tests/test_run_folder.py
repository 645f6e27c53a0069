"""Run folders (#13 section 3): nothing is written before every input has passed, ``--overwrite`` replaces a run
whole, ``--resume`` refuses config changes that alter what is trained and leaves a finished run untouched (a
larger ``train.steps`` continues it), and a checkpoint that cannot be written ends the run with one paragraph,
after which ``--resume`` continues from the last complete checkpoint."""
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxft.cli import main
from jaxft.train.checkpoint import Checkpointer
from sft_worker import train_losses

pytestmark = pytest.mark.slow


def _snapshot(folder: Path) -> dict:
    """Every path under ``folder``: a file's sha256 or "dir", and its mtime. Equal snapshots mean nothing was
    written, replaced or created there (a file made and removed again still moves its folder's mtime)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         p.stat().st_mtime_ns) for p in sorted([folder, *folder.rglob("*")])}


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"jaxft {argv[0]}: error:")
    return err


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The tiny 3-step LoRA run (r=2 on q/v), a checkpoint after every step; finished."""
    run = tiny_run / "trained"
    assert main(["train", str(tiny_run / "run.yaml"), "--set", "train.save_every=1", "--set", f"output_dir={run}"]) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the finished run to change (its config.yaml still names the original output_dir)."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_a_run_refused_by_validation_leaves_no_folder_and_the_fixed_rerun_needs_no_flag(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    err = _error(["train", str(tiny_run / "run.yaml"), "--set", "data.batch_size=3", "--set", f"output_dir={run}"],
                 capsys)
    assert "do not split over the mesh" in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no temporary folder beside it
    assert main(["train", str(tiny_run / "run.yaml"), "--set", "train.steps=1", "--set", f"output_dir={run}"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


def test_overwrite_replaces_the_previous_run_whole(tiny_run, run_copy):
    (run_copy / "notes.txt").write_text("from the old run")
    started = time.time_ns()
    assert main(["train", str(tiny_run / "run.yaml"), "--overwrite", "--set", f"output_dir={run_copy}", "--set",
                 "train.steps=2", "--set", "train.save_every=1", "--set", "lora.r=4", "--set", "lora.lora_alpha=8"]) == 0
    assert not (run_copy / "notes.txt").exists()
    with Checkpointer(run_copy / "checkpoints", read_only=True) as checkpoints:
        assert checkpoints.all_steps() == [1, 2]  # the old run's step 3 is gone
    assert min(p.stat().st_mtime_ns for p in (run_copy / "checkpoints").rglob("*")) >= started  # all new saves
    assert [(r["split"], r["step"]) for r in _records(run_copy)] == [("train", 1), ("train", 2)]
    assert json.loads((run_copy / "adapter" / "adapter_config.json").read_text())["r"] == 4
    kernels = load_file(run_copy / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for name, t in kernels.items() if "lora_A" in name} == {4}


def test_overwrite_refused_by_validation_leaves_the_previous_run_as_it_was(tiny_run, run_copy, tmp_path, capsys):
    before = _snapshot(run_copy)
    err = _error(["train", str(tiny_run / "run.yaml"), "--overwrite", "--set", f"output_dir={run_copy}", "--set",
                  f"data.paths=[{tmp_path / 'missing.jsonl'}]"], capsys)
    assert "missing.jsonl: missing file" in err
    assert _snapshot(run_copy) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_resume_of_a_finished_run_says_so_exits_0_and_changes_no_byte_or_mtime(run_copy, capsys):
    before = _snapshot(run_copy)
    assert main(["train", str(run_copy / "config.yaml"), "--resume", "--set", f"output_dir={run_copy}"]) == 0
    out, err = capsys.readouterr()
    assert "this run is finished" in err and "--resume --set train.steps=6" in err
    assert json.loads(out) == json.loads((run_copy / "summary.json").read_text())
    assert _snapshot(run_copy) == before


def test_resume_with_more_steps_continues_as_one_longer_run_and_records_the_change(tiny_run, trained, run_copy,
                                                                                   tmp_path):
    assert main(["train", str(run_copy / "config.yaml"), "--resume", "--set", f"output_dir={run_copy}",
                 "--set", "train.steps=5"]) == 0
    straight = tmp_path / "straight"  # the oracle: the same config trained for 5 steps in one go
    assert main(["train", str(tiny_run / "run.yaml"), "--set", "train.save_every=1", "--set", "train.steps=5",
                 "--set", f"output_dir={straight}"]) == 0
    assert train_losses(run_copy) == train_losses(straight) and sorted(train_losses(run_copy)) == [1, 2, 3, 4, 5]
    resumes = [r for r in _records(run_copy) if r["split"] == "resume"]
    assert resumes == [{"step": 3, "split": "resume",
                        "changes": {"output_dir": [str(trained), str(run_copy)], "train.steps": [3, 5]}}]
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["steps"] == 5
    assert json.loads((run_copy / "summary.json").read_text())["steps"] == 5
    resumed = load_file(run_copy / "adapter" / "adapter_model.safetensors")
    reference = load_file(straight / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert (resumed[name] == reference[name]).all(), name


@pytest.mark.parametrize("sets, says", [
    (["lora.r=8", "optim.lr=0.01", "train.seed=3", "data.max_length=16"],
     ["lora.r: 2 -> 8", "optim.lr: 0.0002 -> 0.01", "train.seed: 0 -> 3", "data.max_length: 32 -> 16"]),
    (["train.steps=2"], ["train.steps 2 is below the step this run has reached, checkpoint 3"]),
])
def test_resume_that_would_change_what_is_trained_is_refused_naming_every_key(run_copy, capsys, sets, says):
    before = _snapshot(run_copy)
    argv = ["train", str(run_copy / "config.yaml"), "--resume", "--set", f"output_dir={run_copy}"]
    err = _error(argv + [arg for s in sets for arg in ("--set", s)], capsys)
    for fragment in says:
        assert fragment in err
    assert "output_dir:" not in err  # a moved run folder is no reason to refuse
    assert _snapshot(run_copy) == before


def test_resume_onto_a_base_whose_weights_changed_under_the_same_headers_is_refused(tiny_run, run_copy, tmp_path,
                                                                                     capsys):
    base = Path(shutil.copytree(tiny_run / "model", tmp_path / "base"))
    weights = bytearray((base / "model.safetensors").read_bytes())
    header_end = 8 + struct.unpack("<Q", weights[:8])[0]
    weights[-4:] = (np.frombuffer(weights[-4:], np.float32) + 1).tobytes()  # the last weight, edited in place
    (base / "model.safetensors").write_bytes(weights)
    assert header_end < len(weights) - 4  # the header (names, dtypes, shapes, offsets) is as it was
    before = _snapshot(run_copy)
    err = _error(["train", str(run_copy / "config.yaml"), "--resume", "--set", f"output_dir={run_copy}", "--set",
                  f"model={base}", "--set", "train.steps=4"], capsys)
    assert "is not the one these adapters were trained on" in err and "changed files ['model.safetensors']" in err
    assert _snapshot(run_copy) == before


def _cli_with_file_size_limit(limit: int, *argv: str) -> list[str]:
    """The jaxft command line in a process whose writes past ``limit`` bytes of a file fail with EFBIG, as on a full
    disk: a real kernel error that stops root too (permission bits do not)."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); from jaxft.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, *argv]


def test_failed_checkpoint_save_ends_the_run_with_one_paragraph_and_resume_continues(tiny_run, tmp_path):
    run, limit = tmp_path / "run", 32 * 1024
    assert main(["train", str(tiny_run / "run.yaml"), "--set", f"output_dir={run}", "--set", "train.steps=2",
                 "--set", "train.save_every=2", "--set", "lora.r=16", "--set", "lora.target_modules=all-linear"]) == 0
    sizes = {p.name: p.stat().st_size for p in run.rglob("*") if p.is_file()}
    assert max(sizes.values()) > 2 * limit > 8 * max(sizes["metrics.jsonl"], sizes["config.yaml"])  # only saves fail

    failed = subprocess.run(_cli_with_file_size_limit(limit, "train", str(run / "config.yaml"), "--resume", "--set",
                                                      "train.steps=6"), capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and "ERROR:" not in failed.stderr  # orbax's own reports are dropped
    paragraph = failed.stderr[failed.stderr.index("jaxft train: error:"):].splitlines()
    assert paragraph[0].startswith(f"jaxft train: error: could not save checkpoint step 4 to {run}/checkpoints/4: ")
    assert "File too large" in paragraph[0] and "The last complete checkpoint is step 2" in paragraph[0]
    assert paragraph[1] == "(run with --debug for the full traceback)"

    assert main(["train", str(run / "config.yaml"), "--resume"]) == 0
    with Checkpointer(run / "checkpoints", read_only=True) as checkpoints:
        assert checkpoints.all_steps()[-1] == 6
    records = _records(run)
    starts = [i for i, r in enumerate(records) if r["split"] == "resume"]
    assert [records[i]["changes"] for i in starts] == [{"train.steps": [2, 6]}, {}]
    failed_run = [(r["step"], r["loss"]) for r in records[starts[0] + 1:starts[1]] if r["split"] == "train"]
    resumed_run = [(r["step"], r["loss"]) for r in records[starts[1] + 1:] if r["split"] == "train"]
    assert [s for s, _ in resumed_run] == [3, 4, 5, 6]  # from checkpoint 2, the last complete one
    assert resumed_run == failed_run  # the same steps from the same checkpoint give the same losses
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_a_resume_that_stopped_before_its_export_is_not_taken_for_finished(run_copy, tmp_path, capsys):
    """Resumed from 3 to 5 steps, the run saved checkpoint 5 and was killed before its export: summary.json is still
    the 3-step run's. A second --resume finishes it (export and summary of 5 steps) instead of reporting it done."""
    three_step_summary = (run_copy / "summary.json").read_text()
    argv = ["train", str(run_copy / "config.yaml"), "--resume", "--set", f"output_dir={run_copy}"]
    assert main(argv + ["--set", "train.steps=5"]) == 0
    exported = load_file(run_copy / "adapter" / "adapter_model.safetensors")
    (run_copy / "summary.json").write_text(three_step_summary)   # as the killed run left it
    shutil.rmtree(run_copy / "adapter")
    capsys.readouterr()
    assert main(argv + ["--set", "train.max_skipped_steps=50"]) == 0   # a guard setting may change on resume
    assert "this run is finished" not in capsys.readouterr().err
    assert json.loads((run_copy / "summary.json").read_text())["steps"] == 5
    again = load_file(run_copy / "adapter" / "adapter_model.safetensors")
    assert all((again[name] == exported[name]).all() for name in exported)
