"""The memory estimate of an RL run's sampler (its KV cache, working set and rollout arrays) against XLA's
memory_analysis() of the sampler :class:`jaxft.recipes.rl.Rollouts` compiles, and the rows `jaxft inspect` shows.

The oracle is the compiled sampler's temp + output bytes per device: the cache it writes while decoding, the
prefill's logits, and the rollout it returns (its arguments, the params and prompts, are counted elsewhere in the
estimate).
"""
import json

import jax
import pytest
import yaml

import jaxft
from jaxft.analysis import memory
from jaxft.cli import main
from jaxft.config import from_dict
from jaxft.recipes import rl
from jaxft.recipes.config import RunConfig
from jaxft.recipes.skeleton import load_inputs, load_model, train_state
from sft_worker import make_base

LONG = {"num_generations": 8, "max_prompt_length": 16, "max_completion_length": 48}  # the KV cache dominates
# a 4096-word vocabulary and 64 prompt slots: the prefill's logits [prompts, 64, 4096] outweigh the cache
WIDE = {"num_generations": 2, "max_prompt_length": 64, "max_completion_length": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base (make_base's: 2 layers, 2 KV heads of 32, a 23-word vocabulary), the same with a 4096-word
    vocabulary (its tokenizer uses the first 23 ids), and 8 prompts."""
    root = tmp_path_factory.mktemp("estimate-rl")
    records = [{"prompt": [{"role": "user", "content": f"reverse {' '.join(str(d) for d in (i, 1, 4))}"}],
                "answer": "x"} for i in range(8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = make_base(root / "base")
    model_cfg, _ = jaxft.from_pretrained(base)
    wide_cfg = model_cfg.replace(vocab_size=4096)
    jaxft.save_pretrained(wide_cfg, jaxft.init_params(wide_cfg, jax.random.PRNGKey(1)), root / "wide")
    for f in base.iterdir():
        if "token" in f.name:
            (root / "wide" / f.name).write_bytes(f.read_bytes())
    return {"base": base, "wide": root / "wide", "root": root}


def _config_tree(setup, mesh, base="base", task=LONG) -> dict:
    root = setup["root"]
    return {"model": str(setup[base]), "output_dir": str(root / "run"),
            "peft": [{"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}],
            "task": {"type": "grpo", **task},
            "data": {"paths": [str(root / "prompts.jsonl")], "batch_size": 8, "template": "chatml"},
            "mesh": dict(zip(("data", "fsdp", "tensor"), mesh)), "train": {"steps": 2, "grad_accum": 2}}


def _compiled_sampler(cfg: RunConfig) -> dict[str, int]:
    """memory_analysis() of the run's sampler, compiled for its first generation batch on the run's mesh."""
    inputs = load_inputs(cfg)
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(0), inputs.mesh)
    training = train_state(cfg, model_cfg, params, inputs.mesh)
    rollouts = rl.Rollouts(cfg, model_cfg, inputs, training.frozen, start_step=0)
    ids, mask, _, _ = rollouts.prompts(next(inputs.pipeline.iterator))
    task = cfg.task
    sampler = rollouts.sampler(num_generations=task.num_generations, max_new_tokens=task.max_completion_length,
                               temperature=task.temperature, top_k=task.top_k, top_p=task.top_p)
    analysis = sampler.lower(training.state["trainable"], training.frozen, ids, mask,
                             jax.random.PRNGKey(0)).compile().memory_analysis()
    return {"temp": analysis.temp_size_in_bytes, "output": analysis.output_size_in_bytes}


@pytest.mark.parametrize("mesh", [(8, 1, 1), (4, 1, 2)])
def test_sampler_rows_are_the_compiled_samplers_temp_and_output_bytes(setup, mesh):
    cfg = from_dict(RunConfig, _config_tree(setup, mesh))
    estimate = memory.estimate(cfg, mesh)
    compiled = _compiled_sampler(cfg)
    # 64 rows (8 prompts x 8) over the data axis; the KV heads over tensor; 63 slots: [prompt | completion - 1]
    rows, kv_heads = 64 // mesh[0], 2 // mesh[2]
    assert estimate.kv_cache == 2 * 2 * rows * 63 * kv_heads * 32 * 4 + rows * 63 * 4
    assert estimate.rollout == rows * (48 * 12 + 1)
    _assert_near_compiled(estimate, compiled)


def test_the_prefill_logits_of_a_wide_vocabulary_are_the_samplers_working_set(setup):
    cfg = from_dict(RunConfig, _config_tree(setup, (8, 1, 1), "wide", WIDE))
    estimate = memory.estimate(cfg, (8, 1, 1))
    assert estimate.sampler_work == 1 * 64 * 4096 * 4  # one prompt per device
    _assert_near_compiled(estimate, _compiled_sampler(cfg))


def _assert_near_compiled(estimate, compiled: dict):
    sampler = estimate.kv_cache + estimate.sampler_work + estimate.rollout
    print("estimate", sampler, "compiled", compiled, "ratio", sampler / (compiled["temp"] + compiled["output"]))
    # the outputs are the rollout arrays, each buffer aligned by XLA:CPU (the stop flags' 8 bytes take more)
    assert 0 <= compiled["output"] - estimate.rollout <= 64
    # the working set, the prefill's logits or a decoding step's (one more cache: the layer scan's new stack, one
    # layer's weights and its K/V read and written), is what XLA plans; how many copies of a layer's K/V it keeps
    # (3 on one tensor shard, 5 on two, here) and the small transients (queries, scores, the last logits) are not
    # modeled: the bounds of the step's estimate (tests/test_estimate.py)
    assert 0.8 <= sampler / (compiled["temp"] + compiled["output"]) <= 1.2
    assert estimate.total >= estimate.frozen + estimate.trainable + sampler

def test_inspect_shows_the_sampler_rows_of_an_rl_run(setup, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config_tree(setup, (8, 1, 1))))
    assert main(["inspect", str(config), "--mesh", "4,1,2"]) == 0
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    want = [memory.estimate(from_dict(RunConfig, _config_tree(setup, (8, 1, 1))), mesh) for mesh in
            [(8, 1, 1), (4, 1, 2)]]
    assert rows["sampler KV cache"].split()[3:] == [f"{e.kv_cache / 2**20:,.1f}" if i % 2 == 0 else "MiB"
                                                     for e in want for i in range(2)]
    assert rows["sampler working set"].count("MiB") == rows["rollout arrays"].count("MiB") == 2
