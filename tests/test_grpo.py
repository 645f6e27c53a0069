"""GRPO (jaxft.train.grpo) against TRL's GRPOTrainer, the oracle: its ``_compute_loss`` on fixed completions, old
log-probs and advantages (loss, logged metrics, torch autograd of the LoRA weights) and its advantage code on fixed
rewards, on a tiny random Llama with a non-zero PEFT LoRA adapter, at a temperature != 1."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.grpo_trainer import use_adapter

import jaxft
from hf_oracle import build, save
from jaxft.config import ConfigError
from jaxft.data.chat import IGNORE_INDEX
from jaxft.recipes import demo
from jaxft.train.grpo import GRPO, LOSS_TYPES, clipped_surrogate, group_advantages, k3_kl, truncated_mask
from jaxft.train.loop import StepConfig, init_state, jit_train_step, with_reference
from jaxft.train.objectives import CausalLM
from jaxft.train.sequences import adapters_off_logprobs, label_logprobs

PROMPTS = ["reverse 3 1 4 =", "reverse 1 5 9 2 ="]
G = 3  # completions per prompt, prompt-major rows as TRL's repeat_interleave
EOS = 2
COMPLETIONS = [[5, 9, EOS, 0, 0], [7, 7, 8, 6, EOS], [10, 4, 11, 3, 12],  # the third: cut, no stop token
               [EOS, 0, 0, 0, 0], [13, 8, EOS, 0, 0], [6, 5, 4, 9, EOS]]
ADVANTAGES = [0.9, -1.2, 0.5, -0.3, 1.5, -0.8]
SETTINGS = dict(temperature=0.7, epsilon=0.2, epsilon_high=0.28, max_completion_length=5)
BETA = 0.04
# (loss_type, beta, use_bias_correction_kl): every aggregation with and without the KL term (TRL's default
# importance-weighted KL), and the plain k3 estimate once
CASES = [(loss_type, beta, True) for loss_type in LOSS_TYPES for beta in (0.0, BETA)] + [("bnpo", BETA, False)]
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]  # the second group without spread: TRL's + 1e-4 keeps it finite


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A TRL GRPOTrainer (adapters-off reference, temperature 0.7) with a random LoRA adapter, the same model in
    jaxft, TRL's ``_compute_loss`` inputs (old log-probs off the current policy's, so the clip acts) and the batch
    that holds them in jaxft's layout."""
    root = tmp_path_factory.mktemp("grpo")
    demo.build_tokenizer(root, PROMPTS + [" 4 1 3 ."])
    tok = transformers.AutoTokenizer.from_pretrained(root)
    save(build("llama", seed=0, vocab_size=len(tok)), root / "base")
    args = GRPOConfig(output_dir=str(root / "trl"), report_to=[], bf16=False, use_cpu=True, beta=BETA,
                      per_device_train_batch_size=len(COMPLETIONS), num_generations=G, gradient_checkpointing=False,
                      **SETTINGS)
    trainer = GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(root / "base"),
                          reward_funcs=lambda prompts, completions, **_: REWARDS[:len(prompts)], args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]), processing_class=tok,
                          peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(3)
    trainer.model.load_state_dict({name: 0.1 * torch.randn_like(p) for name, p in trainer.model.named_parameters()
                                   if "lora_" in name}, strict=False)
    trainer.model.save_pretrained(root / "adapter")
    inputs = _trl_inputs(trainer, tok)
    cfg, base_params = jaxft.from_pretrained(root / "base")
    return dict(root=root, trainer=trainer, inputs=inputs, cfg=cfg, base_params=base_params,
                params=jaxft.load_adapter(root / "adapter", base_params), batch=_jaxft_batch(inputs))


