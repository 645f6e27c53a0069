"""Bad input, class by class: the command, its exit code, a fragment of its one-paragraph message, and the
user's folders unchanged (nothing written, nothing replaced).

Each row is (argv, message fragment); ``{name}`` placeholders are the paths :func:`_bad_configs` makes. Every
command must exit with status 2, print exactly one paragraph (plus the ``--debug`` hint) without a traceback,
leave ``taken/keep.txt`` as it was, and create no ``fresh`` folder.
"""
import pytest
import yaml

from jaxft.cli import main


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"jaxft {argv[0]}: error:")
    return err


def _bad_configs(root, tmp_path) -> dict:
    """Paths of bad inputs: a missing file, a config with an unknown key, one with a !!python tag, a model folder
    without config.json, and an output folder with someone's file in it."""
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["lora"]["rank"] = 8
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "evil.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    paths = {"missing": str(tmp_path / "nope.yaml"), "unknown": str(tmp_path / "unknown.yaml"),
             "evil": str(tmp_path / "evil.yaml"), "no_config_json": str(tmp_path / "not-a-model"),
             "taken": str(tmp_path / "taken"), "config": str(root / "run.yaml"), "model": str(root / "model"),
             "data": str(root / "train.jsonl")}
    return {**paths, **_silent_wrong_inputs(root), **_bad_values(root, tmp_path),
            **_run_folder_inputs(root, tmp_path)}


def _run_folder_inputs(root, tmp_path) -> dict:
    """#13 section 3: a run killed before its first checkpoint (its config.yaml and an empty checkpoints/), and a
    model folder without tokenizer files with an adapter (without one either) for it, made once per module."""
    import jax

    import jaxft
    from jaxft.recipes.config import dump_run_config, load_run_config

    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    dump_run_config(load_run_config(root / "run.yaml", [f"output_dir={crashed}"]), crashed / "config.yaml")
    bare, adapter = root / "model-without-tokenizer", root / "adapter-without-tokenizer"
    if not adapter.exists():
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            (bare / name).write_bytes((root / "model" / name).read_bytes())
        cfg, params = jaxft.from_pretrained(bare)
        lcfg = jaxft.LoraConfig(r=2, lora_alpha=4)
        jaxft.save_adapter(jaxft.lora.add(cfg, params, lcfg, jax.random.PRNGKey(0)), lcfg, adapter)
    return {"crashed": str(crashed), "bare_model": str(bare), "bare_adapter": str(adapter)}


