"""Decision rules (pipeline/decision.py): the expected-F1 sets are optimal, the chosen rule is the best
cross-fitted candidate, and a saved decision round-trips."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pipeline.decision import (
    RULES,
    Decision,
    _best,
    choose,
    client_source,
    cross_fitted_per_image,
    cross_fitted_scores,
    decide,
    fit_rule,
    rules_help,
    simplest_first,
)
from pipeline.metrics import samples_f1
from pipeline.rule_expected_f1 import expected_f1_sets, fit_calibration


def _brute_expected_f1(p: np.ndarray, pred: np.ndarray) -> float:
    """E[F1] of the set ``pred`` over every one of the 2^C label vectors, labels independent."""
    total = 0.0
    for bits in itertools.product((0, 1), repeat=len(p)):
        y = np.array(bits)
        prob = np.prod(np.where(y == 1, p, 1 - p))
        denom = y.sum() + pred.sum()
        total += prob * (2 * (y & pred).sum() / denom if denom else 0.0)
    return total


def test_expected_f1_sets_are_the_best_of_every_nonempty_set():
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.random((6, 5)), rng.random((4, 5)) ** 4, [[0.9, 0.9, 0.1, 0.05, 0.5]]])
    got = expected_f1_sets(probs)
    assert (got.sum(1) >= 1).all()
    for p, pred in zip(probs, got, strict=True):
        best = max(_brute_expected_f1(p, np.array(s)) for s in itertools.product((0, 1), repeat=5) if any(s))
        assert _brute_expected_f1(p, pred) == pytest.approx(best, abs=1e-12)


def test_expected_f1_picks_more_labels_when_they_are_likely():
    probs = np.array([[0.95, 0.9, 0.85, 0.02], [0.4, 0.05, 0.04, 0.03]])
    assert expected_f1_sets(probs).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_expected_f1_chunks_agree_with_one_block(monkeypatch):
    probs = np.random.default_rng(1).random((50, 7))
    whole = expected_f1_sets(probs)
    monkeypatch.setattr("pipeline.rule_expected_f1._CHUNK", 8)
    assert (expected_f1_sets(probs) == whole).all()


def test_threshold_decisions_give_every_image_a_label():
    d = {"rule": "fixed", "thresholds": [0.5, 0.5, 0.9]}
    assert decide(np.array([[0.1, 0.2, 0.85], [0.6, 0.1, 0.95]]), d).tolist() == [[0, 0, 1], [1, 0, 1]]


def _data(n=400, c=6, seed=0, noise=0.25):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.linspace(0.6, 0.05, c)).astype(np.uint8)
    y[np.arange(n), rng.integers(0, c, n)] |= (y.sum(1) == 0).astype(np.uint8)
    probs = np.clip(0.7 * y + noise * rng.standard_normal((n, c)) + 0.1, 0.001, 0.999) ** 2
    return y, probs


def test_the_chosen_rule_is_the_best_scoring_candidate():
    y, probs = _data()
    choice = choose(y, probs, seed=3)
    assert set(choice.scores) == set(RULES)
    per_image = cross_fitted_per_image(y, probs, seed=3)
    top = max(choice.scores, key=choice.scores.get)
    diff = per_image[top] - per_image[choice.rule]
    # the best, or one the rows cannot tell from it (within one standard error) that tuned less
    assert choice.scores[top] - choice.scores[choice.rule] <= diff.std(ddof=1) / np.sqrt(len(diff)) + 1e-12
    assert choice.scores == cross_fitted_scores(y, probs, seed=3)
    assert not choice.forced and 0 < choice.selected_score <= 1
    # probabilities squared: 0.5 is far off, so a tuned rule must win over fixed
    assert choice.rule != "fixed" and choice.scores["fixed"] < max(choice.scores.values())


def test_a_forced_rule_is_kept_and_scored():
    y, probs = _data()
    choice = choose(y, probs, force="fixed")
    assert choice.rule == "fixed" and choice.forced and choice.selected_score == choice.scores["fixed"]
    with pytest.raises(ValueError, match="unknown decision rule"):
        choose(y, probs, force="nope")


def test_cross_fitted_scores_are_on_unseen_rows():
    y, probs = _data(n=200)
    in_sample = samples_f1(y, fit_rule("per-class", y, probs).apply(probs))
    assert cross_fitted_scores(y, probs, ["per-class"])["per-class"] < in_sample


def test_calibration_undoes_a_logit_scaling():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((4000, 3)) * 2
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.uint8)
    bent = 1 / (1 + np.exp(-(0.5 * z - 1)))
    a, b = fit_calibration(y, bent)
    assert a == pytest.approx(2.0, rel=0.15) and b == pytest.approx(2.0, rel=0.15)


def test_decisions_round_trip_and_apply_alike():
    y, probs = _data(n=120)
    for name in RULES:
        d = fit_rule(name, y, probs)
        again = Decision.from_dict(d.to_dict())
        assert again == d and (again.apply(probs) == decide(probs, d.to_dict())).all()
    assert all(name in rules_help() for name in RULES)
    with pytest.raises(ValueError, match="unknown decision rule"):
        Decision.from_dict({"rule": "x", "thresholds": []})


def test_the_export_clients_decision_step_is_mlcs_exactly():
    """client.py carries its rule's numpy source: run alone (numpy only), it decides as mlc does, every rule."""
    from pipeline.export import client

    y, probs = _data(n=300, c=8, seed=5)
    probs32 = probs.astype(np.float32)  # what onnxruntime hands the client
    for name in RULES:
        assert client_source(name) in client(name)
        ns: dict = {"np": np}
        exec(compile(client_source(name), "client.py", "exec"), ns)  # noqa: S102 - our own source
        d = fit_rule(name, y[:200], probs[:200])
        saved = json.loads(json.dumps(d.to_dict()))  # as export.json holds it
        assert (ns["apply_decision"](probs32[200:], saved) == d.apply(probs32[200:])).all(), name


