"""#21: ``task: pretrain`` and ``task: continued_pretrain`` end to end on a tiny inline Llama and a byte-level BPE.

Oracles: transformers loads the export and gives the logits of jaxft's forward on the checkpoint's trained params;
HF's own random init gives the statistics jaxft's init must match; transformers' ``num_parameters`` gives the
parameter count the MFU is recomputed from; transformers' loss on the eval rows gives each source's eval loss; the
uninterrupted run gives the params a resumed run must end with.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.numpy import load_file
from test_text_stream import build_tokenizer, make_documents, write_jsonl

from jaxft.config import ConfigError, ModelConfig
from jaxft.data.text_config import TextDataConfig
from jaxft.data.text_stream import TextStream
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.peft_format import load_adapter
from jaxft.models.llama import forward
from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config, with_token_batch
from jaxft.recipes.multi import check_members
from jaxft.recipes.skeleton import check_run_dir
from jaxft.recipes.skeleton import load_model
from jaxft.recipes.tasks import source_name
from jaxft.train import flops
from jaxft.train.metrics import read_metrics
from jaxft.train.objectives import CausalLM

STEPS, ROWS, LENGTH = 12, 8, 32  # 8 rows: one per fake CPU device of the default mesh
MODEL = {"type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    tok = build_tokenizer(root / "tok")
    paths = {name: write_jsonl(root / f"{name}.jsonl", make_documents(seed, count))
             for name, seed, count in (("domain", 0, 200), ("general", 1, 200), ("general_eval", 2, 40),
                                       ("domain_eval", 3, 40))}
    return {"root": root, "tok": tok, "paths": paths}


def write_config(setup, name: str, **sections) -> Path:
    tree = {"model": MODEL, "tokenizer": str(setup["tok"]), "output_dir": str(setup["root"] / name),
            "task": {"type": "pretrain"},
            "data": {"type": "text", "paths": [setup["paths"]["domain"]], "max_length": LENGTH, "batch_size": ROWS},
            "optim": {"lr": 3e-3},
            "train": {"steps": STEPS, "log_every": 1, "save_every": 6, "loss_chunk_size": 0}}
    tree.update(sections)
    path = setup["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def trained_params(run: Path, step: int = STEPS) -> dict:
    """The trained params of a full-training run's checkpoint, read with orbax alone."""
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():  # "sharding info not provided": the saved one serves, the array is read whole
        warnings.simplefilter("ignore", UserWarning)
        return ocp.PyTreeCheckpointer().restore(run / "checkpoints" / str(step) / "state")["trainable"]


@pytest.fixture(scope="module")
def pretrained(setup):
    """A from-scratch run: bf16 compute over f32 params, z-loss, 2 micro-batches per step from tokens_per_batch."""
    path = write_config(setup, "scratch", dtype="float32", compute_dtype="bfloat16",
                        task={"type": "pretrain", "z_loss": 1e-4, "tokens_per_batch": 2 * ROWS * LENGTH},
                        eval_data={"type": "text", "paths": [setup["paths"]["domain_eval"]], "max_length": LENGTH,
                                   "batch_size": ROWS})
    summary = sft.run(load_run_config(path))
    return setup["root"] / "scratch", summary


@pytest.mark.slow
def test_export_loads_in_transformers_with_the_logits_of_jaxfts_forward_on_the_trained_params(pretrained):
    run, _ = pretrained
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "model", torch_dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, MODEL["vocab_size"], (2, 24))
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    cfg = ModelConfig(**{k: v for k, v in MODEL.items() if k != "type"})
    params = jax.tree.map(np.asarray, trained_params(run))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))  # f32 master weights
    got = np.asarray(forward(cfg, params, jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_loss_falls_and_the_train_log_has_perplexity_and_mfu(pretrained):
    run, _ = pretrained
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]]) - 0.5
    for r in train:  # with a z-loss the loss is the cross-entropy plus it; the perplexity is the cross-entropy's
        assert r["loss"] == pytest.approx(r["ce_loss"] + r["z_loss"], rel=1e-5) and r["z_loss"] > 0
        assert r["perplexity"] == pytest.approx(math.exp(r["ce_loss"]), rel=1e-5)
    assert all("mfu" in r for r in train[1:]) and "mfu" not in train[0]  # step 1 compiles: no speed yet


