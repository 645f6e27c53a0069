"""Objectives of the task heads (:mod:`jaxft.models.heads`): sequence classification, token classification and
extractive QA, each a frozen dataclass following :class:`jaxft.train.objectives.Objective`.

They read the task batch layout: ``input_ids``, ``segment_ids``, ``positions`` [B, T] as for SFT, and unshifted
targets: ``labels`` [B, T] (-100 where nothing is scored; a sequence label sits at its document's last token),
``targets`` [B, T, N] float (multi-label and regression, at those same tokens), ``answer_start`` / ``answer_end``
[B, T] (1 at each QA feature's answer token). Every eval statistic is a sum (counts, confusion matrices, entity
counts), so :func:`jaxft.train.metrics.evaluate` adds batches exactly and the metrics come from the totals.

A head has N (a few) outputs, so every token's logits are cheap: the objectives take the head on all tokens and
select the scored ones, rather than gathering positions first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import PROBLEM_TYPES, ConfigError, ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.data.formats import DataError
from jaxft.models.heads import token_logits

_INPUT_KEYS = ("input_ids", "segment_ids", "positions")


def task_logits(cfg: ModelConfig, params: dict, batch: dict, kind: str, num_labels: int, rng=None,
                 activation_sharding=None) -> jax.Array:
    """float32 [B, T, N]: the head on every token (``rng``: dropout of the body's adapters and of the head)."""
    head = cfg.head
    if head is None or head.kind != kind or head.num_labels != num_labels:
        have = "no head (a causal LM)" if head is None else f"head {head.kind!r} with {head.num_labels} labels"
        raise ConfigError(f"the objective needs a {kind!r} head with {num_labels} labels, but the model has {have} "
                          f"(ModelConfig.head must match the task's num_labels)")
    return token_logits(cfg, params, batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), rng=rng,
                        activation_sharding=activation_sharding)


def _checked_class_weights(weights, num_labels: int, owner: str) -> tuple[float, ...] | None:
    """The weights scaled so the smallest positive one is 1: the weighted mean sum(w_y * ce) / sum(w_y) does not
    change, and the units (summed weights) of any batch with a weighed label stay >= 1, where the train step's
    floor of 1 unit (for batches without any) never bends the mean."""
    if weights is None:
        return None
    weights = tuple(float(w) for w in weights)
    if len(weights) != num_labels or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) == 0:
        raise ConfigError(f"{owner}: class_weights {list(weights)} must be {num_labels} finite weights >= 0 "
                          f"(one per label, num_labels), not all 0")
    smallest = min(w for w in weights if w > 0)
    return tuple(w / smallest for w in weights)


def _label_weights(labels: jax.Array, class_weights: tuple[float, ...] | None) -> jax.Array:
    """f32, labels' shape: the weight of each position's label (1 without class weights), 0 where unlabelled."""
    labelled = labels != IGNORE_INDEX
    if class_weights is None:
        return labelled.astype(jnp.float32)
    table = jnp.asarray(class_weights, jnp.float32)
    return jnp.where(labelled, table[jnp.where(labelled, labels, 0)], 0.0)


def _weighted_cross_entropy(logits: jax.Array, labels: jax.Array, class_weights) -> jax.Array:
    """Sum over labelled positions of w_y * CE: torch's ``CrossEntropyLoss(weight=w)`` before its division by the
    sum of w_y (the objective's units), so micro-batches add exactly."""
    labelled = labels != IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(labelled, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(_label_weights(labels, class_weights) * jnp.where(labelled, picked, 0.0))


def _confusion(labels: jax.Array, predicted: jax.Array, num_labels: int) -> jax.Array:
    """[N, N] f32 counts over the labelled positions: row = true label, column = predicted label."""
    labelled = labels != IGNORE_INDEX
    truth = jax.nn.one_hot(jnp.where(labelled, labels, 0), num_labels) * labelled[..., None]
    return jnp.einsum("...i,...j->ij", truth, jax.nn.one_hot(predicted, num_labels))


def _f1(true_positives, false_positives, false_negatives) -> np.ndarray:
    """Per-label F1 = 2 TP / (2 TP + FP + FN), 0 where the label is in neither truth nor prediction (scikit-learn's
    zero_division default)."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (true_positives, false_positives, false_negatives))
    return np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)


def _class_metrics(confusion) -> dict[str, float]:
    """Accuracy and scikit-learn's macro-F1 (``f1_score(average="macro")``: the mean over the labels present in
    the truth or the predictions) of a confusion matrix."""
    c = np.asarray(confusion, np.float64)
    tp, support, predicted = np.diag(c), c.sum(axis=1), c.sum(axis=0)
    f1 = _f1(tp, predicted - tp, support - tp)
    return {"accuracy": float(tp.sum() / c.sum()), "macro_f1": float(f1[(support + predicted) > 0].mean())}


def _scored_count(sums: dict, key: str, what: str) -> int:
    count = int(sums[key])
    if count == 0:
        raise DataError("evaluate", f"no {what}", f"the held-out batches contain no {what} (empty split, or every "
                        f"label masked)")
    return count


def _mean_loss(sums: dict) -> float:
    """The objective's held-out mean; 0 when every scored label has class weight 0 (nothing was weighed)."""
    units = float(sums["loss_units"])
    return float(sums["loss_sum"]) / units if units else 0.0


