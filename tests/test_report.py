"""report.py: a fake run folder renders every plot and a page that references them; edge cases hold."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import refresh_manifest
from PIL import Image

from pipeline import report
from pipeline.encoders import create_image_encoder, create_text_encoder
from pipeline.errors import DataError, MlcError
from pipeline.heads import create_head
from pipeline.labels import COCO18
from pipeline.metrics import class_f1_sweep, pr_curve, samples_f1, samples_f1_sweep
from pipeline.runs import RunDir, RunFiles
from pipeline.thresholds import apply_thresholds, tune_global, tune_per_class

# Label frequencies of the competition's train.csv (person 76%, parking meter under 1%).
FREQ = np.array([.76, .037, .148, .042, .034, .043, .043, .076, .035, .049, .020, .020, .0085, .060, .036,
                 .047, .052, .036])
CONFUSED = [(2, 7), (5, 7), (1, 3), (15, 16)]  # car->truck, bus->truck, bicycle->motorcycle, cat->dog


def fake_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 18) uint8 labels with the real frequencies, and probabilities of varying quality per class;
    some look-alike pairs leak score into each other so the confusion plot has something to show."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 18)) < FREQ).astype(np.uint8)
    empty = y.sum(1) == 0
    y[empty, rng.integers(0, 18, empty.sum())] = 1  # every image has a label, as in the real data
    sep = np.linspace(1.2, 4.0, 18)[rng.permutation(18)]  # class separability
    sign = 2 * y.astype(np.float64) - 1  # not uint8 arithmetic: 2 * 0 - 1 would wrap to 255
    logit = sign * sep / 2 + rng.normal(0, 1, (n, 18)) + np.log(FREQ / (1 - FREQ)) / 2
    for a, b in CONFUSED:
        logit[:, b] += 1.5 * y[:, a] * (rng.random(n) < 0.5)
        logit[:, a] -= 1.0 * y[:, a] * (rng.random(n) < 0.3)
    return y, (1 / (1 + np.exp(-logit))).astype(np.float32)


def make_run(path: Path, *, n: int = 400, folds: int = 0, submission: bool = True, encoders: bool = False,
             seed: int = 0, rule: str = "per-class") -> dict:
    """A run folder written by the real writer, with fake held-out scores; returns its metrics."""
    y, s = fake_scores(n, seed)
    g = tune_global(y, s)
    thr = tune_per_class(y, s, init=np.full(18, g))
    rng = np.random.default_rng(seed)

    def curve(k: int, epochs: int) -> list[dict]:
        return [{"epoch": e, "train_loss": 0.3 / e ** 0.5 + 0.01 * k, "val_loss": 0.2 + 0.1 / e + 0.002 * e,
                 "val_f1_at_0.5": 0.8 - 0.2 / e + 0.01 * rng.random()} for e in range(1, epochs + 1)]

    metrics = {"samples_f1_at_0.5": samples_f1(y, apply_thresholds(s, 0.5)), "samples_f1_global": 0.81234,
               "samples_f1_per_class": 0.82345, "samples_f1": 0.82345, "threshold_mode": "per-class",
               "seconds": 12.5, "best_epochs": [6 + k for k in range(max(folds, 1))], "held_out_rows": n}
    heads = [create_head("concat", image_dim=32, text_dim=16, num_classes=18) for _ in range(max(folds, 1))]
    enc = (create_image_encoder("tiny-resnet", random_init=True, seed=0),
           create_text_encoder("tiny-bert", random_init=True, seed=0)) if encoders else None
    RunDir(path).write(RunFiles(
        kind="head", config={"head": "concat", "lr": 0.001, "folds": folds}, features=[], heads=heads,
        thresholds={"label_ids": list(COCO18.ids), "label_names": list(COCO18.names), "mode": "per-class",
                    "global": float(g), "per_class": list(map(float, thr)),
                    "decision": {"rule": rule,
                                 "thresholds": [0.5] * 18 if rule == "expected-f1" else list(map(float, thr))}},
        metrics=metrics, history=[curve(k, 8 + k) for k in range(max(folds, 1))],
        val_ids=[f"{i}.jpg" for i in range(n)], val_scores=s, val_labels=y, log=["fake run"], encoders=enc))
    if submission:
        _, st = fake_scores(200, seed + 1)
        pred = apply_thresholds(st, thr)
        rows = [f"{i}.jpg,{' '.join(str(COCO18.ids[j]) for j in np.flatnonzero(r))}" for i, r in enumerate(pred)]
        (path / "submission.csv").write_text("ImageID,Labels\n" + "\n".join(rows) + "\n")
    return metrics


def _check_pngs(html: str, folder: Path, names: list[str]) -> None:
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert sorted(srcs) == sorted(names)
    for name in names:
        with Image.open(folder / name) as im:
            im.verify()
        with Image.open(folder / name) as im:
            assert im.format == "PNG"
            assert 500 <= im.width <= 3000 and 300 <= im.height <= 2500, (name, im.size)


def test_report_with_submission(tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = make_run(run, encoders=True)
    page = report.make_report(run)
    assert page == run / "report" / "report.html"
    html = page.read_text()
    _check_pngs(html, run / "report", list(report.PLOT_FILES.values()))
    for v in ("samples_f1_at_0.5", "samples_f1_global", "samples_f1_per_class"):
        assert f"{metrics[v]:.4f}" in html
    assert "Where the model is weak" in html and "<details><summary>config.json" in html
    assert "head + finetuned encoders" in html and "of the 100 MB limit" in html
    assert "Skipped" not in html


def test_a_rule_without_thresholds_shows_none(tmp_path: Path) -> None:
    """An expected-F1 run decides per image: the report shows its decisions, never the unread 0.5s as thresholds."""
    run = tmp_path / "run"
    make_run(run, rule="expected-f1", submission=False)
    d = report.load_report_data(run)
    a = report.analyse(d)
    assert not d.reads_thresholds and d.threshold_text(0) == "-"
    assert np.array_equal(a.y_pred, d.decision.apply(d.scores) > 0)  # the rule's labels, not thresholds at 0.5
    assert not np.array_equal(a.y_pred, apply_thresholds(d.scores, d.thresholds) > 0)
    html = report.make_report(run).read_text()
    weak = html.split("Where the model is weak")[1].split("</ul>")[0]
    assert "threshold -" in weak and "threshold 0.50" not in weak
    make_run(tmp_path / "pc", submission=False)
    d_pc = report.load_report_data(tmp_path / "pc")
    assert d_pc.reads_thresholds and d_pc.threshold_text(0) == f"{d_pc.thresholds[0]:.2f}"


def test_report_folds_without_submission(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, folds=3, submission=False)
    stale = run / "report" / "label_distribution.png"  # left by an earlier report made with a submission
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    page = report.make_report(run)
    html = page.read_text()
    expected = [f for k, f in report.PLOT_FILES.items() if k != "label_distribution"]
    _check_pngs(html, run / "report", expected)
    assert "Skipped: no test predictions" in html
    assert not stale.exists()
    assert "This run holds no encoder weights" in html


def test_class_without_held_out_positives(tmp_path: Path) -> None:
    """A class with no held-out positives: notes on the page, no division-by-zero warnings."""
    run = tmp_path / "run"
    make_run(run, n=150, submission=False)
    with np.load(run / "val_scores.npz") as z:
        arrays = dict(z)
    arrays["labels"][:, 11] = 0
    np.savez(run / "val_scores.npz", **arrays)
    refresh_manifest(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero or sklearn warnings leak out
        html = report.make_report(run).read_text()
    assert f"No held-out images carry <b>{COCO18.names[11]}</b>" in html
    _check_pngs(html, run / "report", [report.PLOT_FILES[k] for k in
                                        ("per_class_f1", "pr_curves", "f1_vs_threshold", "training_curves",
                                         "label_confusion")])


def test_run_of_an_older_format_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "cache.json").write_text("{}")  # what mlc 0.1 wrote, without a manifest
    with pytest.raises(MlcError, match="run format 1"):
        report.make_report(run)


def test_explicit_test_predictions_and_bad_labels(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, n=100, submission=True)
    other = tmp_path / "preds.csv"
    other.write_text("ImageID,Labels\n0.jpg,1 3\n\n1.jpg,18\n")
    d = report.load_report_data(run, test_predictions=other)  # the explicit file wins over submission.csv
    assert d.test_source == other and d.test_pred.shape == (2, 18)
    assert d.test_pred[0].nonzero()[0].tolist() == [0, 2] and d.test_pred[1].nonzero()[0].tolist() == [16]
    other.write_text("ImageID,Labels\n0.jpg,1 3\n1.jpg,12\n")
    with pytest.raises(DataError, match=r"preds\.csv:3: label '12'"):
        report.make_report(run, test_predictions=other)
    other.write_text("id,labels\n0.jpg,1\n")
    with pytest.raises(DataError, match="header"):
        report.make_report(run, test_predictions=other)
    with pytest.raises(MlcError, match="nowhere.csv"):
        report.make_report(run, test_predictions=tmp_path / "nowhere.csv")


def test_missing_val_scores_names_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, submission=False)
    (run / "val_scores.npz").unlink()
    with pytest.raises(MlcError, match="val_scores.npz: missing from the folder"):
        report.make_report(run)
    with pytest.raises(MlcError, match="no such run folder"):
        report.make_report(tmp_path / "absent")


def test_samples_f1_sweep_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    y = rng.random((60, 5)) < 0.3
    s = np.round(rng.random((60, 5)), 2)  # ties with the grid and between columns
    thr = rng.uniform(0.3, 0.8, 5)
    grid = np.linspace(0, 1, 21)
    got = samples_f1_sweep(y, s, thr, grid)
    for j in range(5):
        for g, t in enumerate(grid):
            tj = thr.copy()
            tj[j] = t
            assert got[j, g] == pytest.approx(samples_f1(y, apply_thresholds(s, tj)), abs=1e-12)
    cls = class_f1_sweep(y, s, grid)
    assert cls[0, 0] == pytest.approx(2 * y[:, 0].sum() / (y[:, 0].sum() + 60))


def test_pr_curve_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.2
    s = np.round(rng.random(300), 2)  # ties: one point per distinct score
    cuts = np.unique(s)[::-1]
    want_p = [1.0] + [(y & (s >= t)).sum() / (s >= t).sum() for t in cuts]
    want_r = [0.0] + [(y & (s >= t)).sum() / y.sum() for t in cuts]
    got_p, got_r = pr_curve(y, s)
    np.testing.assert_allclose(got_p, want_p)
    np.testing.assert_allclose(got_r, want_r)


def test_confusion_definition(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, n=200, submission=False)
    d = report.load_report_data(run)
    a = report.analyse(d)
    m = report.confusion_matrix(d, a)
    np.testing.assert_allclose(np.diag(m), a.recall)
    i, j = 2, 7  # car images where car is missed and truck is predicted though not true
    want = (d.y_true[:, i] & ~a.y_pred[:, i] & a.y_pred[:, j] & ~d.y_true[:, j]).sum() / d.y_true[:, i].sum()
    assert m[i, j] == pytest.approx(want)


def test_a_submission_with_word_labels_is_read_by_label_text(tmp_path):
    from pipeline.labels import LabelSpace
    from pipeline.report.data import read_predictions

    space = LabelSpace(("cat", "dog", "traffic_light"), ("Cat", "Dog", "Traffic Light"))
    sub = tmp_path / "submission.csv"
    sub.write_text("ImageID,Labels\na.jpg,dog traffic_light\nb.jpg,cat\n")
    np.testing.assert_array_equal(read_predictions(sub, space), [[False, True, True], [True, False, False]])
    sub.write_text("ImageID,Labels\na.jpg,dog\nb.jpg,cow\n")
    with pytest.raises(DataError, match=r"submission.csv:3: label 'cow' is not one of the run's label ids"):
        read_predictions(sub, space)
