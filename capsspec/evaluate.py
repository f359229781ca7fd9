"""Evaluation of a model through any backend: batched predictions, accuracy, per-class accuracy, confusion.

Images are never augmented here. Predictions are computed batch by batch with the backend's
predict; the backend's arrays are collected and read back once at the end, so a GPU backend is
not made to wait after every batch.

What this module must never do: choose anything (a checkpoint, an epoch) by looking at test
accuracy. It measures; the trainer decides what to report (see train.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import CapsNetConfig

__all__ = ["predict_all", "accuracy", "confusion_matrix", "Evaluation", "evaluate"]


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def predict_all(backend: Any, params: Any, images: np.ndarray, config: CapsNetConfig, *, batch_size: int = 500,
                dtype: str = "float32") -> np.ndarray:
    """The predicted class of every image (int64), in batches of batch_size through backend.predict."""
    batch_size = _check_batch_size(batch_size)
    if images.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    outs = []
    for start in range(0, images.shape[0], batch_size):
        xb = np.ascontiguousarray(images[start:start + batch_size], dtype=dtype)
        outs.append(backend.predict(params, backend.asarray(xb), config))
    return np.concatenate([np.asarray(backend.to_numpy(o)).astype(np.int64).reshape(-1) for o in outs])


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to labels (nan for zero examples)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions have shape {predictions.shape} but labels have {labels.shape}")
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

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "error_percent": 100.0 * (1.0 - self.accuracy), "count": self.count,
                "per_class_accuracy": [None if np.isnan(a) else a for a in self.per_class_accuracy],
                "confusion_matrix": self.confusion.tolist()}

    def format(self) -> str:
        """A human-readable report: accuracy, per-class accuracy and the confusion matrix."""
        k = self.confusion.shape[0]
        lines = [f"test accuracy {100 * self.accuracy:.2f}% ({int(np.trace(self.confusion))}/{self.count}), "
                 f"error {100 * (1 - self.accuracy):.2f}%", "", "per-class accuracy:"]
        lines += [f"  {j}: {'n/a' if np.isnan(a) else f'{100 * a:6.2f}%'}  ({int(self.confusion[j].sum())} images)"
                  for j, a in enumerate(self.per_class_accuracy)]
        width = max(5, len(str(int(self.confusion.max(initial=0)))) + 1)
        lines += ["", "confusion matrix (rows: true class, columns: predicted):",
                  " " * 4 + "".join(f"{j:>{width}}" for j in range(k))]
        lines += [f"{j:>3} " + "".join(f"{int(c):>{width}}" for c in row) for j, row in enumerate(self.confusion)]
        return "\n".join(lines)


def evaluate(backend: Any, params: Any, images: np.ndarray, labels: np.ndarray, config: CapsNetConfig, *,
             batch_size: int = 500, dtype: str = "float32") -> Evaluation:
    """Accuracy, per-class accuracy and confusion matrix of a model on (images, labels)."""
    predictions = predict_all(backend, params, images, config, batch_size=batch_size, dtype=dtype)
    cm = confusion_matrix(predictions, labels, config.num_classes)
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)
    return Evaluation(accuracy=accuracy(predictions, labels), per_class_accuracy=[float(a) for a in per_class],
                      confusion=cm, count=int(labels.shape[0]))
