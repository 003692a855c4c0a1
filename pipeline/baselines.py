"""Baselines every fit is compared with, on the same held-out rows: answers that need no model at all.

- ``constant``: the one label set that, given to every image, scores best (greedy forward selection over
  labels on the tuning rows: add the label that raises mean samples-F1 most, stop when none does).
- ``priors``: the label frequencies taken as every image's probabilities, decided by the expected-F1 rule
  (rule_expected_f1.expected_f1_sets): what the label counts alone predict.

Both are cross-fitted like the decision rules (chosen on the other folds, scored on the fold they did not
see), so a model's cross-fitted score and theirs are comparable. Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .decision import fold_ids
from .metrics import samples_f1_per_image
from .rule_expected_f1 import expected_f1_sets

MARGIN = 0.01  # "clearly beats": at least this much samples-F1 over the best baseline


def constant_set(y: np.ndarray) -> np.ndarray:
    """(C,) uint8: the label set that maximises mean samples-F1 when every row gets it (greedy, >= 1 label)."""
    y = np.asarray(y).astype(np.float64)
    n, c = y.shape
    chosen = np.zeros(c, dtype=bool)
    tp, n_true, best = np.zeros(n), y.sum(1), -1.0
    while not chosen.all():
        # mean F1 if label j were added: 2 (tp + y_j) / (|Y| + |S| + 1), for every j at once
        f = (2 * (tp[:, None] + y) / np.maximum(n_true[:, None] + chosen.sum() + 1, 1)).mean(0)
        f[chosen] = -np.inf
        j = int(f.argmax())
        if f[j] <= best + 1e-12:
            break
        chosen[j], tp, best = True, tp + y[:, j], float(f[j])
    return chosen.astype(np.uint8)


def prior_set(y: np.ndarray) -> np.ndarray:
    """(C,) uint8: the expected-F1 set of the label frequencies."""
    return expected_f1_sets(np.asarray(y, dtype=np.float64).mean(0, keepdims=True))[0]


def baselines(y: np.ndarray, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """{"constant": F1, "priors": F1} cross-fitted over ``folds``, plus the sets chosen on all rows (label columns)."""
    y = np.asarray(y)
    n = len(y)
    k = min(folds, n // 2)
    out: dict[str, Any] = {}
    for name, pick in (("constant", constant_set), ("priors", prior_set)):
        per_image = np.zeros(n)
        if k < 2:
            per_image = samples_f1_per_image(y, np.broadcast_to(pick(y), y.shape))
        else:
            fold = fold_ids(n, k, seed)
            for f in range(k):
                held = fold == f
                s = pick(y[~held])
                per_image[held] = samples_f1_per_image(y[held], np.broadcast_to(s, (int(held.sum()), y.shape[1])))
        out[name] = float(per_image.mean()) if n else float("nan")
        out[f"{name}_set"] = [int(j) for j in np.flatnonzero(pick(y))]
    return out


def verdict(model_f1: float, base: dict[str, Any]) -> str | None:
    """None when the model clearly beats both baselines, else one line saying which it does not."""
    best = max(("constant", "priors"), key=lambda k: base[k])
    if model_f1 >= base[best] + MARGIN:
        return None
    return (f"the model ({model_f1:.4f} samples-F1, cross-fitted) does not clearly beat the {best} baseline "
            f"({base[best]:.4f}: the same answer for every image, no model); it is no better than guessing "
            "from label counts. Try more rows, a smaller --batch-size or more --epochs")
