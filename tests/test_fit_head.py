"""Stage 2 over a synthetic cache: it learns, thresholds are honest, run folders describe themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import evaluation as ev
from pipeline.cache import CacheMeta, CacheReader, CacheWriter
from pipeline.cli import app
from pipeline.errors import MismatchError, MlcError
from pipeline.fit_head import FitHeadConfig, fit_grid, fit_head
from pipeline.labels import COCO18
from pipeline.metrics import samples_f1
from pipeline.predictor import Predictor
from pipeline.runs import RunDir


def synthetic_cache(path, n=600, views=2, seed=0, split="train", **meta_kw):
    """Features that carry the labels: image and text each see a noisy half of the signal."""
    rng = np.random.default_rng(seed)
    c = len(COCO18)
    freq = np.linspace(0.5, 0.03, c)
    y = (rng.random((n, c)) < freq).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    w_img, w_txt = rng.normal(size=(c, 32)), rng.normal(size=(c, 16))
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
    assert best["samples_f1"] == pytest.approx(board[0]["samples_f1"], abs=1e-9)


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
