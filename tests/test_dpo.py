"""DPO (jaxft.train.preference) against TRL's DPOTrainer, the oracle: its own data preparation and collator, its
``_compute_loss`` (loss, logged rewards) and torch autograd of it (gradient norm w.r.t. the LoRA weights), on a
tiny random Llama with a non-zero PEFT LoRA adapter, for every loss type, with the adapters-off reference and with
a separate reference model."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import jaxft
from hf_oracle import build, save
from jaxft.config import ConfigError
from jaxft.data.chat import IGNORE_INDEX
from jaxft.recipes import demo
from jaxft.train.loop import StepConfig, init_state, jit_train_step, with_reference
from jaxft.train.preference import DPO, LOSSES, PairLogps, pair_logps, rewards, sigmoid_loss, weighted_loss
from jaxft.train.sequences import label_logprobs

RECORDS = [  # prompt, chosen, rejected: completions of different lengths, one pair alone in the last row
    ("reverse 3 1 4 =", " 4 1 3 .", " 3 1 4 ."),
    ("reverse 1 5 9 2 =", " 2 9 5 1 .", " 2 9 ."),
    ("reverse 5 3 =", " 3 5 .", " 5 3 5 3 3 ."),
    ("reverse 2 7 =", " 7 2 .", " 2 2 ."),
    ("reverse 8 3 8 =", " 8 3 8 .", " 3 8 8 8 ."),
]
PAIRS_PER_ROW = 2
BETA = 0.2
SMOOTHED = {"robust": 0.1, "exo_pair": 0.05}  # the losses that read label_smoothing (TRL: > 0 for exo_pair)
REFERENCES = ("adapters_off", "separate")
CASES = [((name,), None) for name in LOSSES] + [(("sigmoid", "ipo"), (0.8, 0.3))]  # every type, a weighted list


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Base, adapter and reference-model folders, two TRL trainers (adapters-off and separate reference) and the
    batch their collator builds from TRL's tokenization of RECORDS."""
    root = tmp_path_factory.mktemp("dpo")
    demo.build_tokenizer(root, [" ".join(r) for r in RECORDS])
    tok = transformers.AutoTokenizer.from_pretrained(root)
    base = build("llama", seed=0, vocab_size=len(tok))
    save(base, root / "base")
    reference = build("llama", seed=1, vocab_size=len(tok))
    save(reference, root / "reference")
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in RECORDS])
    args = dict(report_to=[], bf16=False, per_device_train_batch_size=len(RECORDS), beta=BETA, use_cpu=True,
                gradient_checkpointing=False)
    # TRL's adapters-off reference is for a new adapter (peft_config=): a PeftModel passed in gets its initial
    # adapter as the reference instead
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    off = DPOTrainer(base, args=DPOConfig(output_dir=str(root / "trl-a"), **args), train_dataset=data,
                     processing_class=tok, peft_config=lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in off.model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    off.model.save_pretrained(root / "adapter")
    policy = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(root / "base"),
                                            root / "adapter", is_trainable=True)
    separate = DPOTrainer(policy, ref_model=reference.eval(), args=DPOConfig(output_dir=str(root / "trl-b"), **args),
                          train_dataset=data, processing_class=tok)
    trainers = {"adapters_off": off, "separate": separate}
    trainer = trainers["adapters_off"]
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    cfg, base_params = jaxft.from_pretrained(root / "base")
    params = jaxft.load_adapter(root / "adapter", base_params)
    batch = _packed_batch(inputs)
    ref_cfg, ref_params = jaxft.from_pretrained(root / "reference")
    ref_logps = label_logprobs(ref_cfg, ref_params, batch, chunk_size=16)
    return dict(root=root, trainers=trainers, inputs=inputs, cfg=cfg, params=params, base_params=base_params,
                batch=batch, ref_logps=ref_logps)