@dataclass(frozen=True)
class SequenceClassification:
    """transformers' ``*ForSequenceClassification`` loss on the score at each document's last token (the positions
    with ``labels`` != -100). ``problem_type`` one of ``PROBLEM_TYPES`` (resolved: ``HeadConfig.problem``):

    - single-label: cross-entropy; with ``class_weights`` (one per label) exactly torch's
      ``CrossEntropyLoss(weight=w)``, a mean sum(w_y * ce) / sum(w_y), so the units are the summed weights
      (kept rescaled so the smallest positive weight is 1, which leaves the mean as it is);
    - multi-label: ``BCEWithLogitsLoss`` against the multi-hot ``targets``, a mean over examples x N;
    - regression: ``MSELoss`` against the ``targets``, a mean over examples x N.
    """

    problem_type: str
    num_labels: int
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"SequenceClassification: problem_type {self.problem_type!r} is unknown; expected one "
                              f"of {PROBLEM_TYPES}")
        if self.class_weights is not None and self.problem_type != "single_label_classification":
            raise ConfigError(f"SequenceClassification: class_weights weigh single-label classes; "
                              f"{self.problem_type} takes none")
        object.__setattr__(self, "class_weights", _checked_class_weights(self.class_weights, self.num_labels,
                                                                         "SequenceClassification"))

    @property
    def single_label(self) -> bool:
        return self.problem_type == "single_label_classification"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return _INPUT_KEYS + (("labels",) if self.single_label else ("labels", "targets"))

    @property
    def float_keys(self) -> dict[str, tuple[int, ...]]:
        """The batch arrays that hold floats, by their trailing dims: multi-label and regression targets [B, T, N]."""
        return {} if self.single_label else {"targets": (self.num_labels,)}

    def units(self, batches: dict) -> jax.Array:
        weights = _label_weights(batches["labels"], self.class_weights)
        return jnp.sum(weights) * (1 if self.single_label else self.num_labels)

    def _loss_sum(self, logits: jax.Array, batch: dict) -> jax.Array:
        if self.single_label:
            return _weighted_cross_entropy(logits, batch["labels"], self.class_weights)
        scored = (batch["labels"] != IGNORE_INDEX)[..., None]
        targets = batch["targets"].astype(jnp.float32)
        if self.problem_type == "regression":
            return jnp.sum(jnp.where(scored, jnp.square(logits - targets), 0.0))
        # torch's stable form of -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]
        bce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        return jnp.sum(jnp.where(scored, bce, 0.0))

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        logits = task_logits(cfg, params, batch, "seq_cls", self.num_labels, rng, activation_sharding)
        return self._loss_sum(logits, batch)

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """{loss_sum, loss_units, examples} and: single-label, the confusion matrix [N, N]; multi-label, per-label
        true/false positives and false negatives [N] at logit > 0 and the examples whose label set is exact;
        regression, the summed absolute error."""
        logits = task_logits(cfg, params, batch, "seq_cls", self.num_labels)
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX
        sums = {"loss_sum": self._loss_sum(logits, batch), "loss_units": self.units(batch),
                "examples": jnp.sum(scored, dtype=jnp.float32)}
        if self.single_label:
            return sums | {"confusion": _confusion(labels, jnp.argmax(logits, axis=-1), self.num_labels)}
        if self.problem_type == "regression":
            error = jnp.abs(logits - batch["targets"].astype(jnp.float32))
            return sums | {"absolute_error": jnp.sum(jnp.where(scored[..., None], error, 0.0))}
        truth, predicted, counted = batch["targets"] > 0.5, logits > 0, scored[..., None]
        leading = tuple(range(labels.ndim))
        per_label = lambda hits: jnp.sum(hits & counted, axis=leading, dtype=jnp.float32)  # noqa: E731
        return sums | {"true_positives": per_label(truth & predicted), "false_positives": per_label(~truth & predicted),
                       "false_negatives": per_label(truth & ~predicted),
                       "exact_sets": jnp.sum(jnp.all(truth == predicted, axis=-1) & scored, dtype=jnp.float32)}

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """loss (the objective's mean) and examples; single-label: accuracy, macro_f1; multi-label: micro_f1,
        macro_f1 (scikit-learn's over all N labels), subset_accuracy, f1_label_<i>; regression: mse, mae."""
        examples = _scored_count(sums, "examples", "scored examples")
        out = {"loss": _mean_loss(sums), "examples": examples}
        if self.single_label:
            return out | _class_metrics(sums["confusion"])
        if self.problem_type == "regression":
            return out | {"mse": out["loss"], "mae": float(sums["absolute_error"]) / (examples * self.num_labels)}
        tp, fp, fn = (np.asarray(sums[k], np.float64) for k in ("true_positives", "false_positives",
                                                                 "false_negatives"))
        per_label = _f1(tp, fp, fn)
        return out | {"micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())), "macro_f1": float(per_label.mean()),
                      "subset_accuracy": float(sums["exact_sets"]) / examples,
                      **{f"f1_label_{i}": float(f1) for i, f1 in enumerate(per_label)}}


