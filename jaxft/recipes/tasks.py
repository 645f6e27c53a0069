"""What a run can be asked to do: its task (``task: {type: ...}`` in a run config, ``recipes.config.TASK_UNION``).

A task is a frozen dataclass with ``objective(train)``: what the step minimizes and the evaluation reports. A task
with a head also has ``head()`` (the :class:`~jaxft.config.HeadConfig` the model is loaded with) and
``pipeline(data, tokenizer, **placement)`` (its data); without them a task trains the LM head on the SFT data
pipeline (:func:`task_head`, :func:`task_pipeline`).

The pretraining tasks (``pretrain``, ``continued_pretrain``) read plain text (``data: {type: text}``,
:class:`jaxft.data.text_config.TextDataConfig`) streamed by :func:`jaxft.data.text_stream.build_text_pipeline`, and
evaluate each held-out source on its own (``eval_pipeline``: one pipeline per ``eval_data.paths`` entry, named by
:func:`source_name`), so forgetting on general text shows beside the gain on the domain.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from jaxft.config import ConfigError, HeadConfig, TaggedUnion
from jaxft.data import build_iterator
from jaxft.data.config import DataConfig
from jaxft.data.text_config import TextDataConfig
from jaxft.data.preference import SEQUENCES_PER_UNIT, build_preference_iterator
from jaxft.data.prompts import build_prompt_iterator
from jaxft.data.tasks import build_task_iterator
from jaxft.data.text_stream import build_text_pipeline
from jaxft.errors import JaxftError
from jaxft.models.llama import InputError
from jaxft.models.sample import check_settings as check_sampling
from jaxft.train.grpo import GRPO, SCALE_REWARDS
from jaxft.train.head_objectives import QuestionAnswering, SequenceClassification, TokenClassification
from jaxft.train.kto import KTO
from jaxft.train.objectives import CausalLM
from jaxft.train.pairwise import ORPO, RewardModel, SimPO
from jaxft.train.ppo import PPO
from jaxft.train.preference import DPO
from jaxft.train.rewards import (ExactMatch, LengthPenalty, RegexFormat, RewardModelScore, WeightedRewards,
                                 reward_model_folders)

if TYPE_CHECKING:
    from jaxft.recipes.config import TrainConfig


@dataclass(frozen=True)
class SftTask:
    """Supervised fine-tuning: next-token cross-entropy on the assistant turns the data marks as targets."""

    def objective(self, train: TrainConfig) -> CausalLM:
        return CausalLM(chunk_size=train.loss_chunk_size)


def task_head(task) -> HeadConfig | None:
    """The task head a run of ``task`` trains (None: the LM head)."""
    return task.head() if hasattr(task, "head") else None


def task_pipeline(task, data: DataConfig, tokenizer, **placement):
    """The data of a run of ``task`` (``placement``: process index and count, the model's vocab size)."""
    return (task.pipeline if hasattr(task, "pipeline") else build_iterator)(data, tokenizer, **placement)


def task_eval_pipeline(task, data: DataConfig | TextDataConfig, tokenizer, **placement):
    """The held-out data of a run of ``task``: one pipeline, or for a task with ``eval_pipeline`` (the pretraining
    tasks) ``{source name: pipeline}``, each source evaluated on its own."""
    if hasattr(task, "eval_pipeline"):
        return task.eval_pipeline(data, tokenizer, **placement)
    return task_pipeline(task, data, tokenizer, **placement)


# The suffixes a source's name drops: the formats the text reader knows, optionally gzipped (``.jsonl.gz``).
TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".text", ".md")
COMPRESSED_SUFFIXES = (".gz",)


