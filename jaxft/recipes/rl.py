"""Online RL with GRPO (TRL's ``GRPOTrainer``) and PPO (TRL's ``PPOTrainer`` before 1.0) on the run skeleton: the
policy samples its rollouts with the training params themselves, on the run's mesh (no second engine, no copy of the
weights), reward functions score them, and GRPO's group-normalized advantages, or PPO's GAE advantages from a value
model over the same base (:class:`PpoRollouts`), weight a clipped policy-gradient step.

One generation batch every ``task.num_iterations`` steps: each process takes ``data.batch_size`` prompts (its
share, :mod:`jaxft.data.prompts`), all processes sample ``task.num_generations`` completions of every prompt in one
jitted call over the mesh (:func:`jaxft.models.sample.sample`), each process decodes and scores its own prompts'
completions (:mod:`jaxft.train.rewards`), the advantages are normalized per group (or batch) over all processes,
and the rows (:func:`jaxft.train.rollouts.rollout_batch`) are split into ``train.grad_accum`` micro-batches. Between
generations the step reuses the batch, its log-probs at sampling time as the old policy's (TRL's
``num_iterations``). Sampling keys derive from ``train.seed`` and the step, so a resumed run draws the same
completions as one that never stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxft import parallel
from jaxft.config import ConfigError
from jaxft.data.formats import DataError
from jaxft.errors import JaxftError
from jaxft.models.generate import left_pad, stop_token_ids
from jaxft.models.sample import Rollout, sample
from jaxft.models.llama import init_params
from jaxft.peft.methods import adapter_tree, without_methods
from jaxft.peft.tree import combine
from jaxft.recipes.config import RunConfig
from jaxft.recipes.skeleton import (Latest, build_params, check_run_dir, finished_summary, load_inputs, load_model,
                                    restore_checkpoint, train_and_publish, train_state, write_run_dir)
from jaxft.recipes.tasks import PpoTask, check_reward_models
from jaxft.train.checkpoint import base_reference
from jaxft.train.grpo import group_advantages, truncated_mask
from jaxft.train.metrics import MetricsLogger
from jaxft.train.optim import make_schedule
from jaxft.train.ppo import PPO, VALUE, VALUE_HEAD, missing_eos_penalty
from jaxft.train.rewards import RewardError
from jaxft.train.rollouts import rollout_batch, token_values
from jaxft.train.sequences import label_logprobs


def _all_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of a per-process array, in process order (the layout of a global batch)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else x


def _on_every_process(fn):
    """``fn()``, raising on every process when it raises on any (a process that failed alone would leave the others
    waiting in the next collective)."""
    error = None
    try:
        result = fn()
    except JaxftError as e:
        error = e
    if jax.process_count() > 1 and _all_rows(np.array([error is not None])).any() and error is None:
        raise RewardError("another process's rewards failed on its completions (its log names the reward and the "
                          "record); every process stops")
    if error is not None:
        raise error
    return result


class Rollouts:
    """The batch source of an RL run: ``self(state)`` -> this step's stacked micro-batches (a new generation batch
    every ``task.num_iterations`` steps; ``fresh`` says whether this step's is new), with that generation's metrics
    in ``metrics``."""

    def __init__(self, cfg: RunConfig, model_cfg, inputs, frozen: dict, start_step: int):
        self.cfg, self.task, self.model_cfg, self.inputs, self.frozen = cfg, cfg.task, model_cfg, inputs, frozen
        self.rewards = cfg.task.reward_functions()
        tokenizer = inputs.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stops = tuple(stop_token_ids(model_cfg, tokenizer.eos_token_id))
        self.prompt_sharding = parallel.batch_sharding(inputs.mesh, 2)
        self.step, self.batches, self.metrics, self.fresh = start_step, None, {}, False
        t = self.task
        self._sample = self.sampler(num_generations=t.num_generations, max_new_tokens=t.max_completion_length,
                                    temperature=t.temperature, top_k=t.top_k, top_p=t.top_p)
        objective = cfg.objective()
        # the old policy's log-probs for a batch trained over several steps: the training forward, no dropout
        self._old_logps = None if objective.on_policy else jax.jit(
            lambda trainable, frozen, batches: jax.lax.map(lambda b: label_logprobs(
                model_cfg, combine(trainable, frozen), b, chunk_size=objective.chunk_size,
                temperature=objective.temperature), batches), out_shardings=inputs.batch_sharding)

    def sampler(self, **settings):
        """``fn(trainable, frozen, ids, mask, rng) -> Rollout``, jitted, with the task's sampling ``settings``; the
        rows come out sharded as the prompts go in (over the batch axes), so each process can take its own back."""
        rows = parallel.batch_sharding(self.inputs.mesh, 1)
        return jax.jit(lambda trainable, frozen, ids, mask, rng: sample(
            self.model_cfg, combine(trainable, frozen), ids, mask, rng, stop_ids=self.stops, pad_id=self.pad_id,
            **settings), out_shardings=Rollout(self.prompt_sharding, self.prompt_sharding, self.prompt_sharding, rows))

    def __call__(self, state) -> dict:
        self.fresh = self.step % self.task.num_iterations == 0
        if self.fresh:
            self.batches = self._generate(state["trainable"])
        self.step += 1
        return self.batches

    def prompts(self, samples) -> tuple[jax.Array, jax.Array, np.ndarray, np.ndarray]:
        """(global ids, global mask, local ids, local mask) of this process's prompts, left padded to
        ``task.max_prompt_length``."""
        ids, mask = left_pad([s.ids.tolist() for s in samples], self.pad_id, width=self.task.max_prompt_length)
        place = jax.make_array_from_process_local_data
        return place(self.prompt_sharding, ids), place(self.prompt_sharding, mask), ids, mask

    def _generate(self, trainable) -> dict:
        samples = next(self.inputs.pipeline.iterator)
        ids, mask, local_ids, local_mask = self.prompts(samples)
        started = time.perf_counter()
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.train.seed), self.step)
        rollout = self._local(self._sample(trainable, self.frozen, ids, mask, rng))
        seconds = time.perf_counter() - started
        total, columns = _on_every_process(lambda: self.score(samples, rollout, self.task.num_generations))
        batches, metrics = self.train_batches(trainable, local_ids, local_mask, rollout, total)
        self.metrics = {**self.rollout_metrics(total, columns, rollout, seconds), **metrics}
        return batches

    def train_batches(self, trainable, local_ids, local_mask, rollout: dict, total: np.ndarray) -> tuple[dict, dict]:
        """(this step's micro-batches, metrics) from this process's rollout rows and their rewards' totals: GRPO's
        group-normalized advantages at every completion token."""
        completion_mask = (truncated_mask(rollout["mask"], rollout["stopped"])
                           if self.task.mask_truncated_completions else rollout["mask"])
        return self.rows(trainable, local_ids, local_mask, rollout, completion_mask,
                         {"advantages": self.advantages(total)}), {}

    def rows(self, trainable, local_ids, local_mask, rollout: dict, completion_mask, per_row: dict) -> dict:
        """The rollout's [prompt | completion] rows as placed micro-batches, with each ``per_row`` value [R] at
        its row's completion tokens, and the old policy's log-probs."""
        batch = rollout_batch(local_ids, local_mask, rollout["tokens"], completion_mask, rollout["logprobs"],
                              self.task.num_generations)
        for key, value in per_row.items():
            batch[key] = token_values(jnp.asarray(value), batch["labels"])
        batches = self.stacked(batch)
        if self._old_logps is not None:
            batches["old_logps"] = self._old_logps(trainable, self.frozen, batches)
        return batches

    def _local(self, rollout) -> dict[str, np.ndarray]:
        """This process's rows of a global rollout, on the host: the inverse of how its prompts were placed."""
        if jax.process_count() > 1:
            rollout = multihost_utils.global_array_to_host_local_array(
                rollout, self.inputs.mesh, Rollout(*(x.sharding.spec for x in rollout)))
        return {name: np.asarray(x) for name, x in zip(Rollout._fields, rollout)}

    def score(self, samples, rollout: dict, g: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The reward functions over this process's completions (``g`` per prompt), each decoded without its stop
        token."""
        tokenizer = self.inputs.tokenizer
        lengths = rollout["mask"].sum(axis=1)
        texts = [tokenizer.decode(row[:n - int(s)].tolist(), skip_special_tokens=True)
                 for row, n, s in zip(rollout["tokens"], lengths, rollout["stopped"])]
        prompts = [tokenizer.decode(s.ids.tolist(), skip_special_tokens=True) for s in samples]
        return self.rewards([prompts[r // g] for r in range(len(texts))], texts,
                            [samples[r // g].record.fields for r in range(len(texts))], rollout["stopped"], lengths,
                            [samples[r // g].record.location for r in range(len(texts))],
                            [samples[r // g].record.prompt for r in range(len(texts))])

    def advantages(self, total: np.ndarray) -> np.ndarray:
        """This process's rows' advantages, normalized over every process's rows (a group never spans processes;
        ``scale_rewards: batch`` takes the whole generation batch's std)."""
        everyone = _all_rows(total)
        advantages = np.asarray(group_advantages(jnp.asarray(everyone), self.task.num_generations,
                                                 self.task.scale_rewards))
        start = jax.process_index() * len(total)
        return advantages[start:start + len(total)]

    def rollout_metrics(self, total, columns: dict, rollout: dict, seconds: float) -> dict[str, float]:
        """TRL's GRPO generation metrics (``reward_std`` within groups, for groups of 2 or more), over every
        process's completions, and the sampler's speed."""
        g = self.task.num_generations
        rewards, lengths = _all_rows(total), _all_rows(rollout["mask"].sum(axis=1))
        stopped = _all_rows(rollout["stopped"])
        metrics = {"reward": float(rewards.mean()),
                   **({"reward_std": float(rewards.reshape(-1, g).std(1, ddof=1).mean())} if g > 1 else {}),
                   **{f"rewards/{name}/mean": float(_all_rows(c).mean()) for name, c in columns.items()},
                   "completions/mean_length": float(lengths.mean()),
                   "completions/clipped_ratio": float(1 - stopped.mean()),
                   "rollout_s": seconds, "rollout_tokens_per_s": float(lengths.sum()) / seconds}
        return metrics

    def stacked(self, batch: dict) -> dict:
        """This process's rows [R, T] as ``train.grad_accum`` micro-batches, placed on the mesh."""
        a = self.cfg.train.grad_accum
        out = {}
        for key, value in batch.items():
            value = np.asarray(value)
            local = value.reshape(a, value.shape[0] // a, *value.shape[1:])
            out[key] = jax.make_array_from_process_local_data(self.inputs.batch_sharding, local)
        return out


class PpoRollouts(Rollouts):
    """PPO's batch source: each completion's score is its rewards' total (less ``task.missing_eos_penalty`` when
    it did not stop); the advantages, returns and old values come from the value model and the reference on the
    whole generation batch (:meth:`jaxft.train.ppo.PPO.targets`)."""

    def __init__(self, cfg: RunConfig, model_cfg, inputs, frozen: dict, start_step: int):
        super().__init__(cfg, model_cfg, inputs, frozen, start_step)
        objective = cfg.objective()
        rows, scalar = inputs.batch_sharding, parallel.replicated(inputs.mesh)
        self._targets = jax.jit(lambda trainable, frozen, batches: objective.targets(
            model_cfg, combine(trainable, frozen), batches), out_shardings=(
            dict.fromkeys(("advantages", "returns", "old_values"), rows), dict.fromkeys(PPO.target_metrics, scalar)))

    def train_batches(self, trainable, local_ids, local_mask, rollout: dict, total: np.ndarray) -> tuple[dict, dict]:
        penalty = self.task.missing_eos_penalty
        scores = total if penalty is None else np.asarray(missing_eos_penalty(total, rollout["stopped"], penalty))
        batches = self.rows(trainable, local_ids, local_mask, rollout, rollout["mask"], {"scores": scores})
        targets, metrics = self._targets(trainable, self.frozen, batches)
        batches = {k: v for k, v in batches.items() if k != "scores"} | targets
        return batches, {name: float(value) for name, value in metrics.items()}


def with_nested_models(cfg: RunConfig, model_cfg, params: dict, rng) -> dict:
    """The params a run trains: a PPO run's with its value model nested (:func:`with_value_model`), others as they
    are."""
    return with_value_model(cfg, model_cfg, params, rng) if isinstance(cfg.task, PpoTask) else params


def with_value_model(cfg: RunConfig, model_cfg, params: dict, rng) -> dict:
    """A PPO run's ``params`` with its value model nested under ``"value"`` (:mod:`jaxft.train.ppo`): the run's own
    methods freshly initialized over the base (``task.value_adapter``; else none; none on the LM head, which the
    value model does not use) and a one-label score head, initialized as transformers initializes a new one."""
    method_rng, head_rng = jax.random.split(rng)
    base = without_methods(params)
    value = build_params(model_cfg, base, method_rng, peft=cfg.peft) if cfg.task.value_adapter else base
    head = init_params(model_cfg.replace(head=VALUE_HEAD), head_rng, cfg.dtype, groups=(VALUE_HEAD.group,))
    adapters = {k: v for k, v in adapter_tree(value).items() if k != "lm_head"}  # its head is the score head
    return {**params, VALUE: {**adapters, **head}}


def check_rollout_rows(cfg: RunConfig, mesh):
    """A micro-batch's completions (over all processes) split over the mesh's data x fsdp devices."""
    rows = cfg.micro_batch_rows * jax.process_count()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ConfigError(f"a micro-batch holds data.batch_size {cfg.data.batch_size} prompts x task.num_generations "
                          f"{cfg.task.num_generations} / train.grad_accum {cfg.train.grad_accum} completions x "
                          f"{jax.process_count()} process(es) = {rows} rows, which do not split over the mesh's "
                          f"data x fsdp = {shards} devices")


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``cfg`` (an RL task) as :func:`jaxft.recipes.sft.run` trains a supervised one: the same run folder,
    checks, logs, checkpoints and export; the batches are rollouts of the policy being trained."""
    out = Path(cfg.output_dir)
    resumed = check_run_dir(cfg, out, resume, overwrite)
    if resumed and resumed.finished:
        return finished_summary(cfg, out, resumed)
    inputs = load_inputs(cfg)
    check_rollout_rows(cfg, inputs.mesh)
    check_reward_models(cfg.task.rewards)  # a reward model that is not there, or does not load, fails before
    cfg.task.reward_functions().load()     # anything is written
    base = base_reference(cfg.model)
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(cfg.train.seed), inputs.mesh)
    params = with_nested_models(cfg, model_cfg, params, jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1))
    training = train_state(cfg, model_cfg, params, inputs.mesh)
    if resumed and resumed.step is not None:
        training = training._replace(state=restore_checkpoint(cfg, out, training.state, inputs.pipeline.iterator,
                                                              base))
    write_run_dir(cfg, out, resumed, overwrite)
    source = PpoRollouts if isinstance(cfg.task, PpoTask) else Rollouts
    rollouts = source(cfg, model_cfg, inputs, training.frozen, int(training.state["step"]))
    return train_and_publish(cfg, out, inputs, training, base, resumed, batches=rollouts,
                             run_eval=_evaluator(rollouts),
                             log_train=lambda logger, latest: _log_train(logger, make_schedule(cfg.optim), latest,
                                                                         rollouts))


def _log_train(logger: MetricsLogger, schedule, latest: Latest, rollouts: Rollouts):
    """The step's metrics, the last generation's, and train tokens/s without the sampling time."""
    def log(result):
        speed = dict(result.speed)
        if "step_time_s" in speed and rollouts.fresh:
            train_s = max(speed["step_time_s"] - rollouts.metrics["rollout_s"], 1e-9)
            speed["train_tokens_per_s"] = speed["tokens_per_s"] * speed["step_time_s"] / train_s
        latest.train = {**result.metrics, **rollouts.metrics, "lr": float(schedule(result.step - 1)), **speed}
        logger.log(result.step, latest.train)

    return log


def _evaluator(rollouts: Rollouts):
    """``run_eval(trainable)``: greedy completions of the eval prompts (the first ``train.eval_batches`` full
    batches of each process's share, in data order: the same ones every time), their mean reward and each reward
    function's mean."""
    cfg, pipeline = rollouts.cfg, rollouts.inputs.eval_pipeline
    greedy = rollouts.sampler(num_generations=1, max_new_tokens=cfg.task.max_completion_length, temperature=0.0)
    size = cfg.eval_data.batch_size if pipeline else 0
    batches = min(cfg.train.eval_batches, int(_all_rows(np.array([len(pipeline.iterator.samples) // size])).min())
                  ) if pipeline else 0
    if pipeline and batches == 0:
        raise DataError("eval_data", "too few prompts", f"some process has fewer than eval_data.batch_size {size} "
                        "eval prompts; lower eval_data.batch_size or add prompts")

    def run_eval(trainable) -> dict:
        totals, columns = [], {}
        for b in range(batches):
            samples = pipeline.iterator.samples[b * size:(b + 1) * size]
            ids, mask, _, _ = rollouts.prompts(samples)
            rollout = rollouts._local(greedy(trainable, rollouts.frozen, ids, mask, jax.random.PRNGKey(0)))
            total, cols = _on_every_process(lambda: rollouts.score(samples, rollout, 1))
            totals.append(_all_rows(total))
            for name, c in cols.items():
                columns.setdefault(name, []).append(_all_rows(c))
        return {"reward": float(np.concatenate(totals).mean()), "completions": int(sum(map(len, totals))),
                **{f"rewards/{name}/mean": float(np.concatenate(c).mean()) for name, c in columns.items()}}

    return run_eval
