"""Objectives and metrics of the task heads against independent oracles: transformers' loss functions and torch's
losses on the same logits, scikit-learn's accuracy / F1, seqeval's entity metrics, the official SQuAD v1.1
evaluation functions (copied below), and a brute-force span search."""
import collections
import dataclasses
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqeval.metrics
import torch
import transformers
from seqeval.metrics.sequence_labeling import get_entities
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error
from transformers.loss.loss_utils import (ForQuestionAnsweringLoss, ForSequenceClassificationLoss,
                                          ForTokenClassification)

import jaxft
from jaxft.config import ConfigError, HeadConfig
from jaxft.models.heads import last_token_mask, sequence_logits, token_logits
from jaxft.models.llama import init_params
from jaxft.train.head_objectives import (QuestionAnswering, SequenceClassification, TokenClassification,
                                         entity_counts, entity_scheme)
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.metrics import evaluate
from jaxft.train.squad import best_spans, squad_scores

CFG = jaxft.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
IGNORE = -100

# jitted once per (objective, config, shapes): the eager forward of a tiny model is slower than its compilation
_loss_sum = jax.jit(lambda objective, cfg, params, batch, rng=None: objective.loss_sum(cfg, params, batch, rng),
                    static_argnums=(0, 1))
_eval_sums = jax.jit(lambda objective, cfg, params, batch: objective.eval_sums(cfg, params, batch),
                     static_argnums=(0, 1))
_sequence_logits = jax.jit(sequence_logits, static_argnums=0, static_argnames="num_segments")
_token_logits = jax.jit(token_logits, static_argnums=0)


def _model(kind, num_labels=2, **head_kwargs):
    """A tiny head model whose head is scaled up (and biased) so the logits spread over several labels."""
    cfg = dataclasses.replace(CFG, head=HeadConfig(kind, num_labels=num_labels, **head_kwargs))
    params = init_params(cfg, jax.random.PRNGKey(0))
    group = params[cfg.head.group]
    group["kernel"] = group["kernel"] * 100.0
    if "bias" in group:
        group["bias"] = jax.random.normal(jax.random.PRNGKey(1), group["bias"].shape)
    return cfg, params


def _rows(lengths_per_row, t, seed=0):
    """input_ids, segment_ids, positions [B, T] of rows packed with documents of the given lengths (then padding)."""
    rng = np.random.default_rng(seed)
    b = len(lengths_per_row)
    ids, segments, positions = (np.zeros((b, t), np.int32) for _ in range(3))
    for r, lengths in enumerate(lengths_per_row):
        start = 0
        for s, n in enumerate(lengths):
            ids[r, start:start + n] = rng.integers(1, CFG.vocab_size, n)
            segments[r, start:start + n] = s + 1
            positions[r, start:start + n] = np.arange(n)
            start += n
    return {"input_ids": ids, "segment_ids": segments, "positions": positions}


PACKED = [[5, 7], [16], [3, 4, 6], [9], [2, 8, 4], [11, 5]]  # documents per row, T = 16


def _sequence_batch(problem, num_labels, seed=0):
    """A packed classification batch: labels (and targets) at each document's last token; one document unscored."""
    rng = np.random.default_rng(seed)
    batch = _rows(PACKED, 16, seed)
    last = np.array(last_token_mask(jnp.asarray(batch["segment_ids"])))
    last[0, 4] = False  # the first document of row 0 is not scored
    labels = np.full(last.shape, IGNORE, np.int32)
    targets = np.zeros((*last.shape, num_labels), np.float32)
    if problem == "single_label_classification":
        labels[last] = rng.integers(0, num_labels, last.sum())
    else:
        labels[last] = 0
        draw = rng.integers(0, 2, (last.sum(), num_labels)) if problem == "multi_label_classification" else \
            rng.normal(size=(last.sum(), num_labels))
        targets[last] = draw
    return batch | {"labels": labels, "targets": targets}


def _scored_logits(cfg, params, batch):
    """The pooled logits of the scored documents [n, N] (transformers' pooled_logits), from jaxft.models.heads."""
    pooled = np.asarray(_sequence_logits(cfg, params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                                        num_segments=3))
    last = np.asarray(last_token_mask(jnp.asarray(batch["segment_ids"])))
    document = np.cumsum(last, axis=1) - last  # index of each last token's document in its row
    rows, cols = np.nonzero(batch["labels"] != IGNORE)
    return pooled[rows, document[rows, cols]], rows, cols


