"""``mlc run --quality best``: blending out-of-fold probabilities (pure), the blend head, and the whole job on tiny
data (a rerun reuses every member and the blend, the time limit is honoured, the export predicts as the run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_data_dir
from typer.testing import CliRunner

from pipeline.best import blend, fit_members, plan
from pipeline.cli import app
from pipeline.ensemble import choose, cross_fitted_blend, greedy_weights, log_loss, mix
from pipeline.head_blend import BlendHead
from pipeline.heads import create_head
from pipeline.leaderboard import find_runs, read_row
from pipeline.predictor import load
from pipeline.runs import RunDir
from pipeline.splits import kfold

ARGS = ["--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init", "--workers", "0",
        "--backend", "torch", "--folds", "2", "--quality", "best"]


def _members(rng: np.random.Generator, n: int = 300, c: int = 6, m: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    """Labels and m noisy members of different quality (one much better than the rest)."""
    y = (rng.random((n, c)) < 0.3).astype(np.float64)
    probs = []
    for k in range(m):
        noise = 0.6 + 0.5 * k if k else 0.4
        probs.append(1 / (1 + np.exp(-((2 * y - 1) * 1.5 + rng.normal(0, noise, (n, c))))))
    return probs, y


@pytest.mark.parametrize("seed", range(6))
def test_a_blend_is_never_worse_than_its_best_member_on_the_cross_fitted_rows(seed):
    probs, y = _members(np.random.default_rng(seed))
    if seed % 2:  # a useless member too: the blend must not be dragged below the best member
        probs.append(np.random.default_rng(seed).random(y.shape))
    chosen = choose(probs, y, "auto" if seed % 3 == 0 else "per-class", seed)  # auto: each its best rule
    assert chosen.metrics["samples_f1"] >= max(chosen.member_f1) - 1e-12
    assert chosen.weights.min() >= 0 and chosen.weights.sum() == pytest.approx(1.0)
    if not chosen.blended:
        assert chosen.weights[int(np.argmax(chosen.member_f1))] == 1.0


def test_greedy_weights_lower_the_log_loss_and_the_cross_fitted_blend_never_sees_its_rows():
    rng = np.random.default_rng(7)
    y = (rng.random((300, 6)) < 0.3).astype(np.float64)
    probs = [1 / (1 + np.exp(-((2 * y - 1) * 1.5 + rng.normal(0, s, y.shape)))) for s in (0.9, 1.0, 1.1)]
    w = greedy_weights(probs, y)
    assert (w > 0).sum() >= 2  # independent errors: blending pays
    assert log_loss(y, mix(probs, w)) < min(log_loss(y, p) for p in probs)
    parts = kfold(y, 3, 0)
    crossed = cross_fitted_blend(probs, y, parts=parts)
    # a fold's blended rows come from weights fitted on the other folds: changing that fold's labels changes nothing
    held = parts[0][1]
    flipped = y.copy()
    flipped[held] = 1 - flipped[held]
    again = cross_fitted_blend(probs, flipped, parts=parts)
    np.testing.assert_array_equal(again[held], crossed[held])
    assert not np.array_equal(again, crossed)  # ... while the other folds' rows see other weights


def test_the_blend_head_is_the_weighted_mean_of_its_members_fold_heads_over_their_columns():
    torch.manual_seed(0)
    a = create_head("concat", image_dim=3, text_dim=2, num_classes=4, hidden=5)
    b = [create_head("gated", image_dim=4, text_dim=2, num_classes=4, hidden=5) for _ in range(2)]
    members = [{"name": "a", "head": a.config(), "folds": 1, "weight": 0.25, "image_ranges": [[0, 3]],
                "text_ranges": [[0, 2]]},
               {"name": "b", "head": b[0].config(), "folds": 2, "weight": 0.75, "image_ranges": [[3, 7]],
                "text_ranges": [[0, 2]]}]
    blend = BlendHead(image_dim=7, text_dim=2, num_classes=4, members=members)
    blend.members[0][0].load_state_dict(a.state_dict())
    for slot, head in zip(blend.members[1], b, strict=True):
        slot.load_state_dict(head.state_dict())
    blend.eval(), a.eval(), [h.eval() for h in b]
    img, txt = torch.randn(8, 7), torch.randn(8, 2)
    want = 0.25 * torch.sigmoid(a(img[:, :3], txt)) + 0.75 * (
        torch.sigmoid(b[0](img[:, 3:], txt)) + torch.sigmoid(b[1](img[:, 3:], txt))) / 2
    assert torch.allclose(torch.sigmoid(blend(img, txt)), want, atol=1e-5)
    rebuilt = create_head(**blend.config())  # head.json rebuilds it; the index buffers are not weights
    assert set(rebuilt.state_dict()) == set(blend.state_dict())
    assert not any("idx" in k or "_weights" in k for k in blend.state_dict())
    with pytest.raises(ValueError, match="ranges"):
        BlendHead(image_dim=7, text_dim=2, num_classes=4, members=[dict(members[0], image_ranges=[[0, 2]])])


def test_fit_head_refuses_the_blend_head():
    res = CliRunner().invoke(app, ["fit-head", "x.h5", "--head", "blend"])
    assert res.exit_code == 2 and "mlc run --quality" in res.output, res.output


@pytest.mark.slow  # a whole mlc run of 4 members, then an export: ~30 s alone
def test_mlc_run_quality_best_blends_reuses_everything_and_exports_what_it_predicts(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    out, cache = tmp_path / "runs" / "best", tmp_path / "cache"
    args = ["run", str(data), *ARGS, "--out", str(out), "--cache-dir", str(cache)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    run = RunDir(out)
    run.verify()
    info = json.loads((out / "ensemble.json").read_text())
    members = sorted(p.name for p in (out / "members").iterdir() if not p.name.startswith("."))
    # one image encoder: 4 pooled members and the attention member over its token maps
    assert members == sorted(info["member_samples_f1"]) and len(members) == 5 and "attention-a" in members
    assert info["samples_f1"] >= max(info["member_samples_f1"].values()) - 1e-12
    assert [h.name for h in run.load().heads] == ["blend"] and run.submission.is_file()
    row = read_row(out)  # `mlc runs`: one row, its members/ no damage (and no rows of their own)
    assert row.fault is None and row.head == "blend" and find_runs(out.parent) == [out], row.fault
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("*"), *cache.rglob("*.h5")] if p.is_file()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("not refitted") == 5 and "blend up to date" in again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten

    exported = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", str(out), "--out", str(exported)])
    assert res.exit_code == 0, res.output
    photos = sorted((data / "data").glob("*.jpg"))[:6]
    captions = [f"caption {i}" for i in range(len(photos))]
    model, onnx = load(out, backend="torch"), load(exported)
    assert model.predict(photos, captions) == onnx.predict(photos, captions)
    np.testing.assert_allclose(model.predict_proba(photos, captions), onnx.predict_proba(photos, captions),
                               atol=1e-4)


def test_members_and_blend_are_reused_and_the_time_limit_is_honoured(fitted):
    cache, out = fitted["cache"], fitted["tmp"] / "best"
    (out / "members").mkdir(parents=True)
    said: list[str] = []
    done = fit_members(plan(1), [cache], out, folds=2, time_limit=0.001, say=said.append, epochs=2)
    assert [m.name for m in done] == ["concat-a"] and any("time limit" in s and "stopping at 1 of 4" in s for s in said)
    info = blend(done, [cache], out, say=said.append)
    assert info["weights"] == {"concat-a": 1.0} and not info["blended"]
    # no limit: the other three, concat-a reused
    done = fit_members(plan(1), [cache], out, folds=2, say=said.append, epochs=2)
    assert len(done) == 4 and sum("up to date" in s for s in said) == 1
    info = blend(done, [cache], out, say=said.append)
    assert len(info["member_samples_f1"]) == 4 and info["samples_f1"] >= max(info["member_samples_f1"].values())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    said.clear()
    fit_members(plan(1), [cache], out, folds=2, say=said.append, epochs=2)
    blend(done, [cache], out, say=said.append)
    assert sum("not refitted" in s for s in said) == 4 and any("blend up to date" in s for s in said)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten


def test_a_blend_whose_members_are_damaged_is_refused_by_name(tmp_path):
    from pipeline.errors import MlcError
    from pipeline.runs import load_head

    cfg = create_head("concat", image_dim=3, text_dim=2, num_classes=4, hidden=5).config()
    blend = {"name": "blend", "image_dim": 3, "text_dim": 2, "num_classes": 4, "hidden": 1, "dropout": 0.0,
             "members": [{"name": "a", "head": cfg, "folds": 1, "weight": 1.0, "image_ranges": [[0, 3]]}]}
    with pytest.raises(MlcError, match="does not build a 'blend' head.*text_ranges"):
        load_head(tmp_path / "head-0.safetensors", blend)


def test_over_a_token_map_pooled_members_read_its_mean_and_attention_members_the_map():
    torch.manual_seed(0)
    c, positions = 8, 4
    att = create_head("attention", image_dim=positions * c, text_dim=2, num_classes=3, hidden=16, token_dim=c)
    pooled = create_head("concat", image_dim=c, text_dim=2, num_classes=3, hidden=5)
    members = [{"name": "t", "head": att.config(), "folds": 1, "weight": 0.4, "image_ranges": [[0, positions * c]],
                "text_ranges": [[0, 2]], "image_input": "features"},
               {"name": "a", "head": pooled.config(), "folds": 1, "weight": 0.6, "image_ranges": [[0, c]],
                "text_ranges": [[0, 2]], "image_input": "mean"}]
    blend = create_head("blend", image_dim=positions * c, text_dim=2, num_classes=3, token_dim=c, members=members)
    blend.members[0][0].load_state_dict(att.state_dict())
    blend.members[1][0].load_state_dict(pooled.state_dict())
    blend.eval(), att.eval(), pooled.eval()
    img, txt = torch.randn(5, positions * c), torch.randn(5, 2)
    want = 0.4 * torch.sigmoid(att(img, txt)) + 0.6 * torch.sigmoid(pooled(img.view(5, positions, c).mean(1), txt))
    assert torch.allclose(torch.sigmoid(blend(img, txt)), want, atol=1e-5)
    assert blend.tokens and not BlendHead(image_dim=c, text_dim=2, num_classes=3, members=[
        dict(members[1], image_input="features")]).tokens  # predict_proba's batches follow the input kind
    rebuilt = create_head(**blend.config())
    assert rebuilt.token_dim == c and set(rebuilt.state_dict()) == set(blend.state_dict())
    with pytest.raises(ValueError, match="image_input"):  # the mean of no token map
        BlendHead(image_dim=c, text_dim=2, num_classes=3, members=[members[1]])
    with pytest.raises(ValueError, match="ranges"):  # a pooled member's ranges index the map's mean (c wide)
        BlendHead(image_dim=positions * c, text_dim=2, num_classes=3, token_dim=c,
                  members=[dict(members[1], image_ranges=[[0, 2 * c]])])


@pytest.fixture(scope="module")
def three_caches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny data's train caches: pooled images + tiny-bert, the same images' token maps + tiny-bert, pooled images
    + tiny-bert-b (an extra text encoder)."""
    from pipeline.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("best3")
    data = make_data_dir(root / "tiny", n_train=30, n_test=4)
    common = {"data_dir": data, "cache_dir": root / "cache", "splits": ("train",), "image_encoder": "tiny-resnet",
              "random_init": True, "workers": 0, "backend": "torch"}
    caches = [extract(ExtractConfig.build(**common, text_encoder=text, image_pooling=pool))[0]
              for text, pool in (("tiny-bert", "avg"), ("tiny-bert", "tokens"), ("tiny-bert-b", "avg"))]
    return {"root": root, "data": data, "caches": caches}


