"""BitFit (``peft: [{type: bitfit}]``): only the biases train. On Qwen2 those are q/k/v's, with gradients equal to
torch autograd's; Llama has none and is refused; beside LoRA it selects what PEFT's ``bias="all"`` trains; a run
trains only the biases and exports the full model, which transformers loads with jaxft's logits."""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.config import ConfigError, from_dict
from jaxft.hf.checkpoint import save_pretrained
from jaxft.models.llama import init_params
from jaxft.peft.bitfit import BitFit
from jaxft.peft.methods import trainable_count
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig
from jaxft.recipes.skeleton import build_params, trainable_spec
from sft_worker import make_base


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    model = build("qwen2", seed=0)
    save(model, root / "base")
    cfg, params = jaxft.from_pretrained(root / "base")
    return model, cfg, params


def test_qwen2_trains_exactly_its_qkv_biases_with_torch_autograd_gradients(qwen2):
    model, cfg, params = qwen2
    spec = BitFit().trainable(cfg, BitFit().add(cfg, params, jax.random.PRNGKey(0)))
    assert spec.paths == {f"layers/{m}/bias" for m in ("q_proj", "k_proj", "v_proj")}
    ids, labels = random_ids((2, 10), seed=3), random_ids((2, 10), seed=4)
    trainable, frozen = jaxft.split(params, spec)

    def loss(trainable):
        logits = jaxft.forward(cfg, jaxft.combine(trainable, frozen), jnp.asarray(ids))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[..., None], axis=-1))

    grads = jax.grad(loss)(trainable)["layers"]
    for p in model.parameters():
        p.requires_grad_(False)
    biases = {n: p.requires_grad_(True) for n, p in model.named_parameters() if n.endswith("bias")}
    logits = model(torch.as_tensor(ids)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.as_tensor(labels).reshape(-1)).backward()
    assert len(biases) == 3 * cfg.num_hidden_layers
    for name, p in biases.items():
        layer, module = int(name.split(".")[2]), name.split(".")[4]
        np.testing.assert_allclose(np.asarray(grads[module]["bias"][layer]), p.grad.numpy(), atol=1e-6, rtol=1e-4,
                                   err_msg=name)


def test_beside_lora_it_trains_what_peft_bias_all_trains(qwen2):
    model, cfg, params = qwen2
    lcfg = jaxft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    with_lora = build_params(cfg, params, jax.random.PRNGKey(0), peft=(lcfg, BitFit()))
    spec = lcfg.trainable(cfg, with_lora) | BitFit().trainable(cfg, with_lora)
    assert spec == lcfg.replace(bias="all").trainable(cfg, with_lora)  # the one selection both use
    pm = peft.get_peft_model(build("qwen2", seed=0), peft.LoraConfig(r=4, lora_alpha=8, bias="all",
                                                                     target_modules=["q_proj", "down_proj"]))
    assert trainable_count(with_lora, spec) == pm.get_nb_trainable_parameters()[0]


def test_a_model_without_biases_is_refused_naming_the_way_out():
    cfg = jaxft.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2)
    with pytest.raises(ConfigError, match="bitfit.*llama model has none.*type: lora"):
        BitFit().add(cfg, init_params(cfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))


def test_a_run_trains_only_the_biases_and_exports_a_model_transformers_loads(tmp_path):
    llama = make_base(tmp_path / "llama")  # for its tokenizer: the Qwen2 base below has the same vocabulary
    cfg, _ = jaxft.from_pretrained(llama)
    base_cfg = cfg.replace(model_type="qwen2", qkv_bias=True)
    base_params = jax.tree.map(lambda x: x + 0.05, init_params(base_cfg, jax.random.PRNGKey(0)))
    save_pretrained(base_cfg, base_params, tmp_path / "base")
    for f in llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / "base" / f.name)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse {i} {i + 1} =", "completion": f" {i + 1} {i} ."}) + "\n"
                            for i in range(32)))
    run = from_dict(RunConfig, {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
                                "peft": [{"type": "bitfit"}], "data": {"paths": [str(data)], "max_length": 24,
                                                                       "batch_size": 8},
                                "optim": {"lr": 5e-2}, "train": {"steps": 3, "log_every": 1}})
    summary = sft.run(run)
    export = Path(summary["export"])
    assert export.name == "model" and summary["trainable_params"] == 2 * (128 + 64 + 64)  # q, k, v biases, 2 layers
    model_cfg, trained = jaxft.from_pretrained(export)
    _, base = jaxft.from_pretrained(tmp_path / "base")
    assert float(jnp.max(jnp.abs(trained["layers"]["q_proj"]["bias"] - base["layers"]["q_proj"]["bias"]))) > 1e-3
    for module in ("q_proj", "up_proj"):
        np.testing.assert_array_equal(np.asarray(trained["layers"][module]["kernel"]),
                                      np.asarray(base["layers"][module]["kernel"]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = random_ids((2, 8), model_cfg.vocab_size, seed=5)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(model_cfg, trained, jnp.asarray(ids))), theirs, atol=1e-4)
