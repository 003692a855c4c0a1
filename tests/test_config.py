"""Configs composed of option groups: flat on the command line, nested in Python and in config.json; one spelling
per concept (docs/DESIGN.md), the old spellings still taken with a notice; frozen, never patched."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
from pathlib import Path

import click
import pytest
from conftest import REPO, refresh_manifest
from typer.testing import CliRunner

from pipeline.cache import CacheReader
from pipeline.cli import COMMANDS, _load, app
from pipeline.cli_options import renamed_options, respell
from pipeline.config import Config, flatten, option_flag
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

# Retired spellings (docs/DESIGN.md, "One spelling per concept"): still taken with a notice, never listed in --help.
# (issue 26: --batch-size is the head's rows per step wherever it is listed; the encoders' images per pass are
# --encode-batch, and the commands that only encode no longer take --batch-size, which in mlc run now means the head's.)
RETIRED = {"--out-dir", "--data", "--output", "--dtype", "--thresholds"}


def _command(name: str) -> click.Command:
    cmd = _load(name)
    return cmd.commands[name] if isinstance(cmd, click.Group) else cmd


def _listed(name: str) -> list[str]:
    """What `mlc NAME --help` lists: arguments by name, options by their first flag (hidden ones left out)."""
    cmd = _command(name)
    return [p.name.upper() if p.param_type_name == "argument" else p.opts[0] for p in cmd.params
            if not getattr(p, "hidden", False)]


def _config_class(name: str) -> type[Config]:
    module, _, cls = COMMANDS[name][1].partition(":")
    return getattr(importlib.import_module(module), cls)


def without_help(params: list[click.Parameter]) -> list[str]:
    """The parameters (arguments and options) whose help is empty."""
    return [p.name or "?" for p in params if p.name != "help" and not (getattr(p, "help", None) or "").strip()]


def spellings(commands: dict[str, list[click.Parameter]]) -> list[str]:
    """Concepts spelled two ways: a config field under two flags, or a flag naming two fields."""
    flags: dict[str, set[str]] = {}
    fields: dict[str, set[str]] = {}
    for params in commands.values():
        for p in params:
            if isinstance(p, click.Option) and p.name != "help":
                flags.setdefault(p.name or "", set()).add(p.opts[0])
                fields.setdefault(p.opts[0], set()).add(p.name or "")
    return sorted([f"{k}: {sorted(v)}" for k, v in flags.items() if len(v) > 1] +
                  [f"{k}: {sorted(v)}" for k, v in fields.items() if len(v) > 1])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_argument_and_option_has_help(name):
    assert without_help(_command(name).params) == []
    text = CliRunner().invoke(app, [name, "--help"], terminal_width=200).output
    for option in [o for o in _listed(name) if o.startswith("--")]:
        assert re.search(rf"{option}(?![\w-])", text), f"mlc {name} --help does not show {option}"
    assert not [old for old in RETIRED if re.search(rf"{old}(?![\w-])", text)], f"mlc {name} --help shows a retired one"


def test_one_spelling_per_option_across_commands():
    assert spellings({name: _command(name).params for name in COMMANDS}) == []


def vocabulary() -> dict[str, set[str]]:
    """docs/DESIGN.md's "One spelling per concept" table: spelling -> the commands that take it."""
    text = (REPO / "docs" / "DESIGN.md").read_text().split("### One spelling per concept", 1)[1]
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "`" in line]
    return {cells[1].strip().strip("`"): set(re.findall(r"`([\w-]+)`", cells[2])) for cells in rows}


def test_the_vocabulary_table_is_what_the_cli_takes():
    table = vocabulary()
    assert {"DATA_DIR", "RUN", "MODEL", "--precision", "--image-cut", "--cache-dir", "--out"} <= set(table)
    for spelling, commands in table.items():
        assert {n for n in COMMANDS if spelling in _listed(n)} == commands, spelling


def test_a_cut_and_a_precision_mean_one_thing_everywhere(caplog):
    for option, lead in (("image_cut", "Where the image encoder's frozen trunk ends"),
                         ("text_cut", "Where the text encoder's frozen trunk ends")):
        for name in ("extract", "finetune"):
            assert _config_class(name).options()[option].field.metadata["help"].startswith(lead), (name, option)
    from pipeline.export import ExportConfig

    assert ExportConfig.build(run="r", out="o", precision="float16").precision == "fp16"  # mlc 0.2's value
    assert "--precision float16 is the old spelling; use fp16" in caplog.text
    assert ExportConfig.build(run="r", out="o", precision="fp16").dtype == "float16"  # export.json's name


def test_the_rule_checks_can_fail():
    bare = click.Option(["--x"])
    assert without_help([bare, click.Option(["--y"], help="Why.")]) == ["x"]
    two = {"a": [click.Option(["--out-dir", "out"])], "b": [click.Option(["--out"], help="h")]}
    assert spellings(two) == ["out: ['--out', '--out-dir']"]


def test_the_retired_spellings_are_the_aliases():
    aliases = {old for n in COMMANDS if n != "encoders" for old in renamed_options(_config_class(n).options())}
    assert aliases == RETIRED


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "encoders"])
def test_every_deprecated_alias_warns_and_reaches_its_option(name, capsys):
    options = _config_class(name).options()
    renamed = renamed_options(options)
    arguments = [n for n, o in options.items() if o.field.metadata.get("argument") and o.field.metadata.get("required")]
    for old, new in renamed.items():
        field = new.lower() if not new.startswith("--") else next(n for n, o in options.items()
                                                                  if option_flag(n, o.field) == new)
        given = [f"{a}-value" for a in arguments if a != field]
        given += [w for n, o in options.items() if o.field.metadata.get("required") and n != field
                  and not o.field.metadata.get("argument") for w in (option_flag(n, o.field), f"{n}-value")]
        got = _parsed(name, [*given, old, "1"])
        assert str(got[field]) in ("1", "(1,)", "['1']"), (name, old, got[field])
        assert f"mlc {name} {old} is deprecated" in capsys.readouterr().err


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
    with pytest.raises(MlcError, match="--encode-batch"):  # the error names the option
        ExtractConfig.build(data_dir="d", encode_batch=0)
    with pytest.raises(MlcError, match=r"--dropout must be in \[0, 1\)"):
        FinetuneConfig.build(data_dir="d", dropout=1.5)
    with pytest.raises(MlcError, match="--label-sep must not be empty"):
        DataOptions(label_sep="")
    res = CliRunner().invoke(app, ["extract", str(tmp_path), "--workers", "-1"])
    assert res.exit_code == 2 and "error: --workers -1: out of range (it must be from 0 to 256)" in res.output


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
