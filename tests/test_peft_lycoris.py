"""LoHa and LoKr parity with PEFT: logits, gradients, trainable counts, adapter folders both ways, merge, on dense
and NF4 bases, and a run with ``peft: [{type: loha}]``.

PEFT's adapters start from ``init_weights=False`` (every factor random and non-zero); jaxft loads them from the
folder PEFT saves, so a wrong tensor name, layout or shape fails every test.
"""
import copy
import json
import re
import shutil
from pathlib import Path

import bitsandbytes
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
import yaml

import jaxft
from hf_oracle import build, build_head, random_ids, save, torch_logits
from jaxft.hf.names import module_name
from jaxft.hf.peft_format import adapter_tensors, read_adapter_config
from jaxft.models import heads
from jaxft.models.llama import LINEAR_MODULES
from jaxft.ops.registry import methods_in
from jaxft.peft.lycoris import factorization, lokr_shapes
from jaxft.cli import main
from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config
from sft_worker import make_base, write_chats

PEFT_CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}
JAXFT_CONFIGS = {"loha": jaxft.LohaConfig, "lokr": jaxft.LokrConfig}
CASES = {
    "loha_llama": ("llama", "loha", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "loha_qwen2_patterns": ("qwen2", "loha", dict(r=2, alpha=3, target_modules=["k_proj", "up_proj"],
                                                  rank_pattern={"up_proj": 3},
                                                  alpha_pattern={"layers.1.self_attn.k_proj": 5})),
    "loha_mistral_one_layer": ("mistral", "loha", dict(r=3, alpha=6, target_modules=list(LINEAR_MODULES),
                                                       layers_to_transform=[0])),
    "lokr_mistral_decompose_both": ("mistral", "lokr", dict(r=2, alpha=4, decompose_both=True,
                                                            target_modules="all-linear")),
    "lokr_llama_krona": ("llama", "lokr", dict(r=8, alpha=8, target_modules=["q_proj", "gate_proj"])),
    "lokr_qwen2_factor": ("qwen2", "lokr", dict(r=3, alpha=6, decompose_factor=4,
                                                target_modules=["o_proj", "down_proj"], layers_to_transform=[1])),
    "loha_llama_saved_excluded": ("llama", "loha", dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                        exclude_modules=["layers.1.self_attn.q_proj"],
                                                        modules_to_save=["lm_head"])),
    "lokr_qwen2_saved_excluded": ("qwen2", "lokr", dict(r=2, alpha=4, target_modules="all-linear",
                                                        exclude_modules=r".*\.0\.mlp\..*",
                                                        modules_to_save=["post_attention_layernorm"])),
    "loha_llama_layer_ranks": ("llama", "loha", dict(r=2, alpha=4, target_modules=["q_proj", "down_proj"],
                                                     rank_pattern={"layers.1.self_attn.q_proj": 4,
                                                                   "model.layers.0.mlp.down_proj": 3})),
    "lokr_mistral_layer_ranks": ("mistral", "lokr", dict(r=2, alpha=4, decompose_both=True,
                                                         target_modules=["q_proj", "o_proj"],
                                                         rank_pattern={"layers.1.self_attn.q_proj": 3})),
}


def _groups(params):
    """(path, group) of every leaf group that holds a method."""
    out = [(("layers", k), v) for k, v in params["layers"].items()]
    return [(path, g) for path, g in out + [((k,), v) for k, v in params.items() if k != "layers"]
            if isinstance(g, dict) and methods_in(g)]


def _get(params, path):
    for k in path:
        params = params[k]
    return params


def _ids():
    return random_ids((2, 10), seed=3)


def _labels():
    return random_ids((2, 10), seed=4)


def _attach(folder, model_type, kind, kwargs, seed=0, quant=None, torch_base=None):
    """PEFT's model with random non-zero factors, and jaxft's base with that adapter loaded from PEFT's folder."""
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(torch_base or build(model_type, seed=seed),
                             PEFT_CONFIGS[kind](init_weights=False, **kwargs))
    with torch.no_grad():  # PEFT's copies of modules_to_save start equal to the base: make them differ
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(folder / "peft-adapter")
    cfg, base_params = jaxft.from_pretrained(folder, quant=quant)
    params = jaxft.load_adapter(folder / "peft-adapter", base_params, cfg)
    acfg = read_adapter_config(folder / "peft-adapter")
    assert acfg == JAXFT_CONFIGS[kind](**kwargs, init_weights=False, inference_mode=True).replace(
        target_modules=acfg.target_modules)  # PEFT saves inference_mode=True
    return pm, cfg, base_params, acfg, params


