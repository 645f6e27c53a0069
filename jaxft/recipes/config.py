"""One YAML file describes a whole run: :class:`RunConfig` and its loader with ``--set`` overrides.

The canonical form names each choice by a ``type:`` (``task: {type: sft}``, ``peft: [{type: lora, r: 16}]``,
``quant: {type: nf4}``, ``model:`` a folder or ``{type: llama, ...}``); ``method: lora|qlora|full`` with a ``lora:``
section is the shorthand that files written before it use, and it loads to the same run.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxft.config import (ABSENT, ATTENTION_IMPLEMENTATIONS, MODEL_UNION, PATH_FIELD, QUANT_UNION, REMAT_POLICIES,
                          ConfigError, HeadConfig, ModelConfig, QuantConfig, TaggedUnion, from_dict, to_dict)
from jaxft.data.config import DataConfig
from jaxft.data.text_config import TextDataConfig
from jaxft.files import write_text_atomic
from jaxft.parallel import MeshConfig
from jaxft.peft.bitfit import BitFit
from jaxft.peft.head import HeadOnly
from jaxft.peft.ia3 import IA3Config
from jaxft.peft.ln_tuning import LNTuningConfig
from jaxft.peft.lora import LoraConfig
from jaxft.peft.lycoris import LohaConfig, LokrConfig
from jaxft.peft.prefix import PrefixTuningConfig, PromptLearning
from jaxft.peft.prompt import PromptEncoderConfig, PromptTuningConfig
from jaxft.recipes.tasks import (ClassifyTask, ContinuedPretrainTask, DpoTask, GrpoTask, KtoTask, OrpoTask, PpoTask,
                                 PretrainTask, QaTask, RewardTask, SftTask, SimpoTask, TokenClassifyTask,
                                 eval_source_names, task_head)
from jaxft.train.optim import OptimConfig

METHODS = ("lora", "qlora", "full")  # the ``method:`` shorthand
DEFAULT_LORA = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")  # the LoRA a run trains by default


# What a run can be asked to do, and the fine-tuning methods it can stack: a next kind is one more entry.
TASK_UNION = TaggedUnion("task", {"sft": SftTask, "classify": ClassifyTask, "token_classify": TokenClassifyTask,
                                  "qa": QaTask, "reward": RewardTask, "dpo": DpoTask, "orpo": OrpoTask,
                                  "simpo": SimpoTask, "kto": KtoTask, "grpo": GrpoTask,
                                  "ppo": PpoTask, "pretrain": PretrainTask,
                                  "continued_pretrain": ContinuedPretrainTask}, default="sft")
# A run's data: chats and records (fine-tuning, the default) or plain text documents (the pretraining tasks).
DATA_UNION = TaggedUnion("data", {"chat": DataConfig, "text": TextDataConfig}, default="chat")
PEFT_UNION = TaggedUnion("peft", {"lora": LoraConfig, "head": HeadOnly,
                                  "ia3": IA3Config,
                                  "ln_tuning": LNTuningConfig,
                                  "bitfit": BitFit,
                                  "loha": LohaConfig, "lokr": LokrConfig,
                                  "prompt_tuning": PromptTuningConfig,
                                  "p_tuning": PromptEncoderConfig,
                                  "prefix_tuning": PrefixTuningConfig})


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings: length, accumulation, cadence of logging / eval / checkpoints, memory knobs."""

    # A count's least valid value is its field's "minimum"; __post_init__ checks them all.
    steps: int = field(default=100, metadata={"minimum": 1})
    grad_accum: int = field(default=1, metadata={"minimum": 1})
    seed: int = 0
    log_every: int = field(default=10, metadata={"minimum": 1})
    eval_every: int = field(default=0, metadata={"minimum": 0})  # 0: evaluate only at the end (when there is eval data)
    eval_batches: int = field(default=8, metadata={"minimum": 1})
    save_every: int = field(default=0, metadata={"minimum": 0})  # 0: checkpoint only at the end
    keep_last: int = field(default=3, metadata={"minimum": 1})
    loss_chunk_size: int = field(default=1024, metadata={"minimum": 0})
    remat: str = "none"
    attention: str = "plain"  # "blockwise": memory linear in sequence length (cuDNN's fused kernel on GPU)
    tensorboard: bool = False
    # Greedy replies to the first sample_prompts eval chats every sample_every steps and at the end (0: none), into
    # samples.jsonl and TensorBoard (jaxft.recipes.samples)
    sample_every: int = field(default=0, metadata={"minimum": 0})
    sample_prompts: int = field(default=4, metadata={"minimum": 1})
    sample_max_new_tokens: int = field(default=64, metadata={"minimum": 1})
    # Stop after this many updates in a row dropped for non-finite gradients.
    max_skipped_steps: int = field(default=25, metadata={"minimum": 1})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            minimum, value = f.metadata.get("minimum"), getattr(self, f.name)
            if minimum is not None and value < minimum:
                raise ConfigError(f"train.{f.name} must be >= {minimum}, got {value}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"train.remat {self.remat!r} is unknown; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"train.attention {self.attention!r} is unknown; expected one of "
                              f"{ATTENTION_IMPLEMENTATIONS}")

    def apply(self, model_cfg: ModelConfig) -> ModelConfig:
        """The model config with this run's memory knobs: the remat policy and the attention implementation."""
        return model_cfg.replace(remat=self.remat, attention=self.attention)


