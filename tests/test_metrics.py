"""metrics.py against scikit-learn on random data, including the edge cases sklearn treats specially."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from pipeline import evaluation, metrics


def _random_case(seed: int, n: int = 300, c: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.25).astype(np.int64)
    pred = (rng.random((n, c)) < 0.3).astype(np.int64)
    scores = rng.random((n, c))
    y[:, 2] = 0  # a class with no positives
    pred[:, 3] = 0  # a class never predicted
    y[:, 4] = 0  # and one with neither
    pred[:, 4] = 0
    pred[:20] = 0  # images with an empty prediction
    y[10:30] = 0  # images with no true labels (10..19 have neither)
    scores[:, 5] = np.round(scores[:, 5], 1)  # heavy ties
    return y, pred, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_f1_variants_match_sklearn(seed: int, zero_division: float) -> None:
    y, pred, _ = _random_case(seed)
    for average, ours in [("samples", metrics.samples_f1), ("micro", metrics.micro_f1),
                          ("macro", metrics.macro_f1)]:
        expected = f1_score(y, pred, average=average, zero_division=zero_division)
        assert ours(y, pred, zero_division=zero_division) == pytest.approx(expected, abs=1e-12), average


def test_samples_f1_default_is_zero_division_0() -> None:
    y = np.array([[0, 0], [1, 0]])
    pred = np.array([[0, 0], [1, 0]])
    assert metrics.samples_f1(y, pred) == pytest.approx(0.5)  # the empty/empty image scores 0
    assert metrics.samples_f1(y, pred, zero_division=1.0) == pytest.approx(1.0)
    np.testing.assert_allclose(metrics.samples_f1_per_image(y, pred), [0.0, 1.0])


def test_per_class_matches_sklearn() -> None:
    y, pred, _ = _random_case(3)
    ours = metrics.per_class(y, pred)
    p, r, f, s = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    np.testing.assert_allclose(ours["precision"], p)
    np.testing.assert_allclose(ours["recall"], r)
    np.testing.assert_allclose(ours["f1"], f)
    np.testing.assert_array_equal(ours["support"], s)


@pytest.mark.parametrize("seed", [0, 1])
def test_average_precision_matches_sklearn_with_ties(seed: int) -> None:
    y, _, scores = _random_case(seed)
    ap = metrics.average_precision_per_class(y, scores)
    for c in range(y.shape[1]):
        if y[:, c].any():
            assert ap[c] == pytest.approx(average_precision_score(y[:, c], scores[:, c]), abs=1e-12)
        else:
            assert np.isnan(ap[c])
    has_pos = y.any(0)
    expected = np.mean([average_precision_score(y[:, c], scores[:, c]) for c in np.flatnonzero(has_pos)])
    assert metrics.mean_average_precision(y, scores) == pytest.approx(expected, abs=1e-12)


def test_average_precision_all_tied_and_perfect() -> None:
    y = np.array([[1], [0], [1], [0]])
    assert metrics.mean_average_precision(y, np.full((4, 1), 0.3)) == pytest.approx(0.5)
    assert metrics.mean_average_precision(y, np.array([[0.9], [0.1], [0.8], [0.2]])) == pytest.approx(1.0)


def test_accepts_float_and_bool_inputs() -> None:
    y, pred, _ = _random_case(4)
    a = metrics.samples_f1(y, pred)
    assert metrics.samples_f1(y.astype(np.float32), pred.astype(bool)) == pytest.approx(a)
    assert metrics.samples_f1(y.astype(np.uint8), pred.astype(np.float16)) == pytest.approx(a)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        metrics.samples_f1(np.zeros((3, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        metrics.samples_f1(np.zeros(3), np.zeros(3))


def test_summarize_is_consistent_and_json_ready() -> None:
    y, _, scores = _random_case(5)
    thr = np.linspace(0.3, 0.7, y.shape[1])
    out = evaluation.summarize(y, scores, thr, names=[f"c{i}" for i in range(y.shape[1])])
    json.dumps(out, allow_nan=False)  # strict JSON: NaN APs became None
    from pipeline.thresholds import apply_thresholds

    pred = apply_thresholds(scores, thr)
    assert out["samples_f1"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=0))
    assert out["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert out["mAP"] == pytest.approx(metrics.mean_average_precision(y, scores))
    assert out["per_class"]["ap"][2] is None
    assert out["per_class"]["threshold"] == pytest.approx(list(thr))
    assert out["mean_pred_labels"] >= 1.0  # at_least_one
    assert len(out["per_class"]["name"]) == y.shape[1]


def test_summarize_scalar_threshold_without_at_least_one() -> None:
    y, _, scores = _random_case(6)
    out = evaluation.summarize(y, scores, 0.9, at_least_one=False)
    pred = (scores >= 0.9).astype(int)
    assert out["samples_f1"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=0))
    assert out["per_class"]["threshold"] == [0.9] * y.shape[1]