def test_a_rule_that_wins_only_by_noise_gives_way_to_the_simpler_one():
    """Breiman's one-SE rule: per-class must beat expected-f1 by more than the paired standard error to be kept."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.0, 4000)
    noise = {"expected-f1": base, "per-class": np.clip(base + rng.normal(0.001, 0.05, 4000), 0, 1)}
    assert noise["per-class"].mean() > noise["expected-f1"].mean()
    assert _best(noise) == "expected-f1"
    clear = {"expected-f1": base, "per-class": np.clip(base + 0.05, 0, 1)}
    assert _best(clear) == "per-class"
    assert _best({"fixed": base, "global": base + 1e-3}) == "global"  # identical noise: any gain is real


def test_the_rules_simplicity_order_is_the_one_se_choices():
    """The rules rank themselves (Rule.rank): nothing tuned first, one threshold per label last."""
    assert simplest_first() == ("expected-f1", "fixed", "global", "expected-f1-calibrated", "per-class")


def test_metrics_detail_of_a_rule_without_thresholds_is_its_own_decisions():
    """metrics.json's per-class detail (the leaderboard's per-label F1) under expected-F1 comes from that rule's
    decisions, not from its placeholder thresholds."""
    from pipeline.evaluation import evaluate
    from pipeline.metrics import per_class

    y, probs = _data()
    metrics, _ = evaluate(y, probs, "expected-f1", seed=0)
    detail = metrics["detail_with_final_thresholds_in_sample"]
    decided = choose(y, probs, force="expected-f1").decision.apply(probs)
    assert detail["per_class"]["f1"] == pytest.approx(per_class(y, decided)["f1"].tolist())
    assert detail["samples_f1"] == pytest.approx(samples_f1(y, decided))
    assert detail["per_class"]["threshold"] == [None] * y.shape[1]
    metrics, _ = evaluate(y, probs, "per-class", seed=0)
    tuned = metrics["detail_with_final_thresholds_in_sample"]["per_class"]["threshold"]
    assert all(isinstance(t, float) for t in tuned)
