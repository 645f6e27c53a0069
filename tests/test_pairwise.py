"""The reward model, ORPO and SimPO objectives against TRL: ``RewardTrainer.compute_loss``, the experimental ORPO
trainer's and CPO trainer's (``loss_type="simpo"``) batch losses and metrics, on the same tiny models and token ids,
and SimPO's formula written in float64 on transformers' logits. Each jaxft batch packs the pairs as two consecutive
documents of a row (several pairs in one row, rows with padding) from the token ids TRL's collators made."""
import dataclasses

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from trl import RewardConfig, RewardTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

import jaxft
from hf_oracle import build, build_head, save
from jaxft.config import ConfigError
from jaxft.peft.tree import Trainable, split
from jaxft.train.loop import StepConfig, init_state, train_step
from jaxft.train.metrics import evaluate
from jaxft.train.pairwise import ORPO, RewardModel, SimPO

WORDS = "<pad> <s> </s> <unk> the quick brown fox jumps over a lazy dog hello world answer question yes no".split()
PROMPTS = ["hello ", "question ", "the dog ", "a ", "world answer "]
CHOSEN = ["the quick fox", "yes", "jumps over a lazy dog", "brown fox jumps", "yes no yes"]
REJECTED = ["a lazy dog jumps", "no no", "yes", "dog", "the fox over the dog"]
MARGINS = [0.5, -0.3, 1.2, 0.0, 0.7]
ROWS = [[0, 1], [2], [3], [4]]  # the pairs packed in each jaxft row: 4 rows, 2 micro-batches of 2 rows
TRL_ARGS = dict(report_to=[], bf16=False, use_cpu=True)

_loss_sum = jax.jit(lambda objective, cfg, params, batch: objective.loss_sum(cfg, params, batch),
                    static_argnums=(0, 1))
_eval_sums = jax.jit(lambda objective, cfg, params, batch: objective.eval_sums(cfg, params, batch),
                     static_argnums=(0, 1))


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("pairwise_tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return folder


def _pack(documents: list[list[dict]]) -> dict[str, np.ndarray]:
    """[B, T] arrays of rows of documents ({ids, labels?, margin?}), each row's documents in order, then padding."""
    t = max(sum(len(d["ids"]) for d in row) for row in documents) + 2
    out = {"input_ids": np.zeros((len(documents), t), np.int32), "segment_ids": np.zeros((len(documents), t), np.int32),
           "positions": np.zeros((len(documents), t), np.int32), "labels": np.full((len(documents), t), -100, np.int32),
           "margin": np.zeros((len(documents), t), np.float32)}
    for r, row in enumerate(documents):
        start = 0
        for s, doc in enumerate(row):
            span = slice(start, start + len(doc["ids"]))
            out["input_ids"][r, span], out["segment_ids"][r, span] = doc["ids"], s + 1
            out["positions"][r, span] = np.arange(len(doc["ids"]))
            if "labels" in doc:
                out["labels"][r, span] = doc["labels"]
            out["margin"][r, span] = doc.get("margin", 0.0)
            start += len(doc["ids"])
    return out


def _micro_batches(batch: dict, keys) -> dict:
    """The [B, T] batch as 2 micro-batches [2, B / 2, T] of the objective's keys."""
    return {k: jnp.asarray(batch[k]).reshape(2, -1, batch[k].shape[-1]) for k in keys}


def _step_metrics(objective, cfg, params, batch) -> dict:
    """The train step's metrics, full fine-tuning (A = 2 micro-batches with 3 and 2 pairs: the step divides by all
    5 pairs once); the pair slots past a row's last pair give no NaN gradient."""
    trainable, frozen = split(params, Trainable(everything=True))
    state = init_state(trainable, optax.sgd(0.0))
    _, metrics = train_step(cfg, StepConfig(objective=objective), optax.sgd(0.0), state, frozen,
                            _micro_batches(batch, objective.batch_keys))
    assert not metrics["skipped"]
    return metrics


def _step(objective, cfg, params, batch) -> tuple[float, float]:
    """The train step's loss and gradient norm (:func:`_step_metrics`)."""
    metrics = _step_metrics(objective, cfg, params, batch)
    return float(metrics["loss"]), float(metrics["grad_norm"])


def _torch_grad_norm(model) -> float:
    norm = float(torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in model.parameters() if p.grad is not None)))
    model.zero_grad(set_to_none=True)
    return norm


def _close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=what)


