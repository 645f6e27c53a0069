"""PEFT's task types (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION): adapters with a trained head go both
ways between jaxft and PEFT (the oracle) with equal logits, and train the same leaves."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import jaxft
from hf_oracle import CONFIGS, TINY, random_ids
from jaxft.config import ConfigError
from jaxft.models import heads

TASKS = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS"}
CASES = [("llama", "seq_cls"), ("llama", "token_cls"), ("llama", "qa"), ("qwen2", "qa"), ("mistral", "qa")]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
IDS = random_ids((2, 9), seed=4)   # no pad token (0): every row's score is at its last token


def _auto_class(kind: str):
    return getattr(transformers, f"AutoModelFor{jaxft.config.HEAD_KINDS[kind]}")


def _randomize(model, predicate, seed: int, scale: float = 0.15):
    """Non-trivial weights (norms near 1) for every parameter ``predicate`` picks by name."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if predicate(name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else scale * torch.randn_like(p))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A saved tiny random ``*For<Task>`` model per case, and a causal Llama for FEATURE_EXTRACTION."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for model_type, kind in CASES:
        cfg = CONFIGS[model_type](**TINY, num_labels=3 if kind != "qa" else 2)
        model = getattr(transformers, f"{cfg.__class__.__name__[:-6]}For{jaxft.config.HEAD_KINDS[kind]}")(cfg)
        _randomize(model, lambda name: True, seed=1)
        out[model_type, kind] = root / f"{model_type}_{kind}"
        model.save_pretrained(out[model_type, kind])
    causal = transformers.LlamaForCausalLM(CONFIGS["llama"](**TINY))
    _randomize(causal, lambda name: True, seed=2)
    out["causal"] = root / "causal"
    causal.save_pretrained(out["causal"])
    return out


def _torch_logits(model, kind: str) -> np.ndarray:
    """[B, N] (seq_cls), [B, T, N] (token_cls) or [B, T, 2] start/end (qa), as jaxft's head functions give them."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(IDS))
    if kind == "qa":
        return torch.stack([out.start_logits, out.end_logits], -1).numpy()
    return out.logits.numpy()


def _jax_logits(cfg, params, kind: str) -> np.ndarray:
    ids = jnp.asarray(IDS)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    segments = jnp.ones_like(ids)
    if kind == "seq_cls":
        return np.asarray(heads.sequence_logits(cfg, params, ids, positions, segments))[:, 0]
    return np.asarray(heads.token_logits(cfg, params, ids, positions, segments))


@pytest.mark.parametrize("model_type,kind", CASES)
def test_jaxft_adapter_loads_in_peft_with_equal_logits(bases, model_type, kind, tmp_path):
    cfg, base = jaxft.from_pretrained(bases[model_type, kind])
    assert cfg.head.kind == kind
    lcfg = jaxft.LoraConfig(task_type=TASKS[kind], init_lora_weights=False, **LORA)   # random A and B
    params = jaxft.lora.add(cfg, base, lcfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(5)
    group = cfg.head.group
    params[group] = {k: v + jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype) for k, v in base[group].items()}
    jaxft.save_adapter(params, lcfg, tmp_path / "adapter", cfg=cfg)

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "np") as f:
        names = set(f.keys())
    decoder = "transformer" if kind == "qa" and model_type != "mistral" else "model"
    assert f"base_model.model.{group}.weight" in names
    assert f"base_model.model.{decoder}.layers.1.self_attn.q_proj.lora_A.weight" in names
    saved = jaxft.hf.config.read_json(tmp_path / "adapter" / "adapter_config.json")
    assert saved["task_type"] == TASKS[kind]
    assert saved["modules_to_save"] == (["qa_outputs"] if kind == "qa" else ["classifier", "score"])

    model = _auto_class(kind).from_pretrained(bases[model_type, kind], attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_logits(peft_model, kind), _jax_logits(cfg, params, kind), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type,kind", CASES)
def test_peft_adapter_loads_in_jaxft_and_trains_the_same_leaves(bases, model_type, kind, tmp_path):
    model = _auto_class(kind).from_pretrained(bases[model_type, kind], attn_implementation="eager")
    peft_config = peft.LoraConfig(task_type=TASKS[kind], **LORA)
    peft_model = peft.get_peft_model(model, peft_config)
    _randomize(peft_model, lambda name: "lora_" in name or "modules_to_save" in name, seed=3, scale=0.1)
    peft_model.eval().save_pretrained(tmp_path / "adapter")

    cfg, base = jaxft.from_pretrained(bases[model_type, kind])
    params = jaxft.load_adapter(tmp_path / "adapter", base)   # no cfg: the head is read off the tree
    np.testing.assert_allclose(_jax_logits(cfg, params, kind), _torch_logits(peft_model, kind), atol=1e-4, rtol=0)

    lcfg = jaxft.LoraConfig(task_type=TASKS[kind], **LORA)
    params = jaxft.lora.add(cfg, base, lcfg, jax.random.PRNGKey(0))
    trainable = lcfg.trainable(cfg, params)
    group = cfg.head.group
    assert {f"{group}/kernel"} | ({f"{group}/bias"} if cfg.head.has_bias else set()) <= trainable.paths
    assert jaxft.peft.methods.trainable_count(params, trainable) == peft_model.get_nb_trainable_parameters()[0]


def test_all_linear_leaves_the_head_to_modules_to_save(bases):
    """all-linear never puts LoRA on the head; the head trains in full, and the count is PEFT's."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(bases["llama", "seq_cls"])
    peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"))
    cfg, base = jaxft.from_pretrained(bases["llama", "seq_cls"])
    lcfg = jaxft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear")
    params = jaxft.lora.add(cfg, base, lcfg, jax.random.PRNGKey(0))
    assert "lora" not in params["score"]
    count = jaxft.peft.methods.trainable_count(params, lcfg.trainable(cfg, params))
    assert count == peft_model.get_nb_trainable_parameters()[0]


