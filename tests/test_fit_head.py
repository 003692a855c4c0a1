"""Stage 2 over a synthetic cache: it learns, thresholds are honest, run folders describe themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import evaluation as ev
from pipeline.cache import CacheMeta, CacheReader, CacheWriter
from pipeline.cli import app
from pipeline.decision import RULES
from pipeline.errors import MismatchError, MlcError
from pipeline.evaluation import evaluate
from pipeline.fit_head import FitHeadConfig, fit_grid, fit_head
from pipeline.labels import COCO18
from pipeline.metrics import samples_f1
from pipeline.predictor import Predictor
from pipeline.runs import RunDir
from pipeline.training import TrainOptions, sized_training


def synthetic_cache(path, n=600, views=2, seed=0, split="train", signal=1.0, **meta_kw):
    """Features that carry the labels: image and text each see a noisy half of the signal (none at signal 0)."""
    rng = np.random.default_rng(seed)
    c = len(COCO18)
    freq = np.linspace(0.5, 0.03, c)
    y = (rng.random((n, c)) < freq).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    w_img, w_txt = signal * rng.normal(size=(c, 32)), signal * rng.normal(size=(c, 16))
    img = (y @ w_img)[:, None, :] + rng.normal(scale=1.5, size=(n, views, 32))
    txt = y @ w_txt + rng.normal(scale=1.5, size=(n, 16))
    meta = dict(
        split=split, image_encoder="tiny-resnet", text_encoder="tiny-bert", image_weights="random-init",
        image_weights_hash="a" * 64, text_weights="random-init", text_weights_hash="b" * 64, random_init=True,
        image_preprocess={"crop": 64}, text_preprocess={"max_length": 32}, views=views, image_dim=32, text_dim=16,
        label_ids=COCO18.ids, label_names=COCO18.names, data_fingerprint="f" * 64, num_records=n,
        extra={"recipe": {"image_encoder": "tiny-resnet", "text_encoder": "tiny-bert"}},
    )
    meta = CacheMeta.from_dict({**meta, **meta_kw})
    w = CacheWriter(path, meta, [f"{i}.jpg" for i in range(n)], y if split == "train" else None, chunk_rows=n)
    w.commit(0, {"image": img.astype(np.float16), "text": txt.astype(np.float16)})
    return w.finalize()


@pytest.fixture
def cache(tmp_path):
    return synthetic_cache(tmp_path / "train.h5")


def test_fit_head_learns_and_writes_a_complete_run(cache, tmp_path):
    out = tmp_path / "run"
    m = fit_head(FitHeadConfig.build(caches=cache, out=out, epochs=15, folds=0), quiet=True)
    y = CacheReader(cache).labels()
    chance = samples_f1(y, np.tile(y.mean(0) > 0.25, (len(y), 1)).astype(np.uint8))
    assert m["samples_f1"] > chance + 0.15
    for name in ("manifest.json", "config.json", "features.json", "head.json", "head-0.safetensors",
                 "thresholds.json", "metrics.json", "history.json", "val_scores.npz", "train.log"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "head" and cfg["fusion"]["head"] == "concat" and cfg["train"]["epochs"] == 15  # nested
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 2 and "head-0.safetensors" in manifest["files"]
    run = RunDir(out).load()
    assert len(run.thresholds) == len(COCO18) and run.labels == COCO18
    model = Predictor.of_run(run)
    with CacheReader(cache) as r:
        scores = model.from_features(r.array("image"), r.array("text"))
    assert scores.shape == (600, len(COCO18)) and model.decide(scores).sum(1).min() >= 1
    # The stored held-out scores are what the saved head computes (no train/eval drift).
    val = np.load(out / "val_scores.npz")
    rows = [int(i.split(".")[0]) for i in val["image_ids"]]
    np.testing.assert_allclose(scores[rows], val["scores"], atol=1e-5)


def test_thresholds_are_never_tuned_on_the_rows_they_are_scored_on():
    """Scores that know nothing of the labels: thresholds tuned on the rows they score flatter them (in-sample),
    cross-fitted ones cannot. Scores that know the labels: cross-fitting loses nothing."""
    rng = np.random.default_rng(1)
    y = (rng.random((200, 18)) < 0.2).astype(np.float32)
    noise = rng.random((200, 18)).astype(np.float32)
    in_sample = samples_f1(y, ev.apply_thresholds(noise, ev.fit_thresholds(y, noise, "per-class")))
    crossed = ev.cross_fitted_f1(y, noise, "per-class", seed=0)
    assert crossed < in_sample - 0.03, (crossed, in_sample)
    perfect = np.clip(y * 0.6 + rng.random((200, 18)) * 0.3, 0, 1).astype(np.float32)
    assert ev.cross_fitted_f1(y, perfect, "per-class", seed=0) == pytest.approx(1.0)


def test_each_head_and_loss_beats_chance(cache, tmp_path):
    y = CacheReader(cache).labels()
    chance = samples_f1(y, np.tile(y.mean(0) > 0.25, (len(y), 1)).astype(np.uint8))
    for head, loss in (("sum", "bce"), ("gated", "asl"), ("image", "soft-margin"), ("text", "bce")):
        m = fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / head, head=head, loss=loss, epochs=10, folds=0,
                                         sampler="weighted", pos_weight=loss == "bce"), quiet=True)
        assert m["samples_f1"] > chance + 0.05, (head, loss, m["samples_f1"])


def test_folds_and_grid(cache, tmp_path):
    m = fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / "k", folds=3, epochs=5), quiet=True)
    assert len(list((tmp_path / "k").glob("head-*.safetensors"))) == 3
    assert m["held_out_rows"] == 600  # out-of-fold predictions for every row
    board, best = fit_grid(FitHeadConfig.build(caches=cache, out=tmp_path / "g", epochs=4, folds=0),
                           grid={"head": ("concat", "sum"), "lr": (1e-3, 1e-4)}, quiet=True)
    assert len(board) == 4 and board == sorted(board, key=lambda r: -r["samples_f1"])
    assert json.loads((tmp_path / "g" / "config.json").read_text())["fusion"]["head"] == board[0]["head"]
    assert best["decision"]["candidates"][board[0]["rule"]] == pytest.approx(board[0]["samples_f1"], abs=1e-9)
    saved = json.loads((tmp_path / "g" / "grid.json").read_text())
    assert saved["board"] == board and saved["selected_score"] == best["grid_selected_score"]
    assert 0 < best["grid_selected_score"] <= 1  # the choice scored on rows it did not see


def test_run_refuses_a_cache_from_other_encoders_or_labels(cache, tmp_path):
    fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / "run", epochs=2, folds=2), quiet=True)
    run = RunDir(tmp_path / "run").load()
    other = CacheReader(synthetic_cache(tmp_path / "o.h5", text_weights_hash="c" * 64)).meta
    with pytest.raises(MismatchError, match="text_weights_hash"):
        run.check_caches([other], ["o.h5"])
    labels = list(COCO18.ids[:-1]) + [20]
    other = CacheReader(synthetic_cache(tmp_path / "l.h5", label_ids=tuple(labels))).meta
    with pytest.raises(MismatchError, match="label_ids"):
        run.check_caches([other], ["l.h5"])


def test_bad_options_and_inputs(cache, tmp_path):
    with pytest.raises(MlcError, match="--head"):
        FitHeadConfig.build(caches=cache, head="nope")
    with pytest.raises(MlcError, match="--folds"):
        FitHeadConfig.build(caches=cache, folds=1)
    test_cache = synthetic_cache(tmp_path / "test.h5", split="test")
    with pytest.raises(MlcError, match="labelled"):
        fit_head(FitHeadConfig.build(caches=test_cache, out=tmp_path / "x"))
    res = CliRunner().invoke(app, ["fit-head", str(tmp_path / "missing.h5")])
    assert res.exit_code == 2 and "missing.h5" in res.output
    assert not (tmp_path / "x").exists()


def test_cli_fit_head(cache, tmp_path):
    res = CliRunner().invoke(app, ["fit-head", str(cache), "--out", str(tmp_path / "r"), "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert "validation samples-F1" in res.output


def test_a_100_row_dataset_gets_enough_steps(tmp_path):
    """At batch 256 a 100-row dataset's fold was one step an epoch; now every head is sized to its rows."""
    opts = FitHeadConfig.build(caches=("x.h5",)).train
    assert (opts.batch_size, opts.epochs, opts.patience) == (None, None, None)  # fit-head: from the row count
    s = sized_training(80, opts)  # 5 folds of 100 rows: 80 train a fold
    steps = -(-80 // s["batch_size"])
    assert s["batch_size"] <= 16 and steps >= 5 and steps * s["epochs"] >= 1000 and s["patience"] >= 10
    assert sized_training(8000, opts)["batch_size"] == 250  # 10,000 rows: about the measured 256
    assert sized_training(80, TrainOptions(batch_size=64, epochs=3, patience=0)) == \
        {"batch_size": 64, "epochs": 3, "patience": 0}  # what is given is kept
    cache = synthetic_cache(tmp_path / "c.h5", n=100)
    fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / "r", epochs=2, folds=5), quiet=True)
    train = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert train["batch_size"] == 16 and train["patience"] == 4  # the final config says what was used


