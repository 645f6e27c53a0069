"""Prompt-style methods through a whole run (``peft: [{type: prefix_tuning}]`` in a run config): only the prefix
trains, on packed rows, and the exported PEFT adapter loads in PEFT with the logits jaxft computes; a TEXT init
tokenizes with the run's tokenizer; a resumed run continues the uninterrupted one."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

import jaxft
from hf_oracle import greedy_tokens, random_ids
from test_resume import _new_losses
from jaxft.config import ConfigError
from jaxft.hf.peft_format import read_adapter_config
from jaxft.data.config import DataConfig
from jaxft.peft.prefix import PrefixTuningConfig, prompt_inputs
from jaxft.peft.prompt import PROMPT
from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config
from jaxft.recipes.scoring import data_metrics
from jaxft.recipes.skeleton import load_model, with_run_tokenizer
from jaxft.recipes.tasks import SftTask, task_pipeline
from sft_worker import tiny_chat_model, train_losses


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-runs")
    return tiny_chat_model(root), root


def _config(chats, name: str, peft_yaml: str, task: str = "", train: str = "steps: 6"):
    model, root = chats
    path = root / f"{name}.yaml"
    path.write_text(f"model: {model}\noutput_dir: {root / name}\n{task}peft: {peft_yaml}\n"
                    f"data: {{paths: [{root / 'train.jsonl'}], max_length: 48, batch_size: 8, packing: true}}\n"
                    f"optim: {{lr: 0.05}}\ntrain: {{{train}, log_every: 1, loss_chunk_size: 0}}\n")
    return load_run_config(path)


def test_prefix_tuning_run_trains_the_prefix_and_exports_an_adapter_peft_loads(chats):
    cfg = _config(chats, "prefix", "[{type: prefix_tuning, num_virtual_tokens: 4}]")
    assert cfg.peft == (PrefixTuningConfig(num_virtual_tokens=4),)
    summary = sft.run(cfg)
    losses = train_losses(cfg.output_dir)
    assert losses[max(losses)] < losses[min(losses)]
    assert summary["trainable_params"] == 2 * 2 * 4 * 2 * 8  # key + value, L=2, P=4, KVH=2, hd=8
    adapter = Path(summary["export"])
    assert read_adapter_config(adapter) == cfg.peft[0]
    model_cfg, base = jaxft.from_pretrained(cfg.model)
    with pytest.raises(ConfigError, match="pass the model's config"):  # the tree alone does not tell its heads
        jaxft.load_adapter(adapter, base)
    _assert_peft_gives_jaxfts_logits(cfg.model, adapter)


def _assert_peft_gives_jaxfts_logits(model: str, adapter: Path):
    """The exported adapter, loaded by jaxft and by PEFT, gives equal logits that differ from the base's."""
    model_cfg, base = jaxft.from_pretrained(model)
    params = jaxft.load_adapter(adapter, base, model_cfg)
    ids = random_ids((2, 9), vocab=model_cfg.vocab_size, seed=1)
    prefixed, hooks = prompt_inputs(model_cfg, params)
    ours = np.asarray(jaxft.forward(model_cfg, prefixed, ids, hooks=hooks))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, adapter).eval()(torch.as_tensor(ids)).logits.numpy()
        plain = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours[:, -ids.shape[1]:], theirs[:, -ids.shape[1]:], atol=1e-4, rtol=0)
    assert np.abs(theirs[:, -ids.shape[1]:] - plain).max() > 1e-3


