"""#14 item 3: run configs as tagged unions. The canonical form (task:, peft: a list of typed methods, quant:,
model: a folder or an inline config) and the `method:` shorthand load to the same RunConfig; --set keys address
both; unknown types and contradictory forms are errors; an inline model trains from scratch and exports a model
transformers loads."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxft.config import ConfigError, ModelConfig, QuantConfig, to_dict
from jaxft.peft.lora import LoraConfig
from jaxft.recipes.config import config_changes, dump_run_config, flat_keys, load_run_config

# A config.yaml as runs wrote it before peft: existed (method, a lora section, a quant section method ignores).
OLD_FORM = """
model: /models/base
output_dir: /runs/old
method: {method}
data: {{paths: [train.jsonl], max_length: 64}}
lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], lora_dropout: 0.1}}
quant: {{quant_type: fp4, blocksize: 128, double_quant: false}}
train: {{steps: 7}}
"""
NEW_FORM = """
model: /models/base
output_dir: /runs/old
task: {{type: sft}}
peft:
  - {{type: lora, r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], lora_dropout: 0.1}}
{quant}
data: {{paths: [train.jsonl], max_length: 64}}
train: {{steps: 7}}
"""
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), lora_dropout=0.1)
FP4 = QuantConfig(quant_type="fp4", blocksize=128, double_quant=False)


def _write(tmp_path, text, name="run.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _error(path, sets=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(path, list(sets))
    return str(info.value)


@pytest.mark.parametrize("method, peft, quant", [("lora", (LORA,), None), ("qlora", (LORA,), FP4), ("full", (), None)])
def test_an_old_form_file_loads_to_the_run_it_always_meant(tmp_path, method, peft, quant):
    cfg = load_run_config(_write(tmp_path, OLD_FORM.format(method=method)))
    assert (cfg.peft, cfg.quant) == (peft, quant)
    assert cfg.lora == (None if method == "full" else LORA)
    assert (cfg.full, cfg.quantized) == (method == "full", method == "qlora")


@pytest.mark.parametrize("method, quant", [
    ("lora", ""), ("qlora", "quant: {type: fp4, blocksize: 128, double_quant: false}"), ("full", None)])
def test_the_canonical_form_of_each_method_equals_its_shorthand(tmp_path, method, quant):
    new = NEW_FORM.format(quant=quant) if quant is not None else (
        "model: /models/base\noutput_dir: /runs/old\npeft: []\ndata: {paths: [train.jsonl], max_length: 64}\n"
        "train: {steps: 7}\n")
    assert load_run_config(_write(tmp_path, new, "new.yaml")) == load_run_config(
        _write(tmp_path, OLD_FORM.format(method=method)))


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_a_dumped_config_is_canonical_and_loads_back_equal(tmp_path, method):
    cfg = load_run_config(_write(tmp_path, OLD_FORM.format(method=method)))
    dump_run_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "method" not in saved and "lora" not in saved and saved["task"] == {"type": "sft"}
    assert [p["type"] for p in saved["peft"]] == ([] if method == "full" else ["lora"])
    assert saved["quant"] == ({"type": "fp4", "blocksize": 128, "double_quant": False} if method == "qlora" else None)
    assert load_run_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("key", ["lora.r", "peft.lora.r", "peft.0.r"])
@pytest.mark.parametrize("form", ["old", "new"])
def test_every_spelling_of_a_lora_key_sets_it_in_either_form(tmp_path, key, form):
    path = _write(tmp_path, OLD_FORM.format(method="lora") if form == "old" else NEW_FORM.format(quant=""))
    assert load_run_config(path, [f"{key}=12"]).lora == LORA.replace(r=12)


def test_replace_with_new_peft_takes_its_lora(tmp_path):
    """A copy with another LoRA in peft trains that LoRA, not the one the original was built with (dataclasses'
    replace would pass the original's init-only ``lora`` on again)."""
    cfg = load_run_config(_write(tmp_path, OLD_FORM.format(method="lora")))
    other = LORA.replace(r=2, lora_alpha=2)
    assert cfg.replace(peft=(other,)).peft == (other,) and cfg.replace(peft=(other,)).lora == other
    assert cfg.replace(train=cfg.train).lora == LORA


def test_method_and_quant_sets_work_on_a_canonical_file(tmp_path):
    path = _write(tmp_path, NEW_FORM.format(quant=""))
    assert load_run_config(path, ["method=qlora"]).quant == QuantConfig()
    assert load_run_config(path, ["method=qlora", "quant.blocksize=256"]).quant == QuantConfig(blocksize=256)
    assert load_run_config(path, ["quant.blocksize=256"]).quant == QuantConfig(blocksize=256)  # quant on: QLoRA
    full = load_run_config(path, ["method=full"])
    assert full.full and full.lora is None and full.quant is None
    assert load_run_config(path, ["method=lora"]) == load_run_config(path)
    # on the old form, method decides quantization and quant gives its settings, as before
    old = _write(tmp_path, OLD_FORM.format(method="lora"), "old.yaml")
    assert load_run_config(old, ["quant.blocksize=256"]).quant is None
    for key in ("quant.type", "quant.quant_type"):  # either spelling, on a file with or without a quant section
        assert load_run_config(path, ["method=qlora", f"{key}=fp4"]).quant == QuantConfig(quant_type="fp4")
        bare = _write(tmp_path, "model: m\noutput_dir: o\ndata: {paths: [d.jsonl]}\nmethod: qlora\n", "bare.yaml")
        assert load_run_config(bare, [f"{key}=fp4"]).quant == QuantConfig(quant_type="fp4")
    assert load_run_config(old, ["method=qlora", "quant.blocksize=256"]).quant == QuantConfig(
        quant_type="fp4", blocksize=256, double_quant=False)


def test_changes_and_flat_keys_name_a_methods_keys_by_its_type(tmp_path):
    path = _write(tmp_path, NEW_FORM.format(quant=""))
    flat = flat_keys(to_dict(load_run_config(path)))
    assert flat["peft"] == ["lora"] and flat["lora.r"] == 4 and flat["task.type"] == "sft" and "lora.type" not in flat
    changes = config_changes(load_run_config(path), load_run_config(path, ["lora.r=8", "method=qlora"]))
    assert changes == {"lora.r": [4, 8], "quant.type": [None, "nf4"], "quant.blocksize": [None, 64],
                       "quant.double_quant": [None, True]}


@pytest.mark.parametrize("section, says", [
    ("task: {type: rloo}", "task.type: unknown task type 'rloo'; known types are ['classify', "
                           "'continued_pretrain', 'dpo', 'grpo', 'kto', 'orpo', 'ppo', 'pretrain', 'qa', 'reward', "
                           "'sft', 'simpo', 'token_classify']"),
    ("peft: [{type: vera}]", "peft.0.type: unknown peft type 'vera'; known types are ['bitfit', 'head', 'ia3', "
                             "'ln_tuning', 'loha', 'lokr', 'lora', 'p_tuning', 'prefix_tuning', 'prompt_tuning']"),
    ("peft: [{r: 4}]", "peft.0.type: a peft entry needs a type; known types are ['bitfit', 'head', 'ia3', "
                       "'ln_tuning', 'loha', 'lokr', 'lora', 'p_tuning', 'prefix_tuning', 'prompt_tuning']"),
    ("peft: [{type: lora}, {type: lora}]", "peft.1: a second lora entry"),
    ("quant: {type: int8}", "quant.type: unknown quant type 'int8'; known types are ['fp4', 'nf4']"),
    ("model: {type: gpt2, vocab_size: 8}", "model.type: unknown model type 'gpt2'; known types are ['llama', "
                                           "'mistral', 'qwen2']"),
    ("peft: [{type: lora}]\nlora: {r: 4}", "peft and {file}: lora are two forms"),
    ("peft: [{type: lora}]\nmethod: full", "peft and {file}: method are two forms"),
    ("peft: []\nquant: {type: nf4}", "quant stores the frozen base in 4 bits, but peft is empty"),
    ("peft: [{type: lora, rank: 4}]", "unknown key(s) ['lora.rank'] for LoraConfig"),
    ("mesh: [2, 2, 2]", "mesh: expected a mapping with keys ['data', 'fsdp', 'tensor'], got the list [2, 2, 2]"),
])
def test_unknown_types_and_contradictory_forms_are_errors(tmp_path, section, says):
    path = _write(tmp_path, f"model: m\noutput_dir: o\ndata: {{paths: [d.jsonl]}}\n{section}\n")
    assert _error(path).startswith(f"{path}: ") and says.format(file=path) in _error(path)


def test_an_adapter_config_follows_a_head_task_or_a_head_entry_trains_the_head(tmp_path):
    """With a task head, a method's PEFT task_type becomes the head's (PEFT then trains and saves the head); with
    {type: head} beside it, that entry trains the head; a run where nothing would train the new head is refused."""
    def load(peft):
        return load_run_config(_write(tmp_path, f"model: m\noutput_dir: o\ndata: {{paths: [d.jsonl]}}\n"
                                                f"task: {{type: classify, num_labels: 3}}\npeft: {peft}\n"))

    ia3 = load("[{type: ia3}]").peft[0]
    assert ia3.task_type == "SEQ_CLS" and "score" in ia3.modules_to_save
    assert load("[{type: loha}, {type: head}]").peft[0].task_type == "CAUSAL_LM"
    with pytest.raises(ConfigError, match="none of peft \\['bitfit'\\] trains"):
        load("[{type: bitfit}]")
    assert load("[{type: loha}]").peft[0].task_type == "SEQ_CLS"


@pytest.mark.parametrize("sets, says", [
    (["lora.rank=4"], "--set lora.rank=4: unknown key(s) ['lora.rank'] for LoraConfig"),
    (["peft.0.r=abc"], "--set peft.0.r=abc: expected a whole number, got 'abc'"),
    (["peft.vera.r=4"], "peft.vera is neither an entry's index nor a method type"),
    (["method=full", "lora.r=4"], "this config's peft list has no lora entry"),
    (["quant.type=int8"], "--set quant.type=int8: unknown quant type 'int8'"),
])
def test_bad_sets_on_a_canonical_file_are_blamed_on_the_set(tmp_path, sets, says):
    assert says in _error(_write(tmp_path, NEW_FORM.format(quant="")), sets)


def test_a_set_that_mixes_the_forms_names_both_keys(tmp_path):
    old = _write(tmp_path, OLD_FORM.format(method="lora"))
    assert _error(old, ["peft=[{type: lora}]"]).startswith(f"--set peft=[{{type: lora}}]: peft and {old}: method are "
                                                           "two forms")
    no_sections = _write(tmp_path, "model: m\noutput_dir: o\ndata: {paths: [d.jsonl]}\n", "bare.yaml")
    assert load_run_config(no_sections, ["peft=[]"]).full  # the shorthand sections filled in for --set stay out
    assert _error(no_sections, ["lora.r=8", "peft=[]"]).startswith("--set peft=[]: peft and --set lora.r=8: lora are "
                                                                   "two forms")
    assert "peft list has no lora entry" in _error(no_sections, ["peft=[]", "lora.r=8"])  # --sets apply in order


INLINE = {"type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}


def test_an_inline_model_needs_a_tokenizer_and_full_training(tmp_path):
    base = f"output_dir: o\ndata: {{paths: [d.jsonl]}}\nmodel: {json.dumps({**INLINE, 'vocab_size': 40})}\n"
    assert "set tokenizer: to a tokenizer folder" in _error(_write(tmp_path, base + "peft: []\n"))
    assert "give peft: [] (or method: full)" in _error(_write(tmp_path, base + "tokenizer: t\n"))
    cfg = load_run_config(_write(tmp_path, base + "tokenizer: t\nmethod: full\n"))
    assert cfg.model == ModelConfig(vocab_size=40, **{k: v for k, v in INLINE.items() if k != "type"})
    assert cfg.model_dir is None and cfg.tokenizer_dir == "t" and cfg.full
    dump_run_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["type"] == "llama"
    assert load_run_config(tmp_path / "config.yaml") == cfg


@pytest.mark.slow
def test_an_inline_model_trains_from_scratch_and_exports_a_model_transformers_loads(tiny_run, tmp_path):
    import torch
    import transformers

    import jaxft
    from jaxft.cli import main

    vocab = len(jaxft.load_tokenizer(tiny_run / "tokenizer"))
    config = {"model": {**INLINE, "vocab_size": vocab}, "tokenizer": str(tiny_run / "tokenizer"), "peft": [],
              "output_dir": str(tmp_path / "run"), "optim": {"lr": 3e-3},
              "data": {"paths": [str(tiny_run / "train.jsonl")], "max_length": 32, "batch_size": 8},
              "train": {"steps": 12, "log_every": 1, "loss_chunk_size": 0, "seed": 3}}
    _write(tmp_path, yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert losses[-1] < 0.8 * losses[0]
    export = tmp_path / "run" / "model"
    model_cfg, params = jaxft.from_pretrained(export)
    start = jaxft.init_params(model_cfg, jax.random.PRNGKey(3))
    assert not np.allclose(params["lm_head"]["kernel"], start["lm_head"]["kernel"], atol=1e-4)  # it trained
    ids = np.array([[1, 5, 7, 2, 9, 4, 3, 8]]) % vocab
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(model_cfg, params, ids)), expected, rtol=1e-4, atol=1e-4)
    assert len(jaxft.load_tokenizer(export)) == vocab


def test_an_inline_model_config_is_its_own_base_for_a_resume():
    from jaxft.train.checkpoint import BaseModelChanged, base_reference, check_base

    model = ModelConfig(vocab_size=40, **{k: v for k, v in INLINE.items() if k != "type"})
    reference = json.loads(json.dumps(base_reference(model)))  # as a checkpoint stores it
    check_base(reference, model, current=base_reference(model))
    check_base(reference, ModelConfig(**to_dict(model) | {"rope": model.rope}))  # an equal config, built anew
    with pytest.raises(BaseModelChanged, match="not the one these adapters were trained on"):
        check_base(reference, model.replace(hidden_size=64, head_dim=None))


PRETRAINING_CONFIGS = ("pretrain-scratch.yaml", "continued-pretrain.yaml")  # tests/test_pretrain_run.py loads them


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")
                                        if p.name not in PRETRAINING_CONFIGS), ids=lambda p: p.name)
def test_every_shipped_config_loads_in_whichever_form_it_is_written(path):
    cfg = load_run_config(path)
    assert cfg.lora is not None and cfg.quantized == (path.name != "llama2-7b-lora-8gpu.yaml")  # the others: QLoRA
