"""``mlc submit`` end to end with tiny random encoders: a valid file every time, written atomically."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from conftest import refresh_manifest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import DataDir
from pipeline.errors import MismatchError, MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.submit import SubmitConfig, check_ids, submit

TINY = dict(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, workers=0, encode_batch=8,
            backend="torch")


@pytest.fixture
def run(data_dir, tmp_path):
    (train,) = extract(ExtractConfig.build(data_dir=data_dir, cache_dir=tmp_path / "cache", splits=("train",), **TINY))
    out = tmp_path / "run"
    fit_head(FitHeadConfig.build(caches=train, out=out, epochs=3, folds=0, val_fraction=0.3), quiet=True)
    return out


def read_submission(path: pathlib.Path) -> list[tuple[str, list[int]]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "ImageID,Labels"
    return [(i, [int(x) for x in labels.split(" ")]) for i, labels in (ln.split(",") for ln in lines[1:])]


def test_submission_has_every_test_id_once_with_valid_labels(run, data_dir, tmp_path):
    path, line = submit(SubmitConfig.build(run=run, data_dir=data_dir, cache_dir=tmp_path / "cache", workers=0,
                        backend="torch"))
    rows = read_submission(path)
    want = [r.image_id for r in DataDir.open(data_dir).records("test")]
    assert [i for i, _ in rows] == want and "36889.jpg" in want  # the unescaped-quote row is there
    allowed = set(json.loads((run / "thresholds.json").read_text())["label_ids"])
    for _, labels in rows:
        assert labels and labels == sorted(labels) and set(labels) <= allowed
    assert line.startswith(f"{len(want)} rows")


def test_interrupted_write_keeps_the_previous_file(run, data_dir, tmp_path, monkeypatch):
    target = tmp_path / "sub.csv"
    target.write_text("ImageID,Labels\nprevious,1\n")  # an earlier submission: the one a submit may replace
    real = pathlib.Path.write_text

    def crash(self, text, *a, **kw):
        real(self, text[: len(text) // 2], *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        submit(SubmitConfig.build(run=run, data_dir=data_dir, out=target, cache_dir=tmp_path / "cache", workers=0,
                        backend="torch"))
    monkeypatch.undo()
    assert target.read_text() == "ImageID,Labels\nprevious,1\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".sub.csv")] == []


def test_mismatched_run_and_cache_are_refused(run, data_dir, tmp_path):
    # The run's head was fitted on these exact encoders; doctor its contract to another text encoder.
    features_json = run / "features.json"
    record = json.loads(features_json.read_text())
    record[0]["contract"]["text_weights_hash"] = "0" * 64
    features_json.write_text(json.dumps(record))
    refresh_manifest(run)
    with pytest.raises(MismatchError, match="text_weights_hash"):
        submit(SubmitConfig.build(run=run, data_dir=data_dir, cache_dir=tmp_path / "cache", workers=0,
                        backend="torch"))
    assert not (run / "submission.csv").exists()
    res = CliRunner().invoke(app, ["submit", str(run), str(data_dir), "--cache-dir",
                                   str(tmp_path / "cache"), "--workers", "0", "--backend", "torch"])
    assert res.exit_code == 2 and "does not match" in res.output


def test_check_ids():
    check_ids(["a.jpg", "b.jpg"], ["a.jpg", "b.jpg"], "x")
    for got in (["a.jpg"], ["a.jpg", "a.jpg"], ["b.jpg", "a.jpg"], ["a.jpg", "b.jpg", "c.jpg"]):
        with pytest.raises(MlcError, match="test ids"):
            check_ids(["a.jpg", "b.jpg"], got, "x")


def test_not_a_run_folder(tmp_path, data_dir):
    res = CliRunner().invoke(app, ["submit", str(tmp_path), str(data_dir)])
    assert res.exit_code == 2 and "not an mlc run folder" in res.output


def test_report_cli_on_a_real_run(run, data_dir, tmp_path):
    submit(SubmitConfig.build(run=run, data_dir=data_dir, cache_dir=tmp_path / "cache", workers=0,
                              backend="torch"))
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    html = (run / "report" / "report.html").read_text()
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert len(pngs) == 6 and all(p in html for p in pngs)
    assert np.load(run / "val_scores.npz")["scores"].shape[1] == 3  # the labels the tiny data holds
