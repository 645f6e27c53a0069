import atexit
import os
import shutil
import sys
import tempfile

import pytest
import yaml

# Multi-device tests run on 8 fake CPU devices; this must be set before jax initializes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent XLA compilation cache for the session, shared by the xdist workers and the processes tests start
# (set before any of them starts): many tests compile the same tiny programs (a run's step and its resumed twin,
# evals, the same model in several files), and a program found on disk is loaded rather than compiled again. A size
# limit turns on JAX's file lock, so concurrent processes never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the session makes it, and removes it at exit
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxft-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

pytest_plugins = ["no_skips"]  # a skipped test fails the run: CI runs the whole suite

from sft_worker import tiny_chat_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny chat model, its training chats and a 3-step LoRA run config (run.yaml) in one folder."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_chat_model(root)
    config = {"model": str(model), "output_dir": str(root / "run"), "method": "lora",
              "data": {"paths": [str(root / "train.jsonl")], "max_length": 32, "batch_size": 8},
              "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "train": {"steps": 3, "log_every": 1, "loss_chunk_size": 0}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root