@dataclass(frozen=True)
class RunConfig:
    """A run: base model (an HF folder, or an inline config trained from scratch), task, fine-tuning methods
    (``peft``; none is full fine-tuning), quantization of the frozen base, optimizer, data, mesh, loop.

    ``method`` and ``lora`` are the shorthand: without ``peft``, ``method`` (default lora) decides the methods and
    the quantization, ``lora`` gives the LoRA settings and ``quant`` the 4-bit settings, as in files written before
    ``peft``. With ``peft``, ``lora=`` replaces its LoRA entry (``cfg.replace(lora=...)``). After
    construction ``cfg.lora`` is the LoRA entry or None.
    """

    model: str | ModelConfig = field(metadata={**PATH_FIELD, "union": MODEL_UNION})
    output_dir: str = field(metadata=PATH_FIELD)
    data: DataConfig | TextDataConfig = field(metadata={"union": DATA_UNION})
    tokenizer: str | None = field(default=None, metadata=PATH_FIELD)  # default: the model folder's
    task: (SftTask | ClassifyTask | TokenClassifyTask | QaTask | RewardTask | DpoTask | OrpoTask | SimpoTask
           | KtoTask | GrpoTask | PpoTask | PretrainTask | ContinuedPretrainTask) = field(
        default_factory=SftTask, metadata={"union": TASK_UNION})
    peft: tuple[Any, ...] | None = field(default=None, metadata={"union": PEFT_UNION})  # PEFT_UNION's members
    method: InitVar[str | None] = None
    dtype: str = "float32"
    compute_dtype: str | None = None
    lora: InitVar[LoraConfig | None] = None
    quant: QuantConfig | None = field(default=None, metadata={"union": QUANT_UNION})
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_data: DataConfig | TextDataConfig | None = field(default=None, metadata={"union": DATA_UNION})
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self, method, lora):
        _check_data_kind(self.task, self.data, self.eval_data)
        # pretraining trains every weight: no method is its default (the lora section read_run_tree fills in for a
        # file without peft is the run's default LoRA, not a choice)
        if isinstance(self.task, PretrainTask) and self.peft is None and method is None and lora in (None,
                                                                                                     DEFAULT_LORA):
            method = "full"
        peft, quant = _methods(self.peft, self.quant, method, lora)
        head_only = any(isinstance(m, HeadOnly) for m in peft)
        peft = tuple(_for_task(m, self.task, head_only) for m in peft)
        _check_head_trained(self.task, peft)
        object.__setattr__(self, "peft", peft)
        object.__setattr__(self, "quant", quant)
        object.__setattr__(self, "lora", next((m for m in peft if isinstance(m, LoraConfig)), None))
        _check_reference_policy(self.task, peft)
        _check_prompt_style(self.task, peft)
        _check_generation_cadence(self.task, self.train, self.data)
        _check_samples(self.task, self.train, self.eval_data)
        if quant is not None and not peft:
            raise ConfigError("quant stores the frozen base in 4 bits, but peft is empty (full fine-tuning trains "
                              "the base itself); add a peft method such as {type: lora} or drop quant")
        if hasattr(self.task, "check_run"):
            self.task.check_run(self.model, peft)
        if isinstance(self.eval_data, TextDataConfig) and self.eval_data.store is None:
            eval_source_names(self.eval_data.paths)
        if isinstance(self.model, ModelConfig) and peft:
            raise ConfigError("model is an inline config: its weights start random and are trained in full, so "
                              "there is no base for peft methods or quant to adapt; give peft: [] (or method: "
                              "full), or point model at a trained model folder")
        if isinstance(self.model, ModelConfig) and self.tokenizer is None:
            raise ConfigError("model is an inline config (trained from scratch), so there is no model folder to "
                              "take the tokenizer from; set tokenizer: to a tokenizer folder")
        # The schedule ends where training ends: a total left out follows train.steps, a different one is refused.
        # 0 is how run folders written before this rule recorded "not set"; they still load and resume.
        if self.optim.total_steps in (None, 0):
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, total_steps=self.train.steps))
        elif self.optim.total_steps != self.train.steps:
            raise ConfigError(f"optim.total_steps is {self.optim.total_steps} but train.steps is {self.train.steps}: "
                              "the learning-rate schedule would end at another step than training; leave "
                              "optim.total_steps out (it follows train.steps) or make the two equal")

    @property
    def full(self) -> bool:
        """Full fine-tuning: no method, the base's own weights train."""
        return not self.peft

    @property
    def quantized(self) -> bool:
        """The frozen base is stored in 4 bits (QLoRA)."""
        return self.quant is not None

    @property
    def model_dir(self) -> str | None:
        """The base model's HF folder; None for an inline model config (trained from scratch)."""
        return None if isinstance(self.model, ModelConfig) else self.model

    @property
    def tokenizer_dir(self) -> str:
        """Where the tokenizer is read from: ``tokenizer:``, else the model folder."""
        return self.tokenizer or self.model

    def replace(self, **changes) -> "RunConfig":
        """A copy with ``changes``. Use this, not ``dataclasses.replace``: that passes the init-only ``lora`` on
        again (read back from the attribute ``__post_init__`` sets), which would override a new ``peft``'s LoRA."""
        changes.setdefault("lora", None)  # self.peft holds the LoRA settings already
        if "train" in changes and "optim" not in changes and self.optim.total_steps == self.train.steps:
            changes["optim"] = dataclasses.replace(self.optim, total_steps=None)  # it keeps following train.steps
        return dataclasses.replace(self, **changes)

    def objective(self):
        """What this run's step minimizes and its evaluation reports: its task's objective."""
        return self.task.objective(self.train)

    @property
    def row_length(self) -> int:
        """Tokens per batch row: ``data.max_length``, or a multiple of it when the task packs several sequences as one
        unit (a preference pair's chosen and rejected), or an RL task's prompt and completion widths."""
        if getattr(self.task, "online", False):
            return self.task.max_prompt_length + self.task.max_completion_length  # [prompt | completion]
        return self.data.max_length * getattr(self.task, "sequences_per_row", 1)

    @property
    def micro_batch_rows(self) -> int:
        """Rows of one micro-batch on one process: ``data.batch_size``, or for an RL task its prompts' completions
        (``data.batch_size`` x ``task.num_generations``) split over ``train.grad_accum`` micro-batches."""
        if getattr(self.task, "online", False):
            return self.data.batch_size * self.task.num_generations // self.train.grad_accum
        return self.data.batch_size

    @property
    def head(self) -> HeadConfig | None:
        """The task head this run trains (None: the LM head)."""
        return task_head(self.task)


