"""Typed, frozen run configuration.

Every config is a frozen dataclass (hashable, so it can be a static argument of ``jax.jit``). YAML files map
onto them with :func:`from_dict`, which rejects unknown keys by name.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from jaxft.errors import JaxftError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLEMENTATIONS = ("plain", "blockwise")
DTYPES = ("float32", "bfloat16", "float16")
# A task head in place of the LM head, by its transformers class (``LlamaFor<...>``), and the problem types of a
# sequence classifier as transformers names them (``config.problem_type``).
HEAD_KINDS = {"seq_cls": "SequenceClassification", "token_cls": "TokenClassification", "qa": "QuestionAnswering"}
# PEFT's task_type of an adapter trained with each head (it saves the head whole with the adapter)
PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS"}
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


class ConfigError(JaxftError, ValueError):
    """A config value or file is wrong; the message names the key (and file) and what was expected."""


@dataclass(frozen=True)
class RopeConfig:
    """RoPE frequency scaling, mirroring HF's ``rope_scaling`` / ``rope_parameters`` fields."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if self.rope_type != "default" and self.factor <= 0:
            raise ConfigError(f"rope factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class HeadConfig:
    """A task head on the decoder's final hidden states, in place of the LM head (transformers'
    ``*ForSequenceClassification``: ``score`` [D, N] without bias, read at each document's last token;
    ``*ForTokenClassification``: ``score`` [D, N] with bias on every token, after dropout; ``*ForQuestionAnswering``:
    ``qa_outputs`` [D, 2] with bias, start and end logits).

    ``labels``: the label names in id order (config.json's ``id2label``), when they have names. ``problem_type``
    (sequence classification only) follows transformers: None means regression for one label, else single-label.
    ``dropout``: token classification's ``classifier_dropout`` (transformers' default 0.1), applied in training.
    """

    kind: str
    num_labels: int = 2
    labels: tuple[str, ...] | None = None
    problem_type: str | None = None
    dropout: float = 0.1

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"head kind {self.kind!r} is unknown; expected one of {sorted(HEAD_KINDS)}")
        if self.kind == "qa" and self.num_labels != 2:
            raise ConfigError(f"a question-answering head has 2 outputs (start, end), got num_labels "
                              f"{self.num_labels}")
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ConfigError(f"num_labels must be a whole number >= 1, got {self.num_labels!r}")
        if isinstance(self.labels, list):
            object.__setattr__(self, "labels", tuple(self.labels))
        if self.labels is not None and (len(self.labels) != self.num_labels or len(set(self.labels)) != len(
                self.labels)):
            raise ConfigError(f"labels {list(self.labels)} must be {self.num_labels} distinct names (num_labels)")
        if self.problem_type is not None and (self.kind != "seq_cls" or self.problem_type not in PROBLEM_TYPES):
            raise ConfigError(f"problem_type {self.problem_type!r}: a sequence classifier's is one of "
                              f"{PROBLEM_TYPES} (transformers' names); other heads have none")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head dropout must be in [0, 1), got {self.dropout}")

    @property
    def problem(self) -> str | None:
        """The sequence classifier's problem type as transformers resolves a missing one (None for other heads;
        multi-label is never inferred, since integer labels say single-label)."""
        if self.kind != "seq_cls":
            return None
        return self.problem_type or ("regression" if self.num_labels == 1 else "single_label_classification")

    @property
    def group(self) -> str:
        """The param group (and HF module) of the head: ``score`` or ``qa_outputs``."""
        return "qa_outputs" if self.kind == "qa" else "score"

    @property
    def has_bias(self) -> bool:
        return self.kind != "seq_cls"

    @property
    def peft_task_type(self) -> str:
        return PEFT_TASK_TYPES[self.kind]


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Llama 2/3/3.x, Mistral and Qwen2 differ only in these flags."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # One flag per layer: does this layer use the sliding window? (Qwen2 mixes full and windowed layers.)
    sliding_layers: tuple[bool, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype; params keep the dtype they were loaded or created with
    remat: str = "none"  # jax.checkpoint policy for the scanned layer body
    attention: str = "plain"  # or "blockwise": online softmax, memory linear in T; cuDNN fused attention on GPU
    head: HeadConfig | None = None  # a task head in place of the LM head (None: causal LM)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.sliding_layers is None:
            object.__setattr__(self, "sliding_layers", (self.sliding_window is not None,) * self.num_hidden_layers)
        else:
            object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.sliding_layers) != self.num_hidden_layers:
            raise ConfigError(
                f"sliding_layers has {len(self.sliding_layers)} entries, expected num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        if any(self.sliding_layers) and not self.sliding_window:
            raise ConfigError("sliding_layers marks windowed layers but sliding_window is not set")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat {self.remat!r} is not a known policy; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention {self.attention!r} is unknown; expected one of {ATTENTION_IMPLEMENTATIONS}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_head(self, head: HeadConfig | None, source: str) -> "ModelConfig":
        """This (a checkpoint's) config with the task head asked for: a head model's own head must agree with
        ``head`` in kind and size; ``head`` wins otherwise (its problem type, dropout), keeping the checkpoint's
        label names when it gives none. ``None`` keeps whatever the checkpoint has. ``source`` names the checkpoint
        in errors."""
        if head is None:
            return self
        if self.head is not None:
            if (self.head.kind, self.head.num_labels) != (head.kind, head.num_labels):
                raise ConfigError(f"{source}: the folder holds a {self.head.kind!r} head with {self.head.num_labels} "
                                  f"labels, but a {head.kind!r} head with {head.num_labels} is asked for; leave the "
                                  "head out to load the folder's, or load its causal-LM base")
            if head.labels is None:
                head = dataclasses.replace(head, labels=self.head.labels)
        return self.replace(head=head)


@dataclass(frozen=True)
class QuantConfig:
    """How frozen linear weights are stored: bitsandbytes-compatible 4-bit blocks (QLoRA)."""

    quant_type: str = "nf4"  # nf4 | fp4
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if self.quant_type not in QUANT_UNION.members:
            raise ConfigError(f"quant.quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"quant.blocksize must be a power of two in 32..4096 (bitsandbytes), got "
                              f"{self.blocksize}")


class TaggedUnion:
    """One config slot that takes one of several kinds, chosen by a ``type:`` key (``peft: [{type: lora, r: 16}]``).

    ``members`` maps each type name to its dataclass; a next kind is one more entry. ``tag_field`` names a field
    that the type fills (``model: {type: qwen2}`` is ``ModelConfig(model_type="qwen2")``), so a section written
    with that field instead of ``type`` means the same; ``default`` is the type of a section without either. A
    field holds a union when its metadata is ``{"union": the union}`` (:func:`from_dict`, :func:`to_dict`).
    """

    def __init__(self, name: str, members: dict, *, tag_field: str | None = None, default: str | None = None):
        self.name, self.members, self.tag_field, self.default = name, dict(members), tag_field, default

    def type_of(self, value) -> str:
        """The type name of a built member (``"lora"`` for a ``LoraConfig``)."""
        if self.tag_field is not None:
            return getattr(value, self.tag_field)
        for name, cls in self.members.items():
            if isinstance(value, cls):
                return name
        raise ConfigError(f"{self.name}: {type(value).__name__} is none of the known types {sorted(self.members)}")

    def split_tag(self, data: dict, where: str) -> tuple[str, dict]:
        """(type name, the section's other keys) of a section as written; an unknown type lists the known ones."""
        data = dict(data)
        tag = data.pop("type", None)
        if self.tag_field is not None:
            if tag is not None and data.get(self.tag_field, tag) != tag:
                raise ConfigError(f"{where}: type {tag!r} and {self.tag_field} {data[self.tag_field]!r} disagree; "
                                  "give one of them")
            tag = data.pop(self.tag_field, tag)
        tag = self.default if tag is None else tag
        if tag is None:
            raise ConfigError(f"{where}: a {self.name} entry needs a type; known types are {sorted(self.members)}")
        if tag not in self.members:
            raise ConfigError(f"{where}: unknown {self.name} type {tag!r}; known types are {sorted(self.members)}")
        if self.tag_field is not None:
            data[self.tag_field] = tag
        return tag, data

    def as_dict(self, value) -> dict:
        """A member as its section: ``type`` first, then its fields (the tag field is the type)."""
        fields = to_dict(value)
        fields.pop(self.tag_field, None)
        return {"type": self.type_of(value), **fields}


# The kinds of a run's ``model:`` (inline: trained from scratch) and ``quant:`` sections, by their ``type:``.
MODEL_UNION = TaggedUnion("model", {name: ModelConfig for name in SUPPORTED_MODEL_TYPES}, tag_field="model_type",
                          default="llama")
QUANT_UNION = TaggedUnion("quant", {"nf4": QuantConfig, "fp4": QuantConfig}, tag_field="quant_type", default="nf4")


# Dataclass field metadata: ~ and $VARS are expanded when a config is built from a file (a template only when it
# names a .jinja file: otherwise it is a built-in name or Jinja source).
PATH_FIELD, TEMPLATE_FIELD = {"path": "always"}, {"path": ".jinja"}


def expand_path(text):
    """``~/models/$NAME`` -> ``/home/me/models/llama``: what a shell would do to the path in a config file."""
    return os.path.expandvars(os.path.expanduser(text)) if isinstance(text, str) else text


def from_dict(cls, data: dict, *, source: str = "<dict>", origins: dict | None = None, _prefix: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys are errors that name the key (``section.key``) and
    ``source``. ``origins`` maps dotted keys that did not come from ``source`` (``{"lora.r": ("--set lora.r=abc",
    value before it)}``) to what an error about them blames instead.

    Nested dataclass fields (also ``X | None``) are built from nested mappings; lists become tuples; the fields
    marked ``PATH_FIELD`` expand ``~`` and environment variables (the one place configs from files are built).
    """
    origins = origins or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, origins, _prefix[:-1])}: expected a mapping for {cls.__name__}, got "
                          f"{type(data).__name__}")
    # InitVars are keys too: a config's shorthand for its fields (RunConfig's ``method:``)
    hints = {name: hint.type if isinstance(hint, dataclasses.InitVar) else hint
             for name, hint in typing.get_type_hints(cls).items()}
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        blame = {(_origin(origins, _prefix + k)[1] or (source,))[0] for k in unknown}
        raise ConfigError(f"{'; '.join(sorted(blame))}: unknown key(s) {[_prefix + k for k in unknown]} for "
                          f"{cls.__name__}; known keys are {sorted(hints)}")
    kwargs = {}
    for name, value in data.items():
        where = _where(source, origins, _prefix + name)
        sub = _nested_dataclass(hints[name])
        union = metadata.get(name, {}).get("union")
        if union is not None and isinstance(value, (dict, list)):
            value = _union_value(union, value, source, origins, _prefix, name)
        elif sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, source=source, origins=origins, _prefix=f"{_prefix}{name}.")
        elif sub is not None and isinstance(value, list):  # e.g. mesh: [2, 2, 2] for {data: 2, fsdp: 2, tensor: 2}
            raise ConfigError(f"{where}: expected a mapping with keys {[f.name for f in dataclasses.fields(sub)]}, "
                              f"got the list {value!r}")
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, str) and float in (hints[name], *typing.get_args(hints[name])):
            value = _as_float(value, where)
        elif _whole_number_field(hints[name]) and value is not None:
            value = _as_int(value, where)
        value = _expanded(value, metadata.get(name, {}).get("path"))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a missing required key or a wrong type
        raise ConfigError(f"{_where(source, origins, _prefix[:-1])}: {cls.__name__}: {e}") from None
    except ConfigError as e:  # a value __post_init__ refused: blame the override that made it wrong, else the file
        raise ConfigError(f"{_blame(cls, data, source, origins, _prefix)}: {e}") from None


def _union_value(union: TaggedUnion, value, source: str, origins: dict, prefix: str, name: str):
    """A union section built as the member its ``type`` names; a list of them (``peft:``) becomes a tuple whose
    entries are named by their type (``lora.r``, not ``peft.0.r``), so each type appears at most once."""
    if isinstance(value, dict):
        tag, rest = union.split_tag(value, _where(source, origins, f"{prefix}{name}.type"))
        return from_dict(union.members[tag], rest, source=source, origins=origins, _prefix=f"{prefix}{name}.")
    built, seen = [], set()
    for i, entry in enumerate(value):
        where = _where(source, origins, f"{prefix}{name}.{i}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with a type, got {entry!r}")
        tag, rest = union.split_tag(entry, f"{where}.type")
        if tag in seen:
            raise ConfigError(f"{where}: a second {tag} entry; each {name} type may appear once")
        seen.add(tag)
        built.append(from_dict(union.members[tag], rest, source=source, origins=origins, _prefix=f"{prefix}{tag}."))
    return tuple(built)


def _expanded(value, kind: str | None):
    if kind is None or (kind == ".jinja" and not (isinstance(value, str) and value.endswith(".jinja"))):
        return value
    return tuple(map(expand_path, value)) if isinstance(value, tuple) else expand_path(value)


def _origin(origins: dict, key: str):
    """The override that set ``key``, or a section above it (``--set eval_data={...}`` sets eval_data.paths)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return ".".join(parts[:n]), origins[".".join(parts[:n])]
    return None, None


def _where(source: str, origins: dict, key: str) -> str:
    at, origin = _origin(origins, key)
    if origin is None:
        return f"{source}: {key}" if key else source
    return origin[0] if at == key or not key else f"{origin[0]}: {key}"


def _blame(cls, data: dict, source: str, origins: dict, prefix: str) -> str:
    """What to name for a value ``cls`` refused: an override of the whole section, else the override(s) under it
    whose removal makes ``data`` valid (``--set train.steps=0``), else the file."""
    at, origin = _origin(origins, prefix[:-1])
    if origin is not None:
        return origin[0]
    mine = [k for k in origins if k.startswith(prefix) and k != prefix]
    for keys in [[k] for k in mine] + ([mine] if len(mine) > 1 else []):
        trial = copy.deepcopy(data)
        for key in keys:
            _revert(trial, key[len(prefix):].split("."), origins[key][1])
        try:
            from_dict(cls, trial)
        except ConfigError:
            continue
        return "; ".join(origins[k][0] for k in keys)
    return source


def _revert(tree: dict, keys: list[str], before):
    """Puts back the value an override replaced (or removes the key the file did not have)."""
    for k in keys[:-1]:
        tree = tree.get(k)
        if not isinstance(tree, dict):
            return
    if before is ABSENT:
        tree.pop(keys[-1], None)
    else:
        tree[keys[-1]] = before


ABSENT = object()  # an override's "value before it" when the file did not have the key


def to_dict(obj) -> dict:
    """The inverse of :func:`from_dict`: plain dicts/lists, ready for YAML or JSON."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        union = f.metadata.get("union")
        if union is not None and isinstance(value, tuple):
            value = [union.as_dict(v) for v in value]
        elif union is not None and dataclasses.is_dataclass(value):
            value = union.as_dict(value)
        elif dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _as_float(text: str, where: str) -> float:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a float field takes it as the number it means."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {text!r}") from None


def _whole_number_field(annotation) -> bool:
    return annotation is int or (int in typing.get_args(annotation) and float not in typing.get_args(annotation))


def _as_int(value, where: str) -> int:
    """A whole-number field takes ``1000``, ``1000.0`` or YAML 1.1's ``1e3`` (a string) as 1000, and refuses the
    rest (2.5, "ten", true) here, naming the key, rather than failing later inside the run."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, bool) or number is None or not number.is_integer():
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    return int(number)


def _nested_dataclass(annotation):
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):  # X | None
        if dataclasses.is_dataclass(arg):
            return arg
    return None