def source_name(spec: str) -> str:
    """A text source's name in the eval metrics (``eval/<name>/perplexity``): a file's stem without every known
    suffix (``wiki.jsonl`` and ``wiki.jsonl.gz`` -> ``wiki``, ``web.v2.txt`` -> ``web.v2``), a folder's name, a
    glob's folder (``web/*.txt`` -> ``web``), ``hf:org/name:split`` -> ``name-split``."""
    if spec.startswith("hf:"):
        return re.sub(r"[^\w.-]+", "-", spec[3:].split("/")[-1].replace(":", "-")).strip("-") or "hf"
    literal = re.split(r"[*?\[]", spec, maxsplit=1)[0]  # a glob is named by the folder it searches
    if literal != spec:
        return Path(literal.rstrip("/")).name or "data"
    name = Path(spec).name
    for suffixes in (COMPRESSED_SUFFIXES, TEXT_SUFFIXES):
        name = next((name[:-len(s)] for s in suffixes if name.lower().endswith(s) and len(name) > len(s)), name)
    return name or "data"


def eval_source_names(paths: tuple[str, ...]) -> dict[str, str]:
    """``{name: path}`` of the eval sources; two sources of one name are refused (their metrics would collide)."""
    names: dict[str, str] = {}
    for path in paths:
        name = source_name(path)
        if name in names:
            raise ConfigError(f"eval_data.paths {names[name]!r} and {path!r} both name the eval source {name!r} "
                              "(metrics are reported per source, by file stem); rename one of the files")
        names[name] = path
    return names


def _num_labels(task, name: str) -> int:
    """``num_labels``, or the number of ``label_names`` when it is left out; the two must agree (``name``: the
    task's type, for the message)."""
    names, n = task.label_names, task.num_labels
    if n is None and names is None:
        raise ConfigError(f"task {name}: give num_labels or label_names")
    if n is not None and names is not None and n != len(names):
        raise ConfigError(f"task {name}: num_labels {n} but {len(names)} label_names {list(names)}")
    return len(names) if n is None else n


@dataclass(frozen=True)
class ClassifyTask:
    """Sequence classification (transformers' ``*ForSequenceClassification``): a ``score`` head read at each
    document's last token. ``problem_type`` as transformers: single-label (cross-entropy, ``class_weights``
    optional), multi-label (BCE) or regression (MSE; the default for one label)."""

    num_labels: int | None = None
    label_names: tuple[str, ...] | None = None
    problem_type: str | None = None
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        self.objective(None)  # the head and the objective check the labels, problem type and class weights

    def head(self) -> HeadConfig:
        return HeadConfig("seq_cls", _num_labels(self, "classify"), self.label_names, self.problem_type)

    def objective(self, train: TrainConfig) -> SequenceClassification:
        return SequenceClassification(self.head().problem, self.head().num_labels, self.class_weights)

    def pipeline(self, data: DataConfig, tokenizer, **placement):
        return build_task_iterator(data, tokenizer, self.head(), **placement)


@dataclass(frozen=True)
class TokenClassifyTask:
    """Token classification (``*ForTokenClassification``): a ``score`` head with bias on every token, after
    ``dropout`` in training; words labelled at their first sub-token (every sub-token with ``label_all_tokens``)."""

    num_labels: int | None = None
    label_names: tuple[str, ...] | None = None
    label_all_tokens: bool = False
    dropout: float = 0.1
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        self.head(), self.objective(None)  # they check the labels, dropout and class weights

    def head(self) -> HeadConfig:
        return HeadConfig("token_cls", _num_labels(self, "token_classify"), self.label_names, dropout=self.dropout)

    def objective(self, train: TrainConfig) -> TokenClassification:
        return TokenClassification(self.head().num_labels, self.label_names, self.class_weights)

    def pipeline(self, data: DataConfig, tokenizer, **placement):
        return build_task_iterator(data, tokenizer, self.head(), label_all_tokens=self.label_all_tokens, **placement)


@dataclass(frozen=True)
class QaTask:
    """Extractive question answering (``*ForQuestionAnswering``): start and end logits from ``qa_outputs``;
    contexts longer than a row are split into windows overlapping by ``doc_stride`` tokens; answers up to
    ``max_answer_length`` tokens are predicted."""

    doc_stride: int = field(default=128, metadata={"minimum": 0})
    max_answer_length: int = field(default=30, metadata={"minimum": 1})

    def __post_init__(self):
        for name in ("doc_stride", "max_answer_length"):
            minimum = self.__dataclass_fields__[name].metadata["minimum"]
            if getattr(self, name) < minimum:
                raise ConfigError(f"task qa: {name} must be >= {minimum}, got {getattr(self, name)}")

    def head(self) -> HeadConfig:
        return HeadConfig("qa", 2)

    def objective(self, train: TrainConfig) -> QuestionAnswering:
        return QuestionAnswering(self.max_answer_length)

    def pipeline(self, data: DataConfig, tokenizer, **placement):
        return build_task_iterator(data, tokenizer, self.head(), doc_stride=self.doc_stride, **placement)


