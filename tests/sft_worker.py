"""A tiny SFT setup for end-to-end engine tests, and a worker that runs ``sft.run`` in its own process.

As a script: ``python tests/sft_worker.py SPEC.json``, where the spec names a run config YAML and says whether
to resume, whether to join a multi-process run (``JAXFT_COORDINATOR`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID`` in
the environment), and how long to pause after each step (so a parent can kill it mid-run). It writes
``result-<process>.json`` next to the spec: this process's target tokens per step and the bytes it read while
restoring the checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIGITS = [(3, 1, 4), (1, 5, 9, 2, 6), (5, 3), (5, 8, 9, 7, 9, 3, 2), (3, 8), (4, 6, 2, 6, 4), (3, 3, 8, 3),
          (2, 7, 9, 5, 0, 2, 8, 8)]


def make_base(folder: Path, **overrides) -> Path:
    """A random tiny Llama (or the family and fields ``overrides`` give ModelConfig) saved as a HF folder with the
    demo's word-level tokenizer."""
    import jax

    from jaxft.config import ModelConfig
    from jaxft.hf.checkpoint import save_pretrained
    from jaxft.hf.tokenizer import load_tokenizer
    from jaxft.models.llama import init_params
    from jaxft.recipes import demo

    tok_dir = folder.with_name(folder.name + ".tokenizer")
    tok_dir.mkdir(parents=True)
    demo.build_tokenizer(tok_dir, [f"reverse {demo.words(p)} = {demo.words(p[::-1])} ." for p in DIGITS])
    vocab = len(load_tokenizer(tok_dir))
    cfg = ModelConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      bos_token_id=None, eos_token_ids=(demo.SPECIAL.index("<|im_end|>"),), pad_token_id=0,
                      **overrides)
    save_pretrained(cfg, init_params(cfg, jax.random.PRNGKey(0)), folder)
    for f in tok_dir.iterdir():
        f.rename(folder / f.name)
    tok_dir.rmdir()
    return folder


def tiny_chat_model(root: Path) -> Path:
    """A random 2-layer, 32-wide Llama with the demo's word-level tokenizer, saved as ``root/model``, and 10 demo
    chats in ``root/train.jsonl``: the smallest model the CLI, sweep and eval tests can train end to end."""
    import jax

    import jaxft
    from jaxft.recipes import demo

    model, tok_dir = root / "model", root / "tokenizer"
    tok_dir.mkdir()
    demo.build_tokenizer(tok_dir, ["increment 1 2 3 4 = 2 3 4 5 ."])
    cfg = jaxft.ModelConfig(vocab_size=len(jaxft.load_tokenizer(tok_dir)), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    jaxft.save_pretrained(cfg, jaxft.init_params(cfg, jax.random.PRNGKey(0)), model)
    for f in tok_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    demo.write_jsonl(root / "train.jsonl", [demo.chat((i, 2, 3, 4)) for i in range(10)])
    return model


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` list-reversal chats of 1 to 8 digits, so rows (and target counts) differ in length."""
    from jaxft.recipes import demo

    rng = np.random.default_rng(seed)
    rows = [tuple(int(d) for d in rng.integers(0, 10, rng.integers(1, 9))) for _ in range(n)]
    demo.write_jsonl(path, [demo.chat(p) for p in rows])
    return path


def run_config(base: Path, data: Path, out: Path, *, method="lora", batch_size=8, packing=True, mesh=(-1, 1, 1),
               steps=6, save_every=0, lr=1e-2):
    from jaxft.data.config import DataConfig
    from jaxft.parallel import MeshConfig
    from jaxft.peft.lora import LoraConfig
    from jaxft.recipes.config import RunConfig, TrainConfig
    from jaxft.train.optim import OptimConfig

    return RunConfig(
        model=str(base), output_dir=str(out), method=method,
        data=DataConfig(paths=(str(data),), max_length=48, batch_size=batch_size, packing=packing, seed=0),
        lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        optim=OptimConfig(lr=lr, max_grad_norm=1.0), mesh=MeshConfig(*mesh),
        train=TrainConfig(steps=steps, save_every=save_every, log_every=1, loss_chunk_size=0))


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from ``metrics.jsonl``; a resumed run's record of a step replaces the killed run's."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    from jaxft import parallel

    if "JAXFT_COORDINATOR" in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        parallel.initialize_distributed()
    from jaxft.recipes import sft
    from jaxft.recipes.config import load_run_config
    from jaxft.train.checkpoint import Checkpointer

    result = {"targets": [], "restore_bytes_read": None}
    make_source = sft.next_batches

    def counted_source(cfg, inputs):
        source = make_source(cfg, inputs)

        def next_and_count(state):
            batches = source(state)
            local = sum(int(np.sum(s.data != -100)) for s in batches["labels"].addressable_shards)
            result["targets"].append(local)  # summed over local devices, each holding its own rows
            time.sleep(spec.get("pace_s", 0))
            return batches

        return next_and_count

    restore = Checkpointer.restore

    def measured_restore(self, *args, **kwargs):
        before = _rchar()
        out = restore(self, *args, **kwargs)
        result["restore_bytes_read"] = _rchar() - before
        return out

    sft.next_batches = counted_source
    Checkpointer.restore = measured_restore
    summary = sft.run(load_run_config(spec["config"]), resume=spec.get("resume", False))
    result["final_loss"] = summary["final_loss"]
    out = Path(spec_path).with_name(f"result-{jax.process_index()}.json")
    out.write_text(json.dumps(result))

def run_script(script: Path, root: Path, name: str, config: dict, devices: int, resume: bool = False) -> dict:
    """Write ``config`` as ``root/name.yaml``, run ``python script SPEC.json`` (the script's ``worker`` trains it)
    on ``devices`` CPU devices with this checkout's jaxft first on the path, and return the run summary the worker
    wrote, after checking it saw ``devices``. A test file that defines a task or a method runs its own runs so."""
    import yaml

    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    spec = root / f"{name}.json"
    spec.write_text(json.dumps({"config": str(root / f"{name}.yaml"), "result": str(root / f"{name}.result.json"),
                                "resume": resume}))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(spec)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((root / f"{name}.result.json").read_text())
    assert result["devices"] == devices
    return result["summary"]


if __name__ == "__main__":
    main(sys.argv[1])