# seqeval's tags (the first character of a label name) as codes; a label name is "O" or "<tag>-<type>"
_O, _B, _I, _E, _S = range(5)
_TAG_CODES = {"O": _O, "B": _B, "I": _I, "E": _E, "S": _S}


def entity_scheme(label_names) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(tag code, type id) of each label when the names follow BIO / IOB2 / IOBES (``O``, ``B-PER``, ``I-PER``,
    ``E-PER``, ``S-PER``), else None (no entity metrics). Types are numbered as seqeval tells them apart: the text
    after the tag and its dash, ``O``'s type being ``_``."""
    if not label_names:
        return None
    if not all(n == "O" or (n[:2] in ("B-", "I-", "E-", "S-") and len(n) > 2) for n in label_names):
        return None
    if all(n == "O" for n in label_names):
        return None
    type_names = ["_" if n == "O" else n[2:] for n in label_names]
    type_ids = {name: i for i, name in enumerate(dict.fromkeys(["_"] + type_names))}
    return tuple(_TAG_CODES[n[0]] for n in label_names), tuple(type_ids[t] for t in type_names)


def _chunk_ends(tag, kind, next_tag, next_kind):
    """seqeval's ``end_of_chunk(prev=this token, tag=next token)`` (conlleval's rule), elementwise."""
    inside = (tag == _B) | (tag == _I)
    closes = (next_tag == _B) | (next_tag == _S) | (next_tag == _O)
    return (tag == _E) | (tag == _S) | (inside & closes) | ((tag != _O) & (kind != next_kind))


def _chunk_starts(prev_tag, prev_kind, tag, kind):
    """seqeval's ``start_of_chunk(prev=previous token, tag=this token)``, elementwise."""
    after_end = (prev_tag == _E) | (prev_tag == _S) | (prev_tag == _O)
    return (tag == _B) | (tag == _S) | (((tag == _E) | (tag == _I)) & after_end) | ((tag != _O) & (prev_kind != kind))