@dataclass(frozen=True)
class _TextTask:
    """What the pretraining tasks share: next-token cross-entropy over every token of plain text documents, with
    PaLM's ``z_loss`` (``z_loss * logsumexp(logits)**2`` per token, keeping the softmax normalizer near 1), and
    ``tokens_per_batch``: the global tokens per optimizer step, from which the run derives ``train.grad_accum``
    (:func:`jaxft.recipes.config.with_token_batch`; None: ``train.grad_accum`` as given)."""

    z_loss: float = 0.0
    tokens_per_batch: int | None = None
    reads_text: ClassVar[bool] = True  # data: {type: text}

    def __post_init__(self):
        if not self.z_loss >= 0:
            raise ConfigError(f"task {self.name}: z_loss must be >= 0 (PaLM uses 1e-4), got {self.z_loss}")
        if self.tokens_per_batch is not None and self.tokens_per_batch < 1:
            raise ConfigError(f"task {self.name}: tokens_per_batch must be >= 1 (or left out), got "
                              f"{self.tokens_per_batch}")

    def objective(self, train: TrainConfig | None) -> CausalLM:
        return CausalLM(chunk_size=_chunk_size(train), z_loss=self.z_loss)

    def pipeline(self, data: TextDataConfig, tokenizer, **placement):
        return build_text_pipeline(data, tokenizer, **placement)

    def eval_pipeline(self, data: TextDataConfig, tokenizer, **placement) -> dict:
        """``{source name: pipeline}``: each held-out source read alone, from its start at every evaluation; a
        pre-tokenized store is one source, named by its folder."""
        if data.store is not None:
            return {Path(data.store).name: self.pipeline(data, tokenizer, **placement)}
        return {name: self.pipeline(data.replace(paths=(path,), weights=None), tokenizer, **placement)
                for name, path in eval_source_names(data.paths).items()}


@dataclass(frozen=True)
class PretrainTask(_TextTask):
    """Pretraining from scratch: an inline ``model:`` config (random weights, HF's init) trained in full on text."""

    name: ClassVar[str] = "pretrain"

    def check_run(self, model, peft: tuple):
        if isinstance(model, str):
            raise ConfigError(f"task pretrain trains an inline model config from random weights, but model "
                              f"{model!r} is a model folder; to train a trained model further on text use task: "
                              "{type: continued_pretrain}, or give model: {type: llama, hidden_size: ...}")
        if peft:
            raise ConfigError("task pretrain trains every weight of a new model; peft methods adapt a trained base, "
                              "which a from-scratch model is not: give peft: [] (the default for pretrain)")


@dataclass(frozen=True)
class ContinuedPretrainTask(_TextTask):
    """Continued pretraining: a trained model folder trained further on text (in full, or with peft methods),
    usually a domain mixed with general text by ``data.weights``; ``eval_data`` sources are evaluated one by one."""

    name: ClassVar[str] = "continued_pretrain"

    def check_run(self, model, peft: tuple):
        if not isinstance(model, str):
            raise ConfigError("task continued_pretrain continues a trained model folder, but model is an inline "
                              "config (random weights); point model at a Hugging Face model folder, or use task: "
                              "{type: pretrain} to train the inline model from scratch")


def task_of(head: HeadConfig | None, **qa_windows):
    """The task that trains (and evaluates) a model with this head, with the head's labels: what ``jaxft eval``
    scores a model folder or adapter by. ``qa_windows``: a QA task's ``doc_stride`` and ``max_answer_length``."""
    if head is None:
        return SftTask()
    if head.kind == "seq_cls":
        return ClassifyTask(head.num_labels, head.labels, head.problem_type)
    if head.kind == "token_cls":
        return TokenClassifyTask(head.num_labels, head.labels, dropout=head.dropout)
    return QaTask(**qa_windows)