def with_token_batch(cfg: RunConfig, process_count: int) -> RunConfig:
    """``cfg`` with ``train.grad_accum`` derived from ``task.tokens_per_batch`` (the global tokens per optimizer
    step): that over the tokens of one micro-batch on every process, ``data.batch_size`` rows x ``data.max_length``
    x ``process_count``. Derived when the run starts (the process count is known only then); a saved config holds
    the derived value, so a resume on as many processes agrees with it and one on another count is refused here."""
    tokens = getattr(cfg.task, "tokens_per_batch", None)
    if tokens is None:
        return cfg
    rows, length = cfg.data.batch_size, cfg.data.max_length
    per_micro_batch = rows * length * process_count
    accum, rest = divmod(tokens, per_micro_batch)
    if rest or not accum:
        raise ConfigError(f"task.tokens_per_batch {tokens} is not a whole number of micro-batches: data.batch_size "
                          f"{rows} x data.max_length {length} x {process_count} process(es) = {per_micro_batch} "
                          f"tokens each; give a multiple of {per_micro_batch}")
    if cfg.train.grad_accum not in (1, accum):
        raise ConfigError(f"train.grad_accum {cfg.train.grad_accum} but task.tokens_per_batch {tokens} makes it "
                          f"{accum} ({tokens} / {per_micro_batch} tokens per micro-batch on {process_count} "
                          "process(es)); leave train.grad_accum out, it follows tokens_per_batch")
    return cfg.replace(train=dataclasses.replace(cfg.train, grad_accum=accum))