def _torch_grads(pm):
    pm.zero_grad()
    logits = pm(torch.as_tensor(_ids())).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.as_tensor(_labels()).reshape(-1))
    loss.backward()
    # PEFT saves a trained copy of modules_to_save under the module's own name
    return {n.removesuffix(".default").replace(".modules_to_save.default", ""): p.grad.numpy()
            for n, p in pm.named_parameters() if p.requires_grad}


def _logits_and_grads(cfg, params, acfg):
    """jaxft's logits and the gradients of the cross-entropy (under their PEFT names) in one compiled pass."""
    trained, frozen = jaxft.split(params, acfg.trainable(cfg, params))
    ids, labels = jnp.asarray(_ids()), jnp.asarray(_labels())

    def loss(trained):
        logits = jaxft.forward(cfg, jaxft.combine(trained, frozen), ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(trained)
    return np.asarray(logits), adapter_tensors(jaxft.combine(grads, frozen), acfg)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, kind, kwargs = CASES[request.param]
    folder = save(build(model_type, seed=0), tmp_path_factory.mktemp(request.param))
    pm, cfg, base_params, acfg, params = _attach(folder, model_type, kind, kwargs)
    logits, grads = _logits_and_grads(cfg, params, acfg)
    return request.param, pm, cfg, base_params, acfg, params, logits, grads


def test_adapter_changes_logits_and_matches_peft(case):
    name, pm, cfg, base_params, acfg, params, logits, grads = case
    ref = torch_logits(pm, _ids())
    with pm.disable_adapter():
        base = torch_logits(pm, _ids())
    assert np.max(np.abs(ref - base)) > 1e-2, "the adapter must visibly change the logits"
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_trainable_count_equals_peft(case):
    name, pm, cfg, base_params, acfg, params, logits, grads = case
    ours = jaxft.peft.methods.trainable_count(params, acfg.trainable(cfg, params))
    assert ours == pm.get_nb_trainable_parameters()[0]


def _assert_grads_match(ours: dict, ref: dict):
    assert sorted(ours) == sorted(ref)
    for tensor_name, g in ours.items():
        assert np.max(np.abs(g)) > 0, f"{tensor_name}: no gradient reaches it"
        np.testing.assert_allclose(g, ref[tensor_name], atol=1e-5, rtol=1e-4, err_msg=tensor_name)


def test_gradients_match_torch_autograd_through_peft(case):
    name, pm, cfg, base_params, acfg, params, logits, grads = case
    _assert_grads_match(grads, _torch_grads(pm))


def test_saved_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    name, pm, cfg, base_params, acfg, params, logits, grads = case
    jaxft.save_adapter(params, acfg, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == acfg.peft_type
    reloaded = peft.PeftModel.from_pretrained(build(CASES[name][0], seed=0), tmp_path / "ours")
    assert type(reloaded.peft_config["default"]) is PEFT_CONFIGS[acfg.method]
    np.testing.assert_allclose(torch_logits(reloaded, _ids()), logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def merged(case):
    """jaxft.merge of the case's params, which the merge and unmerge tests both take."""
    return jaxft.merge(case[5])


def test_merge_equals_peft_merge_and_unload(case, merged):
    name, pm, cfg, base_params, acfg, params, logits, grads = case
    assert not any(acfg.method in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    reference = build(CASES[name][0], seed=0)
    reference.load_state_dict(pm.merge_and_unload(safe_merge=True).state_dict())  # a copy: pm stays unmerged
    for path, group in _groups(params):
        kernel = np.asarray(_get(merged, path)["kernel"])
        for layer in range(kernel.shape[0]):
            weight = reference.get_submodule(module_name(path, layer)).weight.detach().numpy()
            np.testing.assert_allclose(kernel[layer].T, weight, atol=1e-6, rtol=0)
    ids = _ids()
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, merged, jnp.asarray(ids))),
                               torch_logits(reference, ids), atol=1e-4, rtol=0)


def test_unmerge_restores_the_base(case, merged):
    name, pm, cfg, base_params, acfg, params, logits, grads = case
    restored = jaxft.unmerge(merged, jaxft.peft.methods.adapter_tree(params))
    for path, _ in _groups(params):
        np.testing.assert_allclose(np.asarray(_get(restored, path)["kernel"]),
                                   np.asarray(_get(base_params, path)["kernel"]), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """The tiny random Llama saved once (only its config.json is read by inspect)."""
    return save(build("llama"), tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("kind,kwargs", [
    ("loha", dict(r=2, alpha=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[0],
                  rank_pattern={"layers.0.mlp.up_proj": 3})),
    ("lokr", dict(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "o_proj"],
                  exclude_modules=["layers.0.self_attn.o_proj"], rank_pattern={"layers.1.self_attn.q_proj": 3})),
])
def test_inspect_counts_trainable_params_as_peft(llama_folder, tmp_path, capsys, kind, kwargs):
    """Layers left out hold zeros and ranks are padded in the stacked factors: neither is trainable in PEFT."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": str(llama_folder), "output_dir": str(tmp_path / "run"), "peft": [{"type": kind, **kwargs}],
        "data": {"paths": ["train.jsonl"], "max_length": 16, "batch_size": 2},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}))
    assert main(["inspect", str(tmp_path / "run.yaml")]) == 0
    printed = re.search(r"trainable params: ([\d,]+)", capsys.readouterr().out)[1]
    pm = peft.get_peft_model(build("llama"), PEFT_CONFIGS[kind](**kwargs))
    assert int(printed.replace(",", "")) == pm.get_nb_trainable_parameters()[0]


def _head_logits(cfg, params, torch_model, head):
    """jaxft's and PEFT's task-head outputs: [B, N] (seq_cls), [B, T, N] (token_cls), [B, T, 2] start/end (qa)."""
    ids = jnp.asarray(_ids())
    positions, segments = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), jnp.ones_like(ids)
    if head == "seq_cls":
        ours = heads.sequence_logits(cfg, params, ids, positions, segments)[:, 0]
    else:
        ours = heads.token_logits(cfg, params, ids, positions, segments)
    with torch.no_grad():
        out = torch_model(input_ids=torch.as_tensor(_ids()))
    theirs = torch.stack([out.start_logits, out.end_logits], -1) if head == "qa" else out.logits
    return np.asarray(ours), theirs.numpy()


@pytest.mark.parametrize("model_type,head,kind", [("llama", "seq_cls", "loha"), ("qwen2", "qa", "lokr"),
                                                  ("mistral", "token_cls", "lokr")])
def test_task_head_adapters_go_both_ways_with_peft(tmp_path, model_type, head, kind):
    task_type = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS"}[head]
    labels = dict(num_labels=3) if head != "qa" else {}
    save(build_head(model_type, head, **labels), tmp_path / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(build_head(model_type, head, **labels), PEFT_CONFIGS[kind](
        task_type=task_type, init_weights=False, r=2, alpha=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # the head's trained copy starts equal to the base's: make it differ
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    pm.eval().save_pretrained(tmp_path / "peft")
    cfg, base_params = jaxft.from_pretrained(tmp_path / "base")
    params = jaxft.load_adapter(tmp_path / "peft", base_params, cfg)
    acfg = read_adapter_config(tmp_path / "peft")
    assert cfg.head.group in acfg.modules_to_save
    assert jaxft.peft.methods.trainable_count(params, acfg.trainable(cfg, params)) == \
        pm.get_nb_trainable_parameters()[0]
    ours, theirs = _head_logits(cfg, params, pm, head)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    jaxft.save_adapter(params, acfg, tmp_path / "ours", cfg=cfg)
    reloaded = peft.PeftModel.from_pretrained(build_head(model_type, head, **labels), tmp_path / "ours").eval()
    np.testing.assert_allclose(_head_logits(cfg, params, reloaded, head)[1], ours, atol=1e-4, rtol=0)


def _dequantized_twin(folder):
    """A dense transformers model holding bitsandbytes' NF4 round trip of the base at ``folder``: PEFT's LoHa and
    LoKr compute ΔW in the base weight's (packed) shape, so they do not run on a 4-bit base themselves."""
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                w = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                dense.get_submodule(name).weight.copy_(w.float())
    return dense


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    """A tiny Llama saved once, and its dense twin holding bitsandbytes' NF4 round trip."""
    folder = save(build("llama", scale=0.08, intermediate_size=128), tmp_path_factory.mktemp("nf4"))  # bnb: out % 32
    return folder, _dequantized_twin(folder)


@pytest.mark.parametrize("kind,kwargs", [("loha", dict(r=2, alpha=4, target_modules=["v_proj", "up_proj"])),
                                         ("lokr", dict(r=2, alpha=4, decompose_both=True,
                                                       target_modules=["q_proj", "down_proj"]))])
def test_nf4_base_matches_peft_on_the_dequantized_base(nf4_base, tmp_path, kind, kwargs):
    folder, twin = nf4_base
    folder = Path(shutil.copytree(folder, tmp_path / "base"))  # _attach writes PEFT's adapter into the folder
    pm, cfg, base_params, acfg, params = _attach(folder, "llama", kind, kwargs, quant="nf4",
                                                 torch_base=copy.deepcopy(twin))  # PEFT wraps its base in place
    assert isinstance(params["layers"]["q_proj"]["kernel"], jaxft.nf4.QuantizedTensor)
    logits, grads = _logits_and_grads(cfg, params, acfg)
    np.testing.assert_allclose(logits, torch_logits(pm, _ids()), atol=1e-4, rtol=0)
    _assert_grads_match(grads, _torch_grads(pm))


def test_peft_factorization_and_factor_shapes():
    assert [factorization(d) for d in (256, 128, 127, 112)] == [(16, 16), (8, 16), (1, 127), (8, 14)]
    assert factorization(128, 4) == (4, 32)
    for r, both, factor in [(2, True, -1), (8, False, -1), (3, False, 4), (1, True, 8)]:
        for fan_in, fan_out in [(64, 64), (64, 32), (112, 64)]:
            layer = peft.tuners.lokr.layer.Linear(torch.nn.Linear(fan_in, fan_out), "default", r=r, alpha=r,
                                                  config=peft.LoKrConfig(r=r, decompose_both=both,
                                                                         decompose_factor=factor))
            theirs = {n.removeprefix("lokr_").removesuffix(".default"): tuple(p.shape)
                      for n, p in layer.named_parameters() if n.startswith("lokr_")}
            ours = lokr_shapes(jaxft.LokrConfig(r=r, decompose_both=both, decompose_factor=factor), r, fan_in, fan_out)
            assert ours == theirs, (r, both, factor, fan_in, fan_out)


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer jaxft model's config and random params, for the tests that need no PEFT twin."""
    cfg = jaxft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    return cfg, jaxft.init_params(cfg, jax.random.PRNGKey(0))


def test_init_is_a_no_op_as_peft_trains_only_the_factors_and_declares_axes(tiny):
    cfg, base = tiny
    ids = jnp.asarray(random_ids((1, 6), vocab=64))
    base_logits = jaxft.forward(cfg, base, ids)
    for acfg in (jaxft.LohaConfig(target_modules="all-linear"), jaxft.LokrConfig(target_modules="all-linear"),
                 jaxft.LokrConfig(r=1, decompose_both=True, init_weights="lycoris")):
        params = acfg.add(cfg, base, jax.random.PRNGKey(1))
        np.testing.assert_array_equal(jaxft.forward(cfg, params, ids), base_logits)
        trained, _ = jaxft.split(params, acfg.trainable(cfg, params))
        paths = [jax.tree_util.keystr(p, simple=True, separator="/")
                 for p, x in jax.tree_util.tree_flatten_with_path(trained)[0] if x is not None]
        assert paths and all(f"/{acfg.method}/w" in p for p in paths), paths
        axes = jaxft.parallel.logical_axes(params)["layers"]["q_proj"][acfg.method]  # declared, one per dim
        assert set(axes) == set(params["layers"]["q_proj"][acfg.method])


def _one_group(kind, **kwargs):
    cfg = jaxft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    acfg = JAXFT_CONFIGS[kind](r=2, target_modules=["up_proj"], init_weights=False, **kwargs)
    params = acfg.add(cfg, jaxft.init_params(cfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    group = jax.tree.map(lambda x: x[0], params["layers"]["up_proj"])
    return acfg, group


def test_rank_padding_is_zero_and_gets_no_gradient(tiny):
    cfg, base = tiny
    acfg = jaxft.LohaConfig(r=2, target_modules=["up_proj"], rank_pattern={"layers.1.mlp.up_proj": 5},
                            init_weights=False)
    group = acfg.add(cfg, base, jax.random.PRNGKey(1))["layers"]["up_proj"]
    np.testing.assert_array_equal(group["loha"]["rank"], [2, 5])
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 32))

    def loss(factors):
        layer0 = jax.tree.map(lambda v: v[0], {**group, "loha": {**group["loha"], **factors}})
        return jnp.sum(jaxft.ops.registry.REGISTRY["loha"].linear(layer0["loha"], layer0, x, None, None) ** 2)

    factors = {k: v for k, v in group["loha"].items() if k.startswith("w")}
    grads = jax.grad(loss)(factors)
    for name in ("w1_a", "w2_a"):
        assert not np.any(factors[name][0, :, 2:]) and not np.any(grads[name][0, :, 2:]), name
        assert np.all(np.abs(grads[name][0, :, :2]) > 0), name
    for name in ("w1_b", "w2_b"):
        assert not np.any(factors[name][0, 2:]) and not np.any(grads[name][0, 2:]), name


@pytest.mark.parametrize("kind,rescaled", [("loha", True), ("lokr", False)])
def test_rank_dropout_zeroes_output_rows_only_in_training(kind, rescaled):
    acfg, group = _one_group(kind, rank_dropout=0.5)
    method = jaxft.ops.registry.REGISTRY[acfg.method]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 32))
    base = x @ group["kernel"]
    delta = method.linear(group[acfg.method], group, x, None, None) - base
    dropped = method.linear(group[acfg.method], group, x, jax.random.PRNGKey(3), None) - base
    kept = np.asarray(jnp.any(dropped != 0, axis=0))
    assert 0 < kept.sum() < kept.size
    factor = kept.size / kept.sum() if rescaled else 1.0  # PEFT: LoHa divides by the kept mean; LoKr by default not
    np.testing.assert_allclose(dropped, delta * kept * factor, atol=1e-6, rtol=1e-5)


