"""Prompt-style methods through a whole run (``peft: [{type: prefix_tuning}]`` in a run config): only the prefix
trains, on packed rows, and the exported PEFT adapter loads in PEFT with the logits jaxft computes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel

import jaxft
from hf_oracle import random_ids
from jaxft.config import ConfigError
from jaxft.hf.peft_format import read_adapter_config
from jaxft.peft.prefix import PrefixTuningConfig, with_prefix
from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config
from sft_worker import tiny_chat_model, train_losses


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-runs")
    return tiny_chat_model(root), root


def _config(chats, name: str, peft_yaml: str, task: str = ""):
    model, root = chats
    path = root / f"{name}.yaml"
    path.write_text(f"model: {model}\noutput_dir: {root / name}\n{task}peft: {peft_yaml}\n"
                    f"data: {{paths: [{root / 'train.jsonl'}], max_length: 48, batch_size: 8, packing: true}}\n"
                    "optim: {lr: 0.05}\ntrain: {steps: 6, log_every: 1, loss_chunk_size: 0}\n")
    return load_run_config(path)


def test_prefix_tuning_run_trains_the_prefix_and_exports_an_adapter_peft_loads(chats):
    cfg = _config(chats, "prefix", "[{type: prefix_tuning, num_virtual_tokens: 4}]")
    assert cfg.peft == (PrefixTuningConfig(num_virtual_tokens=4),)
    summary = sft.run(cfg)
    losses = train_losses(cfg.output_dir)
    assert losses[max(losses)] < losses[min(losses)]
    assert summary["trainable_params"] == 2 * 2 * 4 * 2 * 8  # key + value, L=2, P=4, KVH=2, hd=8
    adapter = Path(summary["export"])
    acfg = read_adapter_config(adapter)
    model_cfg, base = jaxft.from_pretrained(cfg.model)
    params = jaxft.load_adapter(adapter, base, model_cfg)
    ids = random_ids((2, 9), vocab=model_cfg.vocab_size, seed=1)
    ours = np.asarray(jaxft.forward(model_cfg, with_prefix(model_cfg, params), ids, hooks=acfg.hooks()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, adapter).eval()(torch.as_tensor(ids)).logits.numpy()
        plain = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(theirs - plain).max() > 1e-3


def test_prompt_style_method_outside_sft_is_refused(chats):
    with pytest.raises(ConfigError, match="only with the sft task"):
        _config(chats, "dpo", "[{type: prompt_tuning, num_virtual_tokens: 4}]", "task: {type: dpo}\n").objective()
    with pytest.raises(ConfigError, match="trains alone"):
        _config(chats, "both", "[{type: prefix_tuning}, {type: lora}]").objective()
    assert isinstance(_config(chats, "p", "[{type: p_tuning}]").peft[0], jaxft.PromptEncoderConfig)