@dataclass(frozen=True)
class _PreferenceData:
    """What preference tasks share: their records (``jaxft.data.preference``; pairs, or KTO's unpaired examples) and
    TRL's prompt / completion length limits (tokens; None: only ``data.max_length``, per sequence)."""

    max_prompt_length: int | None = None
    max_completion_length: int | None = None

    def __post_init__(self):
        self.objective(None)  # the objective checks its settings (β, weights, loss types) when the config loads

    def pipeline(self, data: DataConfig, tokenizer, **placement):
        return build_preference_iterator(data, tokenizer, kind=self.record_kind,
                                         max_prompt_length=self.max_prompt_length,
                                         max_completion_length=self.max_completion_length, **placement)

    record_kind: ClassVar[str] = "pairs"
    sequences_per_row: ClassVar[int] = SEQUENCES_PER_UNIT  # rows hold whole pairs: data.max_length per sequence


def _chunk_size(train: TrainConfig | None) -> int:
    """The log-prob pass's tokens per chunk: the run's ``train.loss_chunk_size`` (0, full logits, when the objective
    is only built to check its settings)."""
    return train.loss_chunk_size if train is not None else 0


@dataclass(frozen=True)
class _ReferencePolicy(_PreferenceData):
    """What the tasks that compare the policy with a reference policy share: which reference. By default the same
    base with the adapters off, evaluated in each step; ``reference_model`` (a HF model folder, loaded as the run's
    base) or ``precompute_reference`` (the adapters-off base, or the initial weights of a full fine-tuning run):
    log-probs computed once before training and cached in the run folder (:mod:`jaxft.recipes.reference`)."""

    reference_model: str | None = None
    precompute_reference: bool = False
    reference_policy: ClassVar[bool] = True

    def __post_init__(self):
        if self.reference_model is not None and not (Path(self.reference_model) / "config.json").is_file():
            raise ConfigError(f"task: reference_model {self.reference_model!r} is not a Hugging Face model "
                              "folder (no config.json there); point it at a folder with config.json and "
                              "*.safetensors, or leave it out for the adapters-off reference")
        super().__post_init__()

    @property
    def precomputed_reference(self) -> bool:
        """The reference's log-probs are computed before training (a separate model is always precomputed)."""
        return self.precompute_reference or self.reference_model is not None


@dataclass(frozen=True)
class RewardTask(_PreferenceData):
    """A reward model (TRL's ``RewardTrainer``): a one-label ``score`` head trained with the Bradley–Terry loss on
    pairs, ``-log σ(r_chosen − r_rejected − margin)``, plus ``center_rewards_coefficient`` · mean (r_c + r_r)²."""

    center_rewards_coefficient: float | None = None

    def head(self) -> HeadConfig:
        return HeadConfig("seq_cls", 1)

    def objective(self, train: TrainConfig | None) -> RewardModel:
        return RewardModel(self.center_rewards_coefficient)


@dataclass(frozen=True)
class DpoTask(_ReferencePolicy):
    """DPO and its variants (TRL's ``DPOTrainer`` loss types, a weighted list of several with ``loss_weights``),
    against the reference policy (:class:`_ReferencePolicy`)."""

    beta: float = 0.1
    loss_type: tuple[str, ...] | str = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", (self.loss_type,))
        super().__post_init__()

    def objective(self, train: TrainConfig | None) -> DPO:
        return DPO(self.loss_type, self.loss_weights, self.beta, self.label_smoothing, chunk_size=_chunk_size(train),
                   precomputed_reference=self.precomputed_reference)


@dataclass(frozen=True)
class OrpoTask(_PreferenceData):
    """ORPO: the chosen completion's NLL plus β times the odds-ratio term; no reference policy."""

    beta: float = 0.1

    def objective(self, train: TrainConfig | None) -> ORPO:
        return ORPO(self.beta, chunk_size=_chunk_size(train))


