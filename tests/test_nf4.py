"""jaxft.ops.nf4 against bitsandbytes' CPU path (the oracle): bytes, statistics, dequantized values, serialization."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bitsandbytes.functional as bnb_functional  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from jaxft.hf.bnb import from_bnb, to_bnb  # noqa: E402
from jaxft.ops import nf4  # noqa: E402
from jaxft.ops.dynamic_map import SIGNED_MAP  # noqa: E402

ROW = (128, 96)  # [in, out]: in % 64 == 0 -> row layout
FLAT = (96, 40)  # in % 64 != 0 -> flat layout (numel still a multiple of 64)
ODD = (100, 7)  # numel 700: odd and not a multiple of 64 -> partial last block and a padding nibble
THREADS = torch.get_num_threads()


def _matrix(shape, dtype=np.float32, seed=0):
    """Random normal [in, out] with bnb's hard cases: exact midpoint ties, zeros and a whole zero block.

    Ties: the first torch row (kernel column 0) holds 2 * midpoint values with absmax 2, so value * (1/absmax) lands
    exactly on a midpoint.  The second torch row is all zero (a whole zero block when in >= blocksize)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    mids = nf4._BUCKETS["nf4"][0]
    ties = np.resize(np.concatenate([[2.0], 2.0 * mids, -2.0 * nf4._BUCKETS["fp4"][0]]), shape[0])
    w[:, 0] = ties.astype(np.float32)
    w[:, 1] = 0.0
    w[::7, 2] = 0.0
    return jnp.asarray(w).astype(dtype)


def _oracle(w, blocksize, double_quant, quant_type):
    """bnb's quantize_4bit of the torch weight w.T ([out, in])."""
    torch_w = torch.from_numpy(np.array(jnp.asarray(w).T.astype(jnp.float32))).to(_torch_dtype(w.dtype))
    return bnb_functional.quantize_4bit(torch_w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type=quant_type)


def _torch_dtype(dtype):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[jnp.dtype(dtype).name]


def _oracle_dict(packed, state):
    """What transformers saves for a Linear4bit weight: the packed codes plus QuantState.as_dict(packed=True)."""
    out = {"weight": packed.numpy()}
    out.update({f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()})
    return out


def _assert_same_dict(ours, oracle):
    assert ours.keys() == oracle.keys()
    for key, want in oracle.items():
        assert ours[key].dtype == want.dtype, key
        np.testing.assert_array_equal(ours[key], want, err_msg=key)


