"""jaxft's KTO objective against TRL's KTOTrainer (the oracle) on the same tiny Llama, LoRA adapter and token ids.

TRL prepares the data itself (tokenization, EOS, the KL completions rotated within each batch of
``per_device_train_batch_size``) and computes loss, metrics and gradients in ``_compute_loss``; jaxft gets the very
same token ids packed as segments (each example and each KL-baseline example a document) and the same weights
through ``jaxft.from_pretrained`` + ``jaxft.load_adapter``.
"""
import math

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import jaxft
from jaxft.config import ConfigError
from jaxft.peft.tree import Trainable, split
from jaxft.train.kto import KTO
from jaxft.train.loop import StepConfig, init_state, train_step, with_reference
from jaxft.train.sequences import label_logprobs
from tests.hf_oracle import build, save

import trl  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: hf_oracle's pad, bos and eos ids
LABELS = [True, False, True, True, False, True, False, False]  # two micro-batches of 4, both kinds in each
BETA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT = 0.5, 1.3, 0.7
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
ROW = 40  # tokens per packed row: two examples and their two KL-baseline documents
REFERENCE_SEED = 2  # the separate reference model (seed 0 is the base); its KL baselines on the records are > 0


def _tokenizer(folder):
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _records():
    rng = np.random.default_rng(0)

    def words(n):
        return " ".join(rng.choice(WORDS, size=n))

    return [{"prompt": words(rng.integers(2, 6)), "completion": " " + words(rng.integers(2, 6)), "label": label}
            for label in LABELS]


def _trainer(tmp_path, tokenizer, name, ref_model=None, lora_state=None):
    """A KTOTrainer over the records with a LoRA adapter whose A and B are random (or ``lora_state``'s)."""
    args = trl.KTOConfig(output_dir=str(tmp_path / name), report_to=[], per_device_train_batch_size=4,
                         beta=BETA, desirable_weight=DESIRABLE_WEIGHT, undesirable_weight=UNDESIRABLE_WEIGHT,
                         use_cpu=True, bf16=False)  # float32 throughout (TRL defaults to bf16 autocast)
    trainer = trl.KTOTrainer(model=build("llama", seed=0), ref_model=ref_model, args=args,
                             train_dataset=datasets.Dataset.from_list(_records()), processing_class=tokenizer,
                             peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in trainer.model.named_parameters():
            if "lora_" in param_name:
                param.copy_(lora_state[param_name] if lora_state else 0.2 * torch.randn(
                    param.shape, generator=generator))
    trainer.model.train()
    return trainer


def _trl_step(trainer, micro_batches):
    """TRL's loss (mean over micro-steps, as gradient accumulation), per-micro-step metrics, and the LoRA grad norm."""
    trainer.model.zero_grad()
    losses = []
    for rows in micro_batches:
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in rows])
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False) / len(micro_batches)
        loss.backward()
        losses.append(loss.item())
    grads = [p.grad for name, p in trainer.model.named_parameters() if "lora_" in name]
    grad_norm = math.sqrt(sum(float(torch.sum(g.double() ** 2)) for g in grads))
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return sum(losses), metrics, grad_norm


def _documents(example):
    """(ids, completion mask, kto_label) of an example's document and of its KL-baseline document."""
    kind = 1 if example["label"] else 2
    out = []
    for completion, label in ((example["completion_ids"], kind), (example["KL_completion_ids"], 3)):
        ids = example["prompt_ids"] + completion
        out.append((ids, [0] * len(example["prompt_ids"]) + [1] * len(completion), label))
    return out


