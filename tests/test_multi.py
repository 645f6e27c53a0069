"""K LoRA members in one vmapped step equal K separate runs of the single-run step, each with its own rank,
alpha, lr, dropout and seed; ``run_parallel`` writes what ``sft.run`` writes for each member."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import parallel
from jaxft.config import ConfigError
from jaxft.ops import nf4
from jaxft.peft.ia3 import IA3Config
from jaxft.peft.tree import Trainable, split
from jaxft.train import multi
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.objectives import CausalLM
from jaxft.train.optim import OptimConfig, make_optimizer

CFG = jaxft.ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
OPTIM = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=3, total_steps=20, min_lr_ratio=0.1, weight_decay=0.01)
MEMBERS = [
    multi.Member(jaxft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), lr=1e-2, seed=0),
    multi.Member(jaxft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1, target_modules="all-linear"), lr=3e-3, seed=1),
    multi.Member(jaxft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, use_rslora=True,
                                  target_modules="all-linear"), lr=5e-3, seed=2),
]
STEP = StepConfig(objective=CausalLM(chunk_size=0))


def _batches(n_steps, micro=2, rows=4, t=16, seed=0):
    """Counting sequences (each token is the previous one + 1) from random starts: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    ids = (rng.integers(0, CFG.vocab_size, (n_steps, micro, rows, 1)) + np.arange(t)) % CFG.vocab_size
    labels = np.roll(ids, -1, axis=-1)
    labels[..., -1] = -100
    labels[..., : t // 4] = -100
    return [{"input_ids": jnp.asarray(i, jnp.int32), "labels": jnp.asarray(l, jnp.int32)} for i, l in zip(ids, labels)]


def _separate_run(base, member, batches, optim=OPTIM):
    """The oracle: one member alone through the existing single-run step."""
    params = jaxft.lora.add(CFG, base, member.lora, jax.random.PRNGKey(member.seed))
    trainable, frozen = split(params, Trainable())
    optimizer = make_optimizer(dataclasses.replace(optim, lr=member.lr))
    state = init_state(trainable, optimizer, member.seed)
    step = jit_train_step(CFG, STEP, optimizer)
    losses = []
    for batch in batches:
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), state["trainable"]


def _parallel_run(base, members, batches, group=None, optim=OPTIM):
    s = multi.stack(CFG, base, members)
    state = multi.init_states(s, members, optim)
    step = multi.jit_train_step(CFG, STEP, multi.member_optimizer(optim, 1.0), group=group)
    losses = []
    for batch in batches:
        state, metrics = step(state, s.consts, s.base, batch)
        losses.append(np.asarray(metrics["loss"]))
    return np.stack(losses, axis=1), state["trainable"], s


@pytest.fixture(scope="module")
def dense_runs():
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    batches = _batches(20)
    separate = [_separate_run(base, m, batches) for m in MEMBERS]
    return separate, _parallel_run(base, MEMBERS, batches)


def _max_adapter_diff(s, stacked_trainable, k, own_trainable):
    own = split(multi.member_params(s, stacked_trainable, k), Trainable())[0]
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), own, own_trainable)
    return max(jax.tree.leaves(diffs))


def test_three_members_match_three_separate_runs_over_20_steps(dense_runs):
    separate, (losses, trainable, s) = dense_runs
    expected = np.stack([loss for loss, _ in separate])
    print("max |loss diff| over 20 steps:", np.max(np.abs(losses - expected)))
    np.testing.assert_allclose(losses, expected, atol=1e-5, rtol=0)
    assert np.all(expected[:, -1] < expected[:, 0])  # every member actually trained
    for k, (_, own_trainable) in enumerate(separate):
        assert _max_adapter_diff(s, trainable, k, own_trainable) < 1e-5