@pytest.mark.slow
def test_tokens_per_batch_sets_grad_accum_and_each_step_reads_that_many_tokens(pretrained):
    run, _ = pretrained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["grad_accum"] == 2 and saved["task"]["tokens_per_batch"] == 2 * ROWS * LENGTH
    extra = json.loads((run / "checkpoints" / str(STEPS) / "extra" / "metadata").read_text())  # orbax's JSON item
    state = extra["iterators"][0]
    assert state["row"] == STEPS * 2 * ROWS  # rows read: steps x micro-batches x rows


@pytest.mark.slow
def test_mfu_in_the_summary_is_model_flops_times_tokens_per_s_over_the_peak(pretrained):
    run, summary = pretrained
    written = json.loads((run / "summary.json").read_text())
    assert written["mfu"] == summary["mfu"]
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "model")
    n = model.num_parameters(exclude_embeddings=True)  # untied: the LM head's matmul is in it
    attention = 12 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * LENGTH  # heads x head_dim = hidden
    assert written["flops_per_token"] == 6 * n + attention
    assert written["peak_flops"] == pytest.approx(written["peak_flops_per_device"] * jax.device_count())
    assert written["peak_flops_source"].startswith("measured: best 2048^2 bfloat16 matmul on cpu")
    assert written["devices"] == jax.device_count()
    assert written["mfu"] == pytest.approx((6 * n + attention) * written["tokens_per_s"] / written["peak_flops"])
    assert 0 < written["mfu"] < 1