def _jaxft_batch(dataset, micro_batches):
    """[A, 2, ROW] packed rows: micro-batch a holds TRL's rows ``micro_batches[a]`` (two per packed row), each
    example followed by its KL-baseline document; labels shifted onto the completion tokens only."""
    arrays = {k: np.zeros((len(micro_batches), 2, ROW), np.int32) for k in
              ("input_ids", "segment_ids", "positions", "kto_label")}
    arrays["labels"] = np.full((len(micro_batches), 2, ROW), -100, np.int32)
    for a, rows in enumerate(micro_batches):
        for r in range(2):
            start, segment = 0, 1
            for example in rows[2 * r:2 * r + 2]:
                for ids, mask, kind in _documents(dataset[example]):
                    end = start + len(ids)
                    assert end <= ROW, "ROW too short for the records"
                    arrays["input_ids"][a, r, start:end] = ids
                    arrays["segment_ids"][a, r, start:end] = segment
                    arrays["positions"][a, r, start:end] = np.arange(len(ids))
                    arrays["kto_label"][a, r, start:end] = kind
                    arrays["labels"][a, r, start:end - 1] = np.where(np.array(mask[1:]) == 1, ids[1:], -100)
                    start, segment = end, segment + 1
    return {k: jnp.asarray(v) for k, v in arrays.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    tokenizer = _tokenizer(root / "tokenizer")
    save(build("llama", seed=0), root / "base")
    save(build("llama", seed=REFERENCE_SEED), root / "reference")
    trainer = _trainer(root, tokenizer, "adapters_off")
    trainer.model.save_pretrained(root / "adapter")
    lora_state = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    with_reference_model = _trainer(root, tokenizer, "reference_model",
                                    ref_model=build("llama", seed=REFERENCE_SEED).train(), lora_state=lora_state)
    cfg, base = jaxft.from_pretrained(root / "base")
    params = jaxft.load_adapter(root / "adapter", base, cfg)
    ref_cfg, ref_params = jaxft.from_pretrained(root / "reference")
    return {"trainers": {"adapters_off": trainer, "reference_model": with_reference_model}, "cfg": cfg,
            "params": params, "reference": (ref_cfg, ref_params)}


def _with_ref_logps(setup, batches):
    """The batches with ``ref_logps`` precomputed from the separate reference model (as a cached reference)."""
    ref_cfg, ref_params = setup["reference"]
    ref = jax.vmap(lambda b: label_logprobs(ref_cfg, ref_params, b, chunk_size=0))(batches)
    return {**batches, "ref_logps": ref}


def _jaxft_step(setup, objective, batches):
    trainable, frozen = split(setup["params"], Trainable())
    optimizer = optax.sgd(0.1)
    _, metrics = train_step(setup["cfg"], StepConfig(objective=objective), optimizer, init_state(trainable, optimizer),
                            frozen, batches)
    return metrics


OBJECTIVE = KTO(beta=BETA, desirable_weight=DESIRABLE_WEIGHT, undesirable_weight=UNDESIRABLE_WEIGHT, chunk_size=7)


@pytest.mark.parametrize("reference", ["adapters_off", "reference_model"])
def test_loss_metrics_and_grad_norm_equal_trl(setup, reference):
    trainer = setup["trainers"][reference]
    rows = [0, 1, 2, 3]
    trl_loss, trl_metrics, trl_grad_norm = _trl_step(trainer, [rows])
    batches = _jaxft_batch(trainer.train_dataset, [rows])
    if reference == "reference_model":
        batches = _with_ref_logps(setup, batches)
    assert trl_metrics["kl"][0] > 0, "the records must give a KL baseline above the clamp, or it goes untested"
    metrics = _jaxft_step(setup, OBJECTIVE, batches)
    assert float(metrics["n_targets"]) == 4
    np.testing.assert_allclose(float(metrics["loss"]), trl_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), trl_grad_norm, rtol=1e-4, atol=1e-4)
    single = {k: v[0] for k, v in batches.items()}
    ours = OBJECTIVE.eval_metrics(OBJECTIVE.eval_sums(setup["cfg"], setup["params"], single))
    np.testing.assert_allclose(ours["loss"], trl_loss, rtol=1e-5, atol=1e-5)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(ours[name], trl_metrics[name][0], rtol=1e-5, atol=1e-5, err_msg=name)


def test_accumulated_micro_batches_each_take_their_own_kl_baseline(setup):
    """TRL averages each micro-step's KL rows on their own (gradient accumulation: a forward pass per micro-step);
    jaxft's accumulated step equals it, loss and gradient, with one KL baseline per micro-batch."""
    trainer = setup["trainers"]["adapters_off"]
    micro_batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    trl_loss, trl_metrics, trl_grad_norm = _trl_step(trainer, micro_batches)
    kls = trl_metrics["kl"]
    assert kls[0] != pytest.approx(kls[1], abs=1e-3), "micro-batches with one KL baseline would not test this"
    batches = _jaxft_batch(trainer.train_dataset, micro_batches)
    metrics = _jaxft_step(setup, OBJECTIVE, batches)
    assert float(metrics["n_targets"]) == 8
    np.testing.assert_allclose(float(metrics["loss"]), trl_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), trl_grad_norm, rtol=1e-4, atol=1e-4)
    for a, kl in enumerate(kls):
        single = {k: v[a] for k, v in batches.items()}
        terms = OBJECTIVE._terms(setup["cfg"], setup["params"], with_reference(OBJECTIVE, setup["cfg"],
                                                                               setup["params"], single))
        np.testing.assert_allclose(float(terms["kl"]), kl, rtol=1e-5, atol=1e-6)


