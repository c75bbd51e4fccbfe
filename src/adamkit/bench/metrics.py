"""Classification metrics computed on a held-out split."""
from __future__ import annotations

import numpy as np


def classification_metrics(predictions, targets, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 of integer class predictions.

    Macro averages are taken over the classes that occur in ``targets`` or ``predictions``; a class
    never predicted has precision 0 and a class absent from ``targets`` has recall 0 (scikit-learn's
    ``zero_division=0`` convention).
    """
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    targets = np.asarray(targets, dtype=np.int64).ravel()
    if predictions.shape != targets.shape:
        raise ValueError("predictions and targets must have the same length")
    if targets.size == 0:
        return {"accuracy": float("nan"), "precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    confusion = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)  # rows: true class, columns: predicted
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    present = (predicted > 0) | (actual > 0)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return {
        "accuracy": float(true_positive.sum() / targets.size),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
    }
