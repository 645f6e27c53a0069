"""Task heads through whole runs (``task: classify | token_classify | qa``): what a run exports loads in
transformers / PEFT with the logits jaxft computes, the head trains (alone, or beside LoRA on a dense or NF4
base), float targets shard like token ids, a resume continues the same run, and bad combinations are refused
before anything is written."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open

import jaxft
from jaxft.cli import main
from jaxft.config import ConfigError
from jaxft.data import DataError
from jaxft.data.config import DataConfig
from jaxft.hf.peft_format import adapter_head
from jaxft.models.heads import sequence_logits, token_logits
from jaxft.parallel import MeshConfig
from jaxft.peft.head import HeadOnly
from jaxft.peft.lora import LoraConfig
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig, TrainConfig, load_run_config
from jaxft.recipes.tasks import ClassifyTask, QaTask, SftTask, TokenClassifyTask
from jaxft.recipes.multi import check_members
from jaxft.train.optim import OptimConfig
from sft_worker import make_base, train_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import task_heads  # noqa: E402  (the example's generated records with exact answers)

LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
RUN_NUMBERS = itertools.count()  # every run config gets its own output_dir


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer (pad id 0), and each task's train / eval records."""
    root = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(0)
    files = {}
    for name, make in (("classify", lambda i: task_heads.classify_record(rng)),
                       ("token", lambda i: task_heads.token_record(rng)),
                       ("qa", lambda i: task_heads.qa_record(rng, i))):
        files[name] = _write(root / f"{name}.jsonl", [make(i) for i in range(48)])
    return make_base(root / "base"), files, root


def _run_config(setup, name: str, task, peft=(LORA,), *, quant=None, steps=6, mesh=(-1, 1, 1), save_every=0,
                max_length=24, lr=1e-2) -> RunConfig:
    base, files, root = setup
    data = DataConfig(paths=(str(files[name]),), max_length=max_length, batch_size=8)
    return RunConfig(model=str(base), output_dir=str(root / f"run-{name}-{next(RUN_NUMBERS)}"), task=task,
                     peft=tuple(peft), quant=quant, data=data, eval_data=data, mesh=MeshConfig(*mesh),
                     optim=OptimConfig(lr=lr, max_grad_norm=1.0),
                     train=TrainConfig(steps=steps, log_every=1, eval_batches=8, save_every=save_every))


def _texts(setup, n=4):
    """Token ids of the first ``n`` classify texts, right-padded with the pad id 0 (no text holds it), and the mask."""
    base, files, _ = setup
    tok = jaxft.load_tokenizer(base)
    ids = [tok.encode(json.loads(line)["text"]) for line in files["classify"].read_text().splitlines()[:n]]
    padded = np.array([i + [0] * (max(map(len, ids)) - len(i)) for i in ids])
    return padded, (padded != 0).astype(np.int32)


def test_classify_lora_run_exports_an_adapter_that_peft_loads_with_equal_logits(setup):
    cfg = _run_config(setup, "classify", ClassifyTask(label_names=("other", "increasing")))
    summary = sft.run(cfg)
    assert {"loss", "examples", "accuracy", "macro_f1"} <= summary["eval"].keys()
    assert summary["eval"]["examples"] == 48  # one pass over the eval records, each scored once
    adapter = Path(summary["export"])
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    head = adapter_head(adapter)
    model_cfg, params = jaxft.from_pretrained(setup[0], head=head)
    params = jaxft.load_adapter(adapter, params, model_cfg)
    ids, mask = _texts(setup)
    ours = np.asarray(sequence_logits(model_cfg, params, ids, segment_ids=mask))[:, 0]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(setup[0], num_labels=2).eval()
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    untrained = jaxft.from_pretrained(setup[0], head=head, head_seed=cfg.train.seed)[1]["score"]["kernel"]
    assert np.abs(np.asarray(params["score"]["kernel"]) - np.asarray(untrained)).max() > 1e-3  # the head trained
    assert head == cfg.head  # the label names travel with the adapter (head_config.json beside PEFT's files)