def test_init_matches_transformers_init_statistics(setup):
    """N(0, 0.02) matrices and unit norms, as HF's ``_init_weights`` draws a LlamaForCausalLM of the same config."""
    cfg = load_run_config(write_config(setup, "init"))
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(0))
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in MODEL.items() if k != "type"})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).state_dict()
    layers = params["layers"]
    pairs = [(params["embed_tokens"]["embedding"], hf["model.embed_tokens.weight"]),
             (params["lm_head"]["kernel"], hf["lm_head.weight"])]
    pairs += [(layers[m]["kernel"], hf[f"model.layers.0.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.weight"])
              for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    for ours, theirs in pairs:
        assert float(np.std(ours)) == pytest.approx(float(theirs.std()), rel=0.1)
        assert abs(float(np.mean(ours))) < 3 * hf_cfg.initializer_range / math.sqrt(np.size(ours)) + 1e-3
    for norm in ("input_layernorm", "post_attention_layernorm"):
        np.testing.assert_array_equal(np.asarray(layers[norm]["scale"]),
                                      hf[f"model.layers.0.{norm}.weight"].numpy()[None].repeat(2, 0))
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"]), hf["model.norm.weight"].numpy())


def test_bf16_compute_keeps_f32_params_and_runs_the_matmuls_in_bf16(setup):
    cfg = load_run_config(write_config(setup, "bf16", dtype="float32", compute_dtype="bfloat16"))
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    batch = next(TextStream(cfg.data, load_tokenizer(setup["tok"])))
    jaxpr = jax.make_jaxpr(lambda p: CausalLM(chunk_size=0).loss_sum(model_cfg, p, batch))(params)
    dots = [eqn for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
    operand_dtypes = {tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in dots}
    assert operand_dtypes == {("bfloat16", "bfloat16")}, operand_dtypes
    assert len(dots) >= 9  # 7 linears and attention's two products per (scanned) layer, and the LM head


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else _sub_jaxprs(eqn.params):
            yield from _equations(sub)


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                yield inner


@pytest.mark.slow
def test_resuming_from_a_checkpoint_ends_with_the_params_of_the_uninterrupted_run(setup, tmp_path):
    """Mixed sources (the stream's position per source and row restored): the run stopped after step 6, resumed."""
    mix = {"type": "text", "paths": [setup["paths"]["domain"], setup["paths"]["general"]], "weights": [3, 1],
           "max_length": LENGTH, "batch_size": ROWS}
    sft.run(load_run_config(write_config(setup, "whole", data=mix)))
    whole = setup["root"] / "whole"
    want = load_file(whole / "model" / "model.safetensors")
    shutil.rmtree(whole / "checkpoints" / str(STEPS))  # as if the run had stopped after saving step 6
    sft.run(load_run_config(write_config(setup, "whole", data=mix)), resume=True)
    got = load_file(whole / "model" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.slow
def test_continued_pretraining_logs_each_eval_sources_perplexity_as_transformers_computes_it(setup, pretrained):
    run, _ = pretrained
    names = ("domain_eval", "general_eval")
    eval_data = {"type": "text", "paths": [setup["paths"][n] for n in names], "max_length": LENGTH,
                 "batch_size": ROWS}
    path = write_config(setup, "continued", model=str(run / "model"), tokenizer=None, peft=[],
                        task={"type": "continued_pretrain"},
                        data={"type": "text", "paths": [setup["paths"]["domain"], setup["paths"]["general"]],
                              "weights": [0.7, 0.3], "max_length": LENGTH, "batch_size": ROWS},
                        eval_data=eval_data, train={"steps": 4, "log_every": 1, "eval_every": 2,
                                                    "eval_batches": 2, "loss_chunk_size": 0})
    cfg = load_run_config(path)
    sft.run(cfg)
    out = setup["root"] / "continued"
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model", torch_dtype=torch.float32)
    tokens_all = loss_all = 0.0
    for name in names:
        assert evals[-1][f"{name}/perplexity"] == pytest.approx(math.exp(evals[-1][f"{name}/loss"]), rel=1e-6)
        loss_sum, tokens = _hf_loss(model, cfg.eval_data.replace(paths=(setup["paths"][name],)), out / "model", 2)
        assert evals[-1][f"{name}/loss"] == pytest.approx(loss_sum / tokens, rel=1e-4)
        assert evals[-1][f"{name}/tokens"] == tokens
        tokens_all, loss_all = tokens_all + tokens, loss_all + loss_sum
    assert evals[-1]["loss"] == pytest.approx(loss_all / tokens_all, rel=1e-4)


@pytest.mark.slow
def test_continued_pretraining_with_lora_exports_an_adapter_peft_loads_with_jaxfts_logits(setup, pretrained):
    import peft

    run, _ = pretrained
    path = write_config(setup, "continued_lora", model=str(run / "model"), tokenizer=None,
                        task={"type": "continued_pretrain"},
                        peft=[{"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}],
                        train={"steps": 4, "log_every": 1, "loss_chunk_size": 0})
    summary = sft.run(load_run_config(path))
    assert "mfu" not in summary  # 6N counts every weight's gradient: an adapter run reports none
    ids = torch.tensor(np.random.default_rng(1).integers(0, MODEL["vocab_size"], (2, 24)))
    base = transformers.AutoModelForCausalLM.from_pretrained(run / "model", torch_dtype=torch.float32)
    with torch.no_grad():
        before = base(ids).logits.numpy()
        want = peft.PeftModel.from_pretrained(base, setup["root"] / "continued_lora" / "adapter")(ids).logits.numpy()
    cfg, params = from_pretrained(run / "model")
    params = load_adapter(setup["root"] / "continued_lora" / "adapter", params, cfg)
    got = np.asarray(forward(cfg, params, jnp.asarray(ids.numpy())))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - before).max() > 1e-3  # the adapter trained


def _hf_loss(model, data: TextDataConfig, tokenizer_dir: Path, batches: int) -> tuple[float, int]:
    """Summed next-token cross-entropy and target count of transformers' model on the first eval batches."""
    stream = TextStream(data, load_tokenizer(tokenizer_dir))
    loss_sum, tokens = 0.0, 0
    for _ in range(batches):
        batch = next(stream)
        with torch.no_grad():  # concat rows: one segment, positions 0..T-1, as transformers' default
            logits = model(torch.tensor(batch["input_ids"], dtype=torch.long)).logits
        labels = torch.tensor(batch["labels"], dtype=torch.long)
        loss_sum += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                            ignore_index=-100, reduction="sum"))
        tokens += int((labels != -100).sum())
    return loss_sum, tokens


def test_the_shipped_pretraining_configs_load_with_their_tasks_and_text_data():
    configs = Path(__file__).resolve().parent.parent / "configs"
    scratch = load_run_config(configs / "pretrain-scratch.yaml")
    assert scratch.task.name == "pretrain" and scratch.full and scratch.model_dir is None
    assert scratch.compute_dtype == "bfloat16" and scratch.dtype == "float32"
    continued = load_run_config(configs / "continued-pretrain.yaml")
    assert continued.task.name == "continued_pretrain" and continued.model_dir is not None
    assert continued.data.weights == (0.75, 0.25) and len(continued.eval_data.paths) == 2
    for cfg in (scratch, continued):
        assert isinstance(cfg.data, TextDataConfig) and isinstance(cfg.eval_data, TextDataConfig)


@pytest.mark.parametrize("spec, name", [("corpus/wiki.jsonl", "wiki"), ("corpus/wiki.jsonl.gz", "wiki"),
                                        ("corpus/wiki.parquet", "wiki"), ("corpus/wiki.txt", "wiki"),
                                        ("corpus/wiki.txt.gz", "wiki"), ("corpus/web.v2.txt", "web.v2"),
                                        ("corpus/notes", "notes"), ("web/*.txt", "web"), ("books/", "books"),
                                        ("data/**/part.txt", "data"), ("hf:allenai/c4:validation", "c4-validation")])
def test_an_eval_source_is_named_by_its_file_stem_or_folder(spec, name):
    assert source_name(spec) == name


def test_parallel_runs_refuse_continued_pretraining(setup):
    cfg = load_run_config(write_config(setup, "parallel", model="/models/llama", tokenizer=None,
                                       task={"type": "continued_pretrain"}, peft=[{"type": "lora"}]))
    with pytest.raises(ConfigError, match="task 'continued_pretrain' streams text.*sweep it without --parallel"):
        check_members([cfg, cfg.replace(output_dir="/runs/other")])


def test_tokens_per_batch_derives_grad_accum_per_process_count_and_refuses_a_remainder(setup):
    tokens = 4 * ROWS * LENGTH
    cfg = load_run_config(write_config(setup, "tpb", task={"type": "pretrain", "tokens_per_batch": tokens}))
    assert with_token_batch(cfg, 1).train.grad_accum == 4 and with_token_batch(cfg, 2).train.grad_accum == 2
    with pytest.raises(ConfigError, match=f"task.tokens_per_batch {tokens} is not a whole number of micro-batches: "
                                          f"data.batch_size {ROWS} x data.max_length {LENGTH} x 3 process"):
        with_token_batch(cfg, 3)
    fixed = load_run_config(write_config(setup, "tpb", task={"type": "pretrain", "tokens_per_batch": tokens},
                                         train={"steps": 2, "grad_accum": 3}))
    with pytest.raises(ConfigError, match="train.grad_accum 3 but task.tokens_per_batch"):
        with_token_batch(fixed, 1)


@pytest.mark.parametrize("changes, says", [
    ({"model": "/models/llama"}, "task pretrain trains an inline model config from random weights, but model "
                                 "'/models/llama' is a model folder; to train a trained model further on text use "
                                 "task: {type: continued_pretrain}"),
    ({"peft": [{"type": "lora"}]}, "task pretrain trains every weight of a new model"),
    ({"data": {"paths": ["chats.jsonl"]}}, "data: task 'pretrain' trains on plain text documents, but data is chat "
                                           "/ record data; give data: {type: text"),
    ({"eval_data": {"paths": ["chats.jsonl"]}}, "eval_data: task 'pretrain' trains on plain text documents"),
    ({"task": {"type": "sft"}, "model": "/models/llama", "tokenizer": None},
     "data: {type: text} is plain text for the pretraining tasks (task: pretrain | continued_pretrain), but task "
     "'sft' reads chats or records"),
    ({"task": {"type": "continued_pretrain"}}, "task continued_pretrain continues a trained model folder, but "
                                               "model is an inline config"),
    ({"task": {"type": "pretrain", "z_loss": -1}}, "task pretrain: z_loss must be >= 0"),
    ({"task": {"type": "pretrain", "tokens_per_batch": 0}}, "task pretrain: tokens_per_batch must be >= 1"),
    ({"eval_data": {"type": "text", "paths": ["a/web.jsonl", "b/web.txt"]}},
     "eval_data.paths 'a/web.jsonl' and 'b/web.txt' both name the eval source 'web'"),
    ({"eval_data": {"type": "text", "paths": ["a/wiki.jsonl.gz", "b/wiki.parquet"]}},
     "eval_data.paths 'a/wiki.jsonl.gz' and 'b/wiki.parquet' both name the eval source 'wiki'"),
    ({"data": {"type": "texts", "paths": ["a.txt"]}}, "data.type: unknown data type 'texts'; known types are "
                                                     "['chat', 'text']"),
])
def test_config_errors_name_the_key_and_the_fix(setup, changes, says):
    path = write_config(setup, "bad", **changes)
    with pytest.raises(ConfigError) as error:
        load_run_config(path)
    assert says in str(error.value)


@pytest.fixture(scope="module")
def z_loss_run(setup):
    """Two float32 steps with a large z-loss (its part of the loss is about 1.6 nats), a checkpoint after each."""
    path = write_config(setup, "zloss", task={"type": "pretrain", "z_loss": 0.05},
                        train={"steps": 2, "log_every": 1, "save_every": 1, "loss_chunk_size": 16})
    cfg = load_run_config(path)
    sft.run(cfg)
    return cfg, setup["root"] / "zloss"


def test_train_perplexity_is_of_the_cross_entropy_numpy_computes_without_the_z_loss(setup, z_loss_run):
    cfg, run = z_loss_run
    step2 = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"][1]
    stream = TextStream(cfg.data, load_tokenizer(setup["tok"]))
    next(stream)
    batch = next(stream)  # step 2's rows, trained on the params step 1 left (its checkpoint)
    model_cfg = ModelConfig(**{k: v for k, v in MODEL.items() if k != "type"})
    logits = np.asarray(forward(model_cfg, trained_params(run, 1), jnp.asarray(batch["input_ids"])), np.float64)
    top = logits.max(-1, keepdims=True)
    log_normalizer = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    labels = np.asarray(batch["labels"])
    target = labels != -100
    label_logit = np.take_along_axis(logits, np.where(target, labels, 0)[..., None], -1)[..., 0]
    cross_entropy = (log_normalizer - label_logit)[target].mean()
    z_loss = 0.05 * np.square(log_normalizer[target]).mean()
    assert step2["ce_loss"] == pytest.approx(cross_entropy, rel=1e-4)
    assert step2["z_loss"] == pytest.approx(z_loss, rel=1e-4) and z_loss > 1
    assert step2["loss"] == pytest.approx(cross_entropy + z_loss, rel=1e-4)
    assert step2["perplexity"] == pytest.approx(math.exp(cross_entropy), rel=1e-4)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", None), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", None),
    ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", None), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", None), ("NVIDIA A10G", 125e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("cpu", None)])
