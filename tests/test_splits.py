"""pipeline.splits: seeded multi-label stratified train/val split and k folds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import MlcError
from pipeline.splits import kfold, train_val_split

# Label frequencies from common to rare; the last (~1%) plays parking meter (0.8% in the real data).
RATES = np.array([0.75, 0.3, 0.15, 0.05, 0.02, 0.01])


@pytest.fixture(scope="module")
def y() -> np.ndarray:
    """(2000, 6) imbalanced multi-label 0/1 matrix with a few all-zero rows."""
    rng = np.random.default_rng(42)
    y = (rng.random((2000, RATES.size)) < RATES).astype(np.float32)
    assert 15 <= y[:, -1].sum() <= 25
    return y


def _assert_partition(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype.kind == "i" and (np.diff(p) > 0).all()  # sorted, no repeats
    joined = np.concatenate(parts)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint, covering


def test_train_val_split_is_stratified_and_seeded(y: np.ndarray) -> None:
    train, val = train_val_split(y, 0.2, seed=0)
    _assert_partition([train, val], len(y))
    assert abs(val.size - 400) <= 5
    # Every class, the ~1% one included, lands in val in proportion (within one or two rows).
    expected = y.sum(0) * 0.2
    assert (np.abs(y[val].sum(0) - expected) <= np.maximum(1.5, 0.05 * expected)).all()
    assert y[val, -1].sum() >= 3
    again = train_val_split(y, 0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = train_val_split(y, 0.2, seed=1)[1]
    assert not np.array_equal(other, val)


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_train_val_split_fraction(y: np.ndarray, fraction: float) -> None:
    _, val = train_val_split(y, fraction, seed=3)
    assert abs(val.size - fraction * len(y)) <= 0.01 * len(y)


def test_kfold_is_stratified_and_seeded(y: np.ndarray) -> None:
    folds = kfold(y, 5, seed=0)
    assert len(folds) == 5
    _assert_partition([va for _, va in folds], len(y))
    for train, val in folds:
        _assert_partition([train, val], len(y))
        assert abs(val.size - 400) <= 10
        expected = y.sum(0) / 5
        assert (np.abs(y[val].sum(0) - expected) <= np.maximum(1.5, 0.05 * expected)).all()
        assert y[val, -1].sum() >= 3  # the rare class is in every fold
    again = kfold(y, 5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    assert not np.array_equal(kfold(y, 5, seed=7)[0][1], folds[0][1])


def test_single_column_and_bool_targets() -> None:
    y = np.zeros((50, 1), dtype=bool)
    y[:10] = True
    train, val = train_val_split(y, 0.2)
    _assert_partition([train, val], 50)
    assert y[val].sum() == 2
    assert [int(y[va].sum()) for _, va in kfold(y, 5)] == [2, 2, 2, 2, 2]


@pytest.mark.parametrize(
    ("targets", "kwargs", "match"),
    [
        (np.ones(10), {}, "2-D"),
        (np.ones((1, 3)), {}, "at least 2 rows"),
        (np.full((10, 3), 2.0), {}, "only 0 and 1"),
        (np.ones((10, 3)), {"val_fraction": 0.0}, "between 0 and 1"),
        (np.ones((10, 3)), {"val_fraction": 1.0}, "between 0 and 1"),
        (np.ones((10, 3)), {"val_fraction": 0.01}, "empty"),
    ],
)
def test_train_val_split_validates(targets: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(MlcError, match=match):
        train_val_split(targets, **kwargs)


@pytest.mark.parametrize(("k", "match"), [(1, ">= 2"), (2.5, "integer"), (True, "integer"), (11, "at least 11")])
def test_kfold_validates(k: object, match: str) -> None:
    with pytest.raises(MlcError, match=match):
        kfold(np.eye(10, 3), k)  # type: ignore[arg-type]