def _oracle_dequant(packed, state):
    """bnb's reference dequantization (its pure-torch backend; same math as the CPU kernel where that one is right)."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape,
                                    torch.float32).numpy().T


def test_code_books_match_bitsandbytes():
    np.testing.assert_array_equal(nf4.CODES["nf4"], bnb_functional.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(nf4.CODES["fp4"], bnb_functional.get_4bit_type("fp4", device="cpu").numpy())
    np.testing.assert_array_equal(SIGNED_MAP, bnb_functional.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("shape", [ROW, FLAT, ODD], ids=["row", "flat", "odd"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bytes_and_state_match_bitsandbytes(quant_type, double_quant, shape):
    w = _matrix(shape)
    q = nf4.quantize(w, 64, double_quant, quant_type, torch_threads=THREADS)
    assert q.layout == ("row" if shape == ROW else "flat")
    _assert_same_dict(to_bnb(q), _oracle_dict(*_oracle(w, 64, double_quant, quant_type)))


@pytest.mark.parametrize("shape", [(256, 48), (200, 9)], ids=["row", "odd"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_and_blocksize_128_match_bitsandbytes(dtype, shape):
    w = _matrix(shape, dtype, seed=1)
    q = nf4.quantize(w, 128, True, "nf4", torch_threads=THREADS)
    assert q.dtype == dtype
    _assert_same_dict(to_bnb(q), _oracle_dict(*_oracle(w, 128, True, "nf4")))


def test_offset_matches_torch_mean_over_32768_blocks():
    """With >= 32768 blocks torch's mean (bnb's offset) sums per thread; the offset and state still match."""
    w = _matrix((2048, 1088), seed=2)
    q = nf4.quantize(w, 64, True, "nf4", torch_threads=THREADS)
    _assert_same_dict(to_bnb(q), _oracle_dict(*_oracle(w, 64, True, "nf4")))


@pytest.mark.parametrize("n", [7, 100, 192, 1000, 5000, 40000, 70001])
def test_compiled_offset_mean_is_bit_identical_to_torch_mean(n):
    """bnb's offset is torch's CPU f32 mean: same cascade-sum order and a true division, even fully compiled."""
    x = np.random.default_rng(n).uniform(0.01, 3.0, n).astype(np.float32)
    ours = jax.jit(lambda v: nf4._torch_mean(v, THREADS))(jnp.asarray(x))
    assert np.asarray(ours).view(np.int32) == torch.from_numpy(x).mean().numpy().view(np.int32)


def test_row_layout_shards_like_the_kernel():
    """Codes and absmax take the kernel's (in, out) sharding unchanged; the tiny double-quant state is replicated."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    kernel_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    q = nf4.quantize(_matrix(ROW, seed=9))
    sharded = dataclasses.replace(q, packed=jax.device_put(q.packed, kernel_spec),
                                  absmax=jax.device_put(q.absmax, kernel_spec),
                                  nested_absmax=jax.device_put(q.nested_absmax, replicated),
                                  offset=jax.device_put(q.offset, replicated))
    out = jax.jit(nf4.dequantize)(sharded)
    np.testing.assert_array_equal(out, jax.jit(nf4.dequantize)(q))
    assert out.sharding.is_equivalent_to(kernel_spec, 2)