def _mean_loss(objective, cfg, params, batch):
    return float(_loss_sum(objective, cfg, params, batch)) / float(objective.units(batch))


def _halves_mean(objective, cfg, params, batch):
    """Two half batches' summed losses over the units of the whole (stacked [2, B / 2, T]) batch."""
    halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    stacked = {k: np.stack([h[k] for h in halves]) for k in batch}
    return sum(float(_loss_sum(objective, cfg, params, h)) for h in halves) / float(objective.units(stacked))


@pytest.mark.parametrize("problem,num_labels", [("single_label_classification", 4),
                                                ("multi_label_classification", 3), ("regression", 1),
                                                ("regression", 3)])
def test_sequence_loss_equals_transformers_loss_and_accumulates_exactly(problem, num_labels):
    cfg, params = _model("seq_cls", num_labels, problem_type=problem)
    batch = _sequence_batch(problem, num_labels)
    objective = SequenceClassification(problem, num_labels)
    logits, rows, cols = _scored_logits(cfg, params, batch)
    if problem == "single_label_classification":
        labels = torch.tensor(batch["labels"][rows, cols], dtype=torch.long)
    else:
        labels = torch.tensor(batch["targets"][rows, cols])
    hf_config = transformers.PretrainedConfig(num_labels=num_labels, problem_type=problem)
    expected = float(ForSequenceClassificationLoss(labels, torch.tensor(logits), hf_config))
    assert expected > 0.1
    assert _mean_loss(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert _halves_mean(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_class_weighted_cross_entropy_equals_torch_and_accumulates_exactly():
    weights = (0.5, 2.0, 1.0, 3.5)
    cfg, params = _model("seq_cls", 4)
    batch = _sequence_batch("single_label_classification", 4, seed=1)
    objective = SequenceClassification("single_label_classification", 4, class_weights=list(weights))
    logits, rows, cols = _scored_logits(cfg, params, batch)
    expected = float(torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))(
        torch.tensor(logits), torch.tensor(batch["labels"][rows, cols], dtype=torch.long)))
    assert objective.class_weights == (1.0, 4.0, 2.0, 7.0)  # rescaled: the weighted mean is the same
    assert float(objective.units(batch)) == pytest.approx(sum(weights[y] for y in batch["labels"][rows, cols]) * 2)
    assert _mean_loss(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5)
    assert _halves_mean(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5)
    assert _mean_loss(objective, cfg, params, batch) != pytest.approx(
        _mean_loss(SequenceClassification("single_label_classification", 4), cfg, params, batch), rel=1e-3)


def test_class_weighted_sequence_classification_trains_through_the_step_as_torchs_weighted_mean():
    """Small weights (their sum over a micro-batch below 1, the step's floor of units) and two micro-batches: one
    plain SGD step on the full head model equals the gradient of torch's weighted mean over the whole batch."""
    weights = (0.01, 0.04, 0.02, 0.07)
    cfg, params = _model("seq_cls", 4)
    batch = _sequence_batch("single_label_classification", 4, seed=5)
    micro_batches = {k: jnp.asarray(np.stack([v[0::2], v[1::2]])) for k, v in batch.items() if k != "targets"}
    objective = SequenceClassification("single_label_classification", 4, class_weights=weights)
    trainable, frozen = jaxft.split(params, jaxft.Trainable(everything=True))
    opt = optax.sgd(0.5)
    new, metrics = jit_train_step(cfg, StepConfig(objective=objective), opt)(
        init_state(jax.tree.map(jnp.copy, trainable), opt), frozen, micro_batches)

    rows, cols = np.nonzero(batch["labels"] != IGNORE)
    document = (np.cumsum(np.asarray(last_token_mask(jnp.asarray(batch["segment_ids"]))), axis=1) - 1)[rows, cols]
    labels, w = batch["labels"][rows, cols], jnp.asarray(weights)[batch["labels"][rows, cols]]

    def weighted_mean(t):
        pooled = sequence_logits(cfg, jaxft.combine(t, frozen), batch["input_ids"], batch["positions"],
                                 batch["segment_ids"], num_segments=3)[rows, document]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(pooled), labels[:, None], axis=-1)[:, 0]
        return jnp.sum(w * ce) / jnp.sum(w)

    loss, grads = jax.value_and_grad(weighted_mean)(trainable)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    expected = optax.apply_updates(trainable, opt.update(grads, opt.init(trainable), trainable)[0])
    np.testing.assert_allclose(new["trainable"]["score"]["kernel"], expected["score"]["kernel"], rtol=1e-4,
                               atol=1e-6)
    assert float(jnp.max(jnp.abs(expected["score"]["kernel"] - trainable["score"]["kernel"]))) > 1e-3


