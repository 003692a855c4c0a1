"""Issue 25, trust round three (what was left): an output must be a regular file (or folder) path, said plainly
and naming --out; --force replaces a foreign file, never what another mlc command wrote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_inputs import no_hang
from test_outputs import mlc, one_line_error, snapshot

from pipeline.atomic import claim_output
from pipeline.errors import OutputError

BACKEND = ("--backend", "torch", "--workers", 0)


def _predict(f: dict, *extra: object) -> tuple[int, str]:
    return mlc("predict", f["run"], f["data"] / "data" / "1000.jpg", "--caption", "a dog", *BACKEND, "--format", "csv",
               *extra)


@pytest.mark.parametrize("out", ["/dev/stdout", "/dev/stderr", "/dev/fd/1", "/proc/self/fd/1", "/dev/null"])
def test_out_that_is_a_stream_or_a_device_must_be_a_regular_file_path(out, tmp_path):
    """Whatever fd 1 is (a terminal, a pipe, a redirected file): the claim refuses before any work, naming --out."""
    with pytest.raises(OutputError, match=f"{out}: --out must be a regular file path, and {out} is a "):
        claim_output(out, what="a predictions file", ours=lambda p: True, folder=False, force=True)
    with pytest.raises(OutputError, match="--out must be a folder path"):
        claim_output(out, what="an mlc export folder", ours=lambda p: True, folder=True)
    link = tmp_path / "out.csv"  # a link that leads there is the same output
    link.symlink_to(out)
    with pytest.raises(OutputError, match="--out must be a regular file path"):
        claim_output(link, what="a predictions file", ours=lambda p: True, folder=False)
    assert claim_output(tmp_path / "fine.csv", what="a predictions file", ours=lambda p: True, folder=False)


def test_the_cli_says_so_in_one_line(fitted, tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with no_hang():
        for out in ("/dev/stdout", fifo):
            code, text = _predict(fitted, "--out", out, "--force")
            assert one_line_error(code, text, f"--out must be a regular file path, and {out} is"), text
    assert "a FIFO" in text and fifo.is_fifo()
    code, text = mlc("export", fitted["run"], "--out", "/dev/stdout")
    assert one_line_error(code, text, "--out must be a folder path, and /dev/stdout is a standard stream"), text


def test_force_never_replaces_what_another_command_wrote(fitted):
    f, tmp = fitted, fitted["tmp"]
    (f["data"] / "test.csv").write_text((f["data"] / "train.csv").read_text())  # a labelled split to score
    evaluate = ("evaluate", f["run"], f["data"], *BACKEND)
    sub, preds, scores = tmp / "sub.csv", tmp / "preds.csv", tmp / "scores.json"
    assert mlc("submit", f["run"], f["data"], "--cache-dir", tmp / "cache", *BACKEND, "--out", sub)[0] == 0
    assert _predict(f, "--out", preds)[0] == 0
    assert mlc(*evaluate, "--out", scores)[0] == 0
    page = tmp / "runs.html"
    assert mlc("runs", tmp, "--out", page)[0] == 0
    kinds = {f["cache"]: "HDF5 feature cache", sub: "submission", preds: "predictions", scores: "scores",
             page: "runs page"}
    before = {p: p.read_bytes() for p in kinds}
    for p in (f["cache"], sub, preds, page):
        code, text = mlc(*evaluate, "--out", p, "--force")
        assert one_line_error(code, text, p, kinds[p], "even --force never replaces"), (p, text)
    for p in (f["cache"], sub, scores):
        code, text = _predict(f, "--out", p, "--force")
        assert one_line_error(code, text, p, kinds[p], "even --force never replaces"), (p, text)
    code, text = mlc("submit", f["run"], f["data"], "--cache-dir", tmp / "cache", *BACKEND, "--out", preds, "--force")
    assert one_line_error(code, text, preds, "predictions", "even --force never replaces"), text
    assert {p: p.read_bytes() for p in kinds} == before
    assert mlc(*evaluate, "--out", scores)[0] == 0  # its own kind: replaced, as before
    foreign = tmp / "notes.json"
    foreign.write_text('{"mine": 1}\n')
    assert mlc(*evaluate, "--out", foreign, "--force")[0] == 0 and "samples_f1" in foreign.read_text()


def test_mlc_kind_reads_only_what_it_knows(tmp_path):
    from pipeline.output_rules import mlc_kind

    for name, text in (("a.csv", "id,value\n1,2\n"), ("b.json", '{"samples_f1": 1}'), ("c.html", "<!doctype html>hi"),
                       ("d.bin", "")):
        (tmp_path / name).write_text(text)
        assert mlc_kind(tmp_path / name) is None, name
    assert mlc_kind(tmp_path / "missing") is None
    assert mlc_kind(Path("/dev/null")) is None


def test_force_never_replaces_a_lone_dataset_csv(tmp_path):
    """A data folder's labels CSV is refused as an output even with --force, by name or by its header, wherever it
    lies (`mlc runs --out train.csv --force` replaced it: no photos beside it, so no dataset folder)."""
    from pipeline.output_rules import mlc_kind

    runs = tmp_path / "runs"
    runs.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("ImageID,Labels,Caption\n0.jpg,1,a dog\n")
    named = tmp_path / "train.csv"
    named.write_text("id,value\n1,2\n")
    before = {p: p.read_bytes() for p in (labels, named)}
    for p in (labels, named):
        assert mlc_kind(p) == "a dataset's labels CSV"
        code, text = mlc("runs", runs, "--out", p, "--force")
        assert one_line_error(code, text, p, "a dataset's labels CSV", "even --force never replaces"), text
    assert {p: p.read_bytes() for p in (labels, named)} == before
    other = tmp_path / "other.csv"
    other.write_text("id,value\n1,2\n")
    assert mlc("runs", runs, "--out", other, "--force")[0] == 0 and "<h1>mlc runs</h1>" in other.read_text()


def test_force_never_replaces_a_data_folder_a_command_does_not_read(fitted, tmp_path):
    """Hostile cases O02/O06: fit-head and export do not read the data folder, so it was no input of theirs, and
    --force replaced it (train.csv, test.csv and every photo deleted)."""
    f = fitted
    copy = tmp_path / "parent" / "data"
    copy.parent.mkdir()
    copy.mkdir()
    (copy / "train.csv").write_text((f["data"] / "train.csv").read_text())
    before = snapshot(f["data"]), snapshot(copy.parent)
    for out, csv in ((f["data"], f["data"] / "train.csv"), (copy.parent, copy / "train.csv")):
        code, text = mlc("fit-head", f["cache"], "--out", out, "--force", "--folds", 0, "--epochs", 1)
        assert one_line_error(code, text, out, f"it holds a dataset ({csv})", "even --force"), text
        code, text = mlc("export", f["run"], "--out", out, "--force")
        assert one_line_error(code, text, out, "it holds a dataset", "even --force"), text
    assert (snapshot(f["data"]), snapshot(copy.parent)) == before
    photos = tmp_path / "photos"  # a folder of photos (a dataset's image folder, or anyone's): data too
    photos.mkdir()
    (photos / "IMG_0001.JPG").write_bytes(b"\xff\xd8 a photo")
    before = snapshot(photos)
    assert one_line_error(*mlc("export", f["run"], "--out", photos, "--force"), photos, "it holds a dataset", "photos")
    assert snapshot(photos) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    assert mlc("fit-head", f["cache"], "--out", foreign, "--force", "--folds", 0, "--epochs", 1)[0] == 0  # as before


def test_load_of_a_file_or_a_missing_path_says_what_it_is(tmp_path):
    """Hostile case A01: load() of an existing file said "missing the folder", and named run folders only."""
    import pipeline as mlc_api
    from pipeline.errors import MlcError
    from pipeline.runs import RunDir

    notes = tmp_path / "notes.csv"
    notes.write_text("hi\n")
    with pytest.raises(MlcError, match="notes.csv: it is a file, not a folder; a model is a run folder .* or an "
                                       "export folder"):
        mlc_api.load(notes)
    with pytest.raises(MlcError, match="nope: no such folder; a model is a run folder"):
        mlc_api.load(tmp_path / "nope")
    with pytest.raises(MlcError, match=r"notes.csv: not an mlc run folder \(it is a file, not a folder\)"):
        RunDir(notes).check_format()


def test_ctrl_c_while_a_command_starts_ends_with_one_line(monkeypatch, tmp_path):
    """Hostile case I02a: Ctrl-C while fit-head was still importing (a minute on a busy machine) ended with no
    'interrupted:' line (click's own abort)."""
    from pipeline import cli

    def interrupted(name: str):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    code, text = mlc("fit-head", tmp_path / "x.h5", "--out", tmp_path / "run")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("[mlc fit-head]")]
    assert code == 130 and lines == [lines[0]] and lines[0].startswith("interrupted: mlc fit-head stopped"), text
    assert not (tmp_path / "run").exists()


