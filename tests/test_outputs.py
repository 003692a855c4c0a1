"""Outputs that never destroy, reruns that never lie, resource faults that end in one line.

* Every command that writes (``fit-head``, ``finetune``, ``export``, ``run`` folders; ``submit`` and ``predict``
  files) writes a missing or empty path, or replaces an mlc output of the same kind; anything else is refused
  naming the path (``--force`` replaces it), and no output may be one of the command's own inputs, however
  spelled.
* ``mlc run`` after train.csv or test.csv changed stops naming the stale cache and ``--overwrite``, or with
  it rebuilds what depends on the data; it never hands back the old submission.
* A full disk while writing a run, an export, checkpoints, a report or predictions: ``error: cannot write``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_data_dir
from typer.testing import CliRunner

from pipeline import atomic
from pipeline.atomic import atomic_path, claim_output, write_safetensors
from pipeline.cli import app
from pipeline.errors import OutputError
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.folders import sha256_file
from pipeline.runs import RunDir

TINY = ["--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init", "--workers", "0",
        "--backend", "torch"]
RUN_ARGS = [*TINY, "--folds", "2"]
runner = CliRunner()


def mlc(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def one_line_error(code: int, out: str, *names: object) -> bool:
    """Exit 2, one line ``error: ...`` naming every one of ``names``, no traceback (the runner mixes stdout and
    stderr, so a progress line may come after it)."""
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    return code == 2 and len(errors) == 1 and "Traceback" not in out and all(str(n) in errors[0] for n in names)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def foreign_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's: what no command may delete."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 mine")
    return snapshot(path)


# ------------------------------------------------------------------------ 1. outputs never destroy

FOLDER_COMMANDS = {
    "fit-head": lambda f, out: ("fit-head", f["cache"], "--out", out, "--epochs", 1),
    "finetune": lambda f, out: ("finetune", f["data"], *TINY[:7], "--out", out, "--epochs", 1),
    "export": lambda f, out: ("export", f["run"], "--out", out),
    "run": lambda f, out: ("run", f["data"], *RUN_ARGS, "--cache-dir", f["tmp"] / "cache", "--out", out),
}


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_folder_mlc_did_not_write_is_never_replaced(fitted, command):
    out = fitted["tmp"] / "mine"
    before = foreign_folder(out)
    code, text = mlc(*FOLDER_COMMANDS[command](fitted, out))
    assert one_line_error(code, text, out, "--force"), text
    assert snapshot(out) == before


def test_out_naming_a_folder_of_runs_replaces_none_of_them(fitted):
    runs = fitted["tmp"] / "runs"
    shutil.copytree(fitted["run"], runs / "a")
    fit_head(FitHeadConfig.build(caches=fitted["cache"], out=runs / "b", epochs=1, folds=0), quiet=True)
    before = snapshot(runs)
    for args in (FOLDER_COMMANDS["fit-head"](fitted, runs), FOLDER_COMMANDS["run"](fitted, runs),
                 FOLDER_COMMANDS["export"](fitted, fitted["tmp"] / "runs" / "b")):
        code, text = mlc(*args)
        assert one_line_error(code, text), text
    assert snapshot(runs) == before
    RunDir(runs / "a").verify()


def test_a_run_holding_a_file_mlc_did_not_write_is_not_replaced(fitted):
    (fitted["run"] / "my-notes.txt").write_text("keep me\n")
    code, text = mlc(*FOLDER_COMMANDS["fit-head"](fitted, fitted["run"]))
    assert one_line_error(code, text, fitted["run"], "my-notes.txt"), text
    assert (fitted["run"] / "my-notes.txt").read_text() == "keep me\n"


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_an_mlc_output_of_the_same_kind_is_replaced_of_another_kind_refused(fitted):
    run, export = fitted["run"], fitted["tmp"] / "model"
    assert mlc(*FOLDER_COMMANDS["fit-head"](fitted, run))[0] == 0  # a fit-head run over a fit-head run
    assert mlc(*FOLDER_COMMANDS["export"](fitted, export))[0] == 0
    assert mlc(*FOLDER_COMMANDS["export"](fitted, export))[0] == 0  # an export over an export
    code, text = mlc(*FOLDER_COMMANDS["fit-head"](fitted, export))  # a run over an export: refused
    assert one_line_error(code, text, export, "not an mlc head run folder"), text
    code, text = mlc(*FOLDER_COMMANDS["export"](fitted, fitted["run"].parent))  # holds the run it reads
    assert one_line_error(code, text), text
    assert (export / "export.json").is_file()


def test_empty_and_interrupted_finetune_folders_are_written(fitted, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mlc(*FOLDER_COMMANDS["fit-head"](fitted, empty))[0] == 0
    RunDir(empty).verify()
    resumable = tmp_path / "ft"
    (resumable / "checkpoints").mkdir(parents=True)
    assert RunDir(resumable).replaceable("finetune") and not RunDir(resumable).replaceable("head")


def test_force_replaces_a_foreign_folder(fitted):
    out = fitted["tmp"] / "mine"
    foreign_folder(out)
    code, text = mlc(*FOLDER_COMMANDS["fit-head"](fitted, out), "--force")
    assert code == 0, text
    RunDir(out).verify()
    assert not (out / "notes.txt").exists()


def _spellings(target: Path, tmp: Path) -> list[Path]:
    """Three spellings of ``target``: itself, through ``..``, and through a symlink to its parent."""
    link = tmp / "link"
    link.symlink_to(target.parent, target_is_directory=True)
    return [target, target.parent / "x" / ".." / target.name, link / target.name]


def test_an_output_is_never_one_of_the_commands_inputs_however_spelled(fitted):
    f, tmp = fitted, fitted["tmp"]
    (tmp / "x").mkdir()
    (f["data"] / "x").mkdir()
    before = {"data": snapshot(f["data"]), "cache": snapshot(tmp / "cache"), "run": snapshot(f["run"])}
    for spelled in _spellings(f["cache"].parent, tmp):  # the folder holding the cache it reads
        code, text = mlc("fit-head", f["cache"], "--out", spelled, "--epochs", 1, "--force")
        assert one_line_error(code, text, "which this command reads"), text
    (tmp / "link").unlink()
    for spelled in _spellings(f["data"] / "test.csv", tmp):  # the test.csv it reads
        code, text = mlc("submit", f["run"], f["data"], "--cache-dir", tmp / "cache", "--workers", 0,
                         "--backend", "torch", "--out", spelled, "--force")
        assert one_line_error(code, text, "which this command reads"), text
    for out in (f["run"], f["run"] / "model", f["run"].parent):  # the run it reads, inside it, above it
        code, text = mlc("export", f["run"], "--out", out, "--force")
        assert one_line_error(code, text, "which this command reads"), text
    code, text = mlc("run", f["data"], *RUN_ARGS, "--cache-dir", tmp / "cache", "--out", f["data"], "--force")
    assert one_line_error(code, text, "which this command reads"), text
    photo = f["data"] / "data" / "1000.jpg"
    for out in (photo, f["run"] / "preds.csv"):  # a photo it reads; a file inside the run it reads
        code, text = mlc("predict", f["run"], photo, "--caption", "a dog", "--backend", "torch", "--workers", 0,
                         "--out", out, "--force")
        assert one_line_error(code, text, "which this command reads"), text
    (f["data"] / "x").rmdir()
    assert before == {"data": snapshot(f["data"]), "cache": snapshot(tmp / "cache"), "run": snapshot(f["run"])}


def test_submit_and_predict_replace_their_own_files_only(fitted):
    f, tmp = fitted, fitted["tmp"]
    mine, sub, preds = tmp / "mine.csv", tmp / "sub.csv", tmp / "preds.csv"
    mine.write_text("id,value\n1,2\n")
    submit = ("submit", f["run"], f["data"], "--cache-dir", tmp / "cache", "--workers", 0, "--backend",
              "torch")
    predict = ("predict", f["run"], f["data"] / "data" / "1000.jpg", "--caption", "a dog", "--backend", "torch",
               "--workers", 0, "--format", "csv")
    for args in (submit, predict):
        code, text = mlc(*args, "--out", mine)
        assert one_line_error(code, text, mine, "--force"), text
        assert mine.read_text() == "id,value\n1,2\n"
    assert mlc(*submit, "--out", sub)[0] == 0 and mlc(*submit, "--out", sub)[0] == 0
    assert mlc(*predict, "--out", preds)[0] == 0 and mlc(*predict, "--format", "json", "--out", preds)[0] == 0
    assert mlc(*predict, "--out", mine, "--force")[0] == 0 and mine.read_text().startswith("path,labels")


def test_claim_output_rules(tmp_path):
    inp = tmp_path / "in.csv"
    inp.write_text("x\n")
    never = {"what": "a thing", "ours": lambda p: False}
    assert claim_output(tmp_path / "new", folder=True, **never) == (tmp_path / "new").resolve()
    with pytest.raises(OutputError, match="it is a file"):
        claim_output(inp, folder=True, **never)
    with pytest.raises(OutputError, match="it is a folder"):
        claim_output(tmp_path, folder=False, **never)
    with pytest.raises(OutputError, match="is .*in.csv, which this command reads"):
        claim_output(tmp_path / "." / "in.csv", folder=False, inputs=[inp], force=True, **never)
    (tmp_path / f".x.{os.getpid()}.abcd.tmp").write_text("")  # mlc's own leftovers do not make a folder full
    assert claim_output(tmp_path / "new", folder=True, **never)


# ------------------------------------------------------------------------ 4. reruns never hand back stale results


def _run(data: Path, tmp: Path, *extra: object) -> tuple[int, str]:
    return mlc("run", data, *RUN_ARGS, "--out", tmp / "runs" / "demo", "--cache-dir", tmp / "cache", *extra)


def _ids(csv: Path) -> list[str]:
    return [line.split(",", 1)[0] for line in csv.read_text().splitlines()[1:]]


@pytest.mark.slow
def test_a_changed_test_csv_is_never_answered_with_the_old_submission(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    assert _run(data, tmp_path)[0] == 0
    sub = tmp_path / "runs" / "demo" / "submission.csv"
    lines = (data / "test.csv").read_text().splitlines()
    (data / "test.csv").write_text("\n".join(lines[:-1]) + "\n")  # one test image fewer
    code, text = _run(data, tmp_path)
    assert one_line_error(code, text, "test__", "--overwrite"), text
    code, text = _run(data, tmp_path, "--overwrite")
    assert code == 0, text
    assert _ids(sub) == [ln.split(",", 1)[0] for ln in lines[1:-1]]
    assert "label_distribution.png" in (sub.parent / "report" / "report.html").read_text()


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_a_changed_train_csv_refits_the_run(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    assert _run(data, tmp_path)[0] == 0
    run = RunDir(tmp_path / "runs" / "demo")
    old = sha256_file(run.manifest)
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(lines[:-2]) + "\n")  # two labelled rows fewer
    code, text = _run(data, tmp_path)
    assert one_line_error(code, text, "train__", "--overwrite"), text
    assert sha256_file(run.manifest) == old  # stopped: nothing replaced
    code, text = _run(data, tmp_path, "--overwrite")
    assert code == 0 and "not refitted" not in text, text
    assert sha256_file(run.manifest) != old and len(run.held_out_ids()) == 28
    assert run.submission.is_file() and run.submission_info.is_file()
    code, text = _run(data, tmp_path)  # and now it is up to date
    assert code == 0 and "not refitted" in text, text


@pytest.mark.slow
def test_a_submission_made_from_another_test_csv_is_made_again(tmp_path):
    """The test cache re-extracted by hand for a changed test.csv, the run itself up to date: `mlc run` must make
    the submission again, not hand back the one made from the old test.csv."""
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    assert _run(data, tmp_path)[0] == 0
    lines = (data / "test.csv").read_text().splitlines()
    (data / "test.csv").write_text("\n".join(lines[:-1]) + "\n")
    code, text = mlc("extract", data, *TINY, "--split", "test", "--overwrite", "--cache-dir", tmp_path / "cache")
    assert code == 0, text
    code, text = _run(data, tmp_path)
    assert code == 0 and "not refitted" in text, text
    assert _ids(tmp_path / "runs" / "demo" / "submission.csv") == [ln.split(",", 1)[0] for ln in lines[1:-1]]


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_a_finetuned_run_made_from_other_data_is_finetuned_again_with_overwrite(tmp_path, monkeypatch):
    from pipeline import workflow
    from pipeline.cache import read_meta

    monkeypatch.setitem(workflow.TRUNK_ROUTE, "tiny-resnet", {"image_cut": "layer3", "epochs": 1, "lr": 1e-3,
                                                                 "encoder_lr": 3e-4})
    monkeypatch.setitem(workflow.TEXT_CUTS, "tiny-bert", "layer1")
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    assert _run(data, tmp_path, "--finetune")[0] == 0
    tuned = RunDir(tmp_path / "runs" / "demo-finetuned")
    old = sha256_file(tuned.manifest)
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(lines[:-2]) + "\n")
    code, text = _run(data, tmp_path, "--finetune", "--overwrite")
    assert code == 0, text
    (trunk,) = (tmp_path / "cache").rglob("train__*_img-*.h5")
    assert sha256_file(tuned.manifest) != old
    assert tuned.load().features[0]["data_fingerprint"] == read_meta(trunk).data_fingerprint
    assert f"submission: {tuned.submission}" in text


def test_out_through_a_symlink_is_judged_by_what_it_points_to(fitted):
    f, tmp = fitted, fitted["tmp"]
    (tmp / "to-run").symlink_to(f["run"], target_is_directory=True)
    code, text = mlc(*FOLDER_COMMANDS["fit-head"](f, tmp / "to-run"))
    assert code == 0, text
    assert (tmp / "to-run").is_symlink() and RunDir(f["run"]).verify()  # the run replaced where it lives
    foreign_folder(tmp / "mine")
    (tmp / "to-mine").symlink_to(tmp / "mine", target_is_directory=True)
    code, text = mlc(*FOLDER_COMMANDS["fit-head"](f, tmp / "to-mine"))
    assert one_line_error(code, text, "to-mine", "notes.txt"), text


# ------------------------------------------------------------------------ 6. resource faults


def test_a_writer_error_hiding_a_full_disk_is_an_output_error(tmp_path):
    class WriterError(Exception):
        pass

    with pytest.raises(OutputError, match="No space left on device"), atomic_path(tmp_path / "w.bin"):
        raise WriterError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(OutputError, match="No space left on device"), atomic_path(tmp_path / "w.bin"):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise RuntimeError("unexpected pos 576 vs 534") from e
    with pytest.raises(KeyError), atomic_path(tmp_path / "w.bin"):  # anything else is not a disk fault
        raise KeyError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_write_safetensors_on_a_failing_disk_is_an_output_error(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.Path, "write_bytes", full)
    with pytest.raises(OutputError, match=r"cannot write .*w\.safetensors: No space left on device"):
        write_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(4)})


def _mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped elsewhere), to be filled with ``_fill``."""
    path = tmp_path / "small"
    if not _mount(path, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the real full-disk tests are skipped")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(disk: Path, leave: int = 12 << 10) -> None:
    """Fill ``disk``, then free ``leave`` bytes: enough for the checks before the work, not for the outputs."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while os.write(fd, b"\0" * 4096):
            pass
    os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))


@pytest.mark.slow  # three whole jobs on a filled disk (~6 s): the fast suite keeps to 2 minutes
def test_a_full_disk_ends_in_one_line_and_keeps_the_old_outputs(fitted, small_disk):
    f = fitted
    _fill(small_disk)
    cases = {
        "fit-head": FOLDER_COMMANDS["fit-head"](f, small_disk / "run"),
        "export": FOLDER_COMMANDS["export"](f, small_disk / "model"),
        "finetune": ("finetune", f["data"], *TINY[:7], "--out", small_disk / "ft", "--epochs", 1, "--batch-size",
                     8, "--workers", 0),
    }
    for name, args in cases.items():
        code, text = mlc(*args)
        assert one_line_error(code, text, "cannot write", small_disk, "No space left on device"), (name, text)
    assert not list(small_disk.glob(".*staging"))  # nothing half-written left behind


def test_report_and_predict_on_a_full_disk_keep_the_run(fitted, small_disk):
    run = small_disk / "run"
    shutil.copytree(fitted["run"], run)
    _fill(small_disk)
    before = snapshot(run)
    code, text = mlc("report", run)
    assert one_line_error(code, text, "cannot write", small_disk, "No space left on device"), text
    _fill(small_disk, leave=0)
    photos = [fitted["data"] / "data" / "1000.jpg", fitted["tmp"] / "missing.jpg"]
    code, text = mlc("predict", run, *photos, "--caption", "a dog", "--backend", "torch", "--workers", 0,
                     "--out", small_disk / "preds.csv")
    assert one_line_error(code, text, "cannot write", small_disk), text  # before reading a photo
    assert {k: v for k, v in snapshot(run).items() if not k.startswith("report/")} == before
    RunDir(run).verify()
