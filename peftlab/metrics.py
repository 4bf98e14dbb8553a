"""Classification metrics (scikit-learn), reported as fractions in [0, 1] (MCC in [-1, 1])."""

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = ("accuracy", "macro_f1", "mcc")


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)) if len(set(labels.tolist())) > 1 else 0.0,
    }