SLOW_DECODE = """
import sys, time
from pipeline.data import DataDir
real = DataDir.image
def image(self, *a, **k):  # decoding slowed, so Ctrl-C comes while the decode workers are busy
    time.sleep(0.05)
    return real(self, *a, **k)
DataDir.image = image
from pipeline.cli import app
sys.argv = ["mlc", "extract", *sys.argv[1:]]
app()
"""


@pytest.mark.slow  # a real extract in a subprocess, with decode workers, interrupted as a terminal does
def test_ctrl_c_during_extract_with_decode_workers_is_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, make_data_dir

    data = make_data_dir(tmp_path / "d", n_train=400, n_test=2)
    cmd = [sys.executable, "-c", SLOW_DECODE, str(data), "--image-encoder", "tiny-resnet", "--text-encoder",
           "tiny-bert", "--random-init", "--workers", "2", "--backend", "torch", "--split", "train", "--cache-dir",
           str(tmp_path / "cache"), "--chunk-rows", "64"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    os.set_blocking(p.stderr.fileno(), False)  # type: ignore[union-attr]
    err, t = b"", time.time()
    while b"extract train" not in err and time.time() - t < 600 and p.poll() is None:  # the workers are decoding
        err += p.stderr.read() or b""  # type: ignore[union-attr]
        time.sleep(0.1)
    assert p.poll() is None, err.decode(errors="replace")
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group, decode workers included
    os.set_blocking(p.stderr.fileno(), True)  # type: ignore[union-attr]
    out, rest = p.communicate(timeout=300)
    text = (err + rest).decode(errors="replace").replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("[mlc extract]")
             and "extract train" not in ln]
    assert p.returncode == 130, text
    assert len(lines) == 1 and lines[0].startswith("interrupted: mlc extract stopped"), text
    for noise in ("Traceback", "multiprocessing", "KeyboardInterrupt", "Exception ignored"):
        assert noise not in text, text
    assert not out.strip(), out
    assert not list((tmp_path / "cache").rglob("*.h5"))  # no cache claimed finished


def test_an_empty_or_unknown_photo_says_what_it_is(tmp_path):
    """Hostile note V07: a zero-byte photo was 'cannot identify image file <_io.BufferedReader name=3>'."""
    from pipeline.errors import ImageError
    from pipeline.images import load_image

    (tmp_path / "0.jpg").write_bytes(b"")
    (tmp_path / "1.jpg").write_text("not a photo\n")
    with pytest.raises(ImageError, match=r"0.jpg: cannot decode image: an empty file \(0 bytes\)$"):
        load_image(tmp_path / "0.jpg")
    with pytest.raises(ImageError, match=r"1.jpg: cannot decode image: no image format Pillow reads \(12 bytes\)$"):
        load_image(tmp_path / "1.jpg")
    # mlc validate's whole-folder check (images._quick_check) says it the same way
    from pipeline.images import _quick_check

    assert _quick_check(tmp_path / "0.jpg") == "cannot decode image: an empty file (0 bytes)"
    assert _quick_check(tmp_path / "1.jpg") == "cannot decode image: no image format Pillow reads (12 bytes)"
