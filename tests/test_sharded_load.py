"""Loading a HF folder onto a mesh: each array is assembled from the file slices its devices hold."""
import jax
import numpy as np
import pytest

import jaxft
from jaxft.hf.checkpoint import from_pretrained, save_pretrained
from jaxft.parallel import MeshConfig, make_mesh, param_shardings

CFG = jaxft.ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, model_type="qwen2",
                        qkv_bias=True)
MESHES = [(1, 8, 1), (1, 2, 4), (2, 2, 2)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    # non-zero biases and norms, so a misplaced slice cannot hide behind constant values
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), params)
    return save_pretrained(CFG, params, tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def unsharded(model_dir):
    return from_pretrained(model_dir)[1]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_sharded_load_equals_unsharded_load_with_rules_table_shardings(model_dir, unsharded, mesh_shape):
    mesh = make_mesh(MeshConfig(*mesh_shape))
    _, params = from_pretrained(model_dir, mesh=mesh)
    expected = param_shardings(unsharded, mesh)
    assert jax.tree.structure(params) == jax.tree.structure(unsharded)
    for (path, got), want, sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                           jax.tree.leaves(unsharded), jax.tree.leaves(expected)):
        name = jax.tree_util.keystr(path)
        assert got.sharding.is_equivalent_to(sharding, got.ndim), name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_fsdp_load_really_shards_the_matrices(model_dir):
    _, params = from_pretrained(model_dir, mesh=make_mesh(MeshConfig(1, 8, 1)))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[-1].key in ("kernel", "embedding"):
            assert leaf.addressable_shards[0].data.size * 8 == leaf.size, jax.tree_util.keystr(path)


def _rchar() -> int:
    """Bytes this thread has read through read/pread syscalls so far (page cache hits included)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_each_device_shard_reads_only_its_eighth_of_the_tensor(model_dir, monkeypatch):
    """What makes multi-host loading cheap: a device's callback reads its slice, not the tensor (measured in
    syscall bytes, so buffered over-reads would count too)."""
    reads = []  # (leaf shape, dtype, sharded dims, bytes read by one callback)
    make = jax.make_array_from_callback

    def measured(shape, sharding, callback, dtype=None):
        def wrapped(index):
            before = _rchar()
            out = callback(index)
            reads.append((shape, np.dtype(dtype), sharding.spec, _rchar() - before))
            return out

        return make(shape, sharding, wrapped, dtype=dtype)

    monkeypatch.setattr(jax, "make_array_from_callback", measured)
    from_pretrained(model_dir, mesh=make_mesh(MeshConfig(1, 8, 1)))
    matrices = [r for r in reads if any(axis is not None for axis in r[2]) and len(r[0]) >= 2]
    assert len(matrices) == 8 * 12  # 7 stacked kernels, 3 q/k/v biases, embedding, lm_head: one read per device
    baseline = max(_rchar() - _rchar(), 0) + 512  # reading /proc itself, twice per measurement
    for shape, dtype, spec, n_read in matrices:
        tensor_bytes = int(np.prod(shape)) * dtype.itemsize
        assert 0 < n_read <= tensor_bytes / 8 + baseline, (shape, spec, n_read, tensor_bytes)


def test_nf4_load_on_a_mesh_is_placed_with_the_rules_table_shardings(model_dir):
    mesh = make_mesh(MeshConfig(1, 8, 1))
    _, unsharded = from_pretrained(model_dir, quant="nf4")
    _, params = from_pretrained(model_dir, quant="nf4", mesh=mesh)
    for got, want, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(unsharded),
                                   jax.tree.leaves(param_shardings(unsharded, mesh))):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