def _two_batches(problem, num_labels):
    return [_sequence_batch(problem, num_labels, seed=s) for s in (2, 3)]


def _evaluated(objective, cfg, params, batches):
    return evaluate(lambda b: _eval_sums(objective, cfg, params, b), batches, objective.eval_metrics)


def test_single_label_metrics_equal_scikit_learn_over_two_batches():
    cfg, params = _model("seq_cls", 5)
    kernel = params["score"]["kernel"]  # label 4's score is the mean of labels 0 and 1: never the argmax
    params["score"]["kernel"] = kernel.at[:, 4].set((kernel[:, 0] + kernel[:, 1]) / 2)
    batches = _two_batches("single_label_classification", 5)
    for batch in batches:  # and never the truth
        batch["labels"][batch["labels"] == 4] = 3
    objective = SequenceClassification("single_label_classification", 5)
    truth, predicted = [], []
    for batch in batches:
        logits, rows, cols = _scored_logits(cfg, params, batch)
        truth += list(batch["labels"][rows, cols])
        predicted += list(np.argmax(logits, axis=-1))
    assert len(set(predicted)) > 1 and 4 not in set(truth) | set(predicted), "a label in neither"
    metrics = _evaluated(objective, cfg, params, batches)
    assert metrics["examples"] == len(truth)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    expected = np.mean([_mean_loss(objective, cfg, params, b) * float(objective.units(b)) for b in batches]) * 2 / \
        len(truth)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_multi_label_and_regression_metrics_equal_scikit_learn():
    cfg, params = _model("seq_cls", 4, problem_type="multi_label_classification")
    batches = _two_batches("multi_label_classification", 4)
    truth, predicted = [], []
    for batch in batches:
        logits, rows, cols = _scored_logits(cfg, params, batch)
        truth.append(batch["targets"][rows, cols].astype(int))
        predicted.append((logits > 0).astype(int))
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    metrics = _evaluated(SequenceClassification("multi_label_classification", 4), cfg, params, batches)
    assert metrics["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert metrics["subset_accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    per_label = f1_score(truth, predicted, average=None, zero_division=0)
    assert [metrics[f"f1_label_{i}"] for i in range(4)] == pytest.approx(list(per_label))

    cfg, params = _model("seq_cls", 2, problem_type="regression")
    batches = _two_batches("regression", 2)
    pairs = [(_scored_logits(cfg, params, b)[0], b["targets"][b["labels"] != IGNORE]) for b in batches]
    predicted, truth = (np.concatenate(x) for x in zip(*pairs))
    metrics = _evaluated(SequenceClassification("regression", 2), cfg, params, batches)
    assert metrics["mse"] == metrics["loss"] == pytest.approx(mean_squared_error(truth, predicted), rel=1e-5)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-5)


LABEL_NAMES = ("O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def _token_batch(seed=0, num_labels=len(LABEL_NAMES)):
    """Packed documents with random (often ill-formed) tags and -100 holes (sub-tokens, special tokens)."""
    rng = np.random.default_rng(seed)
    batch = _rows(PACKED, 16, seed)
    labels = rng.integers(0, num_labels, batch["segment_ids"].shape).astype(np.int32)
    labels[(rng.random(labels.shape) < 0.25) | (batch["segment_ids"] == 0)] = IGNORE
    return batch | {"labels": labels}


def test_token_loss_equals_transformers_loss_weighted_torch_and_dropout_applies():
    cfg, params = _model("token_cls", len(LABEL_NAMES))
    batch = _token_batch()
    logits = _token_logits(cfg, params, batch["input_ids"], batch["positions"], batch["segment_ids"])
    torch_logits, torch_labels = torch.tensor(np.asarray(logits)), torch.tensor(batch["labels"], dtype=torch.long)
    hf_config = transformers.PretrainedConfig(num_labels=len(LABEL_NAMES))
    objective = TokenClassification(len(LABEL_NAMES), LABEL_NAMES)
    expected = float(ForTokenClassification(torch_logits, torch_labels, hf_config))
    assert _mean_loss(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5)
    assert _halves_mean(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5)

    weights = np.linspace(0.5, 2.5, len(LABEL_NAMES))
    weighted = TokenClassification(len(LABEL_NAMES), class_weights=tuple(weights))
    expected = float(torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))(
        torch_logits.reshape(-1, len(LABEL_NAMES)), torch_labels.reshape(-1)))
    assert _mean_loss(weighted, cfg, params, batch) == pytest.approx(expected, rel=1e-5)

    dropped = [float(_loss_sum(objective, cfg, params, batch, jax.random.PRNGKey(k))) for k in (0, 0, 1)]
    assert dropped[0] == dropped[1] != dropped[2]
    assert dropped[0] != pytest.approx(float(_loss_sum(objective, cfg, params, batch)), rel=1e-3)