def test_a_best_run_with_the_attention_member_and_an_extra_text_encoder_is_one_graph_over_the_token_map(
        three_caches, tmp_path):
    from pipeline.best import columns, union
    from pipeline.cache import read_meta

    caches, out = three_caches["caches"], tmp_path / "best"
    members = plan(1, tokens=1, texts=[2])
    assert [m.name for m in members][:3] == ["concat-a", "attention-a", "concat-am"]
    said: list[str] = []
    done = fit_members(members, caches, out, folds=2, say=said.append, epochs=2)
    assert len(done) == len(members)
    info = blend(done, caches, out, say=said.append)
    assert info["samples_f1"] >= max(info["member_samples_f1"].values()) - 1e-12  # never below its best member
    # the union over the three caches: the token map feeds the images, the pooled cache nothing (its images are
    # the map's mean, its captions the map cache's), the extra text cache its captions only
    metas = [read_meta(c) for c in caches]
    kept, parts = union(metas)
    assert kept == [metas[1], metas[2]] and [p.to_dict() for p in parts] == [
        {"image": True, "text": True}, {"image": False, "text": True}]
    fused = columns(kept, [metas[0], metas[2]], parts)  # concat-am: lite0's mean, both captions
    assert fused == {"image_input": "mean", "image_ranges": [[0, 128]], "text_ranges": [[0, 32], [32, 56]]}
    assert columns(kept, [metas[1]], parts)["image_input"] == "features"
    # a rerun refits nothing
    said.clear()
    fit_members(members, caches, out, folds=2, say=said.append, epochs=2)
    blend(done, caches, out, say=said.append)
    assert sum("not refitted" in s for s in said) == len(members) and any("blend up to date" in s for s in said)