def test_module_dropout_skips_the_whole_adapter_in_training():
    acfg, group = _one_group("lokr", module_dropout=0.9)
    method = jaxft.ops.registry.REGISTRY[acfg.method]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 32))
    base = np.asarray(x @ group["kernel"])
    outs = [np.asarray(method.linear(group[acfg.method], group, x, jax.random.PRNGKey(i), None)) for i in range(40)]
    skipped = [np.allclose(y, base, atol=0, rtol=0) for y in outs]
    unmasked = np.asarray(method.linear(group[acfg.method], group, x, None, None))
    assert 20 < sum(skipped) < 40
    assert all(np.allclose(y, unmasked, atol=1e-6) for y, s in zip(outs, skipped) if not s)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(rank_dropout=1.0), r"rank_dropout must be in \[0, 1\)"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "needs target_modules as a list"),
    (dict(init_weights="gaussian"), "init_weights must be one of"),
])
def test_bad_configs_are_refused_naming_the_key(kwargs, match):
    with pytest.raises(jaxft.ConfigError, match=match):
        jaxft.LohaConfig(**kwargs)


def test_bad_targets_are_refused(tiny):
    cfg, base = tiny
    with pytest.raises(jaxft.ConfigError, match="linear layers only"):
        jaxft.LokrConfig(target_modules=["embed_tokens"]).add(cfg, base, jax.random.PRNGKey(1))
    with pytest.raises(jaxft.ConfigError, match=r"layers/q_proj ranks \[2, 8\] that make different factors in "
                                                r"different layers: layers \[0\] \(w1, w2_a, w2_b\); layers \[1\]"):
        jaxft.LokrConfig(r=2, rank_pattern={"layers.1.self_attn.q_proj": 8}).add(cfg, base, jax.random.PRNGKey(1))
    with pytest.raises(jaxft.ConfigError, match="decompose_factor"):
        jaxft.LokrConfig(decompose_factor=0)