def _packed_batch(inputs) -> dict:
    """TRL's collated pairs (rows 0..n-1 chosen, n..2n-1 rejected, right-padded) packed as jaxft lays pairs out:
    pair k of a row is its segments 2k + 1 (prompt + chosen) and 2k + 2 (prompt + rejected), labels shifted onto
    the completion tokens."""
    ids, attention, completion = (inputs[k].numpy() for k in ("input_ids", "attention_mask", "completion_mask"))
    n = len(ids) // 2
    rows = [list(range(start, min(start + PAIRS_PER_ROW, n))) for start in range(0, n, PAIRS_PER_ROW)]
    docs = [[(ids[r][attention[r] == 1], completion[r][attention[r] == 1]) for i in row for r in (i, n + i)]
            for row in rows]
    width = max(sum(len(d[0]) for d in row) for row in docs)
    out = {k: np.zeros((len(rows), width), np.int32) for k in ("input_ids", "segment_ids", "positions")}
    out["labels"] = np.full((len(rows), width), IGNORE_INDEX, np.int32)
    for b, row in enumerate(docs):
        at = 0
        for s, (tokens, mask) in enumerate(row, start=1):
            span = slice(at, at + len(tokens))
            out["input_ids"][b, span], out["segment_ids"][b, span] = tokens, s
            out["positions"][b, span] = np.arange(len(tokens))
            out["labels"][b, at:at + len(tokens) - 1] = np.where(mask[1:] == 1, tokens[1:], IGNORE_INDEX)
            at += len(tokens)
    return {k: jnp.asarray(v) for k, v in out.items()}


def _trl(trainer, inputs, loss_types, loss_weights):
    """TRL's loss, its logged mean rewards, and the norm of the loss's gradient w.r.t. the LoRA weights."""
    trainer.loss_types, trainer.loss_weights = list(loss_types), list(loss_weights or [1.0] * len(loss_types))
    trainer.label_smoothing = _smoothing(loss_types)
    trainer._metrics["train"].clear()
    model = trainer.model.train()
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    grads = [p.grad.double() for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]
    metrics = trainer._metrics["train"]
    return dict(loss=loss.item(), chosen=metrics["rewards/chosen"][-1], rejected=metrics["rewards/rejected"][-1],
                grad_norm=float(torch.sqrt(sum((g ** 2).sum() for g in grads))))


def _smoothing(loss_types) -> float:
    return max(SMOOTHED.get(t, 0.0) for t in loss_types)


@pytest.fixture(scope="module")
def trl(setup):
    """TRL's results for every case and reference."""
    return {(reference, case): _trl(setup["trainers"][reference], setup["inputs"], *case)
            for reference in REFERENCES for case in CASES}


def _with_reference(setup, reference: str) -> dict:
    """The packed batch as the step sees it: the separate model's log-probs precomputed into it, or none (the
    objective's adapters-off reference then fills them in)."""
    return setup["batch"] if reference == "adapters_off" else {**setup["batch"], "ref_logps": setup["ref_logps"]}


def _objective(loss_types, loss_weights) -> DPO:
    return DPO(loss_types=loss_types, loss_weights=loss_weights, beta=BETA, label_smoothing=_smoothing(loss_types),
               chunk_size=16)


