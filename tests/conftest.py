import gc
import os
import sys

import pytest
import yaml

# Multi-device tests run on 8 fake CPU devices; this must be set before jax initializes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CLI's persistent compilation cache stays off in the test processes and the processes they start (whatever the
# environment says): jax 0.10.2 crashed twice in test workers while serializing executables into it (probably the
# per-process memory-map limit, see release_compiled_programs). Only tests/test_compile_cache.py turns it on, in a
# subprocess with a temporary folder.
os.environ["JAXFT_COMPILE_CACHE"] = "off"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop each module's compiled programs when it ends.

    Every XLA:CPU executable keeps a few memory mappings of its JIT-compiled code; one xdist worker runs ~750 tests
    and, keeping them all, passed the kernel's 65530-mapping limit (vm.max_map_count) after ~20 minutes, when the
    next compile's mmap failed and the worker died with a segfault.
    """
    yield
    jax.clear_caches()
    gc.collect()


JAX_CACHE_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_compilation_cache_max_size",
                      "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture
def jax_cache_settings():
    """jax's own persistent-cache settings (the real ``jax.config``), restored after the test: a test that points
    them elsewhere, or checks that nothing does, leaves the next test jax's settings as they were."""
    saved = {name: getattr(jax.config, name) for name in JAX_CACHE_SETTINGS}
    yield jax.config
    for name, value in saved.items():
        jax.config.update(name, value)


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
