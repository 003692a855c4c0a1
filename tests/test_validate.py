"""pipeline.validate and the ``mlc validate`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import __version__
from pipeline.cli import app
from pipeline.data import DataOptions
from pipeline.errors import DataError, ImageError
from pipeline.labels import COCO_NAMES
from pipeline.validate import format_report, validate_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "comp5329"
MINI = REPO / "examples" / "comp5329-mini"

TRAIN = (
    "ImageID,Labels,Caption\n"
    '0.jpg,1,"A man riding a horse."\n'
    '1.jpg,1 19,"A couple of men riding horses on top of a green field."\n'
    '2.jpg,14 3,"A parking meter\nnext to a "car" on a street."\n'
    '3.jpg,3,"A car."\n'
)
TEST = 'ImageID,Caption\n30000.jpg,"A dog on a bench."\n30001.jpg,"Two cats."\n'


def make_folder(root: Path, train: str = TRAIN, test: str = TEST) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "train.csv").write_text(train)
    (root / "test.csv").write_text(test)
    rng = np.random.default_rng(0)
    for name in ("0.jpg", "1.jpg", "2.jpg", "3.jpg", "30000.jpg", "30001.jpg"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "data" / name)
    return root


def test_clean_folder(tmp_path: Path) -> None:
    report = validate_data_dir(make_folder(tmp_path), csv_only=False, progress=False)
    assert report.ok and report.problems == []
    assert (report.n_train, report.n_test, report.images_checked) == (4, 2, 6)
    # No labels file: the space is the labels train.csv holds (COCO ids, so COCO names).
    assert report.label_counts == {1: 2, 3: 2, 14: 1, 19: 1}
    assert list(report.label_counts) == list(report.label_space.ids)
    assert report.labels_per_image == {1: 2, 2: 2} and report.mean_labels == 1.5
    words = report.caption_words["train"]
    assert (words.min, words.max) == (2, 12)
    text = format_report(report)
    for piece in ("train rows:  4", "test rows:   2", "parking meter", "25.0%", "no problems found",
                  "6 checked", "mean 1.50"):
        assert piece in text, text


def test_problems_are_all_reported(tmp_path: Path) -> None:
    train = TRAIN + '4.jpg,12,"bad label"\n3.jpg,1,"duplicate"\n'
    test = TEST + '1.jpg,"also a training image"\n'
    root = make_folder(tmp_path, train, test)
    (root / "labels.csv").write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in COCO_NAMES.items()))
    (root / "data" / "0.jpg").write_bytes(b"garbage")
    (root / "data" / "30001.jpg").unlink()
    report = validate_data_dir(root, csv_only=False, progress=False)
    assert not report.ok
    assert report.n_train == 4 and report.n_test == 3  # the good rows still count
    faults = [str(p) for p in report.problems]
    train_csv, test_csv = root / "train.csv", root / "test.csv"
    assert f"{train_csv}:7: label '12' is not in the labels file" in faults[0]
    assert f"{train_csv}:8: duplicate ImageID 3.jpg (first on line 6)" in faults[1]
    assert f"{test_csv}:4: ImageID 1.jpg is also in train.csv (line 3)" in faults[2]
    assert [type(p) for p in report.problems] == [DataError] * 3 + [ImageError] * 2
    assert f"{root / 'data' / '0.jpg'}: cannot decode" in faults[3]
    assert f"{root / 'data' / '30001.jpg'}: file not found" in faults[4]
    text = format_report(report)
    assert "5 problem(s):" in text and all(f in text for f in faults)
    # --csv-only leaves the images alone.
    quick = validate_data_dir(root, csv_only=True, progress=False)
    assert len(quick.problems) == 3 and quick.images_checked == 0
    assert "not checked" in format_report(quick)


def test_missing_csv_is_a_problem(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    (root / "test.csv").unlink()
    report = validate_data_dir(root, csv_only=True)
    assert [str(p) for p in report.problems] == [f"{root / 'test.csv'}: test.csv not found in the data folder"]
    assert report.n_train == 4


def test_label_faults_are_reported_as_every_other_command_would_refuse_them(tmp_path: Path) -> None:
    # A typo among integer labels: extract and fit-head refuse it, so validate names it with its row.
    root = make_folder(tmp_path / "typo", TRAIN.replace("3.jpg,3,", "3.jpg,x3,"))
    report = validate_data_dir(root, csv_only=True)
    assert [str(p) for p in report.problems] == [
        f"{root / 'train.csv'}:6: label 'x3' is not an integer like the other labels; give a labels file "
        "(--labels) if text labels are meant"]
    # A --labels file that is not there: one problem, not a crash.
    root = make_folder(tmp_path / "nofile")
    report = validate_data_dir(root, csv_only=True, options=DataOptions(labels=tmp_path / "absent.csv"))
    assert [str(p) for p in report.problems] == [f"{tmp_path / 'absent.csv'}: labels file not found"]
    assert report.n_train == 4 and report.label_space.ids == (1, 3, 14, 19)
    # A broken labels file beside CSVs read with other options: the CSVs are still read with those options.
    root = make_folder(tmp_path / "opts", TRAIN.replace("ImageID,", "photo,"), TEST.replace("ImageID,", "photo,"))
    (root / "labels.csv").write_text("not,a labels,header\n")
    report = validate_data_dir(root, csv_only=True, options=DataOptions(id_col="photo"))
    assert len(report.problems) == 1 and str(report.problems[0]).startswith(f"{root / 'labels.csv'}")
    assert report.n_train == 4 and report.n_test == 2


runner = CliRunner()


def test_cli_clean_exits_0(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(make_folder(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "train rows:  4" in result.output and "no problems found" in result.output


def test_cli_problems_exit_1(tmp_path: Path) -> None:
    root = make_folder(tmp_path, TRAIN + '../4.jpg,1,"escape"\n')
    result = runner.invoke(app, ["validate", str(root), "--csv-only"])
    assert result.exit_code == 1
    assert f"{root / 'train.csv'}:7: ImageID '../4.jpg' contains '..'" in result.output


def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "absent")])
    assert result.exit_code == 2
    assert "error:" in result.output and "data folder not found" in result.output


def test_cli_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["validate", "--help"])
    assert result.exit_code == 0 and "--csv-only" in result.output
    bare = runner.invoke(app, [])  # no_args_is_help: click prints the help and exits 2
    assert bare.exit_code == 2 and "Usage" in bare.output
    for name in ("validate", "extract", "fit-head", "finetune", "submit", "report", "encoders"):
        assert name in bare.output  # listed without importing the stages


def test_cli_on_the_shipped_sample() -> None:
    result = runner.invoke(app, ["validate", str(MINI), "--csv-only"])
    assert result.exit_code == 0, result.output
    assert "train rows:  808" in result.output


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "train.csv").is_file(), reason=f"{SHARED} not present")
def test_shared_data_validates_clean() -> None:
    report = validate_data_dir(SHARED, csv_only=True)
    assert report.ok, format_report(report)
    assert (report.n_train, report.n_test) == (12_000, 1_001)
    assert report.label_counts[14] == 102 and report.label_counts[1] == 9127


def test_every_option_of_every_command_has_help_that_renders() -> None:
    """Help text comes from the config fields; Typer renders it as Markdown, which drops '<word>' as HTML."""
    import importlib
    import re

    from pipeline.cli import COMMANDS

    for name, (_, where) in COMMANDS.items():
        module, _, cls = where.partition(":")
        for option, o in getattr(importlib.import_module(module), cls).options().items():
            text = o.field.metadata.get("help", "")
            text = text() if callable(text) else text  # a registry's help is made when shown
            assert len(text) > 10, f"{name} --{option} has no help"
            assert not re.search(r"<[A-Za-z]", text), f"{name} --{option}: {text!r} would lose its <...> part"
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, name