def test_jaxft_eval_scores_a_classify_adapter_as_its_run_did(setup, capsys):
    cfg = _run_config(setup, "classify", ClassifyTask(label_names=("other", "increasing")), steps=4)
    summary = sft.run(cfg)
    capsys.readouterr()
    assert main(["eval", str(setup[0]), "--adapter", summary["export"], "--data", str(setup[1]["classify"]),
                 "--max-length", "24", "--batch-size", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "macro_f1", "examples"):  # both score every record of the eval file once
        assert printed[key] == pytest.approx(summary["eval"][key], abs=1e-6), key


def test_head_only_run_trains_the_head_alone_and_exports_a_transformers_token_classifier(setup):
    task = TokenClassifyTask(label_names=("O", "B-ODD", "I-ODD"))
    summary = sft.run(_run_config(setup, "token", task, peft=(HeadOnly(),)))
    assert {"entity_precision", "entity_recall", "entity_f1", "accuracy"} <= summary["eval"].keys()
    export = Path(summary["export"])
    assert export.name == "model"
    model_cfg, params = jaxft.from_pretrained(export)
    assert model_cfg.head == task.head()
    _, base = jaxft.from_pretrained(setup[0])
    for ours, theirs in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(base["layers"]), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))  # the decoder is the base's, bit for bit
    hf = transformers.AutoModelForTokenClassification.from_pretrained(export).eval()
    assert hf.config.id2label == {0: "O", 1: "B-ODD", 2: "I-ODD"}
    ids, mask = _texts(setup)
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ours = np.asarray(token_logits(model_cfg, params, ids, segment_ids=mask))
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4)