def _trl_inputs(trainer, tok) -> dict:
    """``_compute_loss``'s inputs: left-padded prompts, the completions with the truncated one masked, old log-probs
    = the policy's own ± up to 0.4, the advantages, and TRL's adapters-off reference log-probs."""
    prompt = [tok(p)["input_ids"] for p in PROMPTS for _ in range(G)]
    width = max(map(len, prompt))
    prompt_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompt])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt])
    completion_ids = torch.tensor(COMPLETIONS)
    stopped = (completion_ids == EOS).any(dim=1)
    up_to_stop = (torch.cumsum((completion_ids == EOS).int(), dim=1) - (completion_ids == EOS).int()) == 0
    completion_mask = torch.from_numpy(np.array(truncated_mask(up_to_stop.int().numpy(), stopped.numpy())))
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    n = completion_ids.shape[1]
    with torch.no_grad():
        policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, n)[0]
        with use_adapter(trainer.model, adapter_name=None):
            reference = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, n)[0]
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-0.4, 0.4, policy.shape).astype(np.float32))
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, old_per_token_logps=(policy + noise) * completion_mask,
                advantages=torch.tensor(ADVANTAGES), ref_per_token_logps=reference,
                num_items_in_batch=completion_mask.sum())


def _jaxft_batch(inputs) -> dict:
    """The same rows as jaxft lays them out: [prompt | completion] right padded, labels shifted onto the completion
    tokens, the float arrays aligned with the labels; positions as TRL's (its left padding's columns count)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = (inputs[k].numpy() for k in (
        "prompt_ids", "prompt_mask", "completion_ids", "completion_mask"))
    rows, width = len(prompt_ids), prompt_ids.shape[1] + completion_ids.shape[1]
    out = {k: np.zeros((rows, width), np.int32) for k in ("input_ids", "segment_ids", "positions")}
    out["labels"] = np.full((rows, width), IGNORE_INDEX, np.int32)
    floats = {"old_logps": "old_per_token_logps", "ref_logps": "ref_per_token_logps"}
    out.update({k: np.zeros((rows, width), np.float32) for k in (*floats, "advantages")})
    for r in range(rows):
        pad = int((prompt_mask[r] == 0).sum())
        prompt, completion = prompt_ids[r, pad:], completion_ids[r][completion_mask[r] == 1]
        tokens = np.concatenate([prompt, completion])
        out["input_ids"][r, :len(tokens)], out["segment_ids"][r, :len(tokens)] = tokens, 1
        out["positions"][r, :len(tokens)] = pad + np.arange(len(tokens))
        targets = slice(len(prompt) - 1, len(tokens) - 1)  # the logit at t scores token t + 1
        out["labels"][r, targets] = completion
        for key, source in floats.items():
            out[key][r, targets] = inputs[source][r].numpy()[:len(completion)]
        out["advantages"][r, targets] = ADVANTAGES[r]
    return {k: jnp.asarray(v) for k, v in out.items()}


def _trl_loss(trainer, inputs, loss_type, beta, bias_correction=True, backward=False):
    """TRL's loss at one setting (and its gradients in the model's .grad); its metrics land in trainer._metrics."""
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = bias_correction
    trainer._metrics["train"].clear()
    model = trainer.model.train()
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    if backward:
        loss.backward()
    return loss.item()


@pytest.fixture(scope="module")
def trl(setup):
    """TRL's loss and logged metrics for every case."""
    out = {}
    for case in CASES:
        loss = _trl_loss(setup["trainer"], setup["inputs"], *case)
        out[case] = {"loss": loss, **{k: v[-1] for k, v in setup["trainer"]._metrics["train"].items()}}
    return out


def _objective(loss_type, beta, bias_correction=True, chunk_size=16, **kwargs) -> GRPO:
    return GRPO(loss_type=loss_type, beta=beta, use_bias_correction_kl=bias_correction, chunk_size=chunk_size,
                **SETTINGS, **kwargs)


def test_fixture_exercises_the_clip_and_the_kl(setup, trl):
    """A non-zero adapter (its reference differs), and tokens clipped low and high."""
    lora_b = [p for name, p in setup["trainer"].model.named_parameters() if "lora_B" in name]
    assert lora_b and all(float(p.abs().min()) > 0 for p in lora_b)
    metrics = trl["grpo", BETA, True]
    assert 0 < metrics["clip_ratio/low_mean"] and 0 < metrics["clip_ratio/high_mean"] and metrics["kl"] > 1e-3