def _for_task(method, task, head_only: bool):
    """An adapter config's PEFT ``task_type`` follows the run's task (PEFT then trains and saves the head with the
    adapter): the default CAUSAL_LM becomes the head's type, unless a ``{type: head}`` entry (``head_only``) trains
    the head; another head's type is a contradiction. A head-only entry needs a task with a head."""
    head = task_head(task)
    if isinstance(method, HeadOnly) and head is None:
        raise ConfigError(f"peft {{type: head}} trains the task head alone, but task {TASK_UNION.type_of(task)!r} "
                          "has none; give a task with a head (task: {type: classify | token_classify | qa})")
    wanted = "CAUSAL_LM" if head is None or head_only else head.peft_task_type
    if not hasattr(method, "task_type") or method.task_type == wanted:
        return method
    name = PEFT_UNION.type_of(method)
    if method.task_type == "CAUSAL_LM":  # a method that cannot train a head refuses the type, naming what it takes
        return dataclasses.replace(method, task_type=wanted)
    raise ConfigError(f"{name}.task_type {method.task_type!r} does not fit task {TASK_UNION.type_of(task)!r}, whose "
                      f"PEFT task type is {wanted!r}; leave {name}.task_type out (it follows the task)")


def _check_data_kind(task, data, eval_data):
    """The pretraining tasks read plain text (``data: {type: text}``), every other task chats or records."""
    reads_text = getattr(task, "reads_text", False)
    for key, section in (("data", data), ("eval_data", eval_data)):
        if section is None or isinstance(section, TextDataConfig) == reads_text:
            continue
        name = TASK_UNION.type_of(task)
        if reads_text:
            raise ConfigError(f"{key}: task {name!r} trains on plain text documents, but {key} is chat / record "
                              f"data; give {key}: {{type: text, paths: [...]}} (jaxft.data.text_config)")
        raise ConfigError(f"{key}: {{type: text}} is plain text for the pretraining tasks (task: pretrain | "
                          f"continued_pretrain), but task {name!r} reads chats or records; drop {key}.type: text")


def _check_head_trained(task, peft: tuple):
    """A task head starts at random: some entry must train it (its PEFT task type's modules_to_save, or
    ``{type: head}``); full fine-tuning (no entry) trains everything."""
    head = task_head(task)
    if head is None or not peft:
        return
    if any(isinstance(m, HeadOnly) or head.group in (getattr(m, "modules_to_save", None) or ()) for m in peft):
        return
    raise ConfigError(f"task {TASK_UNION.type_of(task)!r} has a new {head.group} head, which none of peft "
                      f"{[PEFT_UNION.type_of(m) for m in peft]} trains: it would stay at its random init; add "
                      "{type: head} to peft (the head trains beside the method)")


def _check_prompt_style(task, peft: tuple):
    """Prompt-style methods (prompt, P- and prefix tuning) train alone and with next-token objectives: only
    CausalLM runs them (``jaxft.peft.prefix.prompt_inputs``), and no weight can hold them for a merged export."""
    if any(isinstance(m, PromptLearning) for m in peft) and (len(peft) > 1 or not isinstance(task, SftTask)):
        raise ConfigError(f"peft {[PEFT_UNION.type_of(m) for m in peft]} with task "
                          f"{TASK_UNION.type_of(task)!r}: a prompt-style method trains alone (no weight can "
                          "hold it, so it exports only as its PEFT adapter, never merged), and only with the sft "
                          "task")


