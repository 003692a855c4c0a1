"""``mlc run --quality best --pseudo-label``: the confidence rule, the fold-safe teacher (fold k's pseudo-labels come
from round one's fold-k heads only, weighed without fold k's held-out rows), pseudo rows only ever on a fold's
training side, and the option round-tripping through a run folder (recorded, reused, exported)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_data_dir
from typer.testing import CliRunner

from pipeline.best import Member, fit_members, students
from pipeline.cache import CacheReader
from pipeline.cli import app
from pipeline.errors import MlcError
from pipeline.fit_head import Features, FitHeadConfig, head_task, sized
from pipeline.heads import predict_proba
from pipeline.leaderboard import read_row
from pipeline.predictor import load
from pipeline.pseudo import PseudoRows, Teacher, Unlabelled, confident, fold_teacher
from pipeline.runs import RunDir
from pipeline.splits import kfold


def test_a_row_is_kept_when_every_label_is_confident_and_one_is_present():
    p = np.array([[0.95, 0.02, 0.01],   # kept: one sure label, the rest sure absent
                  [0.95, 0.50, 0.01],   # one unsure label: dropped whole
                  [0.05, 0.02, 0.01],   # sure of nothing present: dropped
                  [0.91, 0.93, 0.09]])  # kept, two labels
    keep, targets = confident(p, 0.9)
    assert keep.tolist() == [0, 3]
    np.testing.assert_array_equal(targets, [[1, 0, 0], [1, 1, 0]])
    assert confident(p, 0.96)[0].tolist() == []
    with pytest.raises(MlcError, match="confidence"):
        confident(p, 0.4)


def test_fold_k_is_taught_by_the_fold_k_heads_weighed_without_fold_ks_rows():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 3)) < 0.4).astype(np.float64)
    parts = kfold(y, 3, 0)
    oof = [np.clip(y + rng.normal(0, s, y.shape), 0.01, 0.99) for s in (0.2, 0.4)]
    # each member's fold heads say something different on the unlabelled rows
    fold_proba = [[np.full((5, 3), 0.1 * (k + 1) + 0.05 * m) for k in range(3)] for m in range(2)]
    out = fold_teacher(oof, y, parts, fold_proba)
    for k in range(3):
        lo, hi = min(fold_proba[0][k][0, 0], fold_proba[1][k][0, 0]), max(fold_proba[0][k][0, 0],
                                                                        fold_proba[1][k][0, 0])
        assert lo - 1e-12 <= out[k][0, 0] <= hi + 1e-12  # a blend of the fold-k heads, not of all of them
    averaged = np.mean([np.mean(f, 0) for f in fold_proba], 0)
    assert not np.allclose(out[0], averaged)
    # fold k's held-out rows do not weigh its teacher: flipping their labels changes nothing in fold k's targets
    flipped = y.copy()
    flipped[parts[1][1]] = 1 - flipped[parts[1][1]]
    again = fold_teacher(oof, flipped, parts, fold_proba)
    np.testing.assert_array_equal(again[1], out[1])


def _feats(n: int = 20, u: int = 6) -> tuple[Features, PseudoRows]:
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(n, 4, generator=g) < 0.4).numpy().astype(np.float32)
    feats = Features([f"{i}.jpg" for i in range(n)], torch.randn(n, 1, 5, generator=g), torch.randn(n, 3, generator=g),
                     labels)
    rows = Unlabelled([f"u{i}" for i in range(u)], torch.randn(u, 1, 5, generator=g), torch.randn(u, 3, generator=g))
    keep = [np.array([0, 2, 5]), np.array([1])]
    targets = [np.ones((3, 4), np.float32), np.zeros((1, 4), np.float32)]
    return feats, PseudoRows(rows, keep, targets)


def test_pseudo_rows_join_the_fold_training_side_with_that_folds_targets_and_are_never_held_out():
    feats, pseudo = _feats()
    cfg = sized(FitHeadConfig.build(caches=("x.h5",), folds=2, epochs=1, batch_size=64), len(feats.ids))
    tr, va = np.arange(0, 10), np.arange(10, 20)
    task = head_task(cfg, feats, tr, va, (pseudo, 0))
    assert sorted(task.train_rows.tolist()) == [*range(10), 20, 21, 22]  # the labelled rows, then fold 0's three
    np.testing.assert_array_equal(task.y[20:], pseudo.targets[0])
    (batch,) = list(task.batches(1))
    assert len(batch["labels"]) == 13 and float(batch["labels"][-3:].sum()) == 12  # fold 0's all-ones targets
    rows, scores = task.predict(task.model)
    assert rows.tolist() == va.tolist() and scores.shape == (10, 4)
    other = head_task(cfg, feats, tr, va, (pseudo, 1))
    assert sorted(other.train_rows.tolist()) == [*range(10), 20] and float(other.y[20:].sum()) == 0


@pytest.fixture
def round_one(fitted):
    """Two members fitted on rows 0-19 of the tiny cache (2 folds); rows 20-29 are the unlabelled ones."""
    cache, out = fitted["cache"], fitted["tmp"] / "best"
    (out / "members").mkdir(parents=True)
    members = [Member("concat-a", (0,)), Member("sum-a", (0,), "sum")]
    done = fit_members(members, [cache], out, folds=2, rows=np.arange(20), say=lambda s: None, epochs=3)
    hidden = np.arange(20, 30)
    return {"cache": cache, "out": out, "members": done, "hidden": hidden,
            "unlabelled": lambda idx: Unlabelled.load([cache], hidden)}


def test_round_two_learns_from_each_folds_heads_holds_out_only_labelled_rows_and_is_reused(round_one):
    cache, out, members = round_one["cache"], round_one["out"], round_one["members"]
    teach = Teacher.of(members, out, 2, round_one["unlabelled"], 0.51, ["rows 20-29"])
    feats = Features.load([CacheReader(cache)]).subset(np.arange(20))
    ids, probs = teach.fold_targets(0, feats.ids, feats.labels)
    rows = round_one["unlabelled"]((0,))
    # fold k's teacher is a blend of the members' fold-k heads: never outside them, unlike the averaged heads
    fold_heads = [[predict_proba(h, rows.image, rows.text).numpy() for h in RunDir(out / "members" / m.name)
                   .load().heads] for m in members]
    for k in range(2):
        lo = np.minimum(fold_heads[0][k], fold_heads[1][k]) - 1e-6
        hi = np.maximum(fold_heads[0][k], fold_heads[1][k]) + 1e-6
        assert ((probs[k] >= lo) & (probs[k] <= hi)).all()
    assert not np.allclose(probs[0], probs[1])
    said: list[str] = []
    two = fit_members(students(members), [cache], out, folds=2, rows=np.arange(20), teacher=teach,
                      say=said.append, epochs=3)
    for m, s in zip(members, two, strict=True):
        first, second = RunDir(out / "members" / m.name).held_out(), RunDir(out / "members" / s.name).held_out()
        assert second.ids == first.ids and not set(second.ids) & set(ids)  # the same labelled rows held out
        info = RunDir(out / "members" / s.name).read_json("pseudo.json")
        assert info["teachers"] == [m.name for m in members] and info["confidence"] == 0.51
        assert info["rows_kept"] == [len(confident(p, 0.51)[0]) for p in probs]
    said.clear()
    fit_members(students(members), [cache], out, folds=2, rows=np.arange(20), teacher=teach, say=said.append,
                epochs=3)
    assert sum("not refitted" in s for s in said) == 2
    # another confidence: other pseudo-labels, so round two is refitted
    other = Teacher.of(members, out, 2, round_one["unlabelled"], 0.6, ["rows 20-29"])
    said.clear()
    fit_members(students(members), [cache], out, folds=2, rows=np.arange(20), teacher=other, say=said.append,
                epochs=3)
    assert not any("not refitted" in s for s in said)
    # a teacher whose recorded folds are not its seed's (here: called seed 1) is refused, not trusted
    wrong = Teacher.of([Member(m.name, m.caches, m.head, seed=1) for m in members], out, 2, round_one["unlabelled"],
                       0.51, [])
    with pytest.raises(MlcError, match="its folds are not those"):
        wrong.fold_targets(1, feats.ids, feats.labels)


@pytest.mark.slow  # an mlc run of 2 x 4 members, its rerun and an export: ~70 s on the loaded machine
def test_mlc_run_pseudo_label_is_recorded_reused_and_exported(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=8)
    out, cache = tmp_path / "runs" / "best", tmp_path / "cache"
    args = ["run", str(data), "--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init",
            "--workers", "0", "--backend", "torch", "--folds", "2", "--quality", "best", "--no-attention",
            "--extra-image-encoder", "none", "--pseudo-label", "--pseudo-confidence", "0.51", "--out", str(out),
            "--cache-dir", str(cache)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    info = json.loads((out / "ensemble.json").read_text())
    assert set(info["rounds"]) == {"round one", "round two"} and info["pseudo"]["confidence"] == 0.51
    assert sorted(info["pseudo"]["members"]) == ["concat-a-pl", "concat-a-s1-pl", "gated-a-pl", "sum-a-pl"]
    assert all(p["unlabelled_rows"] == 8 for p in info["pseudo"]["members"].values())
    assert len(info["member_samples_f1"]) == 8
    assert json.loads((out / "config.json").read_text())["pseudo_label"] is True
    assert read_row(out).fault is None  # `mlc runs` reads it like any best run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("not refitted") == 8 and "blend up to date" in again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    exported = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", str(out), "--out", str(exported)])
    assert res.exit_code == 0, res.output
    photos = sorted((data / "data").glob("*.jpg"))[:6]
    captions = [f"caption {i}" for i in range(len(photos))]
    assert load(out, backend="torch").predict(photos, captions) == load(exported).predict(photos, captions)


def test_pseudo_label_is_part_of_quality_best(tmp_path):
    res = CliRunner().invoke(app, ["run", str(tmp_path), "--pseudo-label"])
    assert res.exit_code == 2 and "--pseudo-label is part of --quality best" in res.output, res.output