def test_qa_on_an_nf4_base_with_lora_and_jaxft_eval_scores_the_export_as_the_run_did(setup, capsys):
    cfg = _run_config(setup, "qa", QaTask(doc_stride=4, max_answer_length=4), quant=jaxft.QuantConfig(), steps=8)
    summary = sft.run(cfg)
    assert {"exact_match", "f1", "start_accuracy", "end_accuracy"} <= summary["eval"].keys()
    assert train_losses(Path(cfg.output_dir))[8] < train_losses(Path(cfg.output_dir))[1]
    capsys.readouterr()
    assert main(["eval", str(setup[0]), "--adapter", summary["export"], "--quant", "nf4", "--data",
                 str(setup[1]["qa"]), "--max-length", "24", "--batch-size", "8", "--doc-stride", "4",
                 "--max-answer-length", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("exact_match", "f1", "qa_examples"):  # both score every question of the eval file
        assert printed[key] == pytest.approx(summary["eval"][key], abs=1e-6), key
    out = Path(cfg.output_dir).parent / f"{Path(cfg.output_dir).name}-export"
    assert main(["export", str(setup[0]), "--adapter", summary["export"], "--out", str(out)]) == 0
    with safe_open(out / "adapter_model.safetensors", "np") as exported:
        assert any(k.startswith("base_model.model.transformer.layers.") for k in exported.keys())  # Llama QA's base


def test_regression_targets_shard_like_token_ids_on_two_meshes(setup):
    task = ClassifyTask(num_labels=1)  # transformers' default for one label: regression (MSE on float targets)
    base, files, root = setup
    records = [json.loads(line) for line in files["classify"].read_text().splitlines()]
    _write(root / "regression.jsonl", [{"text": r["text"], "label": len(r["text"]) / 10} for r in records])
    setup_reg = (base, {**files, "regression": root / "regression.jsonl"}, root)
    losses = [train_losses(Path(sft.run(cfg)["export"]).parent) for cfg in (
        _run_config(setup_reg, "regression", task, peft=(), mesh=(8, 1, 1), lr=1e-3),
        _run_config(setup_reg, "regression", task, peft=(), mesh=(2, 2, 2), lr=1e-3))]
    assert losses[0][6] < losses[0][1]
    np.testing.assert_allclose(list(losses[1].values()), list(losses[0].values()), rtol=1e-4)


def test_a_resumed_classify_run_continues_the_uninterrupted_one(setup):
    task = ClassifyTask(num_labels=2, label_names=("other", "increasing"))
    whole = _run_config(setup, "classify", task, steps=6, save_every=2)
    sft.run(whole)
    part = _run_config(setup, "classify", task, steps=4, save_every=2)
    sft.run(part)
    sft.run(part.replace(train=TrainConfig(steps=6, log_every=1, eval_batches=8, save_every=2)), resume=True)
    expected, resumed = train_losses(Path(whole.output_dir)), train_losses(Path(part.output_dir))
    np.testing.assert_allclose([resumed[s] for s in (5, 6)], [expected[s] for s in (5, 6)], rtol=1e-5)


def test_runs_that_cannot_hold_a_head_are_refused_before_writing(setup, tmp_path):
    base, files, root = setup
    with pytest.raises(ConfigError, match="lora.task_type 'TOKEN_CLS' does not fit task 'classify'"):
        _run_config(setup, "classify", ClassifyTask(num_labels=2), peft=(LORA.replace(task_type="TOKEN_CLS"),))
    with pytest.raises(ConfigError, match="give num_labels or label_names"):
        ClassifyTask()
    with pytest.raises(ConfigError, match="num_labels 3 but 2 label_names"):
        ClassifyTask(num_labels=3, label_names=("a", "b"))
    cfg = _run_config(setup, "classify", ClassifyTask(num_labels=2))
    with pytest.raises(ConfigError, match="task 'classify' also trains a task head"):
        check_members([cfg])
    with pytest.raises(ConfigError, match="trains the task head alone, but task 'sft' has none"):
        _run_config(setup, "classify", SftTask(), peft=(HeadOnly(),))
    classifier = tmp_path / "classifier"  # a *ForSequenceClassification folder trained as a causal LM
    model_cfg, params = jaxft.from_pretrained(base, head=jaxft.HeadConfig("seq_cls", 2))
    jaxft.save_pretrained(model_cfg, params, classifier)
    for f in base.glob("tokenizer*"):
        (classifier / f.name).write_bytes(f.read_bytes())
    sft_cfg = _run_config(setup, "classify", SftTask()).replace(model=str(classifier))
    with pytest.raises(ConfigError, match="is a seq_cls model .* but task 'sft' trains a causal LM"):
        sft.run(sft_cfg)
    assert not Path(sft_cfg.output_dir).exists()
    ends_with_pad = _write(tmp_path / "pad.jsonl", [{"text": "3 4 <pad>", "label": 0}] * 8)
    cfg = _run_config(setup, "classify", ClassifyTask(num_labels=2))
    with pytest.raises(DataError, match="pad.jsonl:1: ends with the pad token"):
        sft.run(cfg.replace(data=cfg.data.replace(paths=(str(ends_with_pad),))))
    assert not Path(cfg.output_dir).exists()
    no_pad = tmp_path / "no-pad"  # neither config.json nor the tokenizer names a pad token
    no_pad.mkdir()
    for f in base.iterdir():
        (no_pad / f.name).write_bytes(f.read_bytes())
    for name, key in (("config.json", "pad_token_id"), ("tokenizer_config.json", "pad_token")):
        settings = json.loads((no_pad / name).read_text())
        settings.pop(key)
        (no_pad / name).write_text(json.dumps(settings))
    cfg = _run_config(setup, "classify", ClassifyTask(num_labels=2)).replace(
        model=str(no_pad), output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="needs pad_token_id to score batches"):
        sft.run(cfg)
    assert not (tmp_path / "run").exists()


def test_each_example_config_loads_with_its_task_and_head():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name, kind in (("classify-demo", "seq_cls"), ("token-classify-demo", "token_cls"), ("qa-demo", "qa")):
        cfg = load_run_config(root / f"{name}.yaml")
        assert cfg.head.kind == kind and cfg.lora.task_type == cfg.head.peft_task_type


def test_a_task_on_a_head_checkpoint_keeps_its_settings_and_the_checkpoints_label_names():
    folder = jaxft.ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                               num_attention_heads=1, head=jaxft.HeadConfig("seq_cls", 3, labels=("a", "b", "c")))
    asked = jaxft.HeadConfig("seq_cls", 3, problem_type="multi_label_classification")
    assert folder.with_head(asked, "x").head == jaxft.HeadConfig("seq_cls", 3, ("a", "b", "c"),
                                                                 "multi_label_classification")
    assert folder.with_head(None, "x") == folder