@pytest.mark.parametrize("shape", [ROW, FLAT, ODD], ids=["row", "flat", "odd"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_matches_bitsandbytes(quant_type, double_quant, shape):
    w = _matrix(shape, seed=3)
    q = nf4.quantize(w, 64, double_quant, quant_type, torch_threads=THREADS)
    ours = nf4.dequantize(q, jnp.float32)
    assert ours.shape == shape
    np.testing.assert_allclose(ours, _oracle_dequant(*_oracle(w, 64, double_quant, quant_type)), rtol=0, atol=1e-6)


def test_dequantize_matches_bitsandbytes_cpu_kernel_in_row_layout():
    w = _matrix(ROW, seed=4)
    packed, state = _oracle(w, 64, True, "nf4")
    want = bnb_functional.dequantize_4bit(packed, state).numpy().T
    np.testing.assert_allclose(nf4.dequantize(nf4.quantize(w, torch_threads=THREADS)), want, rtol=0, atol=1e-6)


def test_dequantize_defaults_to_original_dtype_and_astype_dequantizes():
    w = _matrix(ROW, jnp.bfloat16, seed=5)
    q = nf4.quantize(w)
    assert nf4.dequantize(q).dtype == jnp.bfloat16
    np.testing.assert_array_equal(q.astype(jnp.float32), nf4.dequantize(q, jnp.float32))


@pytest.mark.parametrize("shape", [ROW, ODD], ids=["row", "odd"])
def test_stacked_layers_equal_per_layer_quantization(shape):
    ws = jnp.stack([_matrix(shape, seed=s) for s in range(3)])
    stacked = nf4.quantize(ws)
    assert stacked.shape == (3, *shape) and stacked.offset.shape == (3,)
    for layer in range(3):
        single = nf4.quantize(ws[layer])
        sliced = jax.tree_util.tree_map(lambda x: x[layer], stacked)
        jax.tree_util.tree_map(np.testing.assert_array_equal, sliced, single)
    np.testing.assert_array_equal(nf4.dequantize(stacked), jnp.stack([nf4.dequantize(nf4.quantize(w)) for w in ws]))


@pytest.mark.parametrize("shape", [ROW, ODD], ids=["row", "odd"])
def test_scan_slices_stacked_tensor_into_layers(shape):
    stacked = nf4.quantize(jnp.stack([_matrix(shape, seed=s) for s in range(3)]))
    _, per_layer = jax.lax.scan(lambda carry, q: (carry, nf4.dequantize(q)), 0, stacked)
    np.testing.assert_array_equal(per_layer, nf4.dequantize(stacked))


def test_stack_equals_quantizing_the_stack():
    ws = [_matrix(ROW, seed=s) for s in range(2)]
    jax.tree_util.tree_map(np.testing.assert_array_equal, nf4.stack([nf4.quantize(w) for w in ws]),
                           nf4.quantize(jnp.stack(ws)))


def test_stack_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="identical"):
        nf4.stack([nf4.quantize(_matrix(ROW)), nf4.quantize(_matrix(ROW), double_quant=False)])


def test_quantize_and_dequantize_work_under_jit():
    w = _matrix(FLAT, seed=6)
    q = jax.jit(nf4.quantize, static_argnums=(1, 2, 3))(w, 64, True, "fp4")
    jax.tree_util.tree_map(np.testing.assert_array_equal, q, nf4.quantize(w, 64, True, "fp4"))
    np.testing.assert_array_equal(jax.jit(nf4.dequantize)(q), nf4.dequantize(q))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", [ROW, ODD], ids=["row", "odd"])
def test_from_bnb_reads_the_oracle_dict_and_round_trips(shape, double_quant):
    w = _matrix(shape, seed=7)
    oracle = _oracle_dict(*_oracle(w, 64, double_quant, "fp4"))
    q = from_bnb(oracle)
    jax.tree_util.tree_map(np.testing.assert_array_equal, q,
                           nf4.quantize(w, 64, double_quant, "fp4", torch_threads=THREADS))
    _assert_same_dict(to_bnb(q), oracle)


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
def test_from_bnb_reinterprets_packed_bytes_of_other_quant_storage(storage):
    w = _matrix(ROW, seed=8)
    torch_w = torch.from_numpy(np.asarray(w).T.copy())
    packed, state = bnb_functional.quantize_4bit(torch_w, compress_statistics=True, quant_type="nf4",
                                                 quant_storage=storage)
    raw = packed.view(torch.uint8).numpy().view(np.dtype(jnp.dtype(str(storage).removeprefix("torch."))))
    tensors = {"model.layers.0.q_proj.weight": raw}
    tensors.update({f"model.layers.0.q_proj.weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()})
    q = from_bnb(tensors, shape_out_in=(ROW[1], ROW[0]))
    np.testing.assert_array_equal(nf4.dequantize(q), nf4.dequantize(nf4.quantize(w, torch_threads=THREADS)))


def test_to_bnb_quant_state_json_is_what_bnb_unpacks():
    q = nf4.quantize(_matrix(ODD))
    state = json.loads(bytes(to_bnb(q)["weight.quant_state.bitsandbytes__nf4"]))
    assert state["shape"] == [ODD[1], ODD[0]] and state["dtype"] == "float32" and state["nested_blocksize"] == 256
    restored = bnb_functional.QuantState.from_dict({k: torch.from_numpy(v) for k, v in to_bnb(q).items()
                                                    if k != "weight"}, device="cpu")
    assert restored.offset.item() == float(q.offset)


@pytest.mark.parametrize("shape", [(1024, 1024), (2048, 1024)])
def test_nf4_double_quant_takes_at_most_052_bytes_per_param(shape):
    q = nf4.quantize(jnp.ones(shape, jnp.bfloat16))
    assert nf4.nbytes(q) / (shape[0] * shape[1]) <= 0.52


def test_to_bnb_rejects_stacked_tensors():
    with pytest.raises(ValueError, match="one matrix"):
        to_bnb(nf4.quantize(jnp.ones((2, 64, 8))))


@pytest.mark.parametrize("kwargs, match", [({"blocksize": 48}, "blocksize"), ({"quant_type": "int4"}, "quant_type")])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nf4.quantize(jnp.ones((64, 8)), **kwargs)


def test_non_float_input_raises():
    with pytest.raises(ValueError, match="float"):
        nf4.quantize(jnp.ones((64, 8), jnp.int32))
