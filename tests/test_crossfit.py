"""``mlc crossfit`` with a tiny random text encoder: no row is encoded by a model that trained on it, and its
caches fuse with frozen ones in fit-head and submit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data_dir

from pipeline.cache import CacheReader, CacheWriter
from pipeline.crossfit import CrossfitConfig, crossfit, crossfit_features
from pipeline.data import DataDir
from pipeline.encoders import create_text_encoder
from pipeline.errors import MismatchError, MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.features import Recipe
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.submit import SubmitConfig, submit

TINY = dict(text_encoder="tiny-bert", random_init=True, epochs=1, batch_size=4, lr=1e-2, encoder_lr=1e-3)


def test_no_row_is_encoded_by_a_model_that_trained_on_it(tmp_path):
    data = DataDir.open(make_data_dir(tmp_path / "tiny", n_train=30, n_test=2))
    recs = data.records("train")
    y = data.label_space().multi_hot([r.labels for r in recs])
    cfg = CrossfitConfig.build(data_dir=data.root, folds=3, **TINY)
    oof, (extra,), folds, hashes = crossfit_features(
        cfg, lambda: create_text_encoder("tiny-bert", random_init=True, seed=0), [r.caption for r in recs], y,
        [["a dog", "a car"]], torch.device("cpu"), lambda msg: None)
    everyone = set(range(len(recs)))
    encoded = np.concatenate([f.encoded for f in folds])
    assert sorted(encoded.tolist()) == sorted(everyone)  # each row encoded exactly once
    for f in folds:
        assert f.trained and not f.trained & set(f.encoded.tolist())
        assert f.trained == everyone - set(f.encoded.tolist())  # trained on all the others (one uniform epoch)
    assert len(set(hashes)) == 3  # three models, each moved away from the shared start
    # the pooled embedding by default (tiny-bert: 32 dimensions)
    assert oof.shape == (30, 32) and extra.shape == (2, 32) and np.isfinite(oof).all() and np.abs(oof).sum(1).min() > 0


def test_crossfit_caches_fuse_with_frozen_ones_and_submit(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=24, n_test=4)
    cache = tmp_path / "cache"
    cf_train, cf_test = crossfit(CrossfitConfig.build(data_dir=data, folds=2, cache_dir=cache, **TINY))
    assert "crossfit-k2" in cf_train.name and cf_test.name.startswith("test__")
    with CacheReader(cf_train) as r:
        assert r.meta.image_dim == 0 and r.meta.text_dim == 32 and r.labels().shape == (24, 3)
    (frozen,) = extract(ExtractConfig.build(data_dir=data, cache_dir=cache, splits=("train",),
                                            image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True,
                                            workers=0, backend="torch"))
    out = tmp_path / "run"
    fit_head(FitHeadConfig.build(caches=(frozen, cf_train), out=out, epochs=2, folds=2), quiet=True)
    path, _ = submit(SubmitConfig.build(run=out, data_dir=data, cache_dir=cache, workers=0, backend="torch"))
    assert len(path.read_text().splitlines()) == 5
    # the same cross-fit again: nothing to do; other options over the same caches: refused
    stamp = cf_train.stat().st_mtime_ns
    again = crossfit(CrossfitConfig.build(data_dir=data, folds=2, cache_dir=cache, **TINY))
    assert again[0].stat().st_mtime_ns == stamp
    cf_test.unlink()
    with pytest.raises(MlcError, match="crossfit"):
        submit(SubmitConfig.build(run=out, data_dir=data, cache_dir=cache, workers=0, backend="torch"))


def test_crossfit_features_have_no_encoders_to_predict_with():
    with pytest.raises(MlcError, match="not kept"):
        Recipe(image_encoder="none", text_encoder="tiny-bert", crossfit="k5-abc").encoders()


def _rewrite(path, **changes) -> None:
    """The cache at ``path`` written again with meta fields changed (flat names), as another writer left it."""
    with CacheReader(path) as r:
        meta, ids, text = r.meta.replace(**changes), r.image_ids, r.array("text")
        labels = r.labels() if meta.split == "train" else None
    writer = CacheWriter(path, meta, ids, labels, chunk_rows=len(ids))
    writer.commit(0, {"text": text})
    writer.finalize()


def test_another_crossfit_over_the_same_caches_is_refused_by_extracts_policy(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=12, n_test=2)
    cfg = CrossfitConfig.build(data_dir=data, folds=2, cache_dir=tmp_path / "c", **TINY)
    train, test = crossfit(cfg)
    other = CrossfitConfig.build(data_dir=data, folds=2, cache_dir=tmp_path / "c", **{**TINY, "lr": 5e-3})
    assert other.recipe(DataDir.open(data)).crossfit != cfg.recipe(DataDir.open(data)).crossfit  # another name
    _rewrite(test, text_weights="someone else's tower", text_weights_hash="0" * 64)  # same name, other features
    with pytest.raises(MismatchError, match=r"different features \(text_weights: .*text_weights_hash: .*--overwrite"):
        crossfit(cfg)
    assert crossfit(cfg.replace(overwrite=True))[1] == test
    assert CacheReader(test).meta.text_weights_hash != "0" * 64


def test_caches_of_the_same_crossfit_written_before_its_identity_was_known_are_reused(tmp_path):
    """Before issue 27 a cross-fit cache's text hash was the fold models' digest (known only after training): such a
    cache of this very cross-fit is current, not another one; a new cross-fit's hash is known up front."""
    data = make_data_dir(tmp_path / "tiny", n_train=12, n_test=2)
    cfg = CrossfitConfig.build(data_dir=data, folds=2, cache_dir=tmp_path / "c", **TINY)
    train, test = crossfit(cfg)
    meta = CacheReader(train).meta
    assert meta.extra["crossfit"]["fold_weights_hash"] != meta.text_weights_hash  # the folds' own, recorded
    for path in (train, test):
        _rewrite(path, text_weights_hash=meta.extra["crossfit"]["fold_weights_hash"])
    stamps = [p.stat().st_mtime_ns for p in (train, test)]
    assert crossfit(cfg) == [train, test] and [p.stat().st_mtime_ns for p in (train, test)] == stamps
    test.unlink()  # the pair is made again together: the old train cache is this cross-fit's, replaced
    crossfit(cfg)
    assert CacheReader(train).meta.text_weights_hash == CacheReader(test).meta.text_weights_hash == \
        meta.text_weights_hash


def test_a_crossfit_of_data_that_changed_is_refused_then_rebuilt_with_overwrite(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=12, n_test=2)
    cfg = CrossfitConfig.build(data_dir=data, folds=2, cache_dir=tmp_path / "c", **TINY)
    train, _ = crossfit(cfg)
    before = CacheReader(train).meta.data_fingerprint
    csv = data / "train.csv"
    csv.write_text(csv.read_text().replace("in the street", "on the road", 1))
    with pytest.raises(MismatchError, match="holds different features \\(data_fingerprint"):
        crossfit(cfg)
    train, _ = crossfit(CrossfitConfig.build(data_dir=data, folds=2, cache_dir=tmp_path / "c", overwrite=True, **TINY))
    assert CacheReader(train).meta.data_fingerprint != before
    assert crossfit(cfg)[0] == train  # now up to date: reused


def test_logits_output_holds_the_label_scores(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=12, n_test=2)
    train, test = crossfit(CrossfitConfig.build(data_dir=data, folds=2, cache_dir=tmp_path / "c",
                                                text_features="logits", **TINY))
    with CacheReader(train) as a, CacheReader(test) as b:
        assert a.meta.text_dim == 3 and a.array("text").shape == (12, 3) and b.array("text").shape == (2, 3)