def test_every_loss_type_with_and_without_kl_matches_trl(setup, trl):
    """Each aggregation at β = 0 and β > 0 (the adapters-off reference computed by the objective; chunked and
    full-logit log-probs alternate): its loss sum over its units is TRL's loss, in one compiled function."""
    cfg, params = setup["cfg"], setup["params"]
    policy_batch = {k: v for k, v in setup["batch"].items() if k != "ref_logps"}
    objectives = [_objective(*case, chunk_size=16 if i % 2 else 0) for i, case in enumerate(CASES)]

    @jax.jit
    def losses(params):
        return jnp.stack([o.loss_sum(cfg, params, with_reference(o, cfg, params, policy_batch))
                          / o.units(policy_batch) for o in objectives])

    np.testing.assert_allclose(losses(params), [trl[case]["loss"] for case in CASES], atol=1e-5, rtol=0)


def test_adapters_off_reference_is_trls(setup):
    """TRL's reference with the adapter disabled, at its temperature, from the objective's reference pass."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    policy_batch = {k: v for k, v in batch.items() if k != "ref_logps"}
    computed = with_reference(_objective("grpo", BETA), cfg, params, policy_batch)["ref_logps"]
    np.testing.assert_allclose(computed, batch["ref_logps"], atol=1e-5, rtol=0)
    assert "ref_logps" not in with_reference(_objective("grpo", 0.0), cfg, params, policy_batch)  # no pass at β = 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_two_micro_batches_give_the_one_batch_loss_and_trls_metrics(setup, trl, loss_type):
    """jaxft's train step over the rows split into 2 micro-batches of uneven completion lengths: the loss of the
    rows as one batch (TRL's: the units are counted over the whole batch and divided once), and TRL's step metrics
    (kl, clip ratios) and the mean completion length, with the reference given in the batch."""
    cfg, batch = setup["cfg"], setup["batch"]
    objective = _objective(loss_type, BETA, precomputed_reference=True)
    trainable, frozen = jaxft.split(setup["params"], jaxft.Trainable())
    opt = optax.sgd(0.0)
    micro_batches = jax.tree.map(lambda x: x.reshape(2, len(COMPLETIONS) // 2, -1), batch)
    lengths = setup["inputs"]["completion_mask"].sum(1).numpy()
    assert lengths[:3].sum() != lengths[3:].sum()  # TRL's per-micro-batch bnpo mean would differ from the batch's
    state = init_state(jax.tree.map(jnp.copy, trainable), opt)  # the step donates it
    _, metrics = jit_train_step(cfg, StepConfig(objective=objective), opt)(state, frozen, micro_batches)
    expected = trl[loss_type, BETA, True]
    np.testing.assert_allclose(metrics["loss"], expected["loss"], atol=1e-5, rtol=0)
    for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        np.testing.assert_allclose(metrics[key], expected[key], atol=1e-5, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(metrics["completions/mean_loss_length"], lengths.mean(), rtol=1e-6)


def test_adapter_gradients_are_torch_autograds(setup):
    """dapo with the KL term: the gradient of every LoRA leaf equals torch autograd's through ``_compute_loss``
    (TRL's gradients saved as a PEFT adapter and loaded by jaxft, so the leaves pair up by jaxft's own mapping)."""
    trainer, root = setup["trainer"], setup["root"]
    _trl_loss(trainer, setup["inputs"], "dapo", BETA, backward=True)
    lora = {name: p for name, p in trainer.model.named_parameters() if "lora_" in name}
    weights = {name: p.detach().clone() for name, p in lora.items()}
    trainer.model.load_state_dict({name: p.grad for name, p in lora.items()}, strict=False)
    trainer.model.save_pretrained(root / "grads")
    trainer.model.load_state_dict(weights, strict=False)
    expected = jaxft.split(jaxft.load_adapter(root / "grads", setup["base_params"]), jaxft.Trainable())[0]
    cfg, batch = setup["cfg"], setup["batch"]
    objective = _objective("dapo", BETA, precomputed_reference=True)
    trainable, frozen = jaxft.split(setup["params"], jaxft.Trainable())
    grads = jax.jit(jax.grad(lambda t: objective.loss_sum(cfg, jaxft.combine(t, frozen), batch)
                             / objective.units(batch)))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected)):
        assert float(jnp.max(jnp.abs(want))) > 1e-4, path
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_eval_is_the_loss_on_a_held_out_batch(setup, trl):
    """eval_sums / eval_metrics of the batch: TRL's loss (its eval mode does not rescale) and metrics."""
    objective = _objective("bnpo", BETA)
    batch = {k: v for k, v in setup["batch"].items() if k != "ref_logps"}
    metrics = objective.eval_metrics(objective.eval_sums(setup["cfg"], setup["params"], batch))
    expected = trl["bnpo", BETA, True]
    keys = ("loss", "kl", "clip_ratio/region_mean")
    np.testing.assert_allclose([metrics[k] for k in keys], [expected[k] for k in keys], atol=1e-5, rtol=1e-5)
    assert metrics["sequences"] == len(COMPLETIONS)
    assert metrics["tokens"] == int(setup["inputs"]["completion_mask"].sum())


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_are_trls(setup, scale_rewards):
    """TRL's advantages of fixed rewards (its reward function returns them for whatever it generated)."""
    trainer = setup["trainer"]
    trainer.scale_rewards = scale_rewards
    trainer.model.eval()
    out = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    np.testing.assert_allclose(group_advantages(jnp.asarray(REWARDS), G, scale_rewards), out["advantages"].numpy(),
                               atol=1e-6, rtol=1e-6)


def test_truncated_mask_is_trls():
    """TRL's mask_truncated_completions: ``completion_mask * (~is_truncated).unsqueeze(1).int()``."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    stopped = torch.tensor([True, False, True])
    expected = mask * stopped.unsqueeze(1).int()
    got = truncated_mask(jnp.asarray(mask.numpy()), jnp.asarray(stopped.numpy()))
    np.testing.assert_array_equal(got, expected.numpy())
    assert got.dtype == jnp.asarray(mask.numpy()).dtype


def test_per_token_terms_against_float64_formulas():
    """The surrogate and k3 KL (float32) against their formulas, written here in float64 over both signs of A and
    ratios inside and outside the clip range."""
    rng = np.random.default_rng(1)
    logps, old, ref = (rng.normal(-2, 0.5, (4, 7)).astype(np.float32) for _ in range(3))
    adv = (rng.normal(size=(4, 1)) * np.ones((1, 7))).astype(np.float32)
    ratio = np.exp(logps.astype(np.float64) - old)
    expected = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.3) * adv)
    assert (ratio < 0.8).any() and (ratio > 1.3).any()
    np.testing.assert_allclose(clipped_surrogate(*map(jnp.asarray, (logps, old, adv)), 0.2, 0.3), expected,
                               rtol=1e-5, atol=1e-6)
    delta = ref.astype(np.float64) - logps
    np.testing.assert_allclose(k3_kl(jnp.asarray(logps), jnp.asarray(ref)), np.exp(delta) - delta - 1, rtol=1e-5,
                               atol=1e-6)


def test_prompt_style_policy_and_its_adapters_off_reference(setup):
    """A prompt-tuning tree: its label log-probs are CausalLM's forward (through prompt_inputs), and the adapters-
    off reference is the bare base."""
    cfg, base, batch = setup["cfg"], setup["base_params"], setup["batch"]
    params = jaxft.PromptTuningConfig(num_virtual_tokens=3).add(cfg, base, jax.random.PRNGKey(0))

    @jax.jit
    def compare(params, base):
        return (label_logprobs(cfg, params, batch, chunk_size=0), CausalLM(chunk_size=0).loss_sum(cfg, params, batch),
                adapters_off_logprobs(cfg, params, batch, chunk_size=16)["ref_logps"],
                label_logprobs(cfg, base, batch, chunk_size=16))

    logps, causal_lm_loss, reference, base_logps = compare(params, base)
    np.testing.assert_allclose(-jnp.sum(logps), causal_lm_loss, rtol=1e-5)
    np.testing.assert_allclose(reference, base_logps, atol=1e-6)
    assert float(jnp.max(jnp.abs(logps - base_logps))) > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="cispo"), "loss_type"), (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(beta=-0.1), "beta"), (dict(precomputed_reference=True), "precomputed_reference"),
    (dict(epsilon=1.0), "epsilon"), (dict(temperature=0.0), "temperature")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GRPO(**kwargs)


def test_bad_advantage_settings_are_refused():
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_advantages(jnp.ones(6), 3, "mean")
    with pytest.raises(ConfigError, match="num_generations"):
        group_advantages(jnp.ones(6), 4)
