"""Configs composed of option groups: flat on the command line, nested in Python and in config.json; one spelling
per concept (docs/DESIGN.md), the old spellings still taken with a notice; frozen, never patched."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import click
import pytest
from conftest import REPO, refresh_manifest
from typer.testing import CliRunner

from pipeline.cache import CacheReader
from pipeline.cli import COMMANDS, _load, app, respell
from pipeline.config import Config, flatten
from pipeline.crossfit import CrossfitConfig
from pipeline.data import DataOptions
from pipeline.encoders import EncoderOptions
from pipeline.errors import MlcError
from pipeline.extract import ExtractConfig
from pipeline.finetune import FinetuneConfig
from pipeline.fit_head import FitHeadConfig, fit_head, sized
from pipeline.runs import RunDir
from pipeline.training import TrainOptions, _comparable
from pipeline.workflow import RunConfig, _up_to_date

# What `mlc CMD --help` listed before option groups became fields (mlc 0.2, commit 7b71778): arguments by name.
BEFORE = {
    "run": "DATA_DIR --out --cache-dir --folds --head --crossfit-text --finetune --overwrite --force --id-col "
           "--labels-col --caption-col --label-sep --labels --images --batch-size --workers --device --backend "
           "--onnx-dir --precision --preset --image-encoder --text-encoder --image-weights --text-weights "
           "--random-init --text-pooling",
    "validate": "DATA_DIR --csv-only --id-col --labels-col --caption-col --label-sep --labels --images",
    "extract": "DATA_DIR --split --from-run --views --image-cut --text-cut --out-dir --chunk-rows --skip-bad-images "
               "--overwrite --id-col --labels-col --caption-col --label-sep --labels --images --batch-size --workers "
               "--device --backend --onnx-dir --precision --preset --image-encoder --text-encoder --image-weights "
               "--text-weights --random-init --text-pooling",
    "fit-head": "CACHES --out --folds --thresholds --grid --force --loss --pos-weight --sampler --optimizer --lr "
                "--weight-decay --batch-size --epochs --patience --best-by --schedule --warmup --clip --accumulate "
                "--val-fraction --seed --head --hidden --dropout",
    "finetune": "DATA_DIR --out --end-to-end --unfreeze --from-cache --image-cut --text-cut --init-head --encoder-lr "
                "--max-rows --augment --workers --device --precision --channels-last --resume --nproc --force --id-col "
                "--labels-col --caption-col --label-sep --labels --images --loss --pos-weight --sampler --optimizer "
                "--lr --weight-decay --batch-size --epochs --patience --best-by --schedule --warmup --clip "
                "--accumulate --val-fraction --seed --head --hidden --dropout --preset --image-encoder --text-encoder "
                "--image-weights --text-weights --random-init --text-pooling",
    "crossfit": "DATA_DIR --text-encoder --text-weights --random-init --folds --train-rows --encoder-lr --output "
                "--out-dir --device --precision --overwrite --id-col --labels-col --caption-col --label-sep --labels "
                "--images --loss --pos-weight --sampler --optimizer --lr --weight-decay --batch-size --epochs "
                "--patience --best-by --schedule --warmup --clip --accumulate --val-fraction --seed",
    "submit": "RUN --data --out --cache-dir --overwrite --force --batch-size --workers --device --backend --onnx-dir",
    "report": "RUN",
    "predict": "MODEL PATHS --caption --captions --format --top-k --skip-bad-images --out --force --id-col "
               "--labels-col --caption-col --label-sep --labels --images --batch-size --workers --device --backend "
               "--onnx-dir",
    "evaluate": "MODEL DATA --split --skip-bad-images --out --id-col --labels-col --caption-col --label-sep --labels "
                "--images --batch-size --workers --device --backend --onnx-dir",
    "export": "RUN --out --dtype --format --force",
    "encoders": "",
}
# The deliberate renames (docs/DESIGN.md, "One spelling per concept"): command -> {old: new}
# (issue 26: the encoders' images per forward pass are --encode-batch, the head's rows per step --batch-size)
ENCODE = {"--batch-size": "--encode-batch"}
RENAMED = {"extract": {"--out-dir": "--cache-dir", **ENCODE},
           "crossfit": {"--out-dir": "--cache-dir", "--output": "--text-features"},
           "submit": {"--data": "DATA_DIR", **ENCODE},
           "evaluate": {"DATA": "DATA_DIR", **ENCODE},
           "predict": ENCODE, "run": ENCODE,
           "fit-head": {"--thresholds": "--decision"}}
# Options added since (issue 21: image token maps for the attention head; issue 26: mlc run's head training)
ADDED = {name: ["--image-pooling"] for name in ("run", "extract", "finetune")}
ADDED["run"] += ["--batch-size", "--epochs", "--lr", "--loss", "--dropout", "--seed", "--decision"]
ADDED["run"] += ["--quality", "--time-limit", "--extra-image-encoder"]  # issue 28: mlc run --quality best
# Commands added since: everything they list (issue 30: mlc serve)
ADDED["serve"] = ["MODEL", "--host", "--port", "--allow-dir", "--max-upload-mb", "--max-photos", "--timeout",
                  "--batch-size", "--batch-wait-ms", "--max-queue", "--backend", "--device", "--onnx-dir"]
OLD_SPELLINGS = {(cmd, old) for cmd, names in RENAMED.items() for old in names
                 if old.startswith("--") and old not in ADDED.get(cmd, [])}


def _command(name: str) -> click.Command:
    cmd = _load(name)
    return cmd.commands[name] if isinstance(cmd, click.Group) else cmd


def _listed(name: str) -> list[str]:
    """What `mlc NAME --help` lists: arguments by name, options by their first flag (hidden ones left out)."""
    cmd = _command(name)
    return [p.name.upper() if p.param_type_name == "argument" else p.opts[0] for p in cmd.params
            if not getattr(p, "hidden", False)]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_the_same_options_as_before_but_the_deliberate_renames(name):
    want = [RENAMED.get(name, {}).get(o, o) for o in BEFORE.get(name, "").split()] + ADDED.get(name, [])
    listed = [n for n in _listed(name) if n != "--help"]
    assert sorted(listed) == sorted(want)
    text = CliRunner().invoke(app, [name, "--help"], terminal_width=200).output
    for option in [o for o in want if o.startswith("--")]:
        assert re.search(rf"{option}(?![\w-])", text), f"mlc {name} --help does not show {option}"
    for cmd, old in OLD_SPELLINGS:
        if cmd == name:
            assert not re.search(rf"{old}(?![\w-])", text), f"mlc {name} --help shows the old {old}"


def test_the_help_check_catches_a_dropped_option(monkeypatch):
    monkeypatch.setitem(BEFORE, "report", "RUN --nothing")
    with pytest.raises(AssertionError):
        test_help_lists_the_same_options_as_before_but_the_deliberate_renames("report")


def test_one_spelling_per_concept():
    """The cache folder is --cache-dir and the data folder the argument DATA_DIR on every command that takes one."""
    for name in COMMANDS:
        listed = _listed(name)
        assert "--out-dir" not in listed and "--data" not in listed, name
    assert {n for n in COMMANDS if "--cache-dir" in _listed(n)} == {"extract", "crossfit", "submit", "run"}
    assert {n for n in COMMANDS if "DATA_DIR" in _listed(n)} == {"validate", "extract", "finetune", "crossfit", "run",
                                                                  "submit", "evaluate"}


# --------------------------------------------------------------------------------------- old spellings


def _parsed(name: str, args: list[str]) -> dict:
    """The values `mlc NAME ARGS` would build its config from (parsed, not run)."""
    return _command(name).make_context(name, args).params


def test_old_spellings_still_work_with_a_one_line_notice(capsys):
    assert _parsed("extract", ["d", "--out-dir", "c"])["cache_dir"] == Path("c")
    assert "mlc extract --out-dir is deprecated; use --cache-dir" in capsys.readouterr().err
    crossfit = _parsed("crossfit", ["d", "--out-dir=c", "--output", "logits"])
    assert (crossfit["cache_dir"], crossfit["text_features"]) == (Path("c"), "logits")
    err = capsys.readouterr().err
    assert "--out-dir is deprecated; use --cache-dir" in err and "--output is deprecated; use --text-features" in err
    for args in (["r", "--data", "d", "--cache-dir", "c"], ["--data=d", "r", "--cache-dir", "c"]):
        submit = _parsed("submit", args)
        assert (submit["run"], submit["data_dir"], submit["cache_dir"]) == (Path("r"), Path("d"), Path("c"))
        assert capsys.readouterr().err.strip() == "warning: mlc submit --data is deprecated; give it as the argument " \
                                                  "DATA_DIR"
    assert _parsed("submit", ["r", "d"])["data_dir"] == Path("d") and capsys.readouterr().err == ""


def test_respelling_leaves_option_values_and_everything_after_double_dash_alone():
    renamed = {"--out-dir": "--cache-dir", "--data": "DATA_DIR"}
    assert respell(["r", "--caption", "--data", "--out-dir", "x"], renamed, {"--caption"}, "t") == \
        ["r", "--caption", "--data", "--cache-dir", "x"]
    assert respell(["--data", "d", "--", "--out-dir"], renamed, set(), "t") == ["--", "--out-dir", "d"]


def test_submit_with_the_old_data_option_writes_the_same_file(fitted):
    tmp = fitted["tmp"]
    base = ["submit", str(fitted["run"]), "--cache-dir", str(tmp / "cache"), "--workers", "0", "--backend", "torch"]
    new = CliRunner().invoke(app, [*base, str(fitted["data"]), "--out", str(tmp / "new.csv")])
    old = CliRunner().invoke(app, [*base, "--data", str(fitted["data"]), "--out", str(tmp / "old.csv")])
    assert new.exit_code == 0 and old.exit_code == 0, new.output + old.output
    assert "--data is deprecated" in old.output and "deprecated" not in new.output
    assert (tmp / "new.csv").read_bytes() == (tmp / "old.csv").read_bytes()


# ---------------------------------------------------------------------------------- building configs


def test_flat_options_go_to_their_groups_with_the_stages_own_defaults():
    cfg = FinetuneConfig.build(data_dir="d", lr=1e-3, dropout=0.1, preset="offline", labels="l.csv")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.sampler) == (1e-3, 4, "weighted")  # finetune's defaults
    assert (cfg.fusion.head, cfg.fusion.dropout) == ("sum", 0.1)
    assert cfg.encoders.image_encoder == "efficientnet-lite0"  # the preset's, recorded
    assert cfg.data_dir == Path("d") and cfg.data.labels == Path("l.csv")  # coerced before construction
    assert TrainOptions().lr == 3e-3 and CrossfitConfig.build(data_dir="d").train.lr == 1e-3
    assert FitHeadConfig.build(caches="a.h5").caches == (Path("a.h5"),)
    assert RunConfig.build(data_dir="x/comp", preset="offline").out == Path("runs/comp-efficientnet-lite0-minilm-l6")


def test_a_group_passes_whole_and_flat_options_change_it():
    enc = EncoderOptions(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True)
    cfg = ExtractConfig.build(data_dir="d", encoders=enc, workers=0)
    assert cfg.encoders is enc and cfg.loader.workers == 0
    assert ExtractConfig.build(data_dir="d", encoders=enc, text_encoder="none").encoders.text_encoder == "none"
    assert cfg.replace(text_encoder="lstm").encoders == dataclasses.replace(enc, text_encoder="lstm")
    with pytest.raises(MlcError, match="encoders must be a EncoderOptions, not DataOptions"):
        ExtractConfig.build(data_dir="d", encoders=DataOptions())


def test_an_unknown_option_is_refused_naming_it():
    with pytest.raises(MlcError, match=r"ExtractConfig takes no option batchsize \(it takes: .*encode_batch"):
        ExtractConfig.build(data_dir="d", batchsize=3)
    with pytest.raises(MlcError, match="takes no option out_dir"):  # the old name of cache_dir
        ExtractConfig.build(data_dir="d", out_dir="c")


def test_a_groups_validation_error_names_the_option(tmp_path):
    with pytest.raises(MlcError, match="--encode-batch must be at least 1"):
        ExtractConfig.build(data_dir="d", encode_batch=0)
    with pytest.raises(MlcError, match=r"--dropout must be in \[0, 1\)"):
        FinetuneConfig.build(data_dir="d", dropout=1.5)
    with pytest.raises(MlcError, match="--label-sep must not be empty"):
        DataOptions(label_sep="")
    res = CliRunner().invoke(app, ["extract", str(tmp_path), "--workers", "-1"])
    assert res.exit_code == 2 and "error: --workers must be 0 or more" in res.output


def test_configs_are_frozen_and_a_stage_leaves_its_config_as_it_was(fitted):
    cfg = FitHeadConfig.build(caches=fitted["cache"], out=fitted["tmp"] / "again", epochs=2, folds=2)
    for target, name in ((cfg, "out"), (cfg.train, "lr"), (cfg.fusion, "head")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, name, None)
    before = copy.deepcopy(cfg)
    fit_head(cfg, quiet=True)
    assert cfg == before


def test_no_config_is_patched_after_construction():
    """object.__setattr__ on a frozen config would hide a value from its type and its validation."""
    patched = [p.relative_to(REPO) for p in (REPO / "pipeline").rglob("*.py")
               if re.search(r"class \w+\(Config\)", p.read_text()) and "object.__setattr__" in p.read_text()]
    assert patched == []


def test_to_dict_is_nested_and_flatten_reads_both_layouts():
    cfg = FitHeadConfig.build(caches="a.h5", lr=1e-2, head="sum")
    d = cfg.to_dict()
    assert d["train"]["lr"] == 1e-2 and d["fusion"]["head"] == "sum" and d["caches"] == ["a.h5"]
    flat = cfg.flat_dict()
    assert flat["lr"] == 1e-2 and "train" not in flat and flatten(d) == flat == flatten(flat)
    assert set(flat) == set(FitHeadConfig.options())
    assert json.loads(json.dumps(d)) == d


def test_a_config_made_by_mlc_0_2_compares_equal(tmp_path):
    """Finetune checkpoints and run folders of mlc 0.2 hold a flat config; resume and `mlc run` compare flat."""
    cfg = FinetuneConfig.build(data_dir="d", epochs=2, resume=True)
    assert _comparable(cfg.flat_dict()) == _comparable(cfg.to_dict())
    assert _comparable(cfg.replace(lr=0.5).flat_dict()) != _comparable(cfg.to_dict())


def test_a_run_with_mlc_0_2s_flat_config_json_is_read_everywhere(fitted, tmp_path):
    """mlc 0.2 wrote config.json flat: such a run is still up to date for `mlc run`, and submit, report and export
    still take it."""
    from pipeline.export import ExportConfig, export
    from pipeline.report import make_report
    from pipeline.submit import SubmitConfig, submit

    run, cache = fitted["run"], fitted["cache"]
    nested = json.loads((run / "config.json").read_text())
    same = FitHeadConfig.build(caches=nested["caches"], out=nested["out"], epochs=3, folds=3)  # the fixture's paths
    same = sized(same, CacheReader(cache).meta.num_records)  # batch and patience from the row count, as fit-head did
    assert nested["train"]["epochs"] == 3 and _up_to_date(RunDir(run), same.to_dict(), [cache])
    (run / "config.json").write_text(json.dumps(flatten(nested)))  # as mlc 0.2 wrote it
    refresh_manifest(run)
    assert RunDir(run).read_config()["epochs"] == 3
    assert _up_to_date(RunDir(run), same.to_dict(), [cache])
    assert not _up_to_date(RunDir(run), same.replace(epochs=4).to_dict(), [cache])
    path, _ = submit(SubmitConfig.build(run=run, data_dir=fitted["data"], cache_dir=tmp_path / "c", workers=0,
                                        backend="torch"))
    assert path.is_file() and make_report(run).is_file()
    out, _ = export(ExportConfig.build(run=run, out=tmp_path / "model", format="safetensors"))
    assert out.is_dir()


def test_every_command_builds_its_config_from_flat_options():
    import importlib

    for name, (_, where) in COMMANDS.items():
        module, _, cls = where.partition(":")
        config_cls = getattr(importlib.import_module(module), cls)
        assert issubclass(config_cls, Config)
        groups = [f.name for f in dataclasses.fields(config_cls) if "group" in f.metadata]
        assert not set(groups) & set(config_cls.options()), name  # a group's name is never an option's


def test_a_cross_fits_identity_is_mlc_0_2s(tmp_path):
    """The digest naming a cross-fit's caches hashes its flat options under mlc 0.2's names (`output`, not
    `text_features`): caches cross-fitted before stay current. The digests are mlc 0.2's (commit 7b71778)."""
    from pipeline.data import DataDir

    data = DataDir.open(tmp_path)
    assert CrossfitConfig.build(data_dir=tmp_path).recipe(data).crossfit == "k5-24bdea67"
    assert CrossfitConfig.build(data_dir=tmp_path, cache_dir="/x", device="cpu", overwrite=True).recipe(data).crossfit \
        == "k5-24bdea67"  # where and how it runs is no part of it
    logits = CrossfitConfig.build(data_dir=tmp_path, text_features="logits", precision="bf16")
    assert logits.recipe(data).crossfit == "k5-f3deb0be"
    assert CrossfitConfig.build(data_dir=tmp_path, folds=3, epochs=2, lr=5e-3).recipe(data).crossfit == "k3-78fb91ed"