# -- reward model ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    model = build_head("llama", "seq_cls", num_labels=1, scale=0.3)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp("reward_model")))
    return model, cfg, params


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.1)])
def test_reward_model_loss_and_metrics_match_trl_reward_trainer(reward_model, tokenizer_folder, tmp_path,
                                                               with_margin, center):
    model, cfg, params = reward_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    records = [{"chosen": p + c, "rejected": p + r} | ({"margin": m} if with_margin else {})
               for p, c, r, m in zip(PROMPTS, CHOSEN, REJECTED, MARGINS)]
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=5, center_rewards_coefficient=center,
                        **TRL_ARGS)
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                            processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    model.eval()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    trl_loss, trl_grad_norm = float(loss), _torch_grad_norm(model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
    margins = inputs["margin"].numpy() if with_margin else np.zeros(5)
    documents = [[doc for k in row for doc in ({"ids": ids[k][mask[k]], "margin": margins[k]},
                                               {"ids": ids[5 + k][mask[5 + k]]})] for row in ROWS]
    batch = _pack(documents)
    if not with_margin:
        del batch["margin"]  # a batch without the array: margin 0
    objective = RewardModel(center_rewards_coefficient=center)
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    _close(float(_loss_sum(objective, cfg, params, jax_batch)) / float(objective.units(jax_batch)), trl_loss,
           "loss")
    if with_margin:
        step_loss, grad_norm = _step(objective, cfg, params, batch)
        _close(step_loss, trl_loss, "train step loss")
        np.testing.assert_allclose(grad_norm, trl_grad_norm, rtol=1e-4, err_msg="gradient norm")
    metrics = evaluate(lambda b: _eval_sums(objective, cfg, params, b),
                       [{k: v[i:i + 2] for k, v in jax_batch.items()} for i in (0, 2)], objective.eval_metrics)
    assert metrics["pairs"] == 5
    for name in ("accuracy", "margin", "mean_reward"):
        _close(metrics[name], trl_metrics[name], name)
    _close(metrics["loss"], trl_loss, "eval loss")


def test_reward_model_train_step_metrics_are_reward_trainers(reward_model, tokenizer_folder, tmp_path):
    """RewardTrainer's logged accuracy, margin and mean_reward of a training batch (margins and centering on), from
    jaxft's step over 2 micro-batches of 3 and 2 pairs: means over all 5 pairs (rewards: over all 10 documents)."""
    model, cfg, params = reward_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    records = [{"chosen": p + c, "rejected": p + r, "margin": m}
               for p, c, r, m in zip(PROMPTS, CHOSEN, REJECTED, MARGINS)]
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=5, center_rewards_coefficient=0.1,
                        **TRL_ARGS)
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                            processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        trainer.compute_loss(model, dict(inputs))
    model.eval()
    expected = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
    documents = [[doc for k in row for doc in ({"ids": ids[k][mask[k]], "margin": inputs["margin"][k].item()},
                                               {"ids": ids[5 + k][mask[5 + k]]})] for row in ROWS]
    metrics = _step_metrics(RewardModel(center_rewards_coefficient=0.1), cfg, params, _pack(documents))
    for name in RewardModel.step_metric_keys:
        _close(float(metrics[name]), expected[name], name)


def test_reward_model_needs_a_one_label_score_head(reward_model):
    _, cfg, params = reward_model
    batch = {k: jnp.asarray(v) for k, v in _pack([[{"ids": [4, 5]}, {"ids": [6]}]]).items()}
    two_labels = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, num_labels=2))
    with pytest.raises(ConfigError, match="'seq_cls' head with 1 labels"):
        RewardModel().loss_sum(two_labels, params, batch)


# -- ORPO and SimPO -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    model = build("llama", scale=0.3)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp("causal_lm")))
    return model, cfg, params


def _trl_pair_batches(trainer_class, config_class, model, tokenizer_folder, tmp_path, **config):
    """TRL's trainer and its batches of one pair each (every pair of the data, in the dataloader's order)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    args = config_class(output_dir=str(tmp_path), per_device_train_batch_size=1, max_length=64, **TRL_ARGS, **config)
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                            processing_class=tokenizer)
    model.eval()
    return trainer, list(trainer.get_train_dataloader())


def _document(batch: dict, side: str) -> dict:
    """One TRL sequence (prompt + completion) as a jaxft document: its ids and the shifted completion labels."""
    keep = batch[f"{side}_attention_mask"][0].numpy().astype(bool)
    ids, labels = batch[f"{side}_input_ids"][0].numpy()[keep], batch[f"{side}_labels"][0].numpy()[keep]
    return {"ids": ids, "labels": np.append(labels[1:], -100)}


def _trl_means(trainer, model, batches) -> tuple[float, float, dict, list[dict]]:
    """TRL's loss, its gradient norm and its metrics as means over its one-pair batches, and the jaxft documents."""
    losses, metrics, documents = [], [], []
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss, batch_metrics = trainer.get_batch_loss_metrics(model, batch)
        (loss / len(batches)).backward()
        losses.append(float(loss))
        metrics.append(batch_metrics)
        documents.append([_document(batch, "chosen"), _document(batch, "rejected")])
    mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    return float(np.mean(losses)), _torch_grad_norm(model), mean, documents