def test_a_negative_kl_baseline_counts_as_zero(setup):
    """Against the formula on the per-document log-ratios, with the baseline documents' log-ratios pushed far below
    0. (That the baseline carries no gradient, TRL computing it under no_grad, the grad-norm parities check.)"""
    batch = {k: v[0] for k, v in _jaxft_batch(setup["trainers"]["adapters_off"].train_dataset, [[0, 1, 2, 3]]).items()}
    cfg, params = setup["cfg"], setup["params"]
    batch = with_reference(OBJECTIVE, cfg, params, batch)
    baseline_targets = (batch["kto_label"] == 3) & (batch["labels"] != -100)
    lowered = {**batch, "ref_logps": batch["ref_logps"] + 50.0 * baseline_targets}
    assert float(OBJECTIVE._terms(cfg, params, batch)["kl"]) > 0
    terms = OBJECTIVE._terms(cfg, params, lowered)
    assert float(terms["kl"]) == 0.0
    r = np.asarray(terms["logratio"], np.float64)
    d, u = np.asarray(terms["desirable"]), np.asarray(terms["undesirable"])
    assert d.sum() == 3 and u.sum() == 1  # LABELS[:4]
    expected = (DESIRABLE_WEIGHT * (1 - 1 / (1 + np.exp(-BETA * r[d]))).sum()
                + UNDESIRABLE_WEIGHT * (1 - 1 / (1 + np.exp(BETA * r[u]))).sum())
    np.testing.assert_allclose(float(OBJECTIVE.loss_sum(cfg, params, lowered)), expected, rtol=1e-6)


def test_units_count_examples_not_baseline_documents_or_padding():
    segment_ids = jnp.array([[[1, 1, 2, 2, 3, 3, 3, 0], [1, 2, 2, 3, 4, 4, 0, 0]]])
    kto_label = jnp.array([[[1, 1, 3, 3, 2, 2, 2, 0], [2, 3, 3, 1, 3, 3, 0, 0]]])
    assert float(KTO().units({"segment_ids": segment_ids, "kto_label": kto_label})) == 4


@pytest.mark.parametrize("bad", [dict(beta=0.0), dict(desirable_weight=-1.0), dict(undesirable_weight=float("nan"))])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        KTO(**bad)


def test_train_step_metrics_are_trls(setup):
    """TRL's logged KTO metrics of each micro-step, from jaxft's accumulated step over the same 2 micro-batches:
    rewards and log-probs divided once by the step's examples of each kind (TRL's per-micro-step means weighted by
    their counts), kl the mean of the micro-batches' KL baselines (TRL's mean over its micro-steps)."""
    trainer = setup["trainers"]["adapters_off"]
    micro_batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    _, trl_metrics, _ = _trl_step(trainer, micro_batches)
    metrics = _jaxft_step(setup, OBJECTIVE, _jaxft_batch(trainer.train_dataset, micro_batches))
    counts = {"chosen": [sum(LABELS[i] for i in rows) for rows in micro_batches]}
    counts["rejected"] = [len(rows) - n for rows, n in zip(micro_batches, counts["chosen"])]
    expected = {"kl": np.mean(trl_metrics["kl"])}
    for kind, n in counts.items():
        assert min(n) != max(n), "equal counts would not tell one division from a mean of micro-step means"
        for name in (f"rewards/{kind}", f"logps/{kind}"):
            expected[name] = np.dot(trl_metrics[name], n) / sum(n)
    expected["rewards/margins"] = expected["rewards/chosen"] - expected["rewards/rejected"]
    assert set(expected) == set(KTO.step_metric_keys)
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-5, err_msg=name)