def entity_counts(labels: jax.Array, predicted: jax.Array, segment_ids: jax.Array, scheme) -> dict[str, jax.Array]:
    """Additive entity counts of a batch [B, T] as seqeval's default (conlleval) chunking finds them:
    {gold_entities, predicted_entities, correct_entities} (f32 scalars; correct = same type, first and last token).

    Each document (row, segment id) is one seqeval sentence made of its labelled positions (``labels`` != -100) in
    order, the others skipped; ``predicted`` [B, T] holds the predicted label ids. The neighbours of a labelled
    position are the previous / next labelled positions of the same document (a running max / reverse running
    min of positions), an ``O`` when there is none, as seqeval separates sentences with ``O``.
    """
    tag_table, kind_table = (jnp.asarray(x, jnp.int32) for x in scheme)
    labelled = labels != IGNORE_INDEX
    t, axis = labels.shape[-1], labels.ndim - 1
    index = jnp.broadcast_to(jnp.arange(t), labels.shape)
    previous = jax.lax.cummax(jnp.where(labelled, index, -1), axis=axis)
    previous = jnp.concatenate([jnp.full_like(previous[..., :1], -1), previous[..., :-1]], axis=-1)
    following = jax.lax.cummin(jnp.where(labelled, index, t), axis=axis, reverse=True)
    following = jnp.concatenate([following[..., 1:], jnp.full_like(following[..., :1], t)], axis=-1)

    def neighbour(values, position):
        """values at ``position`` when it is a labelled position of the same document, else O's code (0)."""
        clipped = jnp.clip(position, 0, t - 1)
        same_document = (position >= 0) & (position < t) & (
            jnp.take_along_axis(segment_ids, clipped, axis=-1) == segment_ids)
        return jnp.where(same_document, jnp.take_along_axis(values, clipped, axis=-1), 0)

    def chunks(ids):
        ids = jnp.where(labelled, ids, 0)
        tag, kind = tag_table[ids], kind_table[ids]
        starts = labelled & _chunk_starts(neighbour(tag, previous), neighbour(kind, previous), tag, kind)
        ends = labelled & _chunk_ends(tag, kind, neighbour(tag, following), neighbour(kind, following))
        return ends, kind, jax.lax.cummax(jnp.where(starts, index, -1), axis=axis)  # a chunk's first position

    gold_ends, gold_kind, gold_first = chunks(labels)
    predicted_ends, predicted_kind, predicted_first = chunks(predicted)
    correct = gold_ends & predicted_ends & (gold_kind == predicted_kind) & (gold_first == predicted_first)
    count = lambda x: jnp.sum(x, dtype=jnp.float32)  # noqa: E731
    return {"gold_entities": count(gold_ends), "predicted_entities": count(predicted_ends),
            "correct_entities": count(correct)}


def _entity_metrics(sums: dict) -> dict[str, float]:
    """seqeval's micro precision, recall and F1 (0 where undefined, its zero_division default)."""
    correct, predicted, gold = (float(sums[k]) for k in ("correct_entities", "predicted_entities", "gold_entities"))
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}


@dataclass(frozen=True)
class TokenClassification:
    """transformers' ``*ForTokenClassification`` loss: cross-entropy over the labelled tokens (``labels`` != -100),
    the head's dropout on in training; ``class_weights`` as torch's ``CrossEntropyLoss(weight=w)``.

    Evaluation: token accuracy and macro-F1, and with ``label_names`` in a BIO / IOB2 / IOBES scheme, seqeval's
    entity-level precision, recall and F1 (its default mode), counted on the device per batch.
    """

    num_labels: int
    label_names: tuple[str, ...] | None = None
    class_weights: tuple[float, ...] | None = None
    batch_keys: ClassVar[tuple[str, ...]] = _INPUT_KEYS + ("labels",)

    def __post_init__(self):
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(self.label_names))
            if len(self.label_names) != self.num_labels:
                raise ConfigError(f"TokenClassification: label_names {list(self.label_names)} must name the "
                                  f"{self.num_labels} labels (num_labels)")
        object.__setattr__(self, "class_weights", _checked_class_weights(self.class_weights, self.num_labels,
                                                                         "TokenClassification"))

    def units(self, batches: dict) -> jax.Array:
        return jnp.sum(_label_weights(batches["labels"], self.class_weights))

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        logits = task_logits(cfg, params, batch, "token_cls", self.num_labels, rng, activation_sharding)
        return _weighted_cross_entropy(logits, batch["labels"], self.class_weights)

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """{loss_sum, loss_units, tokens, confusion [N, N]} and, with an entity scheme, :func:`entity_counts` of
        the argmax predictions."""
        logits = task_logits(cfg, params, batch, "token_cls", self.num_labels)
        labels, predicted = batch["labels"], jnp.argmax(logits, axis=-1)
        sums = {"loss_sum": _weighted_cross_entropy(logits, labels, self.class_weights),
                "loss_units": self.units(batch), "tokens": jnp.sum(labels != IGNORE_INDEX, dtype=jnp.float32),
                "confusion": _confusion(labels, predicted, self.num_labels)}
        scheme = entity_scheme(self.label_names)
        return sums if scheme is None else sums | entity_counts(labels, predicted, batch["segment_ids"], scheme)

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """loss, tokens, token accuracy and macro_f1, and entity_precision / entity_recall / entity_f1."""
        tokens = _scored_count(sums, "tokens", "labelled tokens")
        out = {"loss": _mean_loss(sums), "tokens": tokens,
               **_class_metrics(sums["confusion"])}
        return out | _entity_metrics(sums) if "gold_entities" in sums else out


