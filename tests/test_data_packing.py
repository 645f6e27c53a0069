"""Packing, batch layout and the resumable iterator; packed losses checked against unpacked ones on a tiny model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import JaxftError
import jaxft
from jaxft.data import DataIterator, PackedIterator, Sample, best_fit_decreasing, mixture_plan, shard_indices
from jaxft.data.chat import IGNORE_INDEX as IGNORE, make_sample
from jaxft.data.packing import rows_to_batch

VOCAB = 97


def _samples(count: int, seed: int = 0, max_len: int = 40) -> list[Sample]:
    """Random documents whose first few tokens (a "prompt") carry no loss."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        length = int(rng.integers(3, max_len))
        ids = rng.integers(1, VOCAB, length)
        mask = np.arange(length) >= length // 3
        samples.append(make_sample(ids, mask, f"doc{i}", max_length=max_len, truncation="error"))
    return samples


@pytest.fixture(scope="module")
def tiny_model():
    cfg = jaxft.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    return cfg, jaxft.init_params(cfg, jax.random.PRNGKey(0))


def _token_losses(cfg, params, input_ids, labels, positions=None, segment_ids=None) -> np.ndarray:
    @jax.jit
    def losses(params, input_ids, labels, positions, segment_ids):
        logits = jaxft.forward(cfg, params, input_ids, positions=positions, segment_ids=segment_ids)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(labels != IGNORE, -picked, 0.0)

    return np.asarray(losses(params, input_ids, labels, positions, segment_ids))


def test_packed_per_token_losses_equal_unpacked(tiny_model):
    cfg, params = tiny_model
    samples = _samples(12, max_len=30)
    rows = best_fit_decreasing([len(s.input_ids) for s in samples], 64)
    batch = rows_to_batch(samples, rows, 64, pad_id=0)
    packed = _token_losses(cfg, params, batch["input_ids"], batch["labels"], batch["positions"],
                           batch["segment_ids"])
    # Reference: each document alone in its own row, right-padded; causal attention never sees the padding,
    # and no segment ids or positions are passed, so the model's defaults (one document from 0) apply.
    alone = np.zeros((len(samples), 30), np.int32)
    alone_labels = np.full((len(samples), 30), IGNORE, np.int32)
    for i, sample in enumerate(samples):
        alone[i, :len(sample.input_ids)], alone_labels[i, :len(sample.labels)] = sample.input_ids, sample.labels
    unpacked = _token_losses(cfg, params, alone, alone_labels)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = len(samples[index].input_ids)
            np.testing.assert_allclose(packed[r, start:start + n], unpacked[index, :n], atol=1e-5, rtol=0)
            start += n
    assert (unpacked > 0).sum() == (packed > 0).sum() > 100


def test_bfd_places_every_document_once_within_capacity():
    lengths = np.random.default_rng(1).integers(1, 200, 3000)
    rows = best_fit_decreasing(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(lengths[row].sum() for row in rows) <= 256


def test_bfd_needs_no_more_rows_than_trl():
    import datasets
    from trl import pack_dataset
    lengths = np.random.default_rng(2).integers(1, 300, 600)
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * int(n) for n in lengths]})
    trl_rows = len(pack_dataset(ds, 512, strategy="bfd", map_kwargs={"batch_size": len(lengths)}))
    assert len(best_fit_decreasing(lengths, 512)) <= trl_rows


def test_segment_ids_and_positions_restart_at_each_document():
    samples = [make_sample(np.arange(1, n + 1), np.ones(n, bool), f"d{n}", 16, "error") for n in (3, 4, 2)]
    batch = rows_to_batch(samples, [[0, 1, 2]], 12, pad_id=0)
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0]
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 0, 0]


def test_first_token_of_a_document_is_never_a_target_of_the_previous_one():
    samples = _samples(30)
    batch = rows_to_batch(samples, best_fit_decreasing([len(s.input_ids) for s in samples], 64), 64, pad_id=0)
    segments, labels = batch["segment_ids"], batch["labels"]
    last_of_document = np.zeros_like(segments, bool)
    last_of_document[:, :-1] = segments[:, :-1] != segments[:, 1:]
    last_of_document[:, -1] = segments[:, -1] != 0
    assert (labels[last_of_document] == IGNORE).all() and (labels[segments == 0] == IGNORE).all()


def test_batches_are_int32_arrays_of_fixed_shape():
    batch = next(PackedIterator([_samples(20)], batch_size=4, row_length=64))
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"}
    assert all(a.shape == (4, 64) and a.dtype == np.int32 for a in batch.values())


def test_packing_efficiency_is_reported():
    iterator = PackedIterator([_samples(200)], batch_size=4, row_length=128)
    next(iterator)
    assert iterator.epoch_stats["packing_efficiency"] > 0.9


def test_unpacked_rows_hold_one_document_each():
    iterator = PackedIterator([_samples(10)], batch_size=5, row_length=64, packing=False)
    assert (next(iterator)["segment_ids"].max(axis=1) == 1).all()


def test_iterator_implements_the_protocol():
    assert isinstance(PackedIterator([_samples(3)], batch_size=1, row_length=64), DataIterator)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_same_seed_gives_the_same_batches():
    make = lambda: PackedIterator([_samples(60)], batch_size=3, row_length=64, seed=7)  # noqa: E731
    _assert_same_batches(_take(make(), 10), _take(make(), 10))


def test_different_seeds_give_different_orders():
    a = next(PackedIterator([_samples(60)], batch_size=3, row_length=64, seed=1))
    b = next(PackedIterator([_samples(60)], batch_size=3, row_length=64, seed=2))
    assert not np.array_equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("stop_after", [3, 11])  # mid-epoch, and in the next epoch
def test_resume_continues_with_exactly_the_uninterrupted_batches(stop_after):
    make = lambda: PackedIterator([_samples(40), _samples(15, seed=3)], batch_size=3, row_length=64,  # noqa: E731
                                  weights=[1.0, 2.0], seed=5)
    uninterrupted = _take(make(), 16)
    first = make()
    _take(first, stop_after)
    state = first.get_state()
    resumed = make()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 16 - stop_after), uninterrupted[stop_after:])


def test_resuming_on_different_data_is_refused():
    state = PackedIterator([_samples(40)], batch_size=2, row_length=64).get_state()
    other = PackedIterator([_samples(40, seed=9)], batch_size=2, row_length=64)
    with pytest.raises(JaxftError, match="fingerprint"):  # the user's data changed: one paragraph, no traceback
        other.set_state(state)


def test_process_shards_are_disjoint_and_cover_everything():
    shards = [shard_indices(101, seed=3, process_index=p, process_count=4) for p in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(101))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_mixture_weights_set_each_sources_share_of_an_epoch():
    plan = mixture_plan([1000, 50], [3.0, 1.0], epoch=0, seed=0)
    counts = np.bincount(plan[:, 0])
    assert counts.tolist() == [788, 262]
    assert len(np.unique(plan[plan[:, 0] == 1, 1])) == 50  # the small source is repeated, all of it used


def test_mixture_without_weights_uses_every_sample_once():
    plan = mixture_plan([5, 7], None, epoch=3, seed=1)
    assert sorted(map(tuple, plan.tolist())) == [(0, i) for i in range(5)] + [(1, i) for i in range(7)]
