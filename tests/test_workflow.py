"""``mlc run``: the whole job on generated data writes the submission and the report; a rerun does no work."""

from __future__ import annotations

import pytest
from conftest import make_data_dir
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runs import RunDir

ARGS = ["--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init", "--workers", "0",
        "--backend", "torch", "--folds", "2"]


def test_mlc_run_end_to_end_then_a_rerun_does_no_work(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    out = tmp_path / "runs" / "demo"
    args = ["run", str(data), *ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"submission: {out / 'submission.csv'}" in first.output and "validation samples-F1" in first.output
    run = RunDir(out)
    run.verify()
    assert run.submission.is_file() and (run.report / "report.html").is_file()
    assert len(run.load().heads) == 2  # --folds 2
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("*"), *(tmp_path / "cache").rglob("*.h5")] if p.is_file()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "up to date" in again.output and "not refitted" in again.output and "wrote" not in again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten


def test_mlc_run_stops_on_a_faulty_data_folder(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=12, n_test=2)
    (data / "data" / "3.jpg").unlink()
    res = CliRunner().invoke(app, ["run", str(data), *ARGS, "--out", str(tmp_path / "r"), "--cache-dir",
                                   str(tmp_path / "c")])
    assert res.exit_code == 2 and "3.jpg" in res.output and "problem(s) in the data" in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_mlc_run_finetune_route_starts_from_a_one_split_head_and_submits_with_the_finetuned_encoders(
        tmp_path, monkeypatch):
    from pipeline import workflow

    # the tiny encoders' cuts (the real table lists the measured ones)
    monkeypatch.setitem(workflow.TRUNK_ROUTE, "tiny-resnet", {"image_cut": "layer3", "epochs": 1, "lr": 1e-3,
                                                                 "encoder_lr": 3e-4})
    monkeypatch.setitem(workflow.TEXT_CUTS, "tiny-bert", "layer1")
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    out = tmp_path / "runs" / "demo"
    res = CliRunner().invoke(app, ["run", str(data), *ARGS, "--out", str(out), "--cache-dir",
                                   str(tmp_path / "cache"), "--finetune"])
    assert res.exit_code == 0, res.output
    tuned = RunDir(tmp_path / "runs" / "demo-finetuned")
    loaded = tuned.load()
    assert loaded.config["init_head"] == str(tmp_path / "runs" / "demo-split")
    assert len(RunDir(tmp_path / "runs" / "demo-split").load().heads) == 1  # one split: no leak into held-out rows
    assert (tuned.path / "encoders").is_dir() and tuned.submission.is_file()
    assert (tuned.report / "report.html").is_file() and f"submission: {tuned.submission}" in res.output
    assert not RunDir(out).submission.exists()  # the frozen run is not what was submitted
    trunk = list((tmp_path / "cache").rglob("train__*img-layer3_txt-layer1*.h5"))
    assert len(trunk) == 1


@pytest.mark.slow
def test_mlc_run_with_a_cross_fitted_caption_tower(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    out = tmp_path / "runs" / "cf"
    res = CliRunner().invoke(app, ["run", str(data), *ARGS, "--crossfit-text", "--out", str(out), "--cache-dir",
                                   str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    run = RunDir(out).load()
    assert [e["recipe"]["crossfit"] is not None for e in run.features] == [False, True]
    assert len(run.features[1]["contract"]) and run.features[1]["contract"]["image_dim"] == 0
    assert len(run.dir.submission.read_text().splitlines()) == 5