def _check_samples(task, train: TrainConfig, eval_data: DataConfig | None):
    """Sample replies are an SFT chat model's greedy answers to held-out chats: they need eval_data, and a task
    that trains a causal LM on chats."""
    if not train.sample_every:
        return
    if eval_data is None:
        raise ConfigError(f"train.sample_every {train.sample_every} samples replies to the first eval chats, but "
                          "the run has no eval_data; add eval_data (chats) or set train.sample_every: 0")
    if not isinstance(task, SftTask):
        raise ConfigError(f"train.sample_every samples an SFT run's chat replies, but task "
                          f"{TASK_UNION.type_of(task)!r} is not SFT (a task head predicts labels, a preference or "
                          "RL task logs its own metrics); set train.sample_every: 0")


def _check_generation_cadence(task, train: TrainConfig, data: DataConfig):
    """An RL run reuses each generation batch for ``task.num_iterations`` steps; a checkpoint in the middle of one
    could not resume it (the params that sampled it are gone), so checkpoints and the end fall between them. Its
    completions split evenly into the step's micro-batches."""
    if not getattr(task, "online", False):
        return
    n, key = task.num_iterations, task.iterations_key
    for name in ("steps", "save_every"):
        if getattr(train, name) % n:
            raise ConfigError(f"train.{name} {getattr(train, name)} is not a multiple of task.{key} {n}: each "
                              f"generation batch trains {key} steps, and a run stops or checkpoints only between "
                              "generation batches")
    completions = data.batch_size * task.num_generations
    if completions % train.grad_accum:
        raise ConfigError(f"data.batch_size {data.batch_size} prompts x task.num_generations {task.num_generations} "
                          f"= {completions} completions do not split into train.grad_accum {train.grad_accum} "
                          "equal micro-batches")


def _check_reference_policy(task, peft: tuple):
    """A task whose reference is the base with the adapters off (by default) needs adapters to switch off, and no
    method that trains the base's own leaves in place: switching the adapters off would leave those trained, and the
    reference would move with the policy. A precomputed reference is the initial weights, whatever trains."""
    if not getattr(task, "reference_policy", False) or task.precomputed_reference:
        return
    fix = ("set task.precompute_reference: true (the initial weights, log-probs computed before training) or "
           "task.reference_model: <model folder>") if hasattr(task, "precompute_reference") else task.reference_fix
    name = TASK_UNION.type_of(task)
    if not peft:
        raise ConfigError(f"task {name!r} compares the policy with a reference policy, by default the same base with "
                          f"the adapters off; full fine-tuning (peft: []) has no adapters to switch off: {fix}, or "
                          "add a peft method such as {type: lora}")
    in_place = [PEFT_UNION.type_of(m) for m in peft if _trains_base_leaves(m)]
    if in_place:
        raise ConfigError(f"task {name!r}: peft {in_place} train(s) some of the base's own leaves (biases, "
                          f"modules_to_save, a head), which the adapters-off reference would see trained: {fix}")


def _trains_base_leaves(method) -> bool:
    """The method trains some of the base's own leaves in place, not only a namespace beside them."""
    return (isinstance(method, (BitFit, HeadOnly)) or bool(getattr(method, "modules_to_save", None))
            or getattr(method, "bias", "none") != "none")


def _methods(peft, quant, method, lora) -> tuple[tuple, QuantConfig | None]:
    """(methods, quantization) from either form; see :class:`RunConfig`."""
    if peft is None:
        method = "lora" if method is None else method
        if method not in METHODS:
            raise ConfigError(f"method {method!r} is unknown; expected one of {METHODS}")
        methods = () if method == "full" else (DEFAULT_LORA if lora is None else lora,)
        return methods, (quant or QuantConfig()) if method == "qlora" else None
    if method is not None:
        raise ConfigError(f"method {method!r} and peft both choose the fine-tuning methods; give peft (with quant "
                          "for QLoRA) or method, not both")
    peft = tuple(peft)
    for entry in peft:
        PEFT_UNION.type_of(entry)  # an object of no known method type is refused here, naming the known ones
    if lora is not None:
        if not any(isinstance(m, LoraConfig) for m in peft):
            raise ConfigError("lora settings were given, but peft has no lora entry to take them; add {type: lora} "
                              "to peft")
        peft = tuple(lora if isinstance(m, LoraConfig) else m for m in peft)
    return peft, quant