def test_the_peak_table_matches_device_kinds_as_jax_spells_them_by_whole_words(kind, peak):
    """Vendors' dense bf16 FLOP/s; a kind the table does not hold exactly (L40 is not L40S) is measured."""
    assert flops.known_peak(kind) == peak


def test_a_measured_peak_multiplies_matrices_of_the_runs_compute_dtype(monkeypatch):
    made = []

    def operands(n, dtype, device):
        made.append(flops_operands(n, dtype, device))
        return made[-1]

    flops_operands = flops.matmul_operands
    monkeypatch.setattr(flops, "matmul_operands", operands)
    cfg = ModelConfig(**{k: v for k, v in MODEL.items() if k != "type"}, dtype="bfloat16")
    measured = flops.model_flops(cfg, LENGTH, jax.devices()[:1])
    assert [(a.dtype, a.shape) for a in made[0]] == [(jnp.dtype(jnp.bfloat16), (flops.MATMUL_N, flops.MATMUL_N))] * 2
    assert measured.peak_source.startswith("measured: best 2048^2 bfloat16 matmul on cpu")


@pytest.mark.parametrize("section", ["data", "eval_data"])
def test_a_pretokenized_store_inside_output_dir_is_refused_naming_both_keys(setup, tmp_path, section):
    out = tmp_path / "run"
    store = out / "tokens"
    text = {"type": "text", "paths": [setup["paths"]["domain"]], "max_length": LENGTH, "batch_size": ROWS,
            "store": str(store)}
    cfg = load_run_config(write_config(setup, "store", output_dir=str(out), **{section: text}))
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=f"{section}.store '{store}' is inside output_dir '{out}'"):
            check_run_dir(cfg, out, resume=False, overwrite=overwrite)
    outside = load_run_config(write_config(setup, "store", output_dir=str(tmp_path / "other"), **{section: text}))
    assert check_run_dir(outside, tmp_path / "other", resume=False, overwrite=False) is None