def _documents(labels, segments, values):
    """seqeval's input: one list per document (row, segment) of the values at its labelled positions, in order."""
    docs = []
    for r in range(labels.shape[0]):
        for s in sorted(set(segments[r][segments[r] > 0])):
            keep = (segments[r] == s) & (labels[r] != IGNORE)
            docs.append([LABEL_NAMES[i] for i in values[r][keep]])
    return docs


def test_token_metrics_equal_scikit_learn_and_seqeval():
    cfg, params = _model("token_cls", len(LABEL_NAMES))
    batches = [_token_batch(seed) for seed in (1, 2)]
    objective = TokenClassification(len(LABEL_NAMES), LABEL_NAMES)
    gold, pred, truth_tokens, predicted_tokens = [], [], [], []
    for batch in batches:
        logits = _token_logits(cfg, params, batch["input_ids"], batch["positions"], batch["segment_ids"])
        predicted = np.asarray(jnp.argmax(logits, axis=-1))
        gold += _documents(batch["labels"], batch["segment_ids"], batch["labels"])
        pred += _documents(batch["labels"], batch["segment_ids"], predicted)
        labelled = batch["labels"] != IGNORE
        truth_tokens += list(batch["labels"][labelled])
        predicted_tokens += list(predicted[labelled])
    metrics = _evaluated(objective, cfg, params, batches)
    assert metrics["tokens"] == len(truth_tokens) and len(set(predicted_tokens)) > 2
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth_tokens, predicted_tokens))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth_tokens, predicted_tokens, average="macro"))
    assert metrics["entity_f1"] > 0
    for name in ("precision", "recall", "f1"):
        expected = getattr(seqeval.metrics, f"{name}_score")(gold, pred)
        assert metrics[f"entity_{name}"] == pytest.approx(expected), name


def _entities(docs):
    """{(document, type, first, last)} of seqeval's chunks of each document."""
    return {(d, *chunk) for d, doc in enumerate(docs) for chunk in get_entities(doc)}


@pytest.mark.parametrize("seed", range(3))
def test_entity_counts_equal_seqeval_chunks_on_random_ill_formed_sequences(seed):
    rng = np.random.default_rng(seed)
    b, t = 64, 24
    segments = np.zeros((b, t), np.int32)
    for r in range(b):  # 1 to 3 documents per row, then padding
        cuts = np.sort(rng.choice(np.arange(1, t + 1), rng.integers(1, 4), replace=False))
        segments[r] = np.searchsorted(cuts, np.arange(t), side="right") + 1
        segments[r, np.arange(t) >= cuts[-1]] = 0
    labels = rng.integers(0, len(LABEL_NAMES), (b, t)).astype(np.int32)
    labels[(rng.random((b, t)) < 0.3) | (segments == 0)] = IGNORE
    predicted = np.where(rng.random((b, t)) < 0.6, labels, rng.integers(0, len(LABEL_NAMES), (b, t)))
    predicted = np.where(labels == IGNORE, rng.integers(0, len(LABEL_NAMES), (b, t)), predicted)  # ignored anyway
    counts = jax.jit(entity_counts, static_argnums=3)(jnp.asarray(labels), jnp.asarray(predicted),
                                                      jnp.asarray(segments), entity_scheme(LABEL_NAMES))
    gold = _entities(_documents(labels, segments, labels))
    found = _entities(_documents(labels, segments, predicted))
    assert len(gold) > 100 and 0 < len(gold & found) < len(gold)
    assert {k: int(v) for k, v in counts.items()} == {"gold_entities": len(gold), "predicted_entities": len(found),
                                                     "correct_entities": len(gold & found)}