def _check_against_trl(objective, cfg, params, trl, names):
    trl_loss, trl_grad_norm, trl_metrics, documents = trl
    batch = _pack([[doc for k in row for doc in documents[k]] for row in ROWS])
    jax_batch = {k: jnp.asarray(batch[k]) for k in objective.batch_keys}
    _close(float(_loss_sum(objective, cfg, params, jax_batch)) / float(objective.units(jax_batch)), trl_loss,
           "loss")
    step_loss, grad_norm = _step(objective, cfg, params, batch)
    _close(step_loss, trl_loss, "train step loss")
    np.testing.assert_allclose(grad_norm, trl_grad_norm, rtol=1e-4, err_msg="gradient norm")
    metrics = objective.eval_metrics(_eval_sums(objective, cfg, params, jax_batch))
    _close(metrics["loss"], trl_loss, "eval loss")
    for name in names:
        _close(metrics[name], trl_metrics[name], name)
    return batch


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "nll_loss")


def test_orpo_loss_and_metrics_match_trl_orpo_trainer(causal_lm, tokenizer_folder, tmp_path):
    model, cfg, params = causal_lm
    trainer, batches = _trl_pair_batches(ORPOTrainer, ORPOConfig, model, tokenizer_folder, tmp_path, beta=0.25)
    trl = _trl_means(trainer, model, batches)
    assert all(len(d[0]["ids"]) > (d[0]["labels"] != -100).sum() + 1 for d in trl[3])  # prompts in the NLL
    _check_against_trl(ORPO(beta=0.25, chunk_size=4), cfg, params, trl,
                       PREFERENCE_METRICS + ("log_odds_ratio", "log_odds_chosen"))


def _simpo_float64(model, documents, beta, gamma) -> float:
    """SimPO's loss (its paper's eq. 6) in float64: −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ)."""
    model64 = model.to(torch.float64)
    losses = []
    with torch.no_grad():
        for pair in documents:
            averages = []
            for doc in pair:
                logits = model64(torch.as_tensor(doc["ids"][None], dtype=torch.long)).logits[0]
                logp = torch.log_softmax(logits, -1).numpy()
                scored = doc["labels"] != -100
                averages.append(logp[scored, doc["labels"][scored]].mean())
            losses.append(np.logaddexp(0.0, -(beta * (averages[0] - averages[1]) - gamma)))
    model.to(torch.float32)
    return float(np.mean(losses))


@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_simpo_matches_trl_cpo_simpo_and_the_papers_formula(causal_lm, tokenizer_folder, tmp_path, nll_weight):
    model, cfg, params = causal_lm
    objective = SimPO(beta=2.0, gamma_beta_ratio=0.3, nll_weight=nll_weight, chunk_size=0)
    trainer, batches = _trl_pair_batches(CPOTrainer, CPOConfig, model, tokenizer_folder, tmp_path, loss_type="simpo",
                                         beta=2.0, simpo_gamma=2.0 * 0.3, cpo_alpha=nll_weight)
    trl = _trl_means(trainer, model, batches)
    # TRL reports nll_loss 0 when cpo_alpha is 0 (it skips the term); jaxft reports the chosen NLL all the same
    names = PREFERENCE_METRICS if nll_weight else tuple(n for n in PREFERENCE_METRICS if n != "nll_loss")
    batch = _check_against_trl(objective, cfg, params, trl, names)
    if nll_weight == 0.0:
        paper = _simpo_float64(model, trl[3], beta=2.0, gamma=0.6)
        jax_batch = {k: jnp.asarray(batch[k]) for k in objective.batch_keys}
        _close(float(_loss_sum(objective, cfg, params, jax_batch)) / 5, paper, "SimPO's formula")


def test_pair_objectives_refuse_a_bad_beta():
    with pytest.raises(ConfigError, match="ORPO: beta must be > 0"):
        ORPO(beta=0.0)
    with pytest.raises(ConfigError, match="SimPO: gamma_beta_ratio and nll_weight"):
        SimPO(gamma_beta_ratio=-1.0)


@pytest.mark.parametrize("objective,trainer_class,config_class,config", [
    (ORPO(beta=0.25, chunk_size=4), ORPOTrainer, ORPOConfig, dict(beta=0.25)),
    (SimPO(beta=2.0, gamma_beta_ratio=0.3, nll_weight=1.0, chunk_size=0), CPOTrainer, CPOConfig,
     dict(loss_type="simpo", beta=2.0, simpo_gamma=0.6, cpo_alpha=1.0))], ids=["orpo", "simpo"])
def test_orpo_and_simpo_train_step_metrics_are_trls(causal_lm, tokenizer_folder, tmp_path, objective, trainer_class,
                                                    config_class, config):
    """TRL's metrics (means over its one-pair batches: over the pairs) from jaxft's step over 2 micro-batches of 3
    and 2 pairs, divided once."""
    model, cfg, params = causal_lm
    trainer, batches = _trl_pair_batches(trainer_class, config_class, model, tokenizer_folder, tmp_path, **config)
    _, _, trl_metrics, documents = _trl_means(trainer, model, batches)
    metrics = _step_metrics(objective, cfg, params, _pack([[doc for k in row for doc in documents[k]]
                                                           for row in ROWS]))
    for name in objective.step_metric_keys:
        _close(float(metrics[name]), trl_metrics[name], name)