def lookup(tree: dict, dotted: str):
    """The value at ``lora.r`` in a nested run config dict (a method's key in its ``peft`` entry), or ``ABSENT``."""
    try:
        path, _ = _route(tree, dotted, "")
    except ConfigError:
        return ABSENT
    for k in path:
        if isinstance(k, int) and isinstance(tree, list) and k < len(tree):
            tree = tree[k]
        elif isinstance(tree, dict) and k in tree:
            tree = tree[k]
        else:
            return ABSENT
    return tree


def _route(tree: dict, dotted: str, source: str) -> tuple[list, str]:
    """(where ``dotted`` lives in ``tree``, its name): a method's settings are named ``<type>.<key>`` (``lora.r``),
    also written ``peft.<type>.<key>`` or ``peft.<index>.<key>``; a tree with a ``peft`` list keeps them in its
    entry of that type, a shorthand tree (``method:``, ``lora:``) in its ``lora`` section."""
    keys = dotted.split(".")
    entries = tree.get("peft")
    if keys[0] == "peft" and len(keys) > 1:
        types = [e.get("type") if isinstance(e, dict) else None for e in entries] if isinstance(entries, list) else [
            "lora"]
        if keys[1].isdigit() and int(keys[1]) < len(types):
            keys = [types[int(keys[1])], *keys[2:]]
        elif keys[1] in PEFT_UNION.members:
            keys = keys[1:]
        else:
            raise ConfigError(f"{source} {dotted}: peft.{keys[1]} is neither an entry's index nor a method type; "
                              f"this config's peft entries are {types}")
    if keys[0] in PEFT_UNION.members and isinstance(entries, list):
        index = next((i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("type") == keys[0]), None)
        if index is None:
            raise ConfigError(f"{source} {dotted}: this config's peft list has no {keys[0]} entry; add "
                              f"{{type: {keys[0]}}} to peft first")
        return ["peft", index, *keys[1:]], ".".join(keys)
    return keys, ".".join(keys)


def _set(tree: dict, dotted: str, raw: str, source: str) -> str:
    """Sets the key an override names and returns its name (:func:`_route`)."""
    if "=" in dotted:
        raise ConfigError(f"{source}: bad override {dotted!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{source}: {dotted}={raw}: the value is not plain YAML ({problem}); quote strings, write "
                          "lists as [a, b]; tags such as !!python/... are refused") from None
    if dotted == "method" and isinstance(tree.get("peft"), list):
        _set_method(tree, value, source)
        return dotted
    path, name = _route(tree, dotted, source)
    if path[0] == "peft" and len(path) == 2 and isinstance(value, dict):
        value = {"type": name, **value}  # --set lora={r: 4} replaces the entry's settings, keeping its type
    node = tree
    for k, inner in zip(path[:-1], path[1:]):
        node = node[k] if isinstance(k, int) else node.setdefault(k, {})
        if not isinstance(node, list if isinstance(inner, int) else dict):
            raise ConfigError(f"{source}: --set {dotted}: {k!r} is not a section")
    node[path[-1]] = value
    return name


def _set_method(tree: dict, method, source: str):
    """``--set method=...`` on a tree with a ``peft`` list: its meaning in that form (full: no method; lora: the
    LoRA entry alone, unquantized; qlora: the LoRA entry over a 4-bit base)."""
    if method not in METHODS:
        raise ConfigError(f"{source} method={method}: method {method!r} is unknown; expected one of {METHODS}")
    entry = next((e for e in tree["peft"] if isinstance(e, dict) and e.get("type") == "lora"),
                 PEFT_UNION.as_dict(DEFAULT_LORA))
    tree["peft"] = [] if method == "full" else [entry]
    tree["quant"] = (tree.get("quant") or {}) if method == "qlora" else None  # {}: the default type, nf4


