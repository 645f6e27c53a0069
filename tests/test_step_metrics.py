"""The preference objectives' own metrics at every train step (``loss_and_sums`` / ``step_metrics``): added over
micro-batches and divided once, so an accumulated step reports the means over all its pairs (the oracle: the
objective's evaluation of one batch holding every pair); the output shardings of the single-run and the K-member
step name them; curves.png gets a panel of them. TRL's numbers for them: tests/test_dpo.py, test_kto.py and
test_pairwise.py."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from jaxft import parallel
from jaxft.data.chat import IGNORE_INDEX
from jaxft.peft.tree import Trainable, path_names, split
from jaxft.train import multi
from jaxft.train.loop import StepConfig, init_state, jit_train_step, metric_names
from jaxft.train.metrics import write_curves
from jaxft.train.objectives import CausalLM
from jaxft.train.optim import OptimConfig
from jaxft.train.pairwise import ORPO, SimPO
from jaxft.train.preference import DPO

CFG = jaxft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
LORA = jaxft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
ROW = 40
PAIRS_PER_ROW = (2, 1, 1, 0)  # 2 micro-batches of 2 rows: 3 pairs and 1 pair


def _adapted_params(seed=0) -> dict:
    """The tiny base with a LoRA adapter whose B is random too (the policy differs from the adapters-off base)."""
    params = jaxft.lora.add(CFG, jaxft.init_params(CFG, jax.random.PRNGKey(0)), LORA, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))

    def randomize_b(path, leaf):
        return 0.3 * jax.random.normal(next(keys), leaf.shape, leaf.dtype) if path_names(path)[-1] == "b" else leaf

    return jax.tree_util.tree_map_with_path(randomize_b, params)


def _pair_rows(seed=0) -> dict:
    """[4, ROW] rows of PAIRS_PER_ROW pairs: documents 2k + 1 = prompt + chosen and 2k + 2 = prompt + rejected,
    completions of different lengths, labels shifted onto the completion tokens."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((len(PAIRS_PER_ROW), ROW), np.int32) for k in ("input_ids", "segment_ids", "positions")}
    out["labels"] = np.full((len(PAIRS_PER_ROW), ROW), IGNORE_INDEX, np.int32)
    for b, n_pairs in enumerate(PAIRS_PER_ROW):
        at, segment = 0, 1
        for _ in range(n_pairs):
            prompt = rng.integers(1, CFG.vocab_size, rng.integers(3, 6))
            for completion in (rng.integers(1, CFG.vocab_size, rng.integers(2, 6)) for _ in range(2)):
                ids = np.concatenate([prompt, completion])
                span = slice(at, at + len(ids))
                out["input_ids"][b, span], out["segment_ids"][b, span] = ids, segment
                out["positions"][b, span] = np.arange(len(ids))
                out["labels"][b, at + len(prompt) - 1:at + len(ids) - 1] = completion
                at, segment = at + len(ids), segment + 1
    return {k: jnp.asarray(v) for k, v in out.items()}


def _step_metrics(objective, params, batches) -> dict:
    trainable, frozen = split(params, Trainable())
    optimizer = optax.sgd(0.0)
    _, metrics = jit_train_step(CFG, StepConfig(objective=objective), optimizer)(  # the state is donated
        init_state(jax.tree.map(jnp.copy, trainable), optimizer), frozen, batches)
    return metrics


OBJECTIVES = [DPO(beta=0.3, chunk_size=8), DPO(loss_types=("ipo",), beta=0.3, chunk_size=0), ORPO(beta=0.2),
              SimPO(nll_weight=0.5, chunk_size=8)]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=["dpo-sigmoid", "dpo-ipo", "orpo", "simpo"])
