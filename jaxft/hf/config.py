"""``config.json`` <-> :class:`ModelConfig` for the Llama, Mistral and Qwen2 model types."""
from __future__ import annotations

import json
from pathlib import Path

from jaxft.config import (HEAD_KINDS, ROPE_TYPES, SUPPORTED_MODEL_TYPES, ConfigError, HeadConfig, ModelConfig,
                          RopeConfig)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CAUSAL_LM = "CausalLM"  # the class suffix of ARCHITECTURES; a head model's is HEAD_KINDS[kind]
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_KEYS = {f for f in RopeConfig.__dataclass_fields__} - {"rope_type"}


def read_json(path: Path) -> dict:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _rope(hf: dict, source: str) -> tuple[float, RopeConfig]:
    """Read both spellings: legacy ``rope_theta`` + ``rope_scaling`` and transformers 5's ``rope_parameters``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; expected one of {ROPE_TYPES}")
    if kind == "default":
        return float(theta), RopeConfig()
    known = {k: v for k, v in params.items() if k in ROPE_KEYS and v is not None}
    if "factor" not in known:
        raise ConfigError(f"{source}: rope_scaling of type {kind!r} needs a 'factor'")
    if kind in ("llama3", "yarn"):
        known.setdefault("original_max_position_embeddings",
                         hf.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048)))
    return float(theta), RopeConfig(rope_type=kind, **known)


def _sliding(hf: dict, model_type: str, n_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if model_type == "llama" or window is None:
        return None, (False,) * n_layers
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if model_type == "qwen2":
            start = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
        else:
            layer_types = ["sliding_attention"] * n_layers
    return int(window), tuple(t == "sliding_attention" for t in layer_types)


def config_from_hf(hf: dict, *, source: str = "config.json", dtype: str = "float32") -> ModelConfig:
    """A :class:`ModelConfig` from a parsed ``config.json``; errors name ``source`` and the key."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; "
                          f"jaxft loads {', '.join(SUPPORTED_MODEL_TYPES)}")
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Llama-family models use 'silu')")
    n_layers = hf["num_hidden_layers"]
    theta, rope = _rope(hf, source)
    window, sliding = _sliding(hf, model_type, n_layers)
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=n_layers, num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope=rope,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type == "llama" else False,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        sliding_window=window, sliding_layers=sliding,
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos, pad_token_id=hf.get("pad_token_id"),
        dtype=dtype, head=_head(hf, source),
    )


def architecture(model_type: str, suffix: str) -> str:
    """transformers' class name of ``model_type`` with the given suffix, e.g. ``LlamaForSequenceClassification``."""
    return ARCHITECTURES[model_type][:-len(CAUSAL_LM)] + suffix


def _head(hf: dict, source: str) -> HeadConfig | None:
    """The task head named by ``architectures`` (None for a causal LM, or a config without architectures)."""
    names = hf.get("architectures") or []
    if not names:
        return None
    suffixes = {architecture(hf["model_type"], s): s for s in (CAUSAL_LM, *HEAD_KINDS.values())}
    if names[0] not in suffixes:
        raise ConfigError(f"{source}: architectures {names} is not a class jaxft loads; a {hf['model_type']} model "
                          f"is one of {sorted(suffixes)}")
    kind = {suffix: k for k, suffix in HEAD_KINDS.items()}.get(suffixes[names[0]])
    if kind is None:
        return None
    labels = _labels(hf, source)  # transformers' default names say the labels have none
    fields = {"num_labels": len(labels) if labels else hf.get("num_labels", 2),
              "labels": None if labels == default_labels(len(labels)) else labels}
    if kind == "seq_cls":
        fields["problem_type"] = hf.get("problem_type")
    if kind == "token_cls":
        fields["dropout"] = _token_dropout(hf)
    try:
        return HeadConfig(kind, **fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def default_labels(n: int) -> tuple[str, ...]:
    """transformers' names of labels that have none (``LABEL_0``, ``LABEL_1``, ...)."""
    return tuple(f"LABEL_{i}" for i in range(n))


def _labels(hf: dict, source: str) -> tuple[str, ...]:
    """``id2label``'s names in id order (empty without one); its ids must be 0..N-1."""
    id2label = hf.get("id2label") or {}
    try:
        by_id = {int(i): name for i, name in id2label.items()}
    except (AttributeError, ValueError):
        raise ConfigError(f"{source}: id2label must map label ids 0..N-1 to names, got {id2label!r}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ConfigError(f"{source}: id2label's ids {sorted(by_id)} are not 0..{len(by_id) - 1}")
    return tuple(by_id[i] for i in range(len(by_id)))


def _token_dropout(hf: dict) -> float:
    """transformers' token-classification dropout: ``classifier_dropout``, else ``hidden_dropout``, else 0.1."""
    for key in ("classifier_dropout", "hidden_dropout"):
        if hf.get(key) is not None:
            return float(hf[key])
    return 0.1


def _head_to_hf(cfg: ModelConfig) -> dict:
    """The config.json keys of ``cfg``'s task head (none for a causal LM)."""
    head = cfg.head
    if head is None:
        return {"architectures": [ARCHITECTURES[cfg.model_type]]}
    if head.kind == "seq_cls" and cfg.pad_token_id is None:
        raise ConfigError("a sequence classifier's config.json needs pad_token_id (transformers finds each row's "
                          "last token by it, and refuses batches without one), but ModelConfig.pad_token_id is None; "
                          "set it first, e.g. cfg = cfg.replace(pad_token_id=tokenizer.pad_token_id)")
    labels = head.labels or default_labels(head.num_labels)
    out = {"architectures": [architecture(cfg.model_type, HEAD_KINDS[head.kind])],
           "id2label": {str(i): name for i, name in enumerate(labels)},
           "label2id": {name: i for i, name in enumerate(labels)}}
    if head.problem_type is not None:
        out["problem_type"] = head.problem_type
    if head.kind == "token_cls":
        out["classifier_dropout"] = head.dropout
    return out


def config_to_hf(cfg: ModelConfig, param_dtype: str) -> dict:
    """A ``config.json`` dict that transformers (4.x and 5.x) loads as the same architecture."""
    hf = {
        **_head_to_hf(cfg), "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_to_hf(cfg.rope), "torch_dtype": param_dtype,
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else
        (cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        "initializer_range": 0.02, "attention_dropout": 0.0,
    }
    if cfg.model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    else:
        windowed = [i for i, s in enumerate(cfg.sliding_layers) if s]
        hf.update(use_sliding_window=bool(windowed), sliding_window=cfg.sliding_window,
                  max_window_layers=windowed[0] if windowed else cfg.num_hidden_layers,
                  layer_types=["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers])
    return hf


def _rope_to_hf(rope: RopeConfig) -> dict | None:
    if rope.rope_type == "default":
        return None
    fields = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                       "mscale_all_dim", "attention_factor", "truncate")}[rope.rope_type]
    out = {"rope_type": rope.rope_type}
    out.update({k: getattr(rope, k) for k in fields if getattr(rope, k) is not None})
    return out