def _document_logsumexp(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T]: at each token, the log-sum-exp of ``x`` over the tokens of its document (row and segment id), so a
    packed row's features each get their own softmax."""
    t = x.shape[-1]

    def row(values, segments):
        peak = jax.lax.stop_gradient(jax.ops.segment_max(values, segments, t + 1))[segments]
        return peak + jnp.log(jax.ops.segment_sum(jnp.exp(values - peak), segments, t + 1)[segments])

    return jax.vmap(row)(x, segment_ids)


def _document_argmax_hits(x: jax.Array, marks: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """f32: how many marked tokens are their document's argmax of ``x`` (the first maximum, as argmax takes)."""
    t = x.shape[-1]
    index = jnp.arange(t)

    def row(values, segments):
        peak = jax.ops.segment_max(values, segments, t + 1)[segments]
        return jax.ops.segment_min(jnp.where(values == peak, index, t), segments, t + 1)[segments] == index

    return jnp.sum(jax.vmap(row)(x, segment_ids) & (marks != 0), dtype=jnp.float32)


@dataclass(frozen=True)
class QuestionAnswering:
    """transformers' ``*ForQuestionAnswering`` loss, (start CE + end CE) / 2 per feature, each CE a softmax over
    the tokens of that feature (document) only: padding, and the other features of a packed row, are outside it.
    A feature whose window lacks the answer marks its first token, as transformers' CLS index.

    ``max_answer_length``: the longest span (tokens) :func:`jaxft.train.squad.best_spans` predicts.
    """

    max_answer_length: int = 30
    batch_keys: ClassVar[tuple[str, ...]] = _INPUT_KEYS + ("answer_start", "answer_end")

    def __post_init__(self):
        if not isinstance(self.max_answer_length, int) or self.max_answer_length < 1:
            raise ConfigError(f"QuestionAnswering: max_answer_length must be a whole number >= 1 (tokens), got "
                              f"{self.max_answer_length!r}")

    def units(self, batches: dict) -> jax.Array:
        return jnp.sum(batches["answer_start"], dtype=jnp.float32)

    @staticmethod
    def _loss_sum(logits: jax.Array, batch: dict) -> jax.Array:
        segments = batch["segment_ids"]
        total = jnp.zeros((), jnp.float32)
        for side, key in enumerate(("answer_start", "answer_end")):
            x = logits[..., side]
            total = total + jnp.sum(jnp.where(batch[key] != 0, _document_logsumexp(x, segments) - x, 0.0))
        return total / 2

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return self._loss_sum(task_logits(cfg, params, batch, "qa", 2, rng, activation_sharding), batch)

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """{loss_sum, features, start_hits, end_hits}: a hit is a feature whose argmax token is its answer's."""
        logits = task_logits(cfg, params, batch, "qa", 2)
        segments = batch["segment_ids"]
        return {"loss_sum": self._loss_sum(logits, batch), "features": self.units(batch),
                "start_hits": _document_argmax_hits(logits[..., 0], batch["answer_start"], segments),
                "end_hits": _document_argmax_hits(logits[..., 1], batch["answer_end"], segments)}

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """loss per feature, features, and the start / end token accuracies (the text metrics, exact match and F1,
        come from :func:`jaxft.train.squad.best_spans` and :func:`jaxft.train.squad.squad_scores`)."""
        features = _scored_count(sums, "features", "QA features")
        return {"loss": float(sums["loss_sum"]) / features, "features": features,
                "start_accuracy": float(sums["start_hits"]) / features,
                "end_accuracy": float(sums["end_hits"]) / features}
