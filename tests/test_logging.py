"""What reaches the terminal: library code logs, the CLI alone sets the handler (pipeline/log.py)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from conftest import REPO, make_data_dir
from typer.testing import CliRunner

from pipeline import log
from pipeline.cli import app
from pipeline.data import DataDir

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_mlc_logger():
    """Each test starts as a fresh process would: no handler of the CLI's, the level unset."""
    root = logging.getLogger("mlc")
    saved = root.handlers[:], root.level
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, log._Stderr)]
    root.setLevel(logging.NOTSET)
    yield
    root.handlers[:], root.level = saved[0], saved[1]


def _stray_label_data(tmp_path: Path) -> Path:
    """A data folder whose train.csv holds one rare label: reading its labels logs a warning."""
    root = make_data_dir(tmp_path / "d", n_train=24, n_test=2)
    lines = (root / "train.csv").read_text().splitlines()
    lines[7] = lines[7].replace(",", ",12 ", 1)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_the_python_api_is_silent_unless_asked(tmp_path, capsys):
    root = _stray_label_data(tmp_path)
    DataDir.open(root).label_space()
    assert capsys.readouterr().err == ""  # no lastResort handler: the NullHandler of pipeline/__init__
    logging.getLogger("mlc").addHandler(handler := logging.StreamHandler())  # asked: a handler of the caller's
    try:
        DataDir.open(root).label_space()
    finally:
        logging.getLogger("mlc").removeHandler(handler)
    assert "label 12 is on only" in capsys.readouterr().err


def test_quiet_keeps_warnings_and_drops_progress(tmp_path):
    root = _stray_label_data(tmp_path)
    args = ["extract", str(root), "--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init",
            "--split", "train", "--workers", "0", "--backend", "torch", "--cache-dir", str(tmp_path / "c")]
    loud = runner.invoke(app, args)
    assert loud.exit_code == 0, loud.output
    assert "wrote " in loud.stderr and "label 12 is on only" in loud.stderr
    quiet = runner.invoke(app, ["-q", *args])
    assert quiet.exit_code == 0, quiet.output
    assert "up to date" not in quiet.stderr and "label 12 is on only" in quiet.stderr
    assert quiet.stdout.strip().endswith(".h5")  # what the command returns is still printed
    again = runner.invoke(app, ["-v", *args])
    assert "up to date" in again.stderr and again.stderr.count("up to date") == 1  # one handler, not two


def test_quiet_and_verbose_together_are_refused():
    res = runner.invoke(app, ["-q", "-v", "encoders"])
    assert res.exit_code == 2 and "choose one" in res.output


def test_only_rank_zero_speaks_but_every_rank_keeps_its_errors(monkeypatch, capsys):
    log.configure(0)
    logger = log.get("pipeline.features")
    monkeypatch.setenv("RANK", "1")
    logger.info("progress of rank 1")
    logger.error("error of rank 1")
    monkeypatch.setenv("RANK", "0")
    logger.info("progress of rank 0")
    err = capsys.readouterr().err
    assert "progress of rank 1" not in err and "error of rank 1" in err and "progress of rank 0" in err
    assert logger.name == "mlc.features" and log.get("pipeline").name == "mlc"


def test_progress_bars_follow_the_switch(monkeypatch):
    assert not log.progress_enabled()  # a Python caller that asked for nothing
    log.configure(0)
    assert log.progress_enabled()
    monkeypatch.setenv("RANK", "2")
    assert not log.progress_enabled()
    monkeypatch.setenv("RANK", "0")
    log.configure(-1)
    assert not log.progress_enabled()


def test_no_print_outside_the_cli():
    """Library code logs; ``print`` is the CLI's (and the text of the export's client script, a string)."""
    offences = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offences.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offences, offences
