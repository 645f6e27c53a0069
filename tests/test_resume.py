"""Resuming ``sft.run`` from its checkpoints continues the uninterrupted run: on another mesh within float
tolerance, and after a SIGKILL on the same mesh exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxft.config import from_dict
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig, dump_run_config
from sft_worker import make_base, run_config, train_losses, write_chats

pytestmark = pytest.mark.slow
STEPS = 6
WORKER = Path(__file__).with_name("sft_worker.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return tmp, make_base(tmp / "base"), write_chats(tmp / "train.jsonl", 48)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """LoRA on a (2, 4, 1) mesh, checkpoints every 2 steps; (run folder, step -> loss)."""
    tmp, base, data = setup
    sft.run(run_config(base, data, tmp / "uninterrupted", mesh=(2, 4, 1), steps=STEPS, save_every=2))
    return tmp / "uninterrupted", train_losses(tmp / "uninterrupted")


def _new_losses(run_dir: Path, skip_lines: int) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[skip_lines:]
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def test_uninterrupted_run_trains_and_checkpoints_every_2_steps(uninterrupted):
    run_dir, losses = uninterrupted
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_resume_on_an_8x1x1_mesh_from_a_2x4x1_checkpoint_matches_within_1e_5(setup, uninterrupted):
    tmp, base, data = setup
    run_dir = tmp / "other-mesh"
    shutil.copytree(uninterrupted[0], run_dir)
    for step in (4, 6):  # as if the run had stopped after saving step 2
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    logged = len((run_dir / "metrics.jsonl").read_text().splitlines())
    sft.run(run_config(base, data, run_dir, mesh=(8, 1, 1), steps=STEPS, save_every=2), resume=True)
    resumed = _new_losses(run_dir, logged)
    assert sorted(resumed) == [3, 4, 5, 6]
    print("max |loss diff| after resuming on (8, 1, 1):",
          max(abs(resumed[s] - uninterrupted[1][s]) for s in resumed))
    np.testing.assert_allclose([resumed[s] for s in resumed], [uninterrupted[1][s] for s in resumed],
                               atol=1e-5, rtol=0)


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps in a metrics file another process is appending to (a half-written last line is skipped)."""
    path, steps = run_dir / "metrics.jsonl", []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps


def _complete_checkpoints(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def test_kill_9_mid_run_then_resume_gives_exactly_the_uninterrupted_losses(setup, uninterrupted):
    tmp, base, data = setup
    run_dir, work = tmp / "killed", tmp / "killed-worker"
    work.mkdir()
    cfg = run_config(base, data, run_dir, mesh=(2, 4, 1), steps=STEPS, save_every=2)
    dump_run_config(cfg, work / "config.yaml")
    (work / "spec.json").write_text(json.dumps({"config": str(work / "config.yaml"), "pace_s": 0.5}))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    log = open(work / "output.txt", "w")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(work / "spec.json")], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 180
    try:
        while not (_complete_checkpoints(run_dir) and max(_logged_steps(run_dir), default=0) > 2):
            assert proc.poll() is None, ("the worker ended before it could be killed:\n"
                                         + (work / "output.txt").read_text()[-4000:])
            assert time.monotonic() < deadline, "the worker made no checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    saved, logged = _complete_checkpoints(run_dir)[-1], max(_logged_steps(run_dir))
    assert 2 <= saved < logged < STEPS  # killed after a checkpoint, with steps since then lost
    print(f"killed after step {logged}; resuming from checkpoint {saved}")

    lines = len((run_dir / "metrics.jsonl").read_text().splitlines())
    sft.run(cfg, resume=True)
    assert sorted(_new_losses(run_dir, lines)) == list(range(saved + 1, STEPS + 1))
    losses, reference = train_losses(run_dir), uninterrupted[1]  # the resumed run's records replace the killed one's
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


PEFT_METHODS = {"ia3": {"type": "ia3"}, "ln_tuning": {"type": "ln_tuning"},
                "loha": {"type": "loha", "r": 2, "alpha": 4, "target_modules": ["q_proj", "down_proj"]},
                "lokr": {"type": "lokr", "r": 2, "alpha": 4, "decompose_both": True, "target_modules": ["v_proj"]},
                "bitfit": {"type": "bitfit"}}


@pytest.fixture(scope="module")
def qwen2_setup(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, for BitFit) and a few chats."""
    tmp = tmp_path_factory.mktemp("resume-methods")
    return tmp, make_base(tmp / "base", model_type="qwen2", qkv_bias=True), write_chats(tmp / "train.jsonl", 16)


def _exported(summary: dict) -> dict[str, np.ndarray]:
    return {name: array for path in sorted(Path(summary["export"]).glob("*.safetensors"))
            for name, array in load_file(path).items()}


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_2_steps_and_a_resumed_2_equal_4_straight_for_each_method(qwen2_setup, method):
    tmp, base, data = qwen2_setup
    run_dir = tmp / method
    cfg = from_dict(RunConfig, {
        "model": str(base), "output_dir": str(run_dir), "peft": [PEFT_METHODS[method]],
        "data": {"paths": [str(data)], "max_length": 32, "batch_size": 8, "seed": 0},
        "optim": {"lr": 0.01, "max_grad_norm": 1.0},
        "train": {"steps": 4, "save_every": 2, "log_every": 1, "loss_chunk_size": 0}})
    straight = sft.run(cfg)
    losses, params = train_losses(run_dir), _exported(straight)
    shutil.rmtree(run_dir / "checkpoints" / "4")  # as if the run had stopped after saving step 2
    logged = len((run_dir / "metrics.jsonl").read_text().splitlines())
    resumed = sft.run(cfg, resume=True)
    new = _new_losses(run_dir, logged)
    assert sorted(new) == [3, 4] and [new[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]
    again = _exported(resumed)
    assert sorted(again) == sorted(params) and params
    for name, array in params.items():
        np.testing.assert_array_equal(again[name], array, err_msg=name)