def test_exported_member_has_its_own_rank_and_scale(dense_runs):
    _, (_, trainable, s) = dense_runs
    for k, m in enumerate(MEMBERS):
        q_proj = multi.member_params(s, trainable, k)["layers"]["q_proj"]
        assert q_proj["lora"]["a"].shape[-1] == q_proj["lora"]["b"].shape[-2] == m.lora.r
        np.testing.assert_allclose(q_proj["lora"]["scale"], m.lora.scaling(m.lora.r, m.lora.lora_alpha))


def test_padded_rank_rows_stay_exactly_zero(dense_runs):
    _, (_, trainable, _) = dense_runs
    for group in (g["lora"] for g in trainable["layers"].values() if g.get("lora") is not None):
        for k, m in enumerate(MEMBERS):
            assert not np.any(np.asarray(group["a"][k, ..., m.lora.r:]))
            assert not np.any(np.asarray(group["b"][k, ..., m.lora.r:, :]))


@pytest.mark.slow
def test_qlora_members_one_at_a_time_share_one_nf4_base_and_match_separate_runs():
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    for name, group in base["layers"].items():
        if "kernel" in group:
            group["kernel"] = nf4.quantize(group["kernel"])
    batches = _batches(5, seed=1)
    members = MEMBERS[::2]
    losses, trainable, s = _parallel_run(base, members, batches, group=1)
    for k, m in enumerate(members):
        own_losses, own_trainable = _separate_run(base, m, batches)
        np.testing.assert_allclose(losses[k], own_losses, atol=1e-5, rtol=0)
        assert _max_adapter_diff(s, trainable, k, own_trainable) < 1e-5


@pytest.mark.parametrize("member_rule", [None, "data"], ids=["member-replicated", "member-over-data"])
def test_members_on_a_mesh_match_the_unsharded_step(member_rule):
    """On a (2, 4, 1) mesh of 8 devices the stacked step equals the unsharded one, whether the member axis is
    replicated (the default rule) or sharded over `data`, the axis the shared batch's rows also use."""
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    members, batches = MEMBERS[:2], _batches(4, micro=1, rows=8)
    want, _, _ = _parallel_run(base, members, batches)
    rules = [r for r in parallel.DEFAULT_RULES if r[0] != "member"] + [("member", member_rule)]
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tensor=1))
    s = multi.stack(CFG, base, members)
    state = multi.shard(multi.init_states(s, members, OPTIM), mesh, rules)
    consts, frozen = multi.shard(s.consts, mesh, rules), parallel.shard_params(s.base, mesh, rules)
    step = multi.jit_train_step(CFG, STEP, multi.member_optimizer(OPTIM, 1.0), mesh, state, consts, frozen,
                                rules=rules)
    batch_sharding = parallel.batch_sharding(mesh, 3, rules, accumulation_axis=True)
    losses = []
    for batch in batches:
        state, metrics = step(state, consts, frozen, jax.device_put(batch, batch_sharding))
        losses.append(np.asarray(metrics["loss"]))
    np.testing.assert_allclose(np.stack(losses, axis=1), want, atol=2e-6, rtol=0)
    assert state["trainable"]["layers"]["q_proj"]["lora"]["a"].sharding.spec[0] == member_rule


@pytest.mark.parametrize("name", multi.WHOLE_LEAF_OPTIMIZERS)
def test_whole_leaf_optimizers_train_equal_ranks_and_refuse_padding(name):
    """Adafactor's block RMS and 8-bit Adam's blocks span a whole leaf: members of one rank match separate runs,
    and members that would be padded are refused rather than trained differently from their own runs."""
    optim = dataclasses.replace(OPTIM, name=name)
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    batches = _batches(5, seed=2)
    same_rank = [MEMBERS[0], multi.Member(MEMBERS[0].lora.replace(lora_alpha=8), lr=3e-3, seed=1)]
    losses, _, _ = _parallel_run(base, same_rank, batches, optim=optim)
    for k, m in enumerate(same_rank):
        np.testing.assert_allclose(losses[k], _separate_run(base, m, batches, optim=optim)[0], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=f"optim.name '{name}' computes statistics over whole leaves"):
        multi.init_states(multi.stack(CFG, base, MEMBERS[:2]), MEMBERS[:2], optim)