def test_entity_scheme_recognises_bio_iobes_only():
    assert entity_scheme(("O", "B-PER", "I-PER")) == ((0, 1, 2), (0, 1, 1))
    assert entity_scheme(("O", "S-LOC", "E-LOC", "B-PER-X")) == ((0, 4, 3, 1), (0, 1, 1, 2))
    for names in (None, ("O",), ("O", "PER"), ("neg", "pos"), ("O", "B-")):
        assert entity_scheme(names) is None
    plain = TokenClassification(2, ("neg", "pos"))
    cfg, params = _model("token_cls", 2)
    sums = _eval_sums(plain, cfg, params, _token_batch(num_labels=2))
    assert "gold_entities" not in sums and "entity_f1" not in plain.eval_metrics(sums)


def _qa_batch(lengths_per_row, t, seed=0):
    """Features with their answer marks (start <= end within each feature)."""
    rng = np.random.default_rng(seed)
    batch = _rows(lengths_per_row, t, seed)
    start, end = (np.zeros((len(lengths_per_row), t), np.int32) for _ in range(2))
    for r, lengths in enumerate(lengths_per_row):
        offset = 0
        for n in lengths:
            first = rng.integers(0, n)
            start[r, offset + first] = 1
            end[r, offset + rng.integers(first, n)] = 1
            offset += n
    return batch | {"answer_start": start, "answer_end": end}


def test_qa_loss_equals_transformers_on_unpacked_rows_and_accumulates_exactly():
    cfg, params = _model("qa", 2)
    batch = _qa_batch([[12]] * 4, 12)
    logits = np.asarray(_token_logits(cfg, params, batch["input_ids"], batch["positions"], batch["segment_ids"]))
    expected = float(ForQuestionAnsweringLoss(torch.tensor(logits[..., 0]), torch.tensor(logits[..., 1]),
                                              torch.tensor(batch["answer_start"].argmax(1)),
                                              torch.tensor(batch["answer_end"].argmax(1))))
    objective = QuestionAnswering()
    assert float(objective.units(batch)) == 4
    assert _mean_loss(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5)
    assert _halves_mean(objective, cfg, params, batch) == pytest.approx(expected, rel=1e-5)


def test_qa_loss_and_hits_of_a_packed_row_equal_each_feature_alone():
    cfg, params = _model("qa", 2)
    lengths = [5, 7, 3]
    packed = _qa_batch([lengths], 18, seed=4)  # three features, then padding
    alone = {k: np.zeros((3, 7), np.int32) for k in packed}  # each feature in a row of its own, right-padded
    bounds = np.cumsum([0] + lengths)
    for r, n in enumerate(lengths):
        for k in packed:
            alone[k][r, :n] = packed[k][0, bounds[r]:bounds[r + 1]]
        alone["segment_ids"][r, :n] = 1
    objective = QuestionAnswering()
    logits = np.asarray(_token_logits(cfg, params, alone["input_ids"], alone["positions"], alone["segment_ids"]))
    hits = [sum(logits[r, :n, side].argmax() == alone[key][r].argmax() for r, n in enumerate(lengths))
            for side, key in enumerate(("answer_start", "answer_end"))]
    alone_loss = float(_loss_sum(objective, cfg, params, alone))
    sums = _eval_sums(objective, cfg, params, packed)
    assert float(_loss_sum(objective, cfg, params, packed)) == pytest.approx(alone_loss, rel=1e-5)
    assert float(sums["loss_sum"]) == pytest.approx(alone_loss, rel=1e-5)
    assert [float(sums["start_hits"]), float(sums["end_hits"])] == hits
    grads = jax.jit(jax.grad(lambda p: objective.loss_sum(cfg, p, packed)))(params)
    assert np.all(np.isfinite(np.asarray(grads["qa_outputs"]["kernel"])))