@pytest.mark.parametrize("reference", REFERENCES)
def test_every_loss_type_matches_trl(setup, trl, reference):
    """Each loss function (and the weighted list) on the pairs of the packed batch: its mean over pairs, the rewards
    and the gradient norm w.r.t. the LoRA weights (one compiled function for every case) are TRL's."""
    cfg = setup["cfg"]
    trainable, frozen = jaxft.split(setup["params"], jaxft.Trainable())
    batch = with_reference(_objective(("sigmoid",), None), cfg, setup["params"], _with_reference(setup, reference))

    def pair_stats(t):
        logps = label_logprobs(cfg, jaxft.combine(t, frozen), batch, chunk_size=16)
        return pair_logps(logps, batch["ref_logps"], batch)

    def case_losses(t):
        p, real = pair_stats(t)
        return jnp.stack([jnp.sum(jnp.where(real, weighted_loss(p, types, weights or (1.0,) * len(types), BETA,
                                                                _smoothing(types)), 0.0)) / jnp.sum(real)
                          for types, weights in CASES])

    losses, jacobian = jax.jit(lambda t: (case_losses(t), jax.jacrev(case_losses)(t)))(trainable)
    grad_norms = np.sqrt(sum(np.sum(np.asarray(g, np.float64).reshape(len(CASES), -1) ** 2, axis=1)
                             for g in jax.tree.leaves(jacobian)))
    p, real = pair_stats(trainable)
    chosen, rejected = (float(jnp.sum(jnp.where(real, r, 0.0)) / jnp.sum(real)) for r in rewards(p, BETA))
    for i, case in enumerate(CASES):
        expected = trl[reference, case]
        assert abs(expected["chosen"] - expected["rejected"]) > 1e-3 and expected["grad_norm"] > 1e-3
        # float32 holds a loss of ~20 (sppo_hard) to ~2e-6: within 1e-5, or 1e-6 of its size where that is more
        np.testing.assert_allclose(losses[i], expected["loss"], atol=1e-5, rtol=1e-6, err_msg=str(case))
        np.testing.assert_allclose([chosen, rejected], [expected["chosen"], expected["rejected"]], atol=1e-5, rtol=0)
        # gradient norms reach ~274 (sppo_hard), float32 sums over every trainable leaf in another order than
        # torch's: within 1e-4, or 4e-6 of the norm (measured: 8.9e-7 on an Intel Xeon, under 3.6e-7 on an EPYC)
        np.testing.assert_allclose(grad_norms[i], expected["grad_norm"], atol=1e-4, rtol=4e-6, err_msg=str(case))


@pytest.mark.parametrize("reference,case", [("adapters_off", CASES[0]), ("separate", CASES[2]),
                                            ("adapters_off", CASES[-1])],
                         ids=["sigmoid-adapters_off", "ipo-separate", "weighted-adapters_off"])
def test_train_step_matches_trl(setup, trl, reference, case):
    """The objective end to end: one jaxft train step's loss and gradient norm, and the eval's rewards, are TRL's
    (sigmoid with the adapters-off reference, IPO with the separate model, the weighted list)."""
    cfg, params, batch = setup["cfg"], setup["params"], _with_reference(setup, reference)
    objective = _objective(*case)
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    opt = optax.sgd(0.0)
    _, metrics = jit_train_step(cfg, StepConfig(objective=objective), opt)(
        init_state(jax.tree.map(jnp.copy, trainable), opt), frozen, jax.tree.map(lambda x: x[None], batch))
    evaluated = objective.eval_metrics(objective.eval_sums(cfg, params, batch))
    expected = trl[reference, case]
    np.testing.assert_allclose([metrics["loss"], evaluated["loss"], evaluated["rewards/chosen"],
                                evaluated["rewards/rejected"]],
                               [expected["loss"], expected["loss"], expected["chosen"], expected["rejected"]],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["grad_norm"], expected["grad_norm"], atol=1e-4, rtol=0)
    assert float(metrics["n_targets"]) == len(RECORDS)


def test_eval_metrics_are_trls_means_over_pairs(setup):
    """Every logged DPO metric of TRL's (sigmoid, adapters-off), from the eval sums of the packed batch."""
    trainer = setup["trainers"]["adapters_off"]
    _trl(trainer, setup["inputs"], ("sigmoid",), None)
    objective = DPO(beta=BETA, chunk_size=0)
    metrics = objective.eval_metrics(objective.eval_sums(setup["cfg"], setup["params"], setup["batch"]))
    assert metrics["pairs"] == len(RECORDS)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        np.testing.assert_allclose(metrics[key], trainer._metrics["train"][key][-1], atol=1e-5, rtol=0, err_msg=key)