def test_members_targeting_different_modules_are_a_config_error():
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    members = [MEMBERS[0], multi.Member(jaxft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), lr=1e-3)]
    with pytest.raises(ConfigError, match="target the same modules"):
        multi.stack(CFG, base, members)


# --------------------------------------------------------------------------- the recipe: run_parallel


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from sft_worker import make_base, run_config, write_chats

    tmp = tmp_path_factory.mktemp("multi")
    base, data = make_base(tmp / "base"), write_chats(tmp / "train.jsonl", 48)
    template = run_config(base, data, tmp / "unused", steps=4)
    template = template.replace(eval_data=template.data, train=dataclasses.replace(template.train, eval_batches=1))
    cfgs = [template.replace(output_dir=str(tmp / f"r{r}"), lora=template.lora.replace(r=r, lora_alpha=2 * r),
                             optim=dataclasses.replace(template.optim, lr=lr))
            for r, lr in ((2, 1e-2), (4, 5e-3))]
    return tmp, cfgs, run_parallel(cfgs)


def run_parallel(cfgs, **kwargs):
    from jaxft.recipes.multi import run_parallel as run

    return run(cfgs, **kwargs)


def test_run_parallel_writes_each_members_run_folder_and_adapter(sweep):
    from sft_worker import train_losses

    tmp, cfgs, summaries = sweep
    _, base = jaxft.from_pretrained(cfgs[0].model)
    for cfg, summary in zip(cfgs, summaries):
        out = tmp / f"r{cfg.lora.r}"
        assert sorted(train_losses(out)) == [1, 2, 3, 4]
        assert (out / "curves.png").exists() and (out / "config.yaml").exists()
        assert json.loads((out / "summary.json").read_text())["final_loss"] == pytest.approx(summary["final_loss"])
        assert summary["eval"]["tokens"] > 0 and summary["tokens_per_s"] > 0
        params = jaxft.load_adapter(summary["export"], base)
        assert params["layers"]["q_proj"]["lora"]["a"].shape[-1] == cfg.lora.r
        assert summary["trainable_params"] == jaxft.peft.methods.trainable_count(params, jaxft.Trainable())
    with pytest.raises(FileExistsError):
        run_parallel(cfgs)


@pytest.mark.slow
def test_run_parallel_member_equals_sft_run_of_its_config(sweep):
    from jaxft.recipes import sft
    from sft_worker import train_losses

    tmp, cfgs, summaries = sweep
    alone = cfgs[1].replace(output_dir=str(tmp / "alone"))
    summary = sft.run(alone)
    parallel, separate = train_losses(cfgs[1].output_dir), train_losses(alone.output_dir)
    np.testing.assert_allclose([parallel[s] for s in sorted(parallel)], [separate[s] for s in sorted(separate)],
                               atol=1e-5, rtol=0)
    assert summaries[1]["eval"]["loss"] == pytest.approx(summary["eval"]["loss"], abs=1e-5)
    assert summaries[1]["eval"]["accuracy"] == pytest.approx(summary["eval"]["accuracy"], abs=1e-6)


def test_configs_differing_in_a_shared_key_are_a_config_error_naming_it(sweep):
    from jaxft.recipes.multi import check_members

    _, cfgs, _ = sweep
    other = cfgs[1].replace(lora=cfgs[1].lora.replace(target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="must share lora.target_modules"):
        check_members([cfgs[0], other])
    other = cfgs[1].replace(train=dataclasses.replace(cfgs[1].train, steps=5))
    with pytest.raises(ConfigError, match="must share train.steps"):
        check_members([cfgs[0], other])
    with_ia3 = cfgs[0].replace(peft=(*cfgs[0].peft, IA3Config()))  # the stacked step would drop it silently
    with pytest.raises(ConfigError, match="one lora method .* and no other"):
        check_members([with_ia3])