def test_the_chosen_rule_is_the_best_candidate_and_is_what_predicts(cache, tmp_path):
    m = fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / "r", epochs=3, folds=3), quiet=True)
    cand = m["decision"]["candidates"]
    assert set(cand) == set(RULES) and m["threshold_mode"] == max(cand, key=cand.get)
    run = RunDir(tmp_path / "r").load()
    assert run.decision.rule == m["threshold_mode"]
    held = run.dir.held_out()
    assert (Predictor.of_run(run).decide(held.scores) == run.decision.apply(held.scores)).all()
    forced = fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / "f", epochs=3, folds=3, decision="fixed"),
                      quiet=True)
    assert forced["threshold_mode"] == "fixed" and forced["decision"]["forced"]
    assert forced["samples_f1"] == forced["decision"]["candidates"]["fixed"]


def test_a_model_that_loses_to_the_constant_answer_is_reported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.zeros((120, 5), np.uint8)
    y[:, 0] = 1  # every image has label 0; one other label at random
    y[np.arange(120), rng.integers(1, 5, 120)] = 1
    m, _ = evaluate(y, rng.random((120, 5)), "auto", 0)  # a model that knows nothing
    base = m["baselines"]
    assert base["constant"] > m["samples_f1"] - 0.01 and not base["beaten"] and "constant" in base["verdict"]
    good, _ = evaluate(y, np.clip(y * 0.8 + rng.random((120, 5)) * 0.3, 0, 1), "auto", 0)
    assert good["baselines"]["beaten"] and good["baselines"]["verdict"] is None
    # and fit-head prints it: labels the features do not carry
    cache = synthetic_cache(tmp_path / "c.h5", n=120, signal=0.0)
    fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / "r", epochs=2, folds=3))
    err = capsys.readouterr().err
    assert "warning: the model" in err and "does not clearly beat" in err
    assert "does not clearly beat" in (tmp_path / "r" / "train.log").read_text()
    assert not json.loads((tmp_path / "r" / "metrics.json").read_text())["baselines"]["beaten"]
