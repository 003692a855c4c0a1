"""Every stage takes device, precision and workers from a shared option group and declares none itself (issue 27): the
real config dataclasses are checked, and finetune and crossfit show one compute group, with the same help."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from pipeline.cli import COMMANDS, _load
from pipeline.config import Config, group, opt
from pipeline.crossfit import CrossfitConfig
from pipeline.errors import MlcError
from pipeline.finetune import FinetuneConfig
from pipeline.options import ComputeOptions, LoaderOptions
from pipeline.quantize import PrecisionOptions

GROUPS = (LoaderOptions, PrecisionOptions, ComputeOptions)  # the shared groups that own how a stage computes
OWNED = ("device", "precision", "workers")
# export's --precision is what an export stores (fp32, fp16, int8 weights), not what a stage computes in
STORED = {("ExportConfig", "precision")}


def _stage_configs() -> list[type[Config]]:
    out = []
    for _, where in COMMANDS.values():
        module, _, cls = where.partition(":")
        out.append(getattr(importlib.import_module(module), cls))
    return out


def redeclared(configs: list[type[Config]]) -> list[str]:
    """Stage configs' own fields (not groups) named like an option a shared group owns and not borrowed from it
    (``config.borrow`` shares the owner's help and flag): a second declaration that can drift from the group's."""
    owned = [dict(f.metadata) for g in GROUPS for f in dataclasses.fields(g) if f.name in OWNED]
    faults = []
    for cls in configs:
        for f in dataclasses.fields(cls):
            if "group" in f.metadata or f.name not in OWNED or (cls.__name__, f.name) in STORED:
                continue
            if dict(f.metadata) not in owned:  # borrowed: the owner's metadata (help, flag) as it is
                faults.append(f"{cls.__name__}.{f.name}")
    return faults


def test_no_stage_redeclares_what_a_shared_group_owns():
    assert redeclared(_stage_configs()) == []


def test_the_check_catches_a_stage_that_declares_its_own_device():
    @dataclass(frozen=True, kw_only=True)
    class Rogue(Config):
        device: str = opt("cpu", "Where it runs.")
        compute: ComputeOptions = group(ComputeOptions, omit=("device", "precision", "workers"))

    assert redeclared([Rogue, CrossfitConfig, FinetuneConfig]) == ["Rogue.device"]


def _params(command: str) -> dict[str, click.Parameter]:
    cmd = _load(command)
    cmd = cmd.commands[command] if isinstance(cmd, click.Group) else cmd
    return {p.name: p for p in cmd.params}


def test_finetune_and_crossfit_take_one_compute_group_with_one_help():
    for cls in (FinetuneConfig, CrossfitConfig):
        assert cls.options()["device"].group == cls.options()["precision"].group == "compute"
        assert dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index("compute")].metadata[
            "group"] is ComputeOptions
    finetune, crossfit = _params("finetune"), _params("crossfit")
    for name in ("device", "precision"):
        assert finetune[name].opts == crossfit[name].opts == [f"--{name}"]
        assert finetune[name].help == crossfit[name].help
    assert finetune["device"].help == _params("extract")["device"].help  # one --device, whoever runs it
    assert finetune["workers"].help == _params("extract")["workers"].help


def test_crossfit_takes_no_workers_it_would_not_use(tmp_path: Path):
    assert "workers" in _params("finetune") and "workers" not in _params("crossfit")
    with pytest.raises(MlcError, match="CrossfitConfig takes no option workers"):
        CrossfitConfig.build(data_dir=tmp_path, workers=4)
    cfg = CrossfitConfig.build(data_dir=tmp_path, device="cpu", precision="fp32")
    assert cfg.to_dict()["compute"] == {"device": "cpu", "precision": "fp32"}  # nor in what it records
    assert FinetuneConfig.build(data_dir=tmp_path, workers=0).to_dict()["compute"]["workers"] == 0


def test_the_compute_group_checks_its_options(tmp_path: Path):
    with pytest.raises(MlcError, match="--precision must be one of"):
        FinetuneConfig.build(data_dir=tmp_path, precision="int8")
    with pytest.raises(MlcError, match="--precision must be one of"):
        CrossfitConfig.build(data_dir=tmp_path, precision="fp16")
    with pytest.raises(MlcError, match="--workers -1: out of range"):
        FinetuneConfig.build(data_dir=tmp_path, workers=-1)
