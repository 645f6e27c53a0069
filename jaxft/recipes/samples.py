"""Sample generations during training: every ``train.sample_every`` steps and after the last one, greedy replies
to the first ``train.sample_prompts`` chats of eval_data, each cut before its last assistant turn and rendered with
the run's chat template and generation prompt (:func:`jaxft.recipes.scoring.chat_prompts`, the prompts of
``--exact-match``), go to ``samples.jsonl`` and TensorBoard (:meth:`jaxft.train.metrics.MetricsLogger.log_samples`).

The replies come from the training params themselves, on the run's mesh, in one jitted call of the KV-cache sampler
(:func:`jaxft.models.sample.sample`, the body of ``jaxft generate``): no weights are gathered or copied. The prompts
are placed replicated on every device and the replies come back replicated, so on a multi-host run every process
makes the same call (a collective) and can read the result; only process 0's logger writes it.
"""
from __future__ import annotations

import jax
import numpy as np

from jaxft import parallel
from jaxft.data import resolve_template
from jaxft.models.generate import left_pad, stop_token_ids
from jaxft.models.sample import sample
from jaxft.peft.prefix import prompt_inputs
from jaxft.peft.tree import combine
from jaxft.recipes.config import RunConfig
from jaxft.recipes.scoring import chat_prompts, reply_tokens


class Sampler:
    """``sampler(trainable) -> [{"prompt", "reply", "reference"}]``: the run's greedy replies to its sample prompts,
    with the current trainable params over the run's frozen ones. Built (and the eval chats read and rendered)
    before the run folder is written, so a bad eval file is refused first."""

    def __init__(self, cfg: RunConfig, model_cfg, inputs, frozen: dict):
        tokenizer, tc = inputs.tokenizer, cfg.train
        template = inputs.pipeline.chat_template or resolve_template(tokenizer, cfg.eval_data.template)
        self.prompts = chat_prompts(cfg.eval_data, tokenizer, template, tc.sample_prompts)
        self.tokenizer, self.frozen = tokenizer, frozen
        self.stops = tuple(stop_token_ids(model_cfg, tokenizer.eos_token_id))
        pad_id = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else 0
        everywhere = parallel.replicated(inputs.mesh)
        ids, mask = left_pad([p.ids for p in self.prompts], pad_id)
        self.ids, self.mask = (jax.make_array_from_process_local_data(everywhere, x) for x in (ids, mask))

        def replies(trainable, frozen, ids, mask):
            params, hooks = prompt_inputs(model_cfg, combine(trainable, frozen))  # a prompt-style method's prefix
            rollout = sample(model_cfg, params, ids, mask, jax.random.PRNGKey(0),
                             max_new_tokens=tc.sample_max_new_tokens, temperature=0.0, stop_ids=self.stops,
                             pad_id=pad_id, hooks=hooks)
            return rollout.tokens, rollout.mask

        self._replies = jax.jit(replies, out_shardings=everywhere)

    def __call__(self, trainable) -> list[dict[str, str]]:
        tokens, mask = (np.asarray(x.addressable_data(0)) for x in self._replies(trainable, self.frozen, self.ids,
                                                                                  self.mask))
        out = []
        for prompt, row, n in zip(self.prompts, tokens.tolist(), mask.sum(axis=1).tolist()):
            reply, _ = reply_tokens(row[:n], self.stops)  # shown whether it stopped or hit the token limit
            out.append({"prompt": prompt.text, "reply": self.tokenizer.decode(reply, skip_special_tokens=True),
                        "reference": prompt.reference})
        return out
