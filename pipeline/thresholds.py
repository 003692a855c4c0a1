"""Decision thresholds for multi-label scores, tuned to maximise samples-F1 (the competition metric).

Pure numpy. ``scores`` are (N, C) floats (probabilities or logits: any monotone scale works, as long
as thresholds are on the same scale), ``y_true`` is (N, C) 0/1. Tune on validation or out-of-fold
scores (``tune_global(y_oof, oof_scores)`` is all "out-of-fold tuning" needs), then apply the
thresholds to test scores with :func:`apply_thresholds`.

Both tuners are exact rather than grid searches by default. Samples-F1 is a sum of per-image terms,
and moving a threshold past one score value switches exactly one (image, class) decision, changing
only that image's term; so the objective for every candidate threshold is a prefix sum over the
sorted score values, and all candidates are evaluated in one ``argsort`` + ``cumsum``. Candidates
are the midpoints between consecutive distinct values (so no tuned threshold sits exactly on a
tuning-set score) plus one threshold at or below all values and one above them. Passing ``grid``
restricts the candidates to fixed values instead, which is the coarser, less overfit-prone choice.
"""

from __future__ import annotations

import numpy as np

from .metrics import samples_f1

_TOL = 1e-9  # an F1-sum gain smaller than this is float noise, not an improvement