def test_p_tuning_lstm_run_trains_the_encoder_and_exports_an_adapter_peft_loads(chats):
    """P-tuning with PEFT's LSTM encoder (dropout between its 2 layers in training) trains only the encoder; the
    export holds the embeddings it computes, as PEFT saves them."""
    cfg = _config(chats, "lstm", "[{type: p_tuning, num_virtual_tokens: 4, encoder_reparameterization_type: LSTM, "
                                 "encoder_hidden_size: 8, encoder_dropout: 0.1}]")
    assert cfg.peft == (jaxft.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
                                                  encoder_hidden_size=8, encoder_dropout=0.1),)
    summary = sft.run(cfg)
    losses = train_losses(cfg.output_dir)
    assert losses[max(losses)] < losses[min(losses)]
    d, h = 32, 8  # the model's width, the LSTM's per direction
    lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)  # 2 layers, 2 directions
    assert summary["trainable_params"] == 4 * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    adapter = Path(summary["export"])
    assert read_adapter_config(adapter) == cfg.peft[0]
    _assert_peft_gives_jaxfts_logits(cfg.model, adapter)


def test_eval_and_generation_of_a_prompt_style_adapter_use_its_prefix(chats, tmp_path):
    """Whoever holds a tree with a prefix gets the method's forward with no hooks to pass: ``jaxft eval``'s loss
    (scoring.data_metrics) is PEFT's cross-entropy over the same chats, and generation (prompt_inputs, as the demo's
    exact match, chat exact match and ``jaxft generate`` call it) is PEFT's greedy decoding."""
    model, root = chats
    model_cfg, base = jaxft.from_pretrained(model)
    pcfg = PrefixTuningConfig(num_virtual_tokens=3)
    params = pcfg.add(model_cfg, base, jax.random.PRNGKey(5))
    jaxft.save_adapter(params, pcfg, tmp_path / "adapter", cfg=model_cfg)
    tok = jaxft.load_tokenizer(model)
    data = DataConfig(paths=(str(root / "train.jsonl"),), max_length=48, batch_size=4, packing=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    iterator = task_pipeline(SftTask(), data, tok).iterator
    batches = [next(iterator) for _ in range(iterator.batches_per_epoch)]  # one pass, as jaxft eval reads it
    rows = [row for b in batches for row in zip(b["input_ids"], b["labels"], b["segment_ids"])]
    loss_sum = n_targets = 0.0
    for ids, labels, segments in rows:
        real = segments > 0
        if not real.any():  # a padding row of the last batch
            continue
        with torch.no_grad():
            logits = peft_model(torch.as_tensor(ids[real][None].astype(np.int64))).logits[0]
        target = torch.as_tensor(labels[real].astype(np.int64))
        loss_sum += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
        n_targets += int((target != -100).sum())
    ours = data_metrics(model_cfg, params, tok, data)
    assert ours["tokens"] == n_targets
    np.testing.assert_allclose(ours["loss"], loss_sum / n_targets, rtol=1e-5)
    assert abs(data_metrics(model_cfg, base, tok, data)["loss"] - ours["loss"]) > 1e-3
    prompt = tok.apply_chat_template([{"role": "user", "content": "increment 3 2 3 4"}], add_generation_prompt=True)
    prefixed, hooks = prompt_inputs(model_cfg, params)
    ours = jaxft.generate(model_cfg, prefixed, [prompt], max_new_tokens=6, stop_token_ids=[], hooks=hooks)[0]
    assert ours == greedy_tokens(peft_model, prompt, 6)


@pytest.mark.parametrize("pcfg", [PrefixTuningConfig(num_virtual_tokens=3), jaxft.PromptTuningConfig(
    num_virtual_tokens=3)], ids=["prefix", "prompt"])
def test_a_prompt_style_tree_without_its_hooks_is_refused_not_run_as_the_base(chats, pcfg):
    model_cfg, base = jaxft.from_pretrained(chats[0])
    params = pcfg.add(model_cfg, base, jax.random.PRNGKey(0))
    with pytest.raises(jaxft.JaxftError, match="prompt-style method .*prompt_inputs"):
        jaxft.forward(model_cfg, params, np.zeros((1, 4), np.int32))
    with pytest.raises(jaxft.JaxftError, match="prompt-style method .*prompt_inputs"):
        jaxft.generate(model_cfg, params, [[1, 2]], max_new_tokens=2)


def test_prompt_style_method_outside_sft_is_refused(chats):
    with pytest.raises(ConfigError, match="only with the sft task"):
        _config(chats, "dpo", "[{type: prompt_tuning, num_virtual_tokens: 4}]", "task: {type: dpo}\n")
    with pytest.raises(ConfigError, match="trains alone"):
        _config(chats, "both", "[{type: prefix_tuning}, {type: lora}]")
    assert isinstance(_config(chats, "p", "[{type: p_tuning}]").peft[0], jaxft.PromptEncoderConfig)


@pytest.mark.parametrize("num_virtual_tokens", [3, 11], ids=["cut", "repeated"])
def test_text_init_in_a_run_config_equals_peft_text_init(chats, num_virtual_tokens):
    """``prompt_tuning_init: TEXT`` in a run config: the run tokenizes the text with its own tokenizer (the model
    folder's; the config keeps no path, so a resume may move the model), so the virtual embeddings start as PEFT's,
    which tokenizes with AutoTokenizer and cuts or repeats the ids to P; the export names that tokenizer."""
    text = "increment 2 3 4 ="
    cfg = _config(chats, "text", f"[{{type: prompt_tuning, num_virtual_tokens: {num_virtual_tokens}, "
                                 f"prompt_tuning_init: TEXT, prompt_tuning_init_text: '{text}'}}]")
    assert cfg.peft[0].tokenizer_name_or_path is None
    assert with_run_tokenizer(cfg.peft[0], cfg.tokenizer_dir).tokenizer_name_or_path == cfg.model
    _, params = load_model(cfg, jax.random.PRNGKey(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(cfg.model)
    pm = get_peft_model(hf, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=cfg.model))
    theirs = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    n_ids = len(transformers.AutoTokenizer.from_pretrained(cfg.model)(text)["input_ids"])
    assert 1 < n_ids and (n_ids > num_virtual_tokens) == (num_virtual_tokens == 3)  # cut, or repeated
    np.testing.assert_array_equal(np.asarray(params[PROMPT]["embedding"]), theirs)


@pytest.mark.slow
@pytest.mark.parametrize("name,peft_yaml", [
    ("prompt", "{type: prompt_tuning, num_virtual_tokens: 3, prompt_tuning_init: SAMPLE_VOCAB}"),
    ("p_mlp", "{type: p_tuning, num_virtual_tokens: 3, encoder_hidden_size: 8}"),
    ("p_lstm", "{type: p_tuning, num_virtual_tokens: 3, encoder_hidden_size: 8, encoder_reparameterization_type: "
               "LSTM, encoder_dropout: 0.2}"),
    ("prefix", "{type: prefix_tuning, num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: 8}")])
def test_a_prompt_style_run_resumed_after_2_steps_continues_the_4_step_run(chats, name,
                                                                           peft_yaml):
    """2 steps, stop (the checkpoint of step 2), resume for 2 more: the losses of steps 3 and 4 and the trained
    leaves after step 4 are those of the run that trained 4 steps straight (the LSTM's dropout draws included)."""
    straight = _config(chats, f"resume-{name}", f"[{peft_yaml}]", train="steps: 4, save_every: 2")
    sft.run(straight)
    resumed_dir = Path(straight.output_dir).with_name(f"resumed-{name}")
    shutil.copytree(straight.output_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")  # as if the run had stopped after saving step 2
    logged = len((resumed_dir / "metrics.jsonl").read_text().splitlines())
    sft.run(straight.replace(output_dir=str(resumed_dir)), resume=True)
    resumed, reference = _new_losses(resumed_dir, logged), train_losses(straight.output_dir)
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]
    ours, theirs = _trained(resumed_dir), _trained(Path(straight.output_dir))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


def _trained(run: Path) -> dict:
    """The trained leaves in the run's checkpoint of step 4, read with orbax alone."""
    with warnings.catch_warnings():  # "sharding info not provided": the saved one serves, the array is read whole
        warnings.simplefilter("ignore", UserWarning)
        return ocp.PyTreeCheckpointer().restore(run / "checkpoints" / "4" / "state")["trainable"]
