"""Evaluation of a model through any backend: batched predictions, accuracy, per-class accuracy, confusion.

MultiMNIST (labels (N, K), K classes per image): the K longest class capsules are the
prediction, and an example counts as correct only when that set is the set of its labels
(`predict_top_k`, `accuracy`, `evaluate_multi`), as the paper scores it.

Images are never augmented here. Predictions are computed batch by batch with the backend's
predict; the backend's arrays are collected and read back once at the end, so a GPU backend is
not made to wait after every batch.

What this module must never do: choose anything (a checkpoint, an epoch) by looking at test
accuracy. It measures; the trainer decides what to report (see train.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import CapsNetConfig

__all__ = ["NonFiniteOutputs", "check_finite_lengths", "predict_all", "predict_top_k", "top_k", "accuracy", "confusion_matrix", "Evaluation", "evaluate",
           "MultiEvaluation", "evaluate_multi"]


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


class NonFiniteOutputs(ValueError):
    """Some images gave NaN or inf capsule lengths: no accuracy is reported from such a model."""


def check_finite_lengths(lengths: np.ndarray, count: int | None = None) -> None:
    """Refuse (NonFiniteOutputs, one line: how many images, the likely cause) lengths (N, J) with any NaN or inf.

    An argmax over NaN picks some class anyway, so an accuracy from such outputs would be a wrong number."""
    lengths = np.asarray(lengths)
    bad = ~np.all(np.isfinite(lengths.reshape(lengths.shape[0], -1)), axis=1)
    if bad.any():
        nan = int(np.isnan(lengths.reshape(lengths.shape[0], -1)).any(axis=1).sum())
        raise NonFiniteOutputs(
            f"{int(bad.sum())} of {count if count is not None else lengths.shape[0]} images gave non-finite capsule "
            f"lengths ({nan} NaN, {int(bad.sum()) - nan} inf), so no accuracy is reported: the model's parameters, "
            "though finite, overflow in its forward pass (a diverged or corrupt model?)")


def predict_all(backend: Any, params: Any, images: np.ndarray, config: CapsNetConfig, *, batch_size: int = 500,
                dtype: str = "float32") -> np.ndarray:
    """The predicted class of every image (int64), in batches of batch_size: the longest capsule of forward's
    lengths (ties to the lower class, as the spec's predict), refused (NonFiniteOutputs) if any is not finite."""
    return predict_top_k(backend, params, images, config, 1, batch_size=batch_size, dtype=dtype).reshape(-1)


def top_k(lengths: np.ndarray, k: int) -> np.ndarray:
    """The k classes with the longest capsules of each row of lengths (N, J), longest first; a tie goes to the
    lower class index, as predict's does."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 2 or not 1 <= k <= lengths.shape[1]:
        raise ValueError(f"lengths must be (N, J) with J >= k={k}, got {lengths.shape}")
    return np.argsort(-lengths, axis=1, kind="stable")[:, :k].astype(np.int64)


def predict_top_k(backend: Any, params: Any, images: Any, config: CapsNetConfig, k: int, *, batch_size: int = 500,
                  dtype: str = "float32") -> np.ndarray:
    """The k predicted classes of every image, (N, k) int64 longest first, from forward's capsule lengths
    (NonFiniteOutputs, naming how many images, if any length is NaN or inf).

    images: an array (N, C, H, W) or anything that slices like one (capsspec.training.multimnist.PairImages).
    """
    batch_size = _check_batch_size(batch_size)
    n = images.shape[0]
    if n == 0:
        return np.zeros((0, k), dtype=np.int64)
    outs = []
    for start in range(0, n, batch_size):
        xb = np.ascontiguousarray(images[start:start + batch_size], dtype=dtype)
        outs.append(backend.forward(params, backend.asarray(xb), config).lengths)
    lengths = np.concatenate([np.asarray(backend.to_numpy(o)) for o in outs])
    check_finite_lengths(lengths)
    return top_k(lengths, k)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to labels (nan for zero examples). With (N, K) labels and predictions, an
    example is right when its K predicted classes are its K labels, in any order."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions have shape {predictions.shape} but labels have {labels.shape}")
    if labels.ndim == 2:
        right = np.all(np.sort(predictions, axis=1) == np.sort(labels, axis=1), axis=1)
        return float(np.mean(right)) if labels.shape[0] else float("nan")
    return float(np.mean(predictions == labels)) if labels.size else float("nan")


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] (int64, num_classes x num_classes)."""
    predictions, labels = np.asarray(predictions, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions have shape {predictions.shape} but labels have {labels.shape}")
    for name, a in (("predictions", predictions), ("labels", labels)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{a.min()}, {a.max()}]")
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    per_class_accuracy: list[float]  # nan for a class with no examples
    confusion: np.ndarray  # counts[true, predicted]
    count: int
    class_names: tuple[str, ...] | None = None  # your own images' class names; None: the class indices

    def to_dict(self) -> dict[str, Any]:
        names = {} if self.class_names is None else {"class_names": list(self.class_names)}
        return {"accuracy": self.accuracy, "error_percent": 100.0 * (1.0 - self.accuracy), "count": self.count,
                "per_class_accuracy": [None if np.isnan(a) else a for a in self.per_class_accuracy],
                "confusion_matrix": self.confusion.tolist(), **names}

    def format(self) -> str:
        """A human-readable report: accuracy, per-class accuracy and the confusion matrix."""
        k = self.confusion.shape[0]
        names = _names(self.class_names, k)
        lines = [f"test accuracy {100 * self.accuracy:.2f}% ({int(np.trace(self.confusion))}/{self.count}), "
                 f"error {100 * (1 - self.accuracy):.2f}%", "", "per-class accuracy:"]
        nw = max(len(n) for n in names) + 1
        lines += [f"  {names[j] + ':':<{nw}} {'n/a' if np.isnan(a) else f'{100 * a:6.2f}%'}  "
                  f"({int(self.confusion[j].sum())} images)" for j, a in enumerate(self.per_class_accuracy)]
        width = max(5, len(str(int(self.confusion.max(initial=0)))) + 1)
        if self.class_names is not None:  # columns are numbered; the rows give the numbers their names
            width = max(width, len(str(k)) + 2)
            lines += ["", "confusion matrix (rows: true class, columns: predicted, numbered as the rows):",
                      " " * (_pad(names) + 1) + "".join(f"{j:>{width}}" for j in range(k))]
            lines += [f"{f'{names[j]} {j}':>{_pad(names)}} " + "".join(f"{int(c):>{width}}" for c in row)
                      for j, row in enumerate(self.confusion)]
            return "\n".join(lines)
        lines += ["", "confusion matrix (rows: true class, columns: predicted):",
                  " " * 4 + "".join(f"{j:>{width}}" for j in range(k))]
        lines += [f"{j:>3} " + "".join(f"{int(c):>{width}}" for c in row) for j, row in enumerate(self.confusion)]
        return "\n".join(lines)


def _names(class_names: Any, k: int) -> list[str]:
    return [str(j) for j in range(k)] if class_names is None else [str(n) for n in class_names]


def _pad(names: list[str]) -> int:
    return max(len(f"{n} {j}") for j, n in enumerate(names))


def evaluate(backend: Any, params: Any, images: np.ndarray, labels: np.ndarray, config: CapsNetConfig, *,
             batch_size: int = 500, dtype: str = "float32", class_names: Any = None) -> Evaluation:
    """Accuracy, per-class accuracy and confusion matrix of a model on (images, labels)."""
    predictions = predict_all(backend, params, images, config, batch_size=batch_size, dtype=dtype)
    cm = confusion_matrix(predictions, labels, config.num_classes)
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)
    return Evaluation(accuracy=accuracy(predictions, labels), per_class_accuracy=[float(a) for a in per_class],
                      confusion=cm, count=int(labels.shape[0]),
                      class_names=None if class_names is None else tuple(class_names))


@dataclass(frozen=True)
class MultiEvaluation:
    """The paper's MultiMNIST score of a model: both classes right, and what helps to read it."""

    accuracy: float  # both of an example's classes among the K longest capsules
    one_right: float  # at least one right
    per_class_recall: list[float]  # of the examples holding class c, the fraction where c was predicted
    per_class_count: list[int]
    count: int
    k: int
    class_names: tuple[str, ...] | None = None  # your own images' class names; None: the class indices

    def to_dict(self) -> dict[str, Any]:
        names = {} if self.class_names is None else {"class_names": list(self.class_names)}
        return {"accuracy": self.accuracy, "error_percent": 100.0 * (1.0 - self.accuracy), "count": self.count,
                "classes_per_image": self.k, "at_least_one_right": self.one_right,
                "per_class_recall": [None if np.isnan(a) else a for a in self.per_class_recall],
                "per_class_count": self.per_class_count, **names}

    def format(self) -> str:
        right = int(round(self.accuracy * self.count))
        lines = [f"test accuracy {100 * self.accuracy:.2f}% ({right}/{self.count}; correct when all {self.k} classes "
                 f"are the {self.k} longest capsules), error {100 * (1 - self.accuracy):.2f}%",
                 f"at least one class right: {100 * self.one_right:.2f}%", "",
                 "per-class recall (of the images holding the class, the share where it was among the predicted):"]
        names = _names(self.class_names, len(self.per_class_count))
        lines += [f"  {names[j]}: {'n/a' if np.isnan(a) else f'{100 * a:6.2f}%'}  ({c} images)"
                  for j, (a, c) in enumerate(zip(self.per_class_recall, self.per_class_count))]
        return "\n".join(lines)


def _multi_scores(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> MultiEvaluation:
    predictions, labels = np.asarray(predictions, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if labels.ndim != 2 or predictions.shape != labels.shape:
        raise ValueError(f"predictions and labels must both be (N, K), got {predictions.shape} and {labels.shape}")
    hits = (labels[:, :, None] == predictions[:, None, :]).any(axis=2)  # (N, K): label k among the predicted
    counts = np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
    found = np.bincount(labels.ravel(), weights=hits.ravel().astype(float), minlength=num_classes)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts > 0, found / np.maximum(counts, 1), np.nan)
    n = labels.shape[0]
    return MultiEvaluation(accuracy=accuracy(predictions, labels),
                           one_right=float(np.mean(hits.any(axis=1))) if n else float("nan"),
                           per_class_recall=[float(a) for a in recall], per_class_count=[int(c) for c in counts],
                           count=int(n), k=int(labels.shape[1]))


def evaluate_multi(backend: Any, params: Any, images: Any, labels: np.ndarray, config: CapsNetConfig, *,
                   batch_size: int = 500, dtype: str = "float32", class_names: Any = None) -> MultiEvaluation:
    """The MultiMNIST score: the K longest capsules against each image's K labels (N, K)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, K) for evaluate_multi, got {labels.shape}")
    predictions = predict_top_k(backend, params, images, config, labels.shape[1], batch_size=batch_size, dtype=dtype)
    scores = _multi_scores(predictions, labels, config.num_classes)
    return scores if class_names is None else dataclasses.replace(scores, class_names=tuple(class_names))