def test_run_with_peft_loha_trains_only_its_factors_and_exports_a_peft_adapter(tmp_path):
    base = make_base(tmp_path / "base")
    data = write_chats(tmp_path / "train.jsonl", 24)
    (tmp_path / "run.yaml").write_text(
        f"model: {base}\noutput_dir: {tmp_path / 'run'}\n"
        "peft:\n  - {type: loha, r: 2, alpha: 4, target_modules: [q_proj, down_proj]}\n"
        f"data: {{paths: [{data}], max_length: 48, batch_size: 8}}\n"
        "optim: {lr: 0.01, max_grad_norm: 1.0}\ntrain: {steps: 3, log_every: 1, loss_chunk_size: 0}\n")
    cfg = load_run_config(tmp_path / "run.yaml")
    assert cfg.peft == (jaxft.LohaConfig(r=2, alpha=4, target_modules=("q_proj", "down_proj")),)
    summary = sft.run(cfg)
    adapter = Path(summary["export"])
    assert adapter.name == "adapter"
    model_cfg, base_params = jaxft.from_pretrained(base)
    params = jaxft.load_adapter(adapter, base_params, model_cfg)
    assert summary["trainable_params"] == jaxft.peft.methods.trainable_count(params, jaxft.Trainable())
    assert set(jaxft.peft.methods.adapter_tree(params)["layers"]) == {"q_proj", "down_proj"}
    ids = random_ids((2, 9), vocab=model_cfg.vocab_size)
    ours = np.asarray(jaxft.forward(model_cfg, params, jnp.asarray(ids)))
    assert np.max(np.abs(ours - np.asarray(jaxft.forward(model_cfg, base_params, jnp.asarray(ids))))) > 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    np.testing.assert_allclose(torch_logits(peft.PeftModel.from_pretrained(hf, adapter).eval(), ids), ours,
                               atol=1e-4, rtol=0)
