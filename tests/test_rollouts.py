"""jaxft.train.rollouts: [prompt | completion] rows with padding in the middle read as the unpadded sequences.

Oracle: transformers' log-probs of each completion token, from the unpadded prompt + completion alone. jaxft's
forward over the batch rows (left-padded prompts, completions padded after their stop) must give the same
log-probs at the labelled positions, and the rollout's log-probs must land at those positions in ``old_logps``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.data.chat import IGNORE_INDEX
from jaxft.models.generate import left_pad
from jaxft.train.rollouts import rollout_batch, token_values

G, N = 2, 5


def _torch_completion_logps(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].double(), -1)
    return np.array([logps[len(prompt) + j - 1, t].item() for j, t in enumerate(completion)])


def test_rows_read_as_the_unpadded_sequences(tmp_path):
    model = build("qwen2", seed=3)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / "m"))
    prompts = [random_ids(3, seed=1).tolist(), random_ids(6, seed=2).tolist()]
    lengths = [5, 2, 4, 1]  # completion lengths of the R = 4 rows (with their stop token)
    tokens = random_ids((len(prompts) * G, N), seed=4) % 100 + 3
    mask = (np.arange(N)[None] < np.array(lengths)[:, None]).astype(np.int32)
    tokens = np.where(mask > 0, tokens, 0)
    completions = [tokens[r, :n].tolist() for r, n in enumerate(lengths)]
    reference = [_torch_completion_logps(model, prompts[r // G], completions[r]) for r in range(len(lengths))]
    logprobs = np.zeros((len(lengths), N), np.float32)
    for r, ref in enumerate(reference):
        logprobs[r, :len(ref)] = ref
    ids, prompt_mask = left_pad(prompts, pad_id=0)
    batch = rollout_batch(jnp.asarray(ids), jnp.asarray(prompt_mask), jnp.asarray(tokens), jnp.asarray(mask),
                          jnp.asarray(logprobs), G)
    logits = jaxft.forward(cfg, params, batch["input_ids"], batch["positions"], batch["segment_ids"])
    labels = np.asarray(batch["labels"])
    logps = np.asarray(jax.nn.log_softmax(logits, -1))
    for r, ref in enumerate(reference):
        at = np.flatnonzero(labels[r] != IGNORE_INDEX)
        assert labels[r, at].tolist() == completions[r]
        np.testing.assert_allclose(logps[r, at, labels[r, at]], ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(batch["old_logps"])[r, at], ref, atol=1e-6, rtol=0)
        assert not np.asarray(batch["old_logps"])[r, labels[r] == IGNORE_INDEX].any()
    advantages = np.asarray(token_values(jnp.asarray([1.5, -2.0, 0.0, 3.0]), batch["labels"]))
    assert (advantages[labels == IGNORE_INDEX] == 0).all()
    assert (advantages[0][labels[0] != IGNORE_INDEX] == 1.5).all() and advantages.shape == labels.shape