@dataclass(frozen=True)
class SimpoTask(_PreferenceData):
    """SimPO: reference-free, length-normalized log-probs with a target margin γ = β · ``gamma_beta_ratio``; with
    ``nll_weight`` (TRL CPO's ``cpo_alpha``) plus that times the chosen completion's NLL."""

    beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    nll_weight: float = 0.0

    def objective(self, train: TrainConfig | None) -> SimPO:
        return SimPO(self.beta, self.gamma_beta_ratio, self.nll_weight, chunk_size=_chunk_size(train))


@dataclass(frozen=True)
class KtoTask(_ReferencePolicy):
    """KTO: unpaired examples labelled desirable or not, against the reference policy (:class:`_ReferencePolicy`)
    and TRL's KL baseline."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    record_kind: ClassVar[str] = "kto"

    def objective(self, train: TrainConfig | None) -> KTO:
        return KTO(self.beta, self.desirable_weight, self.undesirable_weight, chunk_size=_chunk_size(train),
                   precomputed_reference=self.precomputed_reference)


# The reward functions an RL run's config can name (``task: {type: grpo, rewards: [{type: exact_match}]}``).
REWARD_UNION = TaggedUnion("reward", {"exact_match": ExactMatch, "format": RegexFormat,
                                      "length_penalty": LengthPenalty, "reward_model": RewardModelScore})


def check_reward_models(rewards: tuple) -> None:
    """Each reward model's folder holds one (:func:`jaxft.train.rewards.reward_model_folders`), checked when a run
    starts, before it writes anything (not when the config loads: a shipped config names the folder a demo makes
    first); the error names the entry's key, ``task.rewards[i].path``."""
    for i, reward in enumerate(rewards):
        if isinstance(reward, RewardModelScore):
            try:
                reward_model_folders(reward.path)
            except JaxftError as e:
                raise ConfigError(f"task.rewards[{i}].path {reward.path!r}: {e}") from None


@dataclass(frozen=True)
class _OnlineTask:
    """What the online (RL) tasks share: their batches are rollouts of the policy being trained
    (:mod:`jaxft.recipes.rl`): ``num_generations`` completions per prompt, sampled with ``temperature``, ``top_k``
    and ``top_p``, scored by ``rewards`` (weighted by ``reward_weights``), each generation batch used for
    ``num_iterations`` steps. ``data.batch_size`` counts prompts per process and step; ``max_prompt_length`` is the
    prompts' padded width (longer prompts are dropped and counted)."""

    num_generations: int = field(default=1, metadata={"minimum": 1})
    max_prompt_length: int = field(default=512, metadata={"minimum": 1})
    max_completion_length: int = field(default=256, metadata={"minimum": 1})
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    rewards: tuple[Any, ...] = field(default=(ExactMatch(),), metadata={"union": REWARD_UNION})
    reward_weights: tuple[float, ...] | None = None
    precomputed_reference: ClassVar[bool] = False
    online: ClassVar[bool] = True  # its batches are rollouts of the policy: jaxft.recipes.rl runs it

    def _check_rollouts(self, name: str, counts: tuple[str, ...]):
        for count in ("num_generations", "max_prompt_length", "max_completion_length") + counts:
            minimum = self.__dataclass_fields__[count].metadata["minimum"]
            if getattr(self, count) < minimum:
                raise ConfigError(f"task {name}: {count} must be >= {minimum}, got {getattr(self, count)}")
        if self.temperature <= 0:
            raise ConfigError(f"task {name}: temperature must be > 0 (the rollouts are sampled), got "
                              f"{self.temperature}")
        try:
            check_sampling(self.num_generations, self.max_completion_length, self.temperature, self.top_k, self.top_p)
        except InputError as e:
            raise ConfigError(f"task {name}: {e}") from None
        self.reward_functions()
        for reward in self.rewards:
            if isinstance(reward, LengthPenalty) and reward.max_completion_len > self.max_completion_length:
                raise ConfigError(f"task {name}: reward {reward.name!r} starts its penalty past max_completion_len "
                                  f"{reward.max_completion_len}, but completions stop at max_completion_length "
                                  f"{self.max_completion_length}; make it at most that")

    def reward_functions(self) -> WeightedRewards:
        return WeightedRewards(tuple(self.rewards), self.reward_weights)

    def pipeline(self, data: DataConfig, tokenizer, **placement):
        return build_prompt_iterator(data, tokenizer, max_prompt_length=self.max_prompt_length, **placement)