def _scores(scores: np.ndarray) -> np.ndarray:
    """(N, C) -> float64 (N, C); float64 so float16 cache scores compare exactly with float thresholds."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D (N, C) matrix, got shape {s.shape}")
    return s


def _labels(y_true: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    y = np.asarray(y_true)
    if y.shape != shape:
        raise ValueError(f"y_true {y.shape} and scores {shape} differ in shape")
    return y > 0.5 if y.dtype.kind == "f" else y.astype(bool)


def _threshold_vector(thresholds: float | np.ndarray, c: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != c):
        raise ValueError(f"thresholds must be a scalar or a ({c},) vector, got shape {t.shape}")
    return np.broadcast_to(t, (c,)).copy()


def _f1(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """Elementwise 2TP/(|true|+|pred|), 0 where both are empty (zero_division=0, as metrics.py)."""
    denom = (n_true + n_pred).astype(np.float64)
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1.0), 0.0)


def apply_thresholds(
    scores: np.ndarray, thresholds: float | np.ndarray, *, at_least_one: bool = True
) -> np.ndarray:
    """(N, C) scores -> (N, C) uint8 predictions: 1 where ``score >= threshold`` (scalar or (C,)).

    With ``at_least_one`` a row with no label over its threshold gets the single label with the
    largest ``score - threshold``: the one that came closest to being predicted. With per-class
    thresholds this is the right notion of "most confident" (a class calibrated to score high
    everywhere should not win just by its raw score); with one global threshold it is simply the
    argmax score. Rows that already have a label are unchanged, because their argmax margin is >= 0.
    """
    s = _scores(scores)
    n, c = s.shape
    margin = s - _threshold_vector(thresholds, c)  # (N, C)
    pred = margin >= 0
    if at_least_one and n and c:
        pred[np.arange(n), margin.argmax(1)] = True
    return pred.astype(np.uint8)


def _best_cut(
    keys: np.ndarray,
    gains: np.ndarray,
    grid: np.ndarray | None,
    current: float | None,
) -> tuple[float, float, float]:
    """Pick t maximising sum(gains[keys >= t]); entries switch on when the threshold drops to their key.

    keys, gains: (M,). Returns (best t, its gain, the gain at ``current`` or -inf). Among equally good
    candidates it prefers the one nearest ``current`` (or the middle one), so plateaus do not drift.
    """
    order = np.argsort(keys, kind="stable")
    k_sorted = keys[order]
    suffix = np.zeros(keys.size + 1)
    suffix[:-1] = np.cumsum(gains[order][::-1])[::-1]  # suffix[i] = gain of entries i.. (keys >= k_sorted[i])
    if grid is not None:
        cand = np.asarray(grid, dtype=np.float64).ravel()
    else:
        u = np.unique(k_sorted[np.isfinite(k_sorted)])
        if u.size == 0:
            return (current if current is not None else 0.5), 0.0, 0.0
        # midpoints between distinct keys, plus "all on" (the lowest key) and "all off" (just above)
        cand = np.concatenate([u[:1], (u[:-1] + u[1:]) / 2.0, [np.nextafter(u[-1], np.inf)]])
    total = suffix[np.searchsorted(k_sorted, cand, side="left")]  # (K,) objective per candidate
    best = float(total.max())
    ties = np.flatnonzero(total >= best - _TOL)
    if current is not None:
        pick = ties[np.argmin(np.abs(cand[ties] - current))]
        at_current = float(suffix[np.searchsorted(k_sorted, current, side="left")])
    else:
        pick, at_current = ties[ties.size // 2], -np.inf
    return float(cand[pick]), float(total[pick]), at_current


def tune_global(
    y_true: np.ndarray, scores: np.ndarray, grid: np.ndarray | None = None, *, at_least_one: bool = True
) -> float:
    """The single threshold that maximises samples-F1 of ``apply_thresholds(scores, t, at_least_one=...)``.

    Exact over all distinct score values (or over ``grid`` when given), in O(NC log NC).
    """
    s = _scores(scores)
    y = _labels(y_true, s.shape)
    n, c = s.shape
    if n == 0 or c == 0:
        raise ValueError("cannot tune a threshold on an empty score matrix")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    # Sort each row's scores descending: as t falls, row i's k-th best label switches on at
    # t = s_sorted[i, k-1], making |pred| = k and TP = ctp[i, k-1]; its F1 term steps by d[i, k-1].
    order = np.argsort(-s, axis=1, kind="stable")  # (N, C)
    s_sorted = np.take_along_axis(s, order, axis=1)
    ctp = np.cumsum(np.take_along_axis(y, order, axis=1), axis=1)  # (N, C) TP with top-k on
    f = _f1(ctp, y.sum(1, keepdims=True), np.arange(1, c + 1)[None, :])  # (N, C) F1 with top-k on
    d = np.diff(f, axis=1, prepend=0.0)  # (N, C); with none on, F1 = 0
    if at_least_one:  # the top label is always on; only ranks 2.. depend on t
        keys, gains = s_sorted[:, 1:].ravel(), d[:, 1:].ravel()
    else:
        keys, gains = s_sorted.ravel(), d.ravel()
    if keys.size == 0:  # one class and at_least_one: every threshold predicts the same thing
        return 0.5
    t, _, _ = _best_cut(keys, gains, grid, None)
    return t


def tune_per_class(
    y_true: np.ndarray,
    scores: np.ndarray,
    *,
    init: float | np.ndarray | None = None,
    grid: np.ndarray | None = None,
    rounds: int = 3,
    min_support: int = 5,
    at_least_one: bool = True,
) -> np.ndarray:
    """(C,) thresholds maximising samples-F1, by coordinate ascent from ``init`` (default: tune_global).

    Each step re-tunes one class c exactly with the others fixed: the per-image TP and |pred| of the
    other columns are computed once, then every candidate threshold for c is scored in one sorted
    prefix sum (see the module docstring; candidates are midpoints of column c's distinct
    effective keys, or ``grid``). ``at_least_one`` is modelled exactly: in an image where no other
    label clears its threshold, c is the forced label while ``s_c - t_c`` beats the best other margin,
    so its switch-on point moves up to ``s_c - max_other_margin``.

    Overfitting guards: classes with fewer than ``min_support`` positives keep their ``init``
    threshold; steps are taken only for a strict gain; and if the result is not at least as good as
    ``init`` on this data (it cannot be, barring float ties), ``init`` is returned.
    """
    s = _scores(scores)
    y = _labels(y_true, s.shape)
    n, c = s.shape
    if init is None:
        init = tune_global(y, s, grid, at_least_one=at_least_one)
    t0 = _threshold_vector(init, c)
    if n == 0 or c == 0 or (at_least_one and c < 2):
        return t0
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    t = t0.copy()
    rows = np.arange(n)
    n_true = y.sum(1)  # (N,)
    tunable = np.flatnonzero(y.sum(0) >= min_support)
    for _ in range(max(0, rounds)):
        moved = False
        for j in tunable:
            margin = s - t  # (N, C)
            margin[:, j] = -np.inf  # column j removed: the other labels' state
            on = margin >= 0
            p = on.sum(1)  # (N,) |pred| without j
            tp = (on & y).sum(1)  # (N,) TP without j
            y_j = y[:, j]
            if at_least_one:
                best_other = margin.argmax(1)  # (N,) the label forced if j is not
                m = margin[rows, best_other]  # (N,) its margin; < 0 exactly where p == 0
                empty = p == 0
                # off: others as they are, or the best other label forced; on: j added, or j alone
                f_off = _f1(np.where(empty, y[rows, best_other], tp), n_true, np.where(empty, 1, p))
                f_on = _f1(np.where(empty, y_j, tp + y_j), n_true, np.where(empty, 1, p + 1))
                keys = np.where(empty, s[:, j] - m, s[:, j])  # j is on iff t_j < key (or <=)
            else:
                f_off, f_on = _f1(tp, n_true, p), _f1(tp + y_j, n_true, p + 1)
                keys = s[:, j]
            new_t, gain, gain_now = _best_cut(keys, f_on - f_off, grid, float(t[j]))
            if gain > gain_now + _TOL:
                t[j], moved = new_t, True
        if not moved:
            break
    # The guard the docstring promises: never worse than where we started, on this data.
    f_start = samples_f1(y, apply_thresholds(s, t0, at_least_one=at_least_one))
    f_end = samples_f1(y, apply_thresholds(s, t, at_least_one=at_least_one))
    return t if f_end >= f_start else t0