def _silent_wrong_inputs(root) -> dict:
    """Made once per module under ``root/silent``: a model whose tokenizer has one token more than its embedding
    rows and chats using it, a model with a weight beyond float16's range, and a ChatML template that ignores
    add_generation_prompt."""
    from test_silent_wrong import oov_chats, overflowing_copy, oversized_tokenizer_model

    folder = root / "silent"
    paths = {"big_vocab": folder / "big-vocab", "oov_data": folder / "oov.jsonl", "hot": folder / "hot",
             "no_gen_prompt": folder / "no-generation-prompt.jinja"}
    if not folder.exists():
        tmp = root / "silent.partial"
        tmp.mkdir()
        oversized_tokenizer_model(root / "model", tmp / "big-vocab")
        oov_chats(tmp / "oov.jsonl")
        overflowing_copy(root / "model", tmp / "hot")
        (tmp / "no-generation-prompt.jinja").write_text(
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>\\n' }}{% endfor %}")
        tmp.rename(folder)
    return {key: str(path) for key, path in paths.items()}


def _bad_values(root, tmp_path) -> dict:
    """#13 section 4: a config whose own train.steps is 0 (the file is to blame, not a flag)."""
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["train"]["steps"] = 0
    (tmp_path / "zero-steps.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "broken.jinja").write_text("{% for message in messages %}{{ message['content'] }}")  # no endfor
    return {"zero_steps": str(tmp_path / "zero-steps.yaml"), "broken_template": str(tmp_path / "broken.jinja")}


MISSING, UNKNOWN_KEY, PYTHON_TAG = "config file not found", "unknown key(s) ['lora.rank']", "not valid YAML at line 1"
NO_CONFIG_JSON, TAKEN, NOT_KEY_VALUE = "no config.json", "already exists and is not empty; pass --overwrite", \
    "is not key=value"
BAD_INPUTS = [
    (["train", "{missing}"], MISSING),
    (["train", "{unknown}"], UNKNOWN_KEY),
    (["train", "{evil}"], PYTHON_TAG),
    (["train", "{config}", "--set", "lora.r"], NOT_KEY_VALUE),
    (["train", "{config}", "--set", "task={{type: rloo}}"], "--set task={{type: rloo}}: task.type: unknown task "
                                                           "type 'rloo'; known types are ['classify', "
                                                           "'continued_pretrain', 'dpo', 'grpo', 'kto', 'orpo', "
                                                           "'ppo', 'pretrain', 'qa', 'reward', 'sft', 'simpo', "
                                                           "'token_classify']"),
    (["train", "{config}", "--set", "data.type=csv"], "--set data.type=csv: unknown data type 'csv'; known types "
                                                     "are ['chat', 'text']"),
    (["train", "{config}", "--set", "method=qlora", "--set", "quant.type=int8"],
     "--set quant.type=int8: unknown quant type 'int8'; known types are ['fp4', 'nf4']"),
    (["train", "{config}", "--set", "model={{type: gpt2}}"], "--set model={{type: gpt2}}: model.type: unknown model "
                                                             "type 'gpt2'; known types are ['llama', 'mistral', 'qwen2']"),
    (["train", "{config}", "--set", "peft=[]"], "--set peft=[]: peft and {config}: method are two forms"),
    (["train", "{config}", "--set", "lora.r=[8"], "lora.r=[8: the value is not plain YAML"),
    (["train", "{config}", "--set", "model={no_config_json}", "--set", "output_dir={taken}/../fresh"], NO_CONFIG_JSON),
    (["train", "{config}", "--set", "output_dir={taken}"], TAKEN),
    (["sweep", "{missing}", "--grid", "r=2,4"], MISSING),
    (["sweep", "{unknown}", "--grid", "r=2,4"], UNKNOWN_KEY),
    (["sweep", "{evil}", "--grid", "r=2,4"], PYTHON_TAG),
    (["sweep", "{config}", "--grid", "lora.rank=2,4", "--out", "{taken}/../fresh"], UNKNOWN_KEY),
    (["sweep", "{config}", "--grid", "lora.r:2,4"], "--grid 'lora.r:2,4': expected KEY=V1,V2,..."),
    (["sweep", "{config}", "--grid", "r=2", "--set", "model={no_config_json}", "--out", "{taken}/../fresh"],
     NO_CONFIG_JSON),
    (["sweep", "{config}", "--grid", "r=2", "--out", "{taken}"], "already exists and is not empty; pass --resume"),
    (["sweep", "{config}", "--grid", "r=2", "--exact-match", "3", "--out", "{taken}/../fresh"], "has no eval_data"),
    (["sweep", "{config}", "--grid", "train.steps=2.5", "--out", "{taken}/../fresh"], "expected a whole number"),
    (["sweep", "{config}", "--grid", "r=4,eight", "alpha=2r", "--out", "{taken}/../fresh"], "derived from lora.r"),
    (["sweep", "{config}", "--parallel", "--grid", "train.log_every=1,2", "--out", "{taken}/../fresh"],
     "parallel runs must share train.log_every"),
    (["sweep", "{config}", "--parallel", "--grid", "r=2,4", "--set", "optim.name=adafactor", "--out",
      "{taken}/../fresh"], "computes statistics over whole leaves"),
    (["inspect", "{missing}"], MISSING),
    (["inspect", "{unknown}"], UNKNOWN_KEY),
    (["inspect", "{evil}"], PYTHON_TAG),
    (["inspect", "{config}", "--set", "model={no_config_json}"], NO_CONFIG_JSON),
    (["generate", "{no_config_json}", "--prompt", "hi"], NO_CONFIG_JSON),
    (["generate", "{model}", "--file", "{missing}"], "--file {missing}: no such file"),
    (["generate", "{model}", "--adapter", "{no_config_json}", "--prompt", "hi"], "no adapter_config.json"),
    (["export", "{no_config_json}", "--adapter", "{model}", "--out", "{taken}/../fresh"], NO_CONFIG_JSON),
    (["export", "{model}", "--adapter", "{missing}", "--out", "{taken}/../fresh"], "no adapter_config.json"),
    (["export", "{model}", "--adapter", "{model}", "--out", "{taken}"], TAKEN),
    (["eval", "{no_config_json}", "--data", "{data}"], NO_CONFIG_JSON),
    (["eval", "{model}", "--data", "{missing}"], "nope.yaml: missing file"),
    (["eval", "{model}", "--adapter", "{missing}", "--data", "{data}"], "no adapter_config.json"),
    (["demo", "--out", "{taken}"], TAKEN),
]

# Multi-host launch (#13 section 1): those bad inputs are environment variables, so their table is
# tests/test_multihost_cli.py::test_a_half_set_jaxft_environment_is_one_paragraph_and_exit_2.

# Silent wrong results (#13 section 2)
OOV, OVERFLOW, NO_GEN_PROMPT = "oov.jsonl:1: token id beyond the model's vocabulary", \
    "tensor 'model.layers.1.mlp.down_proj.weight' holds values up to", "template ignores add_generation_prompt"
BAD_INPUTS += [
    (["train", "{config}", "--set", "model={big_vocab}", "--set", "data.paths=[{oov_data}]", "--set",
      "output_dir={taken}/../fresh"], OOV),
    (["train", "{config}", "--set", "eval_data.paths=[{oov_data}]", "--set", "model={big_vocab}", "--set",
      "output_dir={taken}/../fresh"], OOV),
    (["eval", "{big_vocab}", "--data", "{oov_data}"], OOV),
    (["train", "{config}", "--set", "model={hot}", "--set", "dtype=float16", "--set", "output_dir={taken}/../fresh"],
     OVERFLOW),
    (["train", "{config}", "--set", "data.template={no_gen_prompt}", "--set", "output_dir={taken}/../fresh"],
     NO_GEN_PROMPT),
    (["eval", "{model}", "--template", "{no_gen_prompt}", "--data", "{data}"], NO_GEN_PROMPT),
]

# Run folders (#13 section 3)
BAD_INPUTS += [
    (["train", "{config}", "--set", "data.batch_size=3", "--set", "output_dir={taken}/../fresh"],
     "do not split over the mesh"),
    (["train", "{config}", "--set", "data.paths=[{missing}]", "--set", "output_dir={taken}/../fresh"],
     "nope.yaml: missing file"),
    (["train", "{config}", "--overwrite", "--set", "output_dir={taken}", "--set", "data.paths=[{missing}]"],
     "nope.yaml: missing file"),
    (["train", "{config}", "--overwrite", "--set", "output_dir={taken}", "--set", "data.paths=[{taken}/keep.txt]"],
     "overwrite would delete this run's own inputs"),
    (["train", "{config}", "--resume", "--overwrite", "--set", "output_dir={taken}"],
     "pass one of --resume / --overwrite"),
    (["train", "{config}", "--resume", "--set", "output_dir={taken}"], "{taken}: nothing to resume"),
    (["train", "{config}", "--resume", "--set", "output_dir={crashed}", "--set", "lora.r=8"], "lora.r: 2 -> 8"),
    (["train", "{config}", "--resume", "--set", "output_dir={crashed}", "--set", "train.seed=3", "--set",
      "lora.target_modules=[q_proj]"], "lora.target_modules: ['q_proj', 'v_proj'] -> ['q_proj']; train.seed: 0 -> 3"),
    (["train", "{config}", "--resume", "--set", "output_dir={crashed}", "--set", "model={bare_model}"],
     "model: '{model}' -> '{bare_model}'"),  # with no checkpoint, no base fingerprint vouches for the new path
    (["export", "{bare_model}", "--adapter", "{bare_adapter}", "--merged", "--out", "{taken}/../fresh"],
     "no tokenizer.json or tokenizer.model"),
    (["export", "{bare_model}", "--adapter", "{bare_adapter}", "--out", "{taken}/../fresh"],
     "no tokenizer.json or tokenizer.model"),
]

# Errors that point at the real place (#13 section 4)
BAD_INPUTS += [
    (["train", "{config}", "--set", "lora.r=abc"], "--set lora.r=abc: expected a whole number, got 'abc'"),
    (["train", "{config}", "--set", "train.steps=0"], "--set train.steps=0: train.steps must be >= 1, got 0"),
    (["train", "{zero_steps}", "--set", "lora.r=4"], "{zero_steps}: train.steps must be >= 1, got 0"),
    (["train", "{config}", "--set", "lora.rank=4"], "--set lora.rank=4: unknown key(s) ['lora.rank']"),
    (["train", "{config}", "--set", "optim.total_steps=7"], "--set optim.total_steps=7: optim.total_steps is 7 but "
     "train.steps is 3"),
    (["inspect", "{config}", "--set", "optim.lr=-1"], "--set optim.lr=-1: optim.lr = -1: expected a learning rate"),
    (["sweep", "{config}", "--grid", "lora.r=x", "--out", "{taken}/../fresh"],
     "--grid lora.r=x: expected a whole number, got 'x'"),
    (["sweep", "{config}", "--grid", "r=2,0", "--out", "{taken}/../fresh"],
     "--grid lora.r=0: lora.r must be a positive integer, got 0"),
    (["sweep", "{config}", "--grid", "r=2", "--set", "lora.lora_dropout=2", "--out", "{taken}/../fresh"],
     "--set lora.lora_dropout=2: lora.lora_dropout must be in [0, 1)"),
    (["generate", "{model}", "--chat-template", "nope", "--prompt", "hi"], "--chat-template 'nope' is not a built-in"),
    (["generate", "{model}", "--chat-template", "{taken}/none.jinja", "--prompt", "hi"],
     "--chat-template '{taken}/none.jinja': no such .jinja file"),
    (["eval", "{model}", "--data", "{data}", "--template", "nope"], "--template 'nope' is not a built-in"),
]

# Bugs from the audit (#13 section 5)
BAD_INPUTS += [
    (["train", "{config}", "--set", "eval_data.paths=[{data}]", "--set", "eval_data.batch_size=3", "--set",
      "output_dir={taken}/../fresh"], "eval_data.batch_size 3 x 1 process(es) = 3 rows do not split"),
    (["eval", "{model}", "--template", "{broken_template}", "--data", "{data}"],
     "the chat template of --template failed: TemplateSyntaxError"),
    (["train", "{config}", "--set", "data.template={broken_template}", "--set", "output_dir={taken}/../fresh"],
     "the chat template of data.template failed"),
    (["generate", "{model}", "--prompt", "hi", "--temperature", "1", "--top-p", "0"], "top_p=0.0 (in (0, 1])"),
]


@pytest.mark.parametrize("argv, says", BAD_INPUTS, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _) in
                                                        enumerate(BAD_INPUTS)])
def test_bad_input_gives_a_one_paragraph_error(tiny_run, tmp_path, capsys, argv, says):
    paths = _bad_configs(tiny_run, tmp_path)
    err = _error([arg.format(**paths) for arg in argv], capsys)
    assert says.format(**paths) in err
    assert len(err.strip().splitlines()) == 2  # the paragraph, then the --debug hint
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "fresh").exists()  # refused before anything was written