def apply_overrides(tree: dict, overrides: list[str], source: str = "--set", origins: dict | None = None) -> dict:
    """``["lora.r=8", "optim.lr=1e-4"]`` applied to a nested dict; values are parsed as YAML scalars. ``origins``
    (when given) records each key's override and the value it replaced, so that errors blame ``--set lora.r=abc``
    rather than the file (:func:`jaxft.config.from_dict`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: {item!r} is not key=value (e.g. lora.r=8)")
        before = lookup(tree, key.strip())
        name = _set(tree, key.strip(), value, source)
        if origins is not None:
            origins[name] = (f"{source} {item}", before)
    return tree


def read_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` of a config file; syntax errors and unsafe tags name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e} "
                          "(only plain YAML is accepted; tags such as !!python/... are refused)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def read_run_tree(path: str | Path, overrides: list[str] = (), origins: dict | None = None) -> dict:
    """A YAML run config as a dict with ``--set`` overrides applied. The sections the file leaves out are first
    filled in with the run's defaults, so that ``--set lora.r=8`` changes r alone: without that, the lora section
    would be built from LoraConfig's own defaults (alpha 8, q/v only) instead of the run's (alpha 32, all-linear).
    A file in the shorthand form (no ``peft``) gets the shorthand's sections, ``lora`` and ``quant``."""
    tree = read_yaml(path)
    for f in dataclasses.fields(RunConfig):
        if f.name not in tree and f.default_factory is not dataclasses.MISSING and "union" not in f.metadata:
            tree[f.name] = to_dict(f.default_factory())
    filled = {}
    if "peft" not in tree:
        # quant without its type, so that --set quant.type=fp4 and quant.quant_type=fp4 both set it
        quant = {k: v for k, v in to_dict(QuantConfig()).items() if k != QUANT_UNION.tag_field}
        filled = {k: v for k, v in (("lora", to_dict(DEFAULT_LORA)), ("quant", quant)) if k not in tree}
        tree.update(copy.deepcopy(filled))  # a copy: a --set into the tree must not change what is compared below
    origins = {} if origins is None else origins
    tree = apply_overrides(tree, list(overrides), origins=origins)
    if "peft" in tree:  # a --set peft=[...] turned a shorthand file into the other form: drop what was filled in
        for k, v in filled.items():
            if tree.get(k) == v:
                del tree[k]
    _check_one_form(tree, str(path), origins)
    return tree


def _check_one_form(tree: dict, source: str, origins: dict):
    """``peft`` (the canonical form) and the shorthand's ``method`` / ``lora`` keys choose the same thing."""
    for key in ("method", "lora"):
        if "peft" in tree and key in tree:
            named = {k: next((origin for at, (origin, _) in origins.items() if covered(at, [k])), source)
                     for k in ("peft", key)}
            raise ConfigError(f"{named['peft']}: peft and {named[key]}: {key} are two forms of the run's methods; "
                              f"give peft (with quant for QLoRA) or method and lora, not both")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, and build the typed config; a bad value is blamed on
    the ``--set`` that gave it, or on the file."""
    origins = {}
    tree = read_run_tree(path, overrides, origins)
    return from_dict(RunConfig, tree, source=str(path), origins=origins)


def dump_run_config(cfg: RunConfig, path: str | Path):
    """The resolved config, saved next to the run's outputs (loads back with :func:`load_run_config`); written
    whole or not at all, since a resume compares against it.

    ``optim.total_steps`` is written as null: it always equals ``train.steps`` (``RunConfig`` refuses anything
    else), and a written number would make ``--set train.steps=N`` on the saved file a mismatch."""
    tree = to_dict(cfg)
    tree["optim"]["total_steps"] = None
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False))


def covered(key: str, keys) -> bool:
    """Whether ``section.key`` is one of ``keys`` or lies under one of them (``mesh`` covers ``mesh.fsdp``)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``; an empty or ``None`` section stays one key. A list of
    typed sections (``peft``) is the list of its types, and each entry's keys are named by its type (``lora.r``)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "type" in v for v in value):
            out[f"{prefix}{key}"] = [v["type"] for v in value]
            for entry in value:
                out.update(flat_keys({k: v for k, v in entry.items() if k != "type"}, f"{prefix}{entry['type']}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, list]:
    """``{"section.key": [old value, new value]}`` for every key whose value differs, in key order."""
    a, b = flat_keys(to_dict(old)), flat_keys(to_dict(new))
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
