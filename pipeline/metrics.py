"""Multi-label metrics as vectorised numpy functions (no loops over images), matching scikit-learn.

Inputs: ``y_true`` (N, C) 0/1, ``y_pred`` (N, C) 0/1 or ``scores`` (N, C) float; any numeric or bool dtype.

The competition metric is samples-F1: F1 per image, averaged over images, i.e. scikit-learn's
``f1_score(y_true, y_pred, average="samples", zero_division=0)``. ``zero_division`` is the value an
image (or class) gets when its F1 is 0/0: no true and no predicted labels. We default to 0 like
Kaggle's scorer; it never matters for this task's real data because every image has at least one
true label, and the pipeline predicts at least one label per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.thresholds import apply_thresholds


def _as_binary(y: np.ndarray, name: str) -> np.ndarray:
    """(N, C) anything 0/1 -> (N, C) bool; rejects other shapes so a transposed matrix fails loudly."""
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) matrix, got shape {y.shape}")
    return y > 0.5 if y.dtype.kind == "f" else y.astype(bool)


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_binary(y_true, "y_true"), _as_binary(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    return t, p


def _f1(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray, zero_division: float) -> np.ndarray:
    """Elementwise F1 = 2TP / (|true| + |pred|), ``zero_division`` where both are empty."""
    tp, denom = tp.astype(np.float64), (n_true + n_pred).astype(np.float64)
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1.0), float(zero_division))


def _safe_div(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    num, den = num.astype(np.float64), den.astype(np.float64)
    return np.where(den > 0, num / np.maximum(den, 1.0), float(zero_division))


def samples_f1_per_image(y_true: np.ndarray, y_pred: np.ndarray, *, zero_division: float = 0.0) -> np.ndarray:
    """(N,) F1 of each image; their mean is :func:`samples_f1`."""
    t, p = _pair(y_true, y_pred)
    return _f1((t & p).sum(1), t.sum(1), p.sum(1), zero_division)


def samples_f1(y_true: np.ndarray, y_pred: np.ndarray, *, zero_division: float = 0.0) -> float:
    """The competition metric: mean over images of per-image F1 (sklearn ``average="samples"``)."""
    f1 = samples_f1_per_image(y_true, y_pred, zero_division=zero_division)
    return float(f1.mean()) if f1.size else float("nan")


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray, *, zero_division: float = 0.0) -> float:
    """F1 of the pooled (image, label) decisions (sklearn ``average="micro"``)."""
    t, p = _pair(y_true, y_pred)
    return float(_f1(np.asarray((t & p).sum()), np.asarray(t.sum()), np.asarray(p.sum()), zero_division))


def per_class(y_true: np.ndarray, y_pred: np.ndarray, *, zero_division: float = 0.0) -> dict[str, np.ndarray]:
    """Per-class (C,) arrays ``precision``, ``recall``, ``f1`` (float64) and ``support`` (int64, #true).

    Same values as sklearn ``precision_recall_fscore_support(average=None, zero_division=...)``.
    """
    t, p = _pair(y_true, y_pred)
    tp, n_true, n_pred = (t & p).sum(0), t.sum(0), p.sum(0)  # each (C,)
    return {
        "precision": _safe_div(tp, n_pred, zero_division),
        "recall": _safe_div(tp, n_true, zero_division),
        "f1": _f1(tp, n_true, n_pred, zero_division),
        "support": n_true.astype(np.int64),
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, *, zero_division: float = 0.0) -> float:
    """Unweighted mean of per-class F1 over all C classes (sklearn ``average="macro"``).

    Like sklearn, a class with no true and no predicted labels counts as ``zero_division``.
    """
    return float(per_class(y_true, y_pred, zero_division=zero_division)["f1"].mean())


def average_precision_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(C,) average precision of each class (sklearn ``average_precision_score``); NaN with no positives.

    AP = sum over distinct thresholds of (R_k - R_{k-1}) * P_k, i.e. each positive contributes the
    precision at the end of its tie group of equal scores, divided by the number of positives.
    """
    t = _as_binary(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != t.shape:
        raise ValueError(f"y_true {t.shape} and scores {s.shape} differ in shape")
    n, c = s.shape
    if n == 0:
        return np.full(c, np.nan)
    order = np.argsort(-s, axis=0, kind="stable")  # (N, C) descending per column
    s_sorted = np.take_along_axis(s, order, axis=0)
    y_sorted = np.take_along_axis(t, order, axis=0).astype(np.float64)
    tp_cum = np.cumsum(y_sorted, axis=0)  # (N, C) positives at or above each rank
    rank = np.arange(1, n + 1, dtype=np.float64)[:, None]
    # A tie group ends where the next score differs (or at the last row); precision is only
    # defined at group ends, so every member of a group takes its group end's precision.
    group_end = np.ones((n, c), dtype=bool)
    group_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    end_idx = np.where(group_end, np.arange(n)[:, None], n)  # (N, C), n = "not an end"
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]  # nearest group end at or below
    prec_at_end = np.take_along_axis(tp_cum / rank, end_idx, axis=0)  # (N, C)
    n_pos = y_sorted.sum(0)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (y_sorted * prec_at_end).sum(0) / n_pos
    return np.where(n_pos > 0, ap, np.nan)


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean AP over the classes with at least one positive (NaN if none has one)."""
    ap = average_precision_per_class(y_true, scores)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def _json_float(x: float) -> float | None:
    """NaN -> None, so metrics.json stays strict JSON."""
    return None if math.isnan(x) else float(x)


def summarize(
    y_true: np.ndarray,
    scores: np.ndarray,
    thresholds: float | np.ndarray,
    *,
    at_least_one: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every metric for one (y_true, scores, thresholds) triple, as a JSON-ready dict (metrics.json).

    Predictions are ``apply_thresholds(scores, thresholds, at_least_one=at_least_one)``, exactly what
    a submission would contain. Per-class entries are lists in column order; ``ap`` is None for a
    class with no positives (it is left out of ``mAP``).
    """
    y_pred = apply_thresholds(scores, thresholds, at_least_one=at_least_one)
    t = _as_binary(y_true, "y_true")
    pc = per_class(t, y_pred)
    ap = average_precision_per_class(t, scores)
    c = t.shape[1]
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (c,))
    if names is not None and len(names) != c:
        raise ValueError(f"{len(names)} names for {c} classes")
    out: dict[str, Any] = {
        "n_images": int(t.shape[0]),
        "at_least_one": bool(at_least_one),
        "samples_f1": _json_float(samples_f1(t, y_pred)),
        "micro_f1": _json_float(micro_f1(t, y_pred)),
        "macro_f1": _json_float(macro_f1(t, y_pred)),
        "mAP": _json_float(mean_average_precision(t, scores)),
        "mean_true_labels": _json_float(float(t.sum(1).mean()) if t.size else float("nan")),
        "mean_pred_labels": _json_float(float(y_pred.sum(1).mean()) if y_pred.size else float("nan")),
        "per_class": {
            "threshold": [float(x) for x in thr],
            "precision": [float(x) for x in pc["precision"]],
            "recall": [float(x) for x in pc["recall"]],
            "f1": [float(x) for x in pc["f1"]],
            "support": [int(x) for x in pc["support"]],
            "ap": [_json_float(float(x)) for x in ap],
        },
    }
    if names is not None:
        out["per_class"]["name"] = [str(n) for n in names]
    return out