def test_zero_lora_b_gives_log_2_at_step_0(setup):
    """Levanter / marin's invariant: an untrained LoRA (B = 0) with the adapters-off reference is the reference,
    so every pair's sigmoid loss is -log σ(0) = log 2."""
    cfg = setup["cfg"]
    params = jaxft.lora.add(cfg, setup["base_params"], jaxft.LoraConfig(r=4, target_modules="all-linear"),
                            jax.random.PRNGKey(0))
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    opt = optax.sgd(0.0)
    objective = DPO(beta=BETA, chunk_size=16)
    _, metrics = jit_train_step(cfg, StepConfig(objective=objective), opt)(
        init_state(trainable, opt), frozen, jax.tree.map(lambda x: x[None], setup["batch"]))
    assert float(metrics["loss"]) == np.float32(math.log(2))
    assert float(metrics["n_targets"]) == len(RECORDS)


def test_precomputed_reference_is_used_and_adapters_off_is_the_base(setup):
    """A batch holding ``ref_logps`` keeps them; without, the reference is the base model's log-probs."""
    cfg, batch = setup["cfg"], setup["batch"]
    objective = DPO(chunk_size=16)
    given = with_reference(objective, cfg, setup["params"], {**batch, "ref_logps": setup["ref_logps"]})
    assert given["ref_logps"] is setup["ref_logps"]
    computed = with_reference(objective, cfg, setup["params"], batch)["ref_logps"]
    np.testing.assert_array_equal(computed, label_logprobs(cfg, setup["base_params"], batch, chunk_size=16))


def test_cdpo_label_smoothing_is_the_papers_formula():
    """cDPO (TRL 1.16's sigmoid no longer smooths): -(1 - ε) log σ(βΔ) - ε log σ(-βΔ), in float64."""
    rng = np.random.default_rng(0)
    p = PairLogps(*(rng.normal(size=7) for _ in range(4)), np.full(7, 3.0), np.full(7, 5.0))
    delta = (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)
    expected = -(0.9 * np.log(1 / (1 + np.exp(-BETA * delta))) + 0.1 * np.log(1 / (1 + np.exp(BETA * delta))))
    np.testing.assert_allclose(sigmoid_loss(PairLogps(*map(jnp.asarray, p)), BETA, 0.1), expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_types=("sigmoid", "aot")), "loss_types"), (dict(loss_types=()), "loss_types"),
    (dict(loss_types=("sigmoid", "ipo"), loss_weights=(1.0,)), "loss_weights"), (dict(beta=0.0), "beta"),
    (dict(loss_types=("robust",), label_smoothing=0.5), "robust"), (dict(loss_types=("exo_pair",)), "exo_pair")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DPO(**kwargs)


@pytest.mark.parametrize("reference,case", [("adapters_off", CASES[0]), ("separate", CASES[2])],
                         ids=["sigmoid-adapters_off", "ipo-separate"])
def test_train_step_metrics_are_trls(setup, reference, case):
    """Every DPO metric TRL logs at a train step (its ``_metrics["train"]`` after ``_compute_loss`` of the batch),
    from a jaxft step accumulating 2 micro-batches of 4 pairs and 1 pair: means over all 5 pairs, divided once."""
    trainer = setup["trainers"][reference]
    _trl(trainer, setup["inputs"], *case)
    expected = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    batch = _with_reference(setup, reference)
    empty_row = {k: jnp.full_like(v[:1], IGNORE_INDEX if k == "labels" else 0) for k, v in batch.items()}
    micro_batches = {k: jnp.concatenate([v, empty_row[k]]).reshape(2, 2, -1) for k, v in batch.items()}
    trainable, frozen = jaxft.split(setup["params"], jaxft.Trainable())
    opt = optax.sgd(0.0)
    _, metrics = jit_train_step(setup["cfg"], StepConfig(objective=_objective(*case)), opt)(
        init_state(jax.tree.map(jnp.copy, trainable), opt), frozen, micro_batches)
    assert float(metrics["n_targets"]) == len(RECORDS)
    for key in DPO.step_metric_keys:
        np.testing.assert_allclose(float(metrics[key]), expected[key], atol=1e-5, rtol=0, err_msg=key)