@dataclass(frozen=True)
class GrpoTask(_OnlineTask):
    """GRPO (TRL's ``GRPOTrainer``, its defaults): advantages normalized per group of ``num_generations``
    completions of a prompt (``scale_rewards``), the clipped objective of :class:`jaxft.train.grpo.GRPO` (its
    ``loss_type``, ``epsilon`` / ``epsilon_high``, and with ``beta`` > 0 the KL to the adapters-off reference)."""

    num_generations: int = field(default=8, metadata={"minimum": 2})
    scale_rewards: str = "group"
    num_iterations: int = field(default=1, metadata={"minimum": 1})
    mask_truncated_completions: bool = False
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"

    def __post_init__(self):
        self._check_rollouts("grpo", ("num_iterations",))
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"task grpo: scale_rewards {self.scale_rewards!r} is unknown; expected one of "
                              f"{SCALE_REWARDS}")
        self.objective(None)  # the objective checks beta, epsilon and loss_type

    reference_fix: ClassVar[str] = "set task.beta: 0 (no KL term, TRL's default)"
    iterations_key: ClassVar[str] = "num_iterations"  # the key of the steps each generation batch trains

    @property
    def reference_policy(self) -> bool:
        """The KL term (beta > 0) compares the policy with the adapters-off base."""
        return self.beta > 0

    def objective(self, train: TrainConfig | None) -> GRPO:
        return GRPO(beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                    max_completion_length=self.max_completion_length, temperature=self.temperature,
                    chunk_size=_chunk_size(train), on_policy=self.num_iterations == 1)


@dataclass(frozen=True)
class PpoTask(_OnlineTask):
    """PPO for RLHF (TRL's ``PPOTrainer`` before 1.0, its names and defaults; :class:`jaxft.train.ppo.PPO`): the
    rewards' total is the score of each completion (less ``missing_eos_penalty`` when it did not stop), the reward
    per token the KL penalty to the adapters-off reference (``kl_coef``, ``kl_estimator``) with the score at the
    last token, GAE(``gamma``, ``lam``) with a value model over the same base: the policy's methods freshly
    initialized with a one-label score head (``value_adapter``), or the head alone on the adapters-off base. Each
    generation batch trains ``num_ppo_epochs`` steps (the whole batch per step: TRL's ``num_mini_batches`` 1);
    ``max_completion_length`` is TRL's ``response_length``."""

    max_completion_length: int = field(default=53, metadata={"minimum": 1})
    temperature: float = 0.7
    num_ppo_epochs: int = field(default=4, metadata={"minimum": 1})
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    value_adapter: bool = True

    def __post_init__(self):
        self._check_rollouts("ppo", ("num_ppo_epochs",))
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ConfigError(f"task ppo: missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        self.objective(None)  # the objective checks the coefficients and the estimator

    iterations_key: ClassVar[str] = "num_ppo_epochs"

    @property
    def num_iterations(self) -> int:
        return self.num_ppo_epochs

    # the value model runs on the adapters-off base, as the KL penalty's reference does (at any kl_coef)
    reference_policy: ClassVar[bool] = True
    reference_fix: ClassVar[str] = ("PPO's value model runs on the same base with the policy's adapters off: give "
                                    "peft a method that trains beside the base")

    def objective(self, train: TrainConfig | None) -> PPO:
        return PPO(cliprange=self.cliprange, cliprange_value=self.cliprange_value, vf_coef=self.vf_coef,
                   kl_coef=self.kl_coef,
                   kl_estimator=self.kl_estimator, gamma=self.gamma, lam=self.lam, whiten_rewards=self.whiten_rewards,
                   temperature=self.temperature, chunk_size=_chunk_size(train), on_policy=self.num_ppo_epochs == 1)