def test_accumulated_step_metrics_are_means_over_all_pairs(objective):
    """Two micro-batches of 3 pairs and 1 pair: every step metric is the mean over the 4 pairs, as the objective's
    evaluation of the whole batch says, and as one micro-batch of all of them reports; the mean of the two
    micro-batches' means would differ."""
    params, batch = _adapted_params(), _pair_rows()
    accumulated = _step_metrics(objective, params, jax.tree.map(lambda x: x.reshape(2, 2, ROW), batch))
    whole = _step_metrics(objective, params, jax.tree.map(lambda x: x[None], batch))
    evaluated = objective.eval_metrics(objective.eval_sums(CFG, params, batch))
    assert set(objective.step_metric_keys) <= accumulated.keys() and float(accumulated["n_targets"]) == 4
    for key in objective.step_metric_keys:
        np.testing.assert_allclose(float(accumulated[key]), evaluated[key], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(float(whole[key]), evaluated[key], rtol=1e-5, atol=1e-6, err_msg=key)
    halves = [objective.eval_metrics(objective.eval_sums(CFG, params, {k: v[i:i + 2] for k, v in batch.items()}))
              for i in (0, 2)]
    assert max(abs(np.mean([h[key] for h in halves]) - evaluated[key]) for key in objective.step_metric_keys) > 1e-2


def test_metric_names_hold_the_objectives_keys():
    state = {"step": 0}
    assert metric_names(state, CausalLM()) == ("loss", "grad_norm", "n_targets", "skipped")
    assert metric_names({**state, "loss_scale": 1.0}, DPO()) == (
        "loss", "grad_norm", "n_targets", "skipped", "loss_scale") + DPO.step_metric_keys


def test_dpo_step_on_a_mesh_reports_its_metrics():
    """Under a mesh every output has a sharding (metric_names): the sharded step reports the unsharded metrics."""
    params, batch = _adapted_params(), jax.tree.map(lambda x: x[None], _pair_rows())
    objective = OBJECTIVES[0]
    want = _step_metrics(objective, params, batch)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    trainable, frozen = split(params, Trainable())
    optimizer = optax.sgd(0.0)
    state = jax.device_put(init_state(trainable, optimizer), parallel.state_shardings(
        init_state(trainable, optimizer), mesh))
    frozen = parallel.shard_params(frozen, mesh)
    step = jit_train_step(CFG, StepConfig(objective=objective), optimizer, mesh, state, frozen)
    _, got = step(state, frozen, jax.device_put(batch, parallel.batch_sharding(mesh, 3, accumulation_axis=True)))
    assert got.keys() == want.keys()
    for key in objective.step_metric_keys + ("loss",):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_k_adapter_step_reports_each_members_dpo_metrics():
    """The K-member sweep step with DPO (adapters-off reference per member): each member's step metrics are those
    of its own single-run step."""
    members = [multi.Member(LORA, lr=1e-2, seed=0), multi.Member(jaxft.LoraConfig(r=2, lora_alpha=4,
                                                                                  target_modules="all-linear"),
                                                                 lr=1e-2, seed=1)]
    base, batch = jaxft.init_params(CFG, jax.random.PRNGKey(0)), jax.tree.map(lambda x: x.reshape(2, 2, ROW),
                                                                              _pair_rows())
    optim, objective = OptimConfig(lr=1e-2), OBJECTIVES[0]
    s = multi.stack(CFG, base, members)
    # random B, the same in each member's stacked and own tree, so the policy is not the reference
    b_rng = iter(jax.random.split(jax.random.PRNGKey(5), 64))
    s.trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(b_rng), x.shape) if path_names(p)[-1] == "b" else x, s.trainable)
    step = multi.jit_train_step(CFG, StepConfig(objective=objective), multi.member_optimizer(optim, 1.0), group=1)
    _, metrics = step(multi.init_states(s, members, optim), s.consts, s.base, batch)
    for k in range(len(members)):
        own = _step_metrics(objective, multi.member_params(s, s.trainable, k), batch)
        for key in objective.step_metric_keys + ("loss",):
            np.testing.assert_allclose(float(metrics[key][k]), float(own[key]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"member {k} {key}")


def _write_log(path, train_keys, eval_keys):
    with open(path, "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "split": "train", "loss": 1.0 / step, "lr": 0.1,
                                **{k: 0.1 * step for k in train_keys}}) + "\n")
        f.write(json.dumps({"step": 3, "split": "eval", "loss": 0.5, **{k: 0.2 for k in eval_keys}}) + "\n")


@pytest.mark.parametrize("train_keys,eval_keys,panels", [
    (("rewards/accuracies", "rewards/margins"), ("rewards/accuracies", "rewards/margins"), 3),
    (("accuracy", "margin", "mean_reward"), ("accuracy", "margin"), 3),
    ((), ("accuracy", "perplexity"), 2)], ids=["dpo", "reward-model", "sft"])
def test_curves_draw_a_preference_panel_only_for_preference_runs(tmp_path, train_keys, eval_keys, panels):
    """A third panel, train lines and eval markers, when the train records hold a preference objective's accuracy
    or margin; an SFT run's eval token accuracy does not make one."""
    _write_log(tmp_path / "metrics.jsonl", train_keys, eval_keys)
    fig = write_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert len(fig.axes) == panels and (tmp_path / "curves.png").stat().st_size > 0
    if panels == 3:
        drawn = {line.get_label() for line in fig.axes[2].get_lines()}
        shown = [k for k in ("rewards/accuracies", "rewards/margins", "accuracy", "margin") if k in train_keys]
        assert drawn == {f"{split} {k}" for k in shown for split in ("train", "eval")}
