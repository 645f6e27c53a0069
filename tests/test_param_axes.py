"""Every param leaf has declared logical axes: the model's own, each method's for the leaves it adds, NF4's per child.

The oracle is the meaning of each dimension, written here independently of the declarations: every declared axis
name must name a dimension of exactly the size that name means for the config (vocab, hidden, heads x head_dim,
...), and a hand-written table fixes the axes of a dozen leaves. An undeclared leaf is an error naming it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import parallel
from jaxft.models.llama import param_axes
from jaxft.parallel import ParamAxesError, logical_axes

# Distinct sizes, so that a dimension declared with the wrong name cannot have the right size by accident.
CFG = jaxft.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=6)
RANK = 4
TOKENS = (1, 5, 7, 9, 11)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (model config changes, NF4 base?, LoRA options): together every option that adds or copies leaves.
VARIANTS = {
    "untied_qkv_bias_embed_head_rslora_dropout_tokens": (
        dict(qkv_bias=True), False,
        dict(target_modules=ALL_LINEAR + ["lm_head", "embed_tokens"], use_rslora=True, lora_dropout=0.1,
             bias="lora_only", trainable_token_indices=list(TOKENS))),
    "tied_dora_some_layers_saved_head_bias_all": (
        dict(tie_word_embeddings=True, mlp_bias=True, o_bias=True), False,
        dict(target_modules="all-linear", use_dora=True, layers_to_transform=[0, 2], modules_to_save=["lm_head"],
             bias="all")),
    "tied_saved_embedding": (
        dict(tie_word_embeddings=True), False,
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"], lora_dropout=0.05)),
    "nf4_dora_saved_embedding": (
        dict(qkv_bias=True), True,
        dict(target_modules="all-linear", use_dora=True, modules_to_save=["embed_tokens"], bias="all")),
}


def _meaning(cfg: jaxft.ModelConfig) -> dict[str, int]:
    """What each logical axis name means, as a size, for ``cfg`` and the adapters above."""
    hd = cfg.head_dim
    return {"vocab": cfg.vocab_size, "embed": cfg.hidden_size, "norm": cfg.hidden_size,
            "heads": cfg.num_attention_heads * hd, "kv_heads": cfg.num_key_value_heads * hd,
            "mlp": cfg.intermediate_size, "layer": cfg.num_hidden_layers, "lora_rank": RANK,
            "trainable_tokens": len(TOKENS)}


def _quantized(params: dict) -> dict:
    """Blocksize 32: kernels whose fan-in it divides (hidden 32) keep the "row" layout, the others (24, 40) "flat"."""
    params["layers"] = {k: {**v, "kernel": jaxft.nf4.quantize(v["kernel"], blocksize=32)} if "kernel" in v else v
                        for k, v in params["layers"].items()}
    return params


def _params(name: str):
    changes, quant, options = VARIANTS[name]
    cfg = CFG.replace(**changes)
    base = jaxft.init_params(cfg, jax.random.PRNGKey(0))
    if quant:
        base = _quantized(base)
    lcfg = jaxft.LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, **options)
    return cfg, jaxft.lora.add(cfg, base, lcfg, jax.random.PRNGKey(1))


def _flat(tree, is_leaf=None) -> dict:
    return {jaxft.peft.tree.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _axes_leaves(params: dict) -> dict:
    axes = logical_axes(params)
    return _flat(axes, is_leaf=lambda x: isinstance(x, tuple) or (isinstance(x, dict) and "packed" in x))


@pytest.mark.parametrize("name", VARIANTS)
def test_every_leaf_has_declared_axes_naming_dims_of_their_meaning(name):
    cfg, params = _params(name)
    arrays = _flat(params, is_leaf=lambda x: isinstance(x, jaxft.nf4.QuantizedTensor))
    axes = _axes_leaves(params)
    assert axes.keys() == arrays.keys()
    meaning = _meaning(cfg)
    for path, x in arrays.items():
        if isinstance(x, jaxft.nf4.QuantizedTensor):
            assert axes[path]["packed"][0] == "layer", path  # its stacking axis, in either layout
            for child, child_axes in axes[path].items():
                assert len(child_axes) == getattr(x, child).ndim, (path, child)
            continue
        assert len(axes[path]) == x.ndim, path
        assert tuple(meaning[a] for a in axes[path]) == x.shape, (path, axes[path], x.shape)


# The logical meaning of each dimension, written by hand: [L] stacks layers; kernels are [in, out].
EXPECTED = {
    "embed_tokens/embedding": ("vocab", "embed"),
    "embed_tokens/lora/a": ("vocab", "lora_rank"),
    "embed_tokens/lora/b": ("lora_rank", "embed"),
    "embed_tokens/trainable_tokens/rows": ("trainable_tokens", "embed"),
    "embed_tokens/trainable_tokens/ids": ("trainable_tokens",),
    "layers/input_layernorm/scale": ("layer", "norm"),
    "layers/q_proj/kernel": ("layer", "embed", "heads"),
    "layers/k_proj/bias": ("layer", "kv_heads"),
    "layers/o_proj/kernel": ("layer", "heads", "embed"),
    "layers/down_proj/kernel": ("layer", "mlp", "embed"),
    "layers/v_proj/lora/a": ("layer", "embed", "lora_rank"),
    "layers/v_proj/lora/b": ("layer", "lora_rank", "kv_heads"),
    "layers/o_proj/lora/b": ("layer", "lora_rank", "embed"),
    "layers/gate_proj/lora/dropout": ("layer",),
    "layers/up_proj/lora/scale": ("layer",),
    "norm/scale": ("norm",),
    "lm_head/kernel": ("embed", "vocab"),
    "lm_head/lora/a": ("embed", "lora_rank"),
    "lm_head/lora/b": ("lora_rank", "vocab"),
    "lm_head/lora/scale": (),
}
EXPECTED_DORA = {
    "layers/up_proj/lora/magnitude": ("layer", "mlp"),
    "layers/down_proj/lora/mask": ("layer", "lora_rank"),
    "layers/o_proj/bias": ("layer", "embed"),
    "lm_head/kernel": ("embed", "vocab"),  # the trained copy that untied the head
}


def test_hand_written_table_of_axes():
    axes = _axes_leaves(_params("untied_qkv_bias_embed_head_rslora_dropout_tokens")[1])
    assert {k: axes[k] for k in EXPECTED} == EXPECTED
    axes = _axes_leaves(_params("tied_dora_some_layers_saved_head_bias_all")[1])
    assert {k: axes[k] for k in EXPECTED_DORA} == EXPECTED_DORA


def test_nf4_children_follow_the_kernel_in_the_row_layout_only():
    _, params = _params("nf4_dora_saved_embedding")
    axes = logical_axes(params)["layers"]
    assert axes["q_proj"]["kernel"] == {"packed": ("layer", "embed", "heads"), "absmax": ("layer", "embed", "heads"),
                                        "nested_absmax": ("layer", None), "offset": ("layer",)}
    assert params["layers"]["o_proj"]["kernel"].layout == "flat"  # fan-in 24: blocks straddle rows
    assert axes["o_proj"]["kernel"] == {"packed": ("layer", None), "absmax": ("layer", None),
                                        "nested_absmax": ("layer", None), "offset": ("layer",)}


def test_model_declaration_has_the_structure_and_shapes_of_init_params():
    for changes in ({}, {"tie_word_embeddings": True, "qkv_bias": True, "o_bias": True, "mlp_bias": True}):
        cfg = CFG.replace(**changes)
        params = jaxft.init_params(cfg, jax.random.PRNGKey(0))
        declared = param_axes(cfg)
        assert jax.tree.structure(declared, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)
        assert logical_axes(params) == declared


def test_a_loaded_checkpoint_gets_the_models_declarations(tmp_path):
    cfg = CFG.replace(qkv_bias=True, o_bias=True, mlp_bias=True)  # Llama's attention_bias biases q, k, v and o
    jaxft.save_pretrained(cfg, jaxft.init_params(cfg, jax.random.PRNGKey(0)), tmp_path / "model")
    loaded_cfg, loaded = jaxft.from_pretrained(tmp_path / "model")
    assert logical_axes(loaded) == param_axes(loaded_cfg)
    _, quantized = jaxft.from_pretrained(tmp_path / "model", quant=jaxft.QuantConfig(blocksize=32))
    assert logical_axes(quantized)["layers"]["k_proj"]["kernel"]["packed"] == ("layer", "embed", "kv_heads")


def test_an_undeclared_leaf_is_an_error_naming_it():
    _, params = _params("tied_saved_embedding")
    params["value_head"] = {"kernel": jnp.zeros((CFG.hidden_size, 2))}
    mesh = parallel.make_mesh(parallel.MeshConfig(1, 8, 1))
    for place in (logical_axes, lambda p: parallel.param_shardings(p, mesh), lambda p: parallel.shard_params(p, mesh)):
        with pytest.raises(ParamAxesError, match="param value_head/kernel: no logical axes are declared"):
            place(params)
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    params["layers"]["q_proj"]["lora_c"] = jnp.zeros((3, 2))
    with pytest.raises(ParamAxesError, match="layers/q_proj/lora_c"):
        logical_axes(params)
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    params["norm"]["lora"] = {"a": jnp.zeros((CFG.hidden_size, 2))}  # a method where it declares nothing
    with pytest.raises(ParamAxesError, match="param norm/lora/a: no logical axes are declared"):
        logical_axes(params)


def test_a_declaration_that_does_not_fit_the_leaf_is_an_error_naming_it():
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"][None]
    with pytest.raises(ParamAxesError, match=r"param lm_head/kernel: its declared logical axes \('embed', 'vocab'\) "
                                             r"name 2 dims, but it has shape \(1, 32, 96\)"):
        logical_axes(params)


def test_trainable_token_rows_shard_like_the_table_width_and_give_the_same_loss_and_gradient():
    """The rows were replicated before they had declared axes; now their width takes ``fsdp`` like the table."""
    cfg, params = _params("untied_qkv_bias_embed_head_rslora_dropout_tokens")
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)), jnp.int32)

    def loss(trainable, frozen):
        logits = jaxft.forward(cfg, jaxft.combine(trainable, frozen), ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

    want = jax.jit(jax.value_and_grad(loss))(trainable, frozen)
    mesh = parallel.make_mesh(parallel.MeshConfig(2, 4, 1))
    sharded = parallel.shard_params(trainable, mesh)
    assert sharded["embed_tokens"]["trainable_tokens"]["rows"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    got = jax.jit(jax.value_and_grad(loss))(sharded, parallel.shard_params(frozen, mesh))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for path, g in _flat(got[1]).items():
        np.testing.assert_allclose(g, _flat(want[1])[path], rtol=1e-5, atol=1e-7, err_msg=path)
