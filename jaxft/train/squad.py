"""Extractive QA's text side, on the host: each example's best answer span from its features' start / end logits
(as transformers' ``run_qa`` example post-processes them), and SQuAD v1.1's exact match and F1 of answer texts.

A long context is split into several features (windows with a stride); a feature's tokens carry their character
offsets in the example's context, -1 for the tokens outside it (question, special tokens, padding), so a span can
only start and end on context tokens. Both metrics are fractions in [0, 1], as every jaxft metric (the official
script prints 100 times them).
"""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from jaxft.data.formats import DataError

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(prediction: str, gold: str) -> float:
    predicted_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """{"exact_match", "f1"}: SQuAD v1.1's metrics, each example scored against its best gold answer, averaged over
    the examples. ``golds[i]``: the gold answer texts of example i (at least one)."""
    if len(predictions) != len(golds):
        raise DataError("squad_scores", "length mismatch", f"{len(predictions)} predictions for {len(golds)} "
                        f"examples with gold answers")
    if not predictions:
        raise DataError("squad_scores", "no examples", "there are no predictions to score")
    missing = [i for i, answers in enumerate(golds) if not answers]
    if missing:
        raise DataError("squad_scores", "no gold answer", f"examples {missing[:5]} have no gold answer text")
    exact = sum(max(normalize_answer(p) == normalize_answer(g) for g in answers) for p, answers in zip(predictions,
                                                                                                       golds))
    f1 = sum(max(_token_f1(p, g) for g in answers) for p, answers in zip(predictions, golds))
    return {"exact_match": exact / len(predictions), "f1": f1 / len(predictions)}


def _best_in_feature(start_logits, end_logits, offsets, n_best: int, max_answer_length: int):
    """(score, (first char, end char)) of a feature's best valid span, or (-inf, None): the ``n_best`` highest
    start and end tokens, in transformers' order (start outer, end inner, the first of equal scores kept)."""
    starts = np.argsort(start_logits)[-1:-n_best - 1:-1][:, None]
    ends = np.argsort(end_logits)[-1:-n_best - 1:-1][None, :]
    in_context = offsets[:, 0] >= 0
    valid = in_context[starts] & in_context[ends] & (ends >= starts) & (ends - starts + 1 <= max_answer_length)
    if not valid.any():
        return -np.inf, None
    scores = np.where(valid, start_logits[starts] + end_logits[ends], -np.inf)
    i, j = np.unravel_index(np.argmax(scores), scores.shape)
    return scores[i, j], (int(offsets[starts[i, 0], 0]), int(offsets[ends[0, j], 1]))


def best_spans(start_logits, end_logits, offsets, feature_example, contexts: list[str], *, n_best: int = 20,
               max_answer_length: int = 30) -> list[str]:
    """The predicted answer text of each example: over all its features, the span with the highest start + end
    logit among each feature's ``n_best`` start and end tokens that starts and ends inside the context, ends at or
    after its start and is at most ``max_answer_length`` tokens long (transformers' ``postprocess_qa_predictions``
    for SQuAD v1.1). An example without any valid span predicts "".

    ``start_logits``, ``end_logits`` [F, T] per feature; ``offsets`` [F, T, 2] each token's (start, end) character
    offsets in its example's context, -1 outside it; ``feature_example`` [F] the example index of each feature;
    ``contexts`` the context text of each example.
    """
    start_logits, end_logits = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
    offsets, feature_example = np.asarray(offsets), np.asarray(feature_example)
    f, t = start_logits.shape
    if end_logits.shape != (f, t) or offsets.shape != (f, t, 2) or feature_example.shape != (f,):
        raise DataError("best_spans", "shape mismatch", f"expected start/end logits [F, T], offsets [F, T, 2] and "
                        f"feature_example [F]; got {start_logits.shape}, {end_logits.shape}, {offsets.shape}, "
                        f"{feature_example.shape}")
    if f and not (0 <= feature_example.min() and feature_example.max() < len(contexts)):
        raise DataError("best_spans", "bad example index", f"feature_example must index the {len(contexts)} "
                        f"contexts, got values {feature_example.min()}..{feature_example.max()}")
    best = [(-np.inf, None)] * len(contexts)
    for k in range(f):
        score, span = _best_in_feature(start_logits[k], end_logits[k], offsets[k], n_best, max_answer_length)
        example = int(feature_example[k])
        if span is not None and score > best[example][0]:
            best[example] = (score, span)
    return ["" if span is None else contexts[i][span[0]:span[1]] for i, (_, span) in enumerate(best)]
