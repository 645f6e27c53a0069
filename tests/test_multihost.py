"""Two processes on 127.0.0.1 (CPU collectives over gloo) train, save and resume like one process.

Each process loads its own shard of the data records (``shard_indices``); with one unpacked batch per epoch, every
global batch holds all records, so the one-process run sees the same global batches and the losses must agree,
although the two processes hold different numbers of target tokens.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_oracle import greedy_tokens, held_out_chats, peft_greedy_replies
from jaxft.recipes import sft
from jaxft.recipes.config import dump_run_config
from jaxft.train.metrics import read_samples
from process_pair import free_port
from sft_worker import make_base, run_config, train_losses, write_chats

pytestmark = pytest.mark.slow
N_RECORDS = 8
WORKER = Path(__file__).with_name("sft_worker.py")
TIMEOUT_S = 240
SAMPLES, SAMPLE_TOKENS = 3, 8  # sample replies per sampled step, and their new tokens


def _two_processes(cfg, work: Path, resume: bool) -> list[dict]:
    """Runs ``cfg`` as a 2-process job (2 CPU devices each); returns each process's result."""
    work.mkdir(parents=True)
    dump_run_config(cfg, work / "config.yaml")
    (work / "spec.json").write_text(json.dumps({"config": str(work / "config.yaml"), "resume": resume}))
    port = free_port()
    procs = []
    for i in range(2):
        # the compilation cache lets the resuming job reuse the first job's executables (time only)
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COMPILATION_CACHE_DIR": str(work.parent / "jax-cache"),
               "JAXFT_COORDINATOR": f"127.0.0.1:{port}", "JAXFT_NUM_PROCESSES": "2", "JAXFT_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(work / "spec.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
    return [json.loads((work / f"result-{i}.json").read_text()) for i in range(2)]


def _sampling(cfg):
    """``cfg`` with its training chats as eval data and 3 sample replies every 3 steps."""
    train = dataclasses.replace(cfg.train, sample_every=3, sample_prompts=SAMPLES, sample_max_new_tokens=SAMPLE_TOKENS)
    return cfg.replace(eval_data=cfg.data, train=train)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    base = make_base(tmp / "base")
    data = write_chats(tmp / "train.jsonl", N_RECORDS)
    # LoRA on an fsdp-only mesh: A matrices shard their embed dim, B matrices their output dim (through the
    # rules table's fallback), so the adapters and their optimizer state split across the processes
    common = dict(method="lora", packing=False, mesh=(1, -1, 1), lr=3e-3)
    one = sft.run(_sampling(run_config(base, data, tmp / "one", batch_size=N_RECORDS, steps=6, **common)))
    run_dir = tmp / "two"
    first = _two_processes(_sampling(run_config(base, data, run_dir, batch_size=N_RECORDS // 2, steps=3, **common)),
                           tmp / "first", resume=False)
    resumed = _two_processes(_sampling(run_config(base, data, run_dir, batch_size=N_RECORDS // 2, steps=6,
                                                  **common)), tmp / "resumed", resume=True)
    return {"one": tmp / "one", "two": run_dir, "first": first, "resumed": resumed, "one_summary": one,
            "base": base, "data": data}


def test_processes_hold_uneven_target_tokens(runs):
    per_process = [r["targets"][0] for r in runs["first"]]
    assert per_process[0] != per_process[1]
    assert all(r["targets"] == [r["targets"][0]] * len(r["targets"]) for r in runs["first"] + runs["resumed"])


def test_two_process_losses_equal_one_process_across_save_and_resume(runs):
    one, two = train_losses(runs["one"]), train_losses(runs["two"])
    assert sorted(two) == sorted(one) == list(range(1, 7))
    print("max |loss diff| 2 processes vs 1:", max(abs(two[s] - one[s]) for s in one), "losses:", one)
    np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)], atol=1e-5, rtol=0)
    assert one[6] < one[1] - 0.1  # it trains
    assert all(r["final_loss"] == pytest.approx(two[6], abs=1e-6) for r in runs["resumed"])


def test_both_processes_resumed_from_the_shared_checkpoint(runs):
    assert sorted(int(p.name) for p in (runs["two"] / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert all(r["restore_bytes_read"] is not None for r in runs["resumed"])
    assert all(r["restore_bytes_read"] is None for r in runs["first"])


def test_each_process_reads_at_most_60_percent_of_the_checkpoint(runs):
    step_dir = runs["two"] / "checkpoints" / "3"
    total = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    fractions = [r["restore_bytes_read"] / total for r in runs["resumed"]]
    print(f"checkpoint {total} bytes; fraction read per process: {fractions}")
    assert all(0.3 < f <= 0.6 for f in fractions), fractions


def test_two_processes_sample_their_exported_adapters_greedy_replies_once_per_step_across_a_resume(runs):
    """The sampler's collective call and process 0's log across processes and a resume: the replies at the last step
    are transformers + PEFT's greedy replies with the adapter the two processes exported, which differ from the
    base's own, so a sampler that ignored the trained params would fail."""
    one, two = (read_samples(runs[name] / "samples.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in two] == [3] * 3 + [6] * 3  # process 0 alone writes, the resume adds step 6
    assert two == one
    held_out = held_out_chats(runs["base"], runs["data"], SAMPLES)
    assert [r["prompt"] for r in two[-SAMPLES:]] == [text for _, text, _ in held_out]
    prompts = [ids for ids, _, _ in held_out]

    def greedy(model, ids):
        return greedy_tokens(model, ids, SAMPLE_TOKENS)

    adapter = peft_greedy_replies(runs["base"], runs["two"] / "adapter", prompts, greedy)
    assert [r["reply"] for r in two[-SAMPLES:]] == adapter
    assert adapter != peft_greedy_replies(runs["base"], None, prompts, greedy)
