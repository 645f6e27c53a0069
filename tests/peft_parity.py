"""The checks every PEFT method's parity tests share (tests/test_peft_<method>.py): a method's adapter, made by PEFT
with non-trivial weights, against PEFT itself (logits, file tensors, counts, gradients, files both ways), on an NF4
base, and through a whole ``sft.run``.

The ``test_*`` functions here take a module's ``case`` fixture: (model_type, PEFT model, cfg, base params, params
with the adapter, adapter config, the folder holding ``base/`` and ``adapter/``), as :func:`load_case` builds it; a
test file imports them, so pytest collects them there with that file's cases."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.config import from_dict
from jaxft.hf.peft_format import adapter_tensors
from jaxft.ops.linear import dense_kernel
from jaxft.peft.methods import adapter_tree, trainable_count
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig
from sft_worker import make_base


def ids():
    return random_ids((2, 10), seed=3)


def labels():
    return random_ids((2, 10), seed=4)


def load_case(pm, model_type: str, root: Path, config_class) -> tuple:
    """A ``case``: PEFT's model ``pm`` saved in ``root`` as a base folder and an adapter folder, both loaded into
    jaxft, and the adapter config read back from PEFT's."""
    save(build(model_type, seed=0), root / "base")
    pm.save_pretrained(root / "adapter")
    cfg, base_params = jaxft.from_pretrained(root / "base")
    params = jaxft.load_adapter(root / "adapter", base_params, cfg)
    acfg = config_class.from_peft(pm.peft_config["default"].to_dict(), "peft")
    return model_type, pm, cfg, base_params, params, acfg, root


def check_logits(pm, cfg, base_params, params):
    """jaxft's logits equal PEFT's, and the adapter visibly changes them."""
    with torch.no_grad():
        ref = pm(torch.as_tensor(ids())).logits.numpy()
    base = np.asarray(jaxft.forward(cfg, base_params, jnp.asarray(ids())))
    assert np.max(np.abs(ref - base)) > 1e-2, "the adapter must visibly change the logits"
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids()))), ref, atol=1e-4, rtol=0)


def check_tensors_and_count(pm, cfg, params, acfg):
    """The adapter file's tensors are PEFT's state dict, names and values; the trainable count is PEFT's."""
    assert trainable_count(params, acfg.trainable(cfg, params)) == pm.get_nb_trainable_parameters()[0]
    ours, theirs = adapter_tensors(params, acfg, cfg), peft.get_peft_model_state_dict(pm)
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def check_gradients(pm, cfg, params, acfg):
    """The gradients of the trained leaves of a cross-entropy loss equal PEFT autograd's, tensor by tensor."""
    trainable, frozen = jaxft.split(params, acfg.trainable(cfg, params))

    def loss(trainable):
        logits = jaxft.forward(cfg, jaxft.combine(trainable, frozen), jnp.asarray(ids()))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels())[..., None], axis=-1))

    ours = adapter_tensors(jaxft.combine(jax.grad(loss)(trainable), frozen), acfg, cfg)
    pm.zero_grad()
    logits = pm(torch.as_tensor(ids())).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.as_tensor(labels()).reshape(-1)).backward()
    ref = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(ref)
    for k, g in ours.items():
        np.testing.assert_allclose(g, ref[k], atol=1e-5, rtol=1e-4, err_msg=k)


def check_peft_loads_saved(pm, model_type: str, cfg, params, acfg, folder: Path):
    """``save_adapter``'s folder loads with ``PeftModel.from_pretrained``, with the logits of ``pm``."""
    jaxft.save_adapter(params, acfg, folder, cfg=cfg)
    reloaded = peft.PeftModel.from_pretrained(build(model_type, seed=0), folder)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.as_tensor(ids())).logits.numpy(),
                                   pm(torch.as_tensor(ids())).logits.numpy(), atol=1e-5, rtol=0)


def check_nf4_base(cfg, root: Path):
    """The adapter on a 4-bit base gives the logits of the same adapter on the dequantized kernels, dense."""
    _, quantized = jaxft.from_pretrained(root / "base", quant="nf4")
    on_nf4 = jaxft.load_adapter(root / "adapter", quantized, cfg)
    dense = jax.tree.map(lambda x: dense_kernel(x, jnp.float32) if _is_nf4(x) else x, on_nf4, is_leaf=_is_nf4)
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, on_nf4, jnp.asarray(ids()))),
                               np.asarray(jaxft.forward(cfg, dense, jnp.asarray(ids()))), atol=1e-4, rtol=0)


def test_logits_equal_peft_and_differ_from_the_base(case):
    model_type, pm, cfg, base_params, params, acfg, _ = case
    check_logits(pm, cfg, base_params, params)


def test_file_tensors_and_trainable_count_equal_peft(case):
    model_type, pm, cfg, base_params, params, acfg, _ = case
    check_tensors_and_count(pm, cfg, params, acfg)


def test_gradients_equal_peft_autograd(case):
    model_type, pm, cfg, base_params, params, acfg, _ = case
    check_gradients(pm, cfg, params, acfg)


def test_saved_adapter_loads_in_peft_with_equal_logits(case, tmp_path):
    model_type, pm, cfg, base_params, params, acfg, _ = case
    check_peft_loads_saved(pm, model_type, cfg, params, acfg, tmp_path / "ours")


def test_nf4_base_forward_equals_the_dequantized_base(case):
    model_type, pm, cfg, base_params, params, acfg, root = case
    check_nf4_base(cfg, root)


def _is_nf4(x) -> bool:
    return isinstance(x, jaxft.nf4.QuantizedTensor)


def run_with(tmp_path: Path, entry: dict, expected_config) -> tuple[dict, Path]:
    """A short ``sft.run`` of a tiny Llama with ``peft: [entry]`` (checked to load as ``expected_config``):
    (its summary, the base folder)."""
    base = make_base(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse {i} {i + 1} =", "completion": f" {i + 1} {i} ."}) + "\n"
                            for i in range(32)))
    cfg = from_dict(RunConfig, {"model": str(base), "output_dir": str(tmp_path / "run"), "peft": [entry],
                                "data": {"paths": [str(data)], "max_length": 24, "batch_size": 8},
                                "optim": {"lr": 5e-2}, "train": {"steps": 4, "log_every": 1}})
    assert cfg.peft == (expected_config,)
    return sft.run(cfg), base


def check_exported_adapter(summary: dict, base: Path, peft_type: str) -> dict:
    """The run exported a PEFT adapter of ``peft_type`` that trains exactly the method's leaves and that PEFT loads
    with jaxft's logits; returns the params with it attached."""
    adapter = Path(summary["export"])
    assert adapter.name == "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == peft_type
    model_cfg, base_params = jaxft.from_pretrained(base)
    params = jaxft.load_adapter(adapter, base_params, model_cfg)
    assert summary["trainable_params"] == sum(x.size for x in jax.tree.leaves(adapter_tree(params)))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    tokens = random_ids((2, 8), model_cfg.vocab_size, seed=5)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(model_cfg, params, jnp.asarray(tokens))), theirs, atol=1e-4)
    return params
