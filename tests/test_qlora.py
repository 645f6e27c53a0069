"""QLoRA: 4-bit bases that match transformers + bitsandbytes byte for byte, and adapters that move between them."""
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxft
from hf_oracle import build, random_ids, save, torch_logits


def _bnb_model(folder, quant_type="nf4", double_quant=True):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32))


def bnb_logits(model, ids):
    """Logits through bitsandbytes' training path (dequantize + float32 matmul), the one QLoRA uses.

    In eval mode on CPUs with AVX512-BF16, bitsandbytes switches to a fused kernel that casts activations to
    bfloat16, which is ~1e-2 off any float32 computation. Nothing here has dropout, so train mode is exact.
    """
    model.train()
    try:
        return torch_logits(model, ids)
    finally:
        model.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    save(build("llama", scale=0.08, intermediate_size=128), root / "base")  # bnb CPU kernels need out % 32 == 0
    quantized = _bnb_model(root / "base")
    quantized.save_pretrained(root / "bnb")
    return root, quantized


def test_bnb_checkpoint_loads_with_transformers_logits(bases):
    root, quantized = bases
    cfg, params = jaxft.from_pretrained(root / "bnb")
    assert isinstance(params["layers"]["q_proj"]["kernel"], jaxft.nf4.QuantizedTensor)
    ids = random_ids((2, 12))
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids))),
                               bnb_logits(quantized, ids), atol=1e-4, rtol=0)


def test_quantize_on_load_equals_bitsandbytes_checkpoint_bytes(bases):
    root, _ = bases
    _, ours = jaxft.from_pretrained(root / "base", quant="nf4")
    _, theirs = jaxft.from_pretrained(root / "bnb")
    for module in ("q_proj", "down_proj"):
        a, b = ours["layers"][module]["kernel"], theirs["layers"][module]["kernel"]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("quant_type,double_quant", [("fp4", False), ("nf4", False)])
def test_other_4bit_variants_load_with_transformers_logits(tmp_path, bases, quant_type, double_quant):
    root, _ = bases
    quantized = _bnb_model(root / "base", quant_type, double_quant)
    quantized.save_pretrained(tmp_path / "q")
    cfg, params = jaxft.from_pretrained(tmp_path / "q")
    ids = random_ids((1, 9))
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids))),
                               bnb_logits(quantized, ids), atol=1e-4, rtol=0)


def test_adapter_trained_on_nf4_base_loads_in_peft_on_bnb_model(tmp_path, bases):
    root, _ = bases
    cfg, base_params = jaxft.from_pretrained(root / "base", quant="nf4")
    lcfg = jaxft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    params = jaxft.lora.add(cfg, base_params, lcfg, jax.random.PRNGKey(0))
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    ids = jnp.asarray(random_ids((2, 10)))
    grads = jax.grad(lambda t: jnp.mean(jaxft.forward(cfg, jaxft.combine(t, frozen), ids) ** 2))(trainable)
    trainable = jax.tree.map(lambda p, g: p - 0.5 * g, trainable, grads)
    params = jaxft.combine(trainable, frozen)
    jaxft.save_adapter(params, lcfg, tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(_bnb_model(root / "base"), tmp_path / "adapter")
    ours = np.asarray(jaxft.forward(cfg, params, ids))
    base = np.asarray(jaxft.forward(cfg, base_params, ids))
    assert np.max(np.abs(ours - base)) > 1e-2
    np.testing.assert_allclose(ours, bnb_logits(model, np.asarray(ids)), atol=1e-4, rtol=0)


def test_merge_into_nf4_base_warns_and_matches_unmerged(bases):
    root, _ = bases
    cfg, params = jaxft.from_pretrained(root / "base", quant="nf4")
    params = jaxft.lora.add(cfg, params, jaxft.LoraConfig(r=4, init_lora_weights=False), jax.random.PRNGKey(1))
    with pytest.warns(UserWarning, match="dequantized to float32"):
        merged = jaxft.merge(params)
    ids = jnp.asarray(random_ids((1, 8)))
    np.testing.assert_allclose(jaxft.forward(cfg, merged, ids), jaxft.forward(cfg, params, ids), atol=1e-4)


@pytest.mark.slow
def test_nf4_loading_of_a_200m_param_checkpoint_stays_within_memory_bound(tmp_path):
    """Peak RSS of loading with quant='nf4' <= the NF4 tree + 2x the largest tensor (measured in a subprocess)."""
    import ml_dtypes
    from jaxft.hf.safetensors_io import write_safetensors

    hf = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
              num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = jaxft.hf.config.config_from_hf(hf)
    from jaxft.hf.checkpoint import expected_tensors
    rng = np.random.default_rng(0)
    shapes = expected_tensors(cfg)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert n_params >= 200_000_000
    tensors = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
               for name, shape in shapes.items()}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    largest = max(t.nbytes for t in tensors.values())
    del tensors
    script = textwrap.dedent(f"""
        import resource, jax, numpy as np, jaxft
        from jaxft.peft.tree import nbytes
        jaxft.nf4.quantize(jax.numpy.ones((128, 64), jax.numpy.bfloat16))  # compile-time arenas off the books
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cfg, params = jaxft.from_pretrained({str(tmp_path)!r}, dtype="bfloat16", quant="nf4")
        jax.block_until_ready(params)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - before, nbytes(params), nbytes(params["layers"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth, tree_bytes, layer_bytes = map(int, out.stdout.split())
    linear_params = n_params - 2 * 32000 * 1024 - 1024 * (2 * 12 + 1)
    assert layer_bytes / linear_params <= 0.52
    assert growth <= tree_bytes + 2 * largest, (growth, tree_bytes, largest)
