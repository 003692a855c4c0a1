"""Seeded multi-label stratified splits (iterative stratification, Sechidis et al. 2011).

A plain random split can leave a rare class (parking meter is on 0.8% of images) out of a
validation fold entirely; iterative stratification places every class in every part in proportion.
All functions take a (N, C) 0/1 target matrix and return sorted, disjoint index arrays that cover
0..N-1, identical for the same seed.
"""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit

from .errors import MlcError


def _check_targets(y: np.ndarray) -> np.ndarray:
    """Validate a (N, C) 0/1 matrix; return it as bool with at least two columns for iterstrat."""
    y = np.asarray(y)
    if y.ndim != 2:
        raise MlcError(f"targets must be a 2-D (N, C) 0/1 matrix, got shape {y.shape}")
    if y.shape[0] < 2 or y.shape[1] < 1:
        raise MlcError(f"need at least 2 rows and 1 label column to split, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise MlcError("targets must contain only 0 and 1")
    y = y.astype(bool)
    if y.shape[1] == 1:
        # sklearn reads a single column as 'binary', which iterstrat refuses; its complement
        # carries no new information but makes the matrix a multilabel indicator.
        y = np.concatenate([y, ~y], axis=1)
    return y


def train_val_split(
    y: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into (train_idx, val_idx), stratified on every label column."""
    y = _check_targets(y)
    n = y.shape[0]
    if not 0.0 < float(val_fraction) < 1.0:
        raise MlcError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not 1 <= round(n * val_fraction) <= n - 1:
        raise MlcError(f"val_fraction {val_fraction} of {n} rows leaves an empty train or validation part")
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(n), y))
    return np.sort(train_idx), np.sort(val_idx)


def kfold(y: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_idx, val_idx) folds; the val parts are disjoint and together cover every row."""
    y = _check_targets(y)
    n = y.shape[0]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 2:
        raise MlcError(f"k must be an integer >= 2, got {k!r}")
    if k > n:
        raise MlcError(f"k={k} folds need at least {k} rows, got {n}")
    # shuffle=True so the seed also decides ties between equally good folds' row order.
    splitter = MultilabelStratifiedKFold(n_splits=int(k), shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in splitter.split(np.zeros(n), y)]
