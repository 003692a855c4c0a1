"""Replay: ``mlc run --config RUN`` and ``mlc fit-head --config RUN/config.json`` rerun a recorded recipe, any
option given overriding it."""

from __future__ import annotations

import json

import pytest
from conftest import make_data_dir
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runs import RunDir

ARGS = ["--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init", "--workers", "0",
        "--backend", "torch", "--folds", "2"]


def test_fit_head_config_replays_with_overrides(fitted):
    run = fitted["run"]
    again = fitted["tmp"] / "again"
    res = CliRunner().invoke(app, ["fit-head", "--config", str(run / "config.json"), "--out", str(again),
                                   "--folds", "2"])
    assert res.exit_code == 0, res.output
    old, new = RunDir(run).read_config(), RunDir(again).read_config()
    assert new["folds"] == 2 and old["folds"] == 3  # the override
    assert new["caches"] == old["caches"] and new["train"]["epochs"] == old["train"]["epochs"] == 3  # recorded
    refused = CliRunner().invoke(app, ["run", "--config", str(run / "config.json")])
    assert refused.exit_code == 2 and "mlc fit-head --config" in refused.output
    bad = fitted["tmp"] / "bad.json"
    bad.write_text(json.dumps({"caches": [str(fitted["cache"])], "no_such_option": 1}))
    res = CliRunner().invoke(app, ["fit-head", "--config", str(bad)])
    assert res.exit_code == 2 and "no_such_option" in res.output


@pytest.mark.slow  # two whole `mlc run` jobs
def test_mlc_run_records_its_recipe_and_replays_it(tmp_path, monkeypatch):
    data = make_data_dir(tmp_path / "tiny", n_train=24, n_test=3)
    out = tmp_path / "runs" / "a"
    res = CliRunner().invoke(app, ["run", str(data), *ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    recipe = json.loads((out / "run.json").read_text())
    assert recipe["data_dir"] == str(data.resolve()) and recipe["folds"] == 2
    RunDir(out).verify()  # run.json is written after the run, outside its manifest
    monkeypatch.chdir(tmp_path)  # from another folder, another --out, one option changed
    res = CliRunner().invoke(app, ["run", "--config", str(out), "--out", "b", "--head", "sum"])
    assert res.exit_code == 0, res.output
    b = RunDir(tmp_path / "b").load()
    assert b.head_config["name"] == "sum" and len(b.heads) == 2
    assert json.loads((tmp_path / "b" / "run.json").read_text())["data_dir"] == str(data.resolve())