# The official SQuAD v1.1 evaluation script's functions (evaluate-v1.1.py), copied as the test's reference.
def official_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def official_exact_match_score(prediction, ground_truth):
    return (official_normalize_answer(prediction) == official_normalize_answer(ground_truth))


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def test_squad_scores_equal_the_official_evaluation():
    predictions = ["The Eiffel Tower!", "in 1889", "Paris, France", "an apple a day", "", "Théâtre   the Odéon",
                   "the the", "Denver Broncos", "42"]
    golds = [["Eiffel tower"], ["1889", "the year 1889"], ["France"], ["apple day", "An Apple"], ["nothing"],
             ["théâtre de l'Odéon"], ["a"], ["Denver Broncos", "Broncos"], ["forty-two", "42."]]
    n = len(predictions)
    exact = sum(official_metric_max_over_ground_truths(official_exact_match_score, p, g)
                for p, g in zip(predictions, golds))
    f1 = sum(official_metric_max_over_ground_truths(official_f1_score, p, g) for p, g in zip(predictions, golds))
    scores = squad_scores(predictions, golds)
    assert 0 < exact < n and scores["exact_match"] == pytest.approx(exact / n)
    assert scores["f1"] == pytest.approx(f1 / n)


def _brute_force_spans(start, end, offsets, feature_example, contexts, max_answer_length):
    """Every valid (start, end) pair of every feature (n_best covers all tokens), the best per example."""
    best = [(-np.inf, "")] * len(contexts)
    for f in range(len(start)):
        for i in range(start.shape[1]):
            for j in range(i, min(i + max_answer_length, start.shape[1])):
                if offsets[f, i, 0] >= 0 and offsets[f, j, 0] >= 0:
                    e = feature_example[f]
                    score = start[f, i] + end[f, j]
                    if score > best[e][0]:
                        best[e] = (score, contexts[e][offsets[f, i, 0]:offsets[f, j, 1]])
    return [text for _, text in best]


def test_best_spans_take_the_best_valid_span_over_each_examples_features():
    rng = np.random.default_rng(0)
    contexts = [" ".join(f"w{e}_{k}" for k in range(12)) for e in range(3)] + ["unreached"]
    feature_example = np.array([0, 0, 1, 2, 2, 2])
    f, t = len(feature_example), 10
    offsets = np.full((f, t, 2), -1)
    for k, e in enumerate(feature_example):  # 3 question tokens, then a window of 6 context words, then padding
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", contexts[e])]
        first = int(rng.integers(0, 6))
        offsets[k, 3:9] = words[first:first + 6]
    start, end = rng.normal(size=(2, f, t)) * 3
    for max_length in (1, 3, 30):
        expected = _brute_force_spans(start, end, offsets, feature_example, contexts, max_length)
        assert best_spans(start, end, offsets, feature_example, contexts, max_answer_length=max_length) == expected
    assert len(set(expected)) == 4 and expected[-1] == ""

    # n_best: only the highest start / end tokens are paired, as transformers' post-processing does
    start, end = np.zeros((1, 4)), np.zeros((1, 4))
    start[0], end[0] = [0, 5, 4, 0], [0, 0, 3, 6]
    offsets = np.array([[[0, 1], [2, 3], [4, 5], [6, 7]]])
    assert best_spans(start, end, offsets, [0], ["a b c d"], n_best=1) == ["b c d"]
    assert best_spans(start, end, offsets, [0], ["a b c d"], n_best=1, max_answer_length=2) == [""]
    assert best_spans(start, end, offsets, [0], ["a b c d"], n_best=2, max_answer_length=2) == ["c d"]


def test_bad_configs_and_inputs_name_what_was_expected():
    with pytest.raises(ConfigError, match="problem_type 'binary'"):
        SequenceClassification("binary", 2)
    with pytest.raises(ConfigError, match="class_weights .* must be 3"):
        SequenceClassification("single_label_classification", 3, class_weights=(1.0, 2.0))
    with pytest.raises(ConfigError, match="regression takes none"):
        SequenceClassification("regression", 1, class_weights=(1.0,))
    with pytest.raises(ConfigError, match="label_names"):
        TokenClassification(3, ("O", "B-PER"))
    cfg, params = _model("seq_cls", 3)
    with pytest.raises(ConfigError, match="'token_cls' head with 3 labels, but the model has head 'seq_cls'"):
        TokenClassification(3).loss_sum(cfg, params, _token_batch(num_labels=3))
    with pytest.raises(jaxft.JaxftError, match="2 predictions for 1 examples"):
        squad_scores(["a", "b"], [["a"]])
    with pytest.raises(jaxft.JaxftError, match=r"examples \[1\] have no gold"):
        squad_scores(["a", "b"], [["a"], []])
    with pytest.raises(jaxft.JaxftError, match="feature_example must index the 1 contexts"):
        best_spans(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2, 2)), [1], ["a"])