def test_structure_config_reads_the_head_off_the_tree(bases):
    for (model_type, kind) in CASES:
        cfg, base = jaxft.from_pretrained(bases[model_type, kind])
        head = jaxft.lora.structure_config(base).head
        assert (head.kind, head.num_labels, head.group) == (kind, cfg.head.num_labels, cfg.head.group)
    _, causal = jaxft.from_pretrained(bases["causal"])
    assert jaxft.lora.structure_config(causal).head is None


def _features(cfg, params) -> np.ndarray:
    ids = jnp.asarray(IDS)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return np.asarray(heads.features(cfg, params, ids, positions, jnp.ones_like(ids), pooling="last"))[:, 0]


def test_feature_extraction_adapters_go_both_ways_on_the_bare_decoder(bases, tmp_path):
    """PEFT's FEATURE_EXTRACTION wraps ``AutoModel`` (no head, decoder names without ``model.``)."""
    cfg, base = jaxft.from_pretrained(bases["causal"])
    lcfg = jaxft.LoraConfig(task_type="FEATURE_EXTRACTION", init_lora_weights=False, **LORA)
    assert lcfg.modules_to_save is None
    params = jaxft.lora.add(cfg, base, lcfg, jax.random.PRNGKey(1))
    jaxft.save_adapter(params, lcfg, tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "np") as f:
        assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    decoder = transformers.AutoModel.from_pretrained(bases["causal"], attn_implementation="eager")
    reloaded = peft.PeftModel.from_pretrained(decoder, tmp_path / "ours").eval()
    with torch.no_grad():
        last = reloaded(input_ids=torch.as_tensor(IDS)).last_hidden_state[:, -1].numpy()
    np.testing.assert_allclose(last, _features(cfg, params), atol=1e-4, rtol=0)

    decoder = transformers.AutoModel.from_pretrained(bases["causal"], attn_implementation="eager")
    theirs = peft.get_peft_model(decoder, peft.LoraConfig(task_type="FEATURE_EXTRACTION", **LORA))
    _randomize(theirs, lambda name: "lora_" in name, seed=4, scale=0.1)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        last = theirs(input_ids=torch.as_tensor(IDS)).last_hidden_state[:, -1].numpy()
    loaded = jaxft.load_adapter(tmp_path / "theirs", base)
    np.testing.assert_allclose(_features(cfg, loaded), last, atol=1e-4, rtol=0)


def test_seq2seq_task_type_is_refused():
    with pytest.raises(ConfigError, match="SEQ_2_SEQ_LM.*decoder-only"):
        jaxft.LoraConfig(task_type="SEQ_2_SEQ_LM")


def test_head_task_type_on_a_causal_lm_tree_is_refused(bases):
    cfg, base = jaxft.from_pretrained(bases["causal"])
    with pytest.raises(ConfigError, match="'SEQ_CLS' trains the task head classifier or score.*no task head"):
        jaxft.lora.add(cfg, base, jaxft.LoraConfig(task_type="SEQ_CLS"), jax.random.PRNGKey(0))
    cfg, base = jaxft.from_pretrained(bases["llama", "seq_cls"])
    with pytest.raises(ConfigError, match="'QUESTION_ANS' trains the task head qa_outputs.*score"):
        jaxft.lora.add(cfg, base, jaxft.LoraConfig(task_type="QUESTION_ANS"), jax.random.PRNGKey(0))


def test_unknown_modules_to_save_of_the_user_is_still_an_error(bases):
    cfg, base = jaxft.from_pretrained(bases["llama", "seq_cls"])
    with pytest.raises(ConfigError, match=r"modules_to_save \['pooler'\] match no module"):
        jaxft.lora.add(cfg, base, jaxft.LoraConfig(task_type="SEQ_CLS", modules_to_save=["pooler"]),
                       jax.random.PRNGKey(0))


def test_qa_adapter_needs_the_model_config_to_be_named(bases, tmp_path):
    cfg, base = jaxft.from_pretrained(bases["mistral", "qa"])
    lcfg = jaxft.LoraConfig(task_type="QUESTION_ANS")
    with pytest.raises(ConfigError, match="needs its ModelConfig"):
        jaxft.save_adapter(jaxft.lora.add(cfg, base, lcfg, jax.random.PRNGKey(0)), lcfg, tmp_path / "a")