@pytest.mark.slow  # two members, a forced blend over the token map, an ONNX export: ~20 s alone
def test_the_export_of_a_blend_over_a_token_map_predicts_as_its_run_folder(three_caches, tmp_path):
    from pipeline.best import _aligned, _write
    from pipeline.ensemble import Blend
    from pipeline.evaluation import evaluate

    caches, out = three_caches["caches"], tmp_path / "best"
    members = [m for m in plan(1, tokens=1) if m.name in ("concat-a", "attention-a")]
    fit_members(members, caches, out, folds=2, say=lambda s: None, epochs=2)
    runs = [RunDir(out / "members" / m.name) for m in members]
    ids, probs, y = _aligned(runs)
    weights = np.array([0.5, 0.5])  # both members, whatever the tiny data says: the token-map graph is exercised
    mixed = mix(probs, weights)
    metrics, th = evaluate(y.astype(np.float64), mixed, "per-class", 0)
    chosen = Blend(weights, mixed, metrics, th, [0.0, 0.0], float(metrics["samples_f1"]), True)
    _write(RunDir(out), members, runs, caches, chosen, ids, y, {"mode": "per-class", "blended": True})
    run = RunDir(out).load()
    assert [e.contract["image_encoder"] for e in run.entries] == ["tiny-resnet"] and run.heads[0].token_dim > 0
    exported = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", str(out), "--out", str(exported)])
    assert res.exit_code == 0, res.output
    photos = sorted((three_caches["data"] / "data").glob("*.jpg"))[:6]
    captions = [f"caption {i}" for i in range(len(photos))]
    model, onnx = load(out, backend="torch"), load(exported)
    np.testing.assert_allclose(model.predict_proba(photos, captions), onnx.predict_proba(photos, captions),
                               atol=1e-4)
    assert model.predict(photos, captions) == onnx.predict(photos, captions)


def test_a_second_image_encoder_beside_the_attention_member_is_refused_naming_the_way_out(tmp_path):
    args = ["run", str(tmp_path), "--quality", "best", "--extra-image-encoder", "efficientnet-lite2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--no-attention" in res.output, res.output


def test_an_extra_encoder_is_installed_by_its_specs_cheap_check(monkeypatch):
    """best asks a spec's ``present`` (MPNet: are the five parts installed?) instead of building 420 MB; a spec
    without one is built. The tiny text encoder has no pretrained weights, so only its check can say yes."""
    import dataclasses

    import tiny_encoders  # noqa: F401  # registers tiny-bert

    from pipeline.best_route import installed
    from pipeline.encoders import registry

    spec = registry.get_spec("text", "tiny-bert")
    assert not installed("tiny-bert") and not installed("no-such-encoder")  # built: no weights
    for answer in (True, False):
        monkeypatch.setitem(registry._SPECS["text"], "tiny-bert", dataclasses.replace(spec, present=lambda a=answer: a))
        assert installed("tiny-bert") is answer
