"""Registries that describe themselves (pipeline/registries.py): a head defined here, in one test module and
registered as any head is, reaches `--help`, `--grid`, the docs table and an export with no edit elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from pipeline.cli import _load, app
from pipeline.errors import MlcError
from pipeline.fit_head import default_grid
from pipeline.heads import HEADS, FusionHead, create_head
from pipeline.losses import LOSSES
from pipeline.predictor import load  # ids, not names: the core the API wraps
from pipeline.registries import Registry, document

runner = CliRunner()


class ToyHead(FusionHead):
    """A toy: one linear map over both features."""

    name = "toy"
    modalities = ("image", "text")
    grid = True
    recipe = {"epochs": 2}

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        self.linear = nn.Linear(image_dim + text_dim, num_classes)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        return self.linear(torch.cat([self._input(image_feat, "image", self.image_dim),
                                      self._input(text_feat, "text", self.text_dim)], dim=1))


@pytest.fixture
def toy() -> Iterator[type[FusionHead]]:
    """ToyHead registered as a head module registers itself, and gone after the test."""
    HEADS.register()(ToyHead)
    yield ToyHead
    del HEADS["toy"], HEADS.about["toy"]


def _help_of(command: str, option: str) -> str:
    cmd = _load(command)
    cmd = cmd.commands[command] if hasattr(cmd, "commands") else cmd
    return next(p.help for p in cmd.params if p.name == option)


def test_a_head_in_one_module_reaches_help_and_grid(toy):
    assert "toy (A toy: one linear map over both features; `mlc run` trains it with --epochs 2)" in \
        _help_of("fit-head", "head")
    assert "toy (A toy" in _help_of("finetune", "head") and "toy (A toy" in _help_of("run", "head")
    assert "heads (sum, concat, gated, toy)" in _help_of("fit-head", "grid")
    assert default_grid()["head"] == ("sum", "concat", "gated", "toy")
    assert "A toy: one linear map" in document()


@pytest.mark.slow
def test_a_head_in_one_module_is_fitted_by_grid_and_survives_export(toy, fitted_once: Path, tmp_path: Path):
    (cache,) = (fitted_once / "cache").rglob("train__*.h5")

    grid = runner.invoke(app, ["fit-head", str(cache), "--grid", "--folds", "0", "--epochs", "1",
                               "--out", str(tmp_path / "grid")])
    assert grid.exit_code == 0, grid.output
    assert grid.stdout.count("head=toy") == 8  # on the leaderboard: x 2 losses x 2 head batches x 2 dropouts

    fit = runner.invoke(app, ["fit-head", str(cache), "--head", "toy", "--folds", "2", "--epochs", "2",
                              "--out", str(tmp_path / "run")])
    assert fit.exit_code == 0, fit.output
    out = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "model"),
                              "--format", "safetensors"])
    assert out.exit_code == 0, out.output
    photo = next((fitted_once / "tiny" / "data").glob("*.jpg"))
    pred = load(tmp_path / "model")
    labels = pred.predict([Image.open(photo)], ["A photo of a person in the street."])
    assert len(labels) == 1 and set(labels[0]) <= set(pred.labels.ids) and labels[0]
    del HEADS["toy"]  # the export names its head; without the module that registers it, it is refused by name
    try:
        with pytest.raises(MlcError, match="head.*toy"):
            load(tmp_path / "model")
    finally:
        HEADS["toy"] = ToyHead


def test_every_registered_head_and_loss_describes_itself():
    for registry in (HEADS, LOSSES):
        assert list(registry.about) == list(registry), registry.what
        for name, about in registry.about.items():
            assert about.summary and not about.summary.endswith("."), (registry.what, name)
    assert HEADS.about["attention"].recipe["lr"] == 3e-4 and HEADS.in_grid() == ("sum", "concat", "gated")
    assert LOSSES.in_grid() == ("bce", "asl")
    head = create_head("concat", image_dim=4, text_dim=3, num_classes=2)
    assert head.dropout_p == FusionHead.options["dropout"][0] == 0.5  # one default, that of --dropout


def test_a_name_is_registered_once():
    reg: Registry[object] = Registry("thing")

    @reg.register("a", summary="one")
    def one() -> None: ...

    with pytest.raises(ValueError, match="thing 'a' is registered already"):
        reg.register("a")(lambda: None)
    with pytest.raises(MlcError, match="unknown thing 'b'; choose from a"):
        reg.get_entry("b")
    assert reg.help("Things:")() == "Things: a (one)."


def test_docs_heads_md_is_the_registries_tables():
    """docs/heads.md is generated (python -m pipeline.registries > docs/heads.md): it says what the code does."""
    assert (REPO / "docs" / "heads.md").read_text() == document()


def test_plugins_load_only_for_a_name_not_registered_or_a_listing():
    """A registered name is found without importing $MLC_PLUGINS (whose modules may import torch: the predict path
    of an export checks its decision rule by name); an unknown name, or a listing, loads them first."""
    loads: list[int] = []
    reg: Registry[object] = Registry("thing", load=lambda: loads.append(1))
    reg.register("a", summary="one")(object())
    assert "a" in reg and reg.get_entry("a") is not None and loads == []
    assert "b" not in reg and len(loads) == 1
    assert reg.choices() == ("a",) and len(loads) == 2
