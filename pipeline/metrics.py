"""Multi-label metrics as vectorised numpy functions (no loops over images), matching scikit-learn.

Inputs: ``y_true`` (N, C) 0/1, ``y_pred`` (N, C) 0/1 or ``scores`` (N, C) float; any numeric or bool dtype.

The competition metric is samples-F1: F1 per image, averaged over images, i.e. scikit-learn's
``f1_score(y_true, y_pred, average="samples", zero_division=0)``. ``zero_division`` is the value an
image (or class) gets when its F1 is 0/0: no true and no predicted labels. We default to 0 like
Kaggle's scorer; it never matters for this task's real data because every image has at least one
true label, and the pipeline predicts at least one label per image.
"""

from __future__ import annotations

import numpy as np


def as_binary(y: np.ndarray, name: str) -> np.ndarray:
    """(N, C) anything 0/1 -> (N, C) bool; rejects other shapes so a transposed matrix fails loudly."""
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) matrix, got shape {y.shape}")
    return y > 0.5 if y.dtype.kind == "f" else y.astype(bool)


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = as_binary(y_true, "y_true"), as_binary(y_pred, "y_pred")
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
    t = as_binary(y_true, "y_true")
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


# ------------------------------------------------------------------------ curves and sweeps (report)

SWEEP = np.linspace(0.0, 1.0, 101)  # thresholds for the F1-vs-threshold curves


def pr_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of one class at every distinct score cut, from (0, 1) on; as sklearn's
    ``precision_recall_curve`` (without importing sklearn, which costs seconds)."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # last row of each tie group
    tp = np.cumsum(y_sorted)[ends]
    precision = tp / (ends + 1)
    recall = tp / max(y_sorted.sum(), 1.0)
    return np.r_[1.0, precision], np.r_[0.0, recall]


def class_f1_sweep(y: np.ndarray, s: np.ndarray, grid: np.ndarray = SWEEP) -> np.ndarray:
    """(C, G) F1 of each class alone when it is predicted at ``score >= grid[g]``."""
    on = s[:, :, None] >= grid[None, None, :]  # (N, C, G)
    tp = (on & y[:, :, None]).sum(0)
    denom = y.sum(0)[:, None] + on.sum(0)
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)


def samples_f1_sweep(y: np.ndarray, s: np.ndarray, thr: np.ndarray, grid: np.ndarray = SWEEP) -> np.ndarray:
    """(C, G) samples-F1 when class j's threshold is ``grid[g]`` and every other class keeps ``thr``.

    Exact for ``apply_thresholds(..., at_least_one=True)``: a row left empty gets the label with the
    largest margin (first column on ties), which may be j or the best of the other columns.
    """
    n, c = s.shape
    margin = s - thr[None, :]  # (N, C)
    n_true = y.sum(1)[:, None]  # (N, 1)
    rows = np.arange(n)
    out = np.empty((c, grid.size))
    for j in range(c):
        others = np.arange(c) != j
        m_o, on_o, y_o = margin[:, others], margin[:, others] >= 0, y[:, others]
        p_o, tp_o = on_o.sum(1)[:, None], (on_o & y_o).sum(1)[:, None]
        if m_o.shape[1]:
            arg = m_o.argmax(1)
            best, y_best = m_o[rows, arg][:, None], y_o[rows, arg][:, None]
            col_best = np.flatnonzero(others)[arg][:, None]  # real column index, for the tie rule
        else:
            best, y_best, col_best = np.full((n, 1), -np.inf), np.zeros((n, 1), bool), np.full((n, 1), c)
        mj = s[:, j, None] - grid[None, :]  # (N, G)
        on_j = mj >= 0
        empty = (p_o == 0) & ~on_j
        force_j = empty & ((mj > best) | ((mj == best) & (j < col_best)))
        force_o = empty & ~force_j
        pick_j = on_j | force_j
        tp = tp_o + (pick_j & y[:, j, None]) + (force_o & y_best)
        denom = n_true + p_o + pick_j + force_o
        out[j] = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0).mean(0)
    return out
