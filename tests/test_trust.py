"""Issue 25, trust round three: one output policy for every written file, bounded reads of every read file,
options checked like data, model folders that agree with themselves, one decode path for photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_data_dir
from test_inputs import no_hang
from test_outputs import mlc, one_line_error, snapshot

from pipeline import reading
from pipeline.data import DataDir, DataOptions
from pipeline.errors import DataError
from pipeline.folders import read_json
from pipeline.labels import LabelSpace
from pipeline.records import parse_csv

BACKEND = ("--backend", "torch", "--workers", 0)


def _submit(f: dict, *extra: object) -> tuple[int, str]:
    return mlc("submit", f["run"], f["data"], "--cache-dir", f["tmp"] / "cache", *BACKEND, *extra)


def _predict(f: dict, *extra: object) -> tuple[int, str]:
    return mlc("predict", f["run"], f["data"] / "data" / "1000.jpg", "--caption", "a dog", *BACKEND, *extra)


# ------------------------------------------------------------------------------------ 1. one output policy


def test_predictions_never_replace_a_submission(fitted):
    sub = fitted["tmp"] / "sub.csv"
    assert _submit(fitted, "--out", sub)[0] == 0
    before = sub.read_bytes()
    for fmt in ("csv", "json", "table"):
        code, text = _predict(fitted, "--format", fmt, "--out", sub)
        assert one_line_error(code, text, sub, "is not a predictions file"), text
    assert sub.read_bytes() == before
    assert _predict(fitted, "--format", "csv", "--out", fitted["tmp"] / "p.csv")[0] == 0  # a table replaces a table
    assert _predict(fitted, "--format", "table", "--out", fitted["tmp"] / "p.csv")[0] == 0


def test_evaluate_out_follows_the_output_policy(fitted):
    f, tmp = fitted, fitted["tmp"]
    (f["data"] / "test.csv").write_text((f["data"] / "train.csv").read_text())  # a labelled split to score
    mine = tmp / "mine.json"
    mine.write_text('{"mine": 1}\n')
    evaluate = ("evaluate", f["run"], f["data"], *BACKEND)
    code, text = mlc(*evaluate, "--out", mine)
    assert one_line_error(code, text, mine, "--force"), text
    assert mine.read_text() == '{"mine": 1}\n'
    before = snapshot(f["data"])
    for out in (f["data"] / "train.csv", f["data"] / "test.csv", f["data"] / "data" / "1000.jpg", f["run"] / "s.json"):
        code, text = mlc(*evaluate, "--out", out, "--force")
        assert one_line_error(code, text, "which this command reads"), (out, text)
    assert snapshot(f["data"]) == before
    scores = tmp / "scores.json"
    assert mlc(*evaluate, "--out", scores)[0] == 0 and mlc(*evaluate, "--out", scores)[0] == 0  # its own: replaced
    assert json.loads(scores.read_text())["rows"] == 30


def test_force_never_replaces_a_file_inside_the_data_folder(fitted):
    f = fitted
    (f["data"] / "README.txt").write_text("about my data\n")
    before = snapshot(f["data"])
    for out in (f["data"] / "data" / "1001.jpg", f["data"] / "README.txt"):
        code, text = _submit(f, "--out", out, "--force")
        assert one_line_error(code, text, "--force never replaces a file inside"), text
    code, text = _predict(f, "--format", "csv", "--out", f["data"] / "data" / "1001.jpg", "--force")  # beside a photo
    assert one_line_error(code, text, "--force never replaces a file inside"), text
    assert snapshot(f["data"]) == before
    assert _submit(f, "--out", f["data"] / "new-submission.csv")[0] == 0  # a new file there is fine


def test_an_output_that_is_no_regular_file_is_never_replaced(fitted, tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with no_hang():
        for out in (fifo, Path("/dev/null")):
            code, text = _predict(fitted, "--format", "csv", "--out", out, "--force")
            assert one_line_error(code, text, out, "--out must be a regular file path"), text
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()


def test_an_output_name_too_long_is_refused_in_one_line(fitted):
    long_name = fitted["tmp"] / ("p" * 240 + ".csv")  # fits alone, not with mlc's staging prefix beside it
    code, text = _predict(fitted, "--format", "csv", "--out", long_name)
    assert one_line_error(code, text, "mlc's temporary name"), text
    code, text = mlc("export", fitted["run"], "--out", fitted["tmp"] / ("e" * 300) / "model")
    assert one_line_error(code, text, "the file system allows"), text
    assert not long_name.exists()


# ------------------------------------------------------------------------------------ 2. bounded reads


@pytest.mark.parametrize("what", ["fifo", "zero", "folder"])
def test_every_file_read_must_be_a_regular_file(tmp_path, what):
    bad = tmp_path / "bad"
    if what == "fifo":
        os.mkfifo(bad)
        want = "FIFO"
    elif what == "zero":
        bad.symlink_to("/dev/zero")
        want = "character device"
    else:
        bad.mkdir()
        want = "a folder"
    with no_hang():
        assert want in parse_csv(bad, labelled=False)[1][0].fault
        with pytest.raises(DataError, match=want):
            LabelSpace.from_file(bad)
        with pytest.raises(DataError, match=want):
            read_json(bad, "a run")


def test_a_fifo_as_captions_or_labels_is_one_line_not_a_hang(fitted, tmp_path):
    fifo = tmp_path / "captions.csv"
    os.mkfifo(fifo)
    with no_hang():
        code, text = mlc("predict", fitted["run"], fitted["data"] / "data" / "1000.jpg", "--captions", fifo, *BACKEND)
        assert one_line_error(code, text, fifo, "not a regular file"), text
        code, text = mlc("validate", fitted["data"], "--labels", "/dev/zero")  # validate lists it among the problems
        assert code == 1 and "/dev/zero: not a regular file (a character device)" in text, text


def test_a_file_larger_than_any_real_one_is_refused_with_its_size(tmp_path, monkeypatch):
    root = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    size = (root / "train.csv").stat().st_size
    monkeypatch.setattr(reading, "CSV_BYTES", 100)
    import pipeline.records as records

    monkeypatch.setattr(records, "CSV_BYTES", 100)
    with pytest.raises(DataError, match=rf"train.csv: {size:,} bytes, more than any real CSV file holds"):
        DataDir.open(root, DataOptions()).records("train")
    big = tmp_path / "x.json"
    big.write_bytes(b" " * (reading.JSON_BYTES + 1))
    with pytest.raises(DataError, match=r"x.json: 64 MiB, more than any real JSON file holds"):
        read_json(big, "a run")


# ------------------------------------------------------------------------------------ 4. options checked like data


@pytest.mark.parametrize(("args", "named"), [
    (("fit-head", "x.h5", "--lr", "inf"), "--lr inf: not a finite number"),
    (("fit-head", "x.h5", "--weight-decay", "nan"), "--weight-decay nan: not a finite number"),
    (("fit-head", "x.h5", "--clip", "-inf"), "--clip -inf: not a finite number"),
    (("fit-head", "x.h5", "--seed", "-1"), "--seed -1: out of range"),
    (("fit-head", "x.h5", "--hidden", "1000000000"), "--hidden 1000000000: out of range"),
    (("predict", "m", "x.jpg", "--encode-batch", "100000000"), "--encode-batch 100000000: out of range"),
])
def test_numeric_options_are_finite_and_in_range_naming_the_option(args, named):
    code, text = mlc(*args)
    assert one_line_error(code, text, named), text


def test_an_old_spelling_and_its_new_one_must_agree(tmp_path):
    data = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    code, text = mlc("extract", data, "--out-dir", tmp_path / "a", "--cache-dir", tmp_path / "b")
    assert code == 2 and "--out-dir is the old spelling of --cache-dir, and they disagree" in text, text
    assert "Traceback" not in text and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------ 6. one decode path


def _odd_photos(folder: Path) -> list[Path]:
    """Photos whose decoding is more than Image.convert("RGB"): 16-bit grey, palette grey, CMYK, alpha, EXIF."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    paths = {name: folder / name for name in ("g16.png", "pal.png", "cmyk.jpg", "rgba.png", "exif.jpg")}
    Image.fromarray(grey.astype(np.uint16) * 200).save(paths["g16.png"])  # a 16-bit greyscale PNG
    Image.fromarray(grey, "L").convert("P").save(paths["pal.png"])
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).convert("CMYK").save(paths["cmyk.jpg"])
    rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(paths["rgba.png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees
    Image.fromarray(rgba[..., :3]).save(paths["exif.jpg"], exif=exif)
    return list(paths.values())


def test_a_pil_image_is_decoded_as_its_path_is(fitted, tmp_path):
    from PIL import Image

    from pipeline import load

    pred = load(fitted["run"], backend="torch")
    paths = _odd_photos(tmp_path)
    caps = ["a photo"] * len(paths)
    want = pred.predict_proba(paths, caps)
    fresh = [Image.open(p) for p in paths]  # not decoded yet
    loaded = [Image.open(p) for p in paths]
    for im in loaded:
        im.load()
    modes = [im.mode for im in loaded]
    for photos in (fresh, loaded):
        got = pred.predict_proba(photos, caps)
        assert abs(got - want).max() < 1e-5, (photos, abs(got - want).max(axis=1))
    assert [im.mode for im in loaded] == modes  # the caller's images are left as they were


# ------------------------------------------------------------------------------------ 8. read-only caches


def test_up_to_date_caches_on_read_only_storage_serve_extract_and_submit(fitted, tmp_path):
    import shutil
    import subprocess

    store = tmp_path / "ro"
    store.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(store)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        shutil.copytree(fitted["tmp"] / "cache", store / "cache")
        code, text = mlc("extract", fitted["data"], "--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert",
                         "--random-init", *BACKEND, "--cache-dir", store / "cache", "--split", "test")
        assert code == 0, text
        assert subprocess.run(["mount", "-o", "remount,ro", str(store)], capture_output=True).returncode == 0
        before = snapshot(store)
        code, text = mlc("extract", fitted["data"], "--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert",
                         "--random-init", *BACKEND, "--cache-dir", store / "cache")
        assert code == 0 and text.count("up to date") == 2, text
        sub = tmp_path / "sub.csv"
        code, text = _submit({**fitted, "tmp": store}, "--out", sub)
        assert code == 0 and len(sub.read_text().splitlines()) == 5, text
        (fitted["data"] / "test.csv").write_text((fitted["data"] / "test.csv").read_text().replace("a", "b"))
        code, text = _submit({**fitted, "tmp": store}, "--out", sub)
        assert code == 2 and "error:" in text and "Traceback" not in text, text  # stale and unwritable: one line
        assert snapshot(store) == before
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)


# ------------------------------------------------------------------------------------ 5. leftovers of killed writers


def test_a_killed_exports_staging_folder_is_removed_by_the_next_writer(fitted):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    out = fitted["tmp"] / "model"
    stage = fitted["tmp"] / f".model.{pid}.abcd1234.staging"
    (stage / "encoders").mkdir(parents=True)
    (stage / "model.onnx").write_bytes(b"\0" * 1000)
    tmp_file = fitted["tmp"] / f".preds.csv.{pid}.abcd1234.tmp"
    tmp_file.write_text("half")
    code, text = mlc("export", fitted["run"], "--out", out, "--format", "safetensors")
    assert code == 0, text
    assert not stage.exists() and not tmp_file.exists() and (out / "export.json").is_file()


# ------------------------------------------------------------------------------------ 3. model folders agree


@pytest.fixture(scope="module")
def exports(fitted_once, tmp_path_factory) -> dict[str, Path]:
    from pipeline.export import ExportConfig, export

    root = tmp_path_factory.mktemp("exports")
    return {fmt: export(ExportConfig.build(run=fitted_once / "run", out=root / fmt, format=fmt))[0]
            for fmt in ("onnx", "safetensors")}


def _resigned(src: Path, dest: Path, edit) -> Path:
    """A copy of the export ``src`` with export.json edited as a writer that knows the format would (file
    hashes and its checksum redone): what only the folder's agreement with itself can catch."""
    import shutil

    from pipeline.folders import sha256_file
    from pipeline.schemas import CHECKSUM, checksum

    shutil.copytree(src, dest)
    path = dest / "export.json"
    d = json.loads(path.read_text())
    edit(d, dest)
    d["files"] = {name: {"bytes": (dest / name).stat().st_size, "sha256": sha256_file(dest / name)}
                  for name in d["files"]}
    d.pop(CHECKSUM, None)
    path.write_text(json.dumps({**d, CHECKSUM: checksum(d)}))
    return dest


def _drop_label(d: dict, _: Path) -> None:
    for key in ("label_ids", "label_names", "thresholds"):
        d[key] = d[key][:-1]
    d["decision"]["thresholds"] = d["decision"]["thresholds"][:-1]  # the rule's own copy (issue 26), kept consistent
    if "head" in d:
        d["head"]["num_classes"] -= 1


def _other_graph(d: dict, folder: Path) -> None:
    """A graph with one output fewer labels, put where the export's graph belongs."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    model.graph.output[0].name = "scores"
    for node in model.graph.node:
        node.output[:] = ["scores" if o == "probabilities" else o for o in node.output]
    onnx.save(model, str(folder / "model.onnx"))


EDITS = {
    "onnx": [
        (_drop_label, "label_ids: 2 labels, but the graph gives 3 probabilities"),
        (lambda d, _: d["decision"].update(at_least_one=False), "decision.at_least_one: False is not the rule"),
        (lambda d, _: d["decision"].update(top_k=2), "decision.top_k: 2 is not the rule"),
        (lambda d, _: d.update(kind="safetensors"), "kind: 'safetensors', but the folder is a onnx export"),
        (lambda d, _: d["graph"]["inputs"][0].update(dtype="float32"), "graph.inputs: the graph's inputs are"),
        (_other_graph, "graph.outputs: the graph's outputs are"),
        # hostile case M04: the README's "per-label thresholds" said 0.99 while decision.thresholds' 0.5 applied
        (lambda d, _: d.update(thresholds=[0.99] * len(d["thresholds"])),
         "thresholds: [0.99, 0.99, 0.99] disagree with decision.thresholds"),
    ],
    "safetensors": [
        (_drop_label, "head-0.safetensors: cannot load the head's weights"),
        (lambda d, _: d["head"].update(image_dim=d["head"]["image_dim"] + 1), "head.image_dim/text_dim: "),
        (lambda d, _: d["decision"].pop("at_least_one"), "decision.at_least_one: None is not the rule"),
    ],
}


@pytest.mark.parametrize(("fmt", "i"), [(f, i) for f, cases in EDITS.items() for i in range(len(cases))])
def test_an_export_that_disagrees_with_itself_is_refused_naming_file_and_field(exports, tmp_path, fmt, i):
    edit, want = EDITS[fmt][i]
    model = _resigned(exports[fmt], tmp_path / "model", edit)
    photo = tmp_path / "p.jpg"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
    code, text = mlc("predict", model, photo, "--caption", "a dog", *BACKEND)
    assert one_line_error(code, text, want), text
    assert "export.json" in text or ".safetensors" in text


# ------------------------------------------------------------------------------------ 5. interrupts and faults


def test_ctrl_c_ends_in_one_line(tmp_path, monkeypatch):
    import pipeline.extract

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.extract, "extract", interrupted)
    code, text = mlc("extract", make_data_dir(tmp_path / "d", n_train=6, n_test=2), "--cache-dir", tmp_path / "c")
    assert code == 130 and text.strip().splitlines() == [
        "interrupted: mlc extract stopped; its outputs are as they were before (an extract resumes from its finished "
        "chunks when run again)"], text


FULL_AT_ASSEMBLY = """
import collections, os, sys
from pipeline import cache
Usage = collections.namedtuple("Usage", "total used free")
cache.shutil.disk_usage = lambda p: Usage(1 << 40, 0, 1 << 40)  # the estimate passes
real = cache.CacheWriter.finalize
def finalize(self):  # the disk fills up (another writer) just before the assembly
    fd = os.open(self.target.parent / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    os.ftruncate(fd, os.fstat(fd).st_size - 4 * 1024)  # 4 KB left: HDF5 fails closing a dataset
    os.close(fd)
    return real(self)
cache.CacheWriter.finalize = finalize
from pipeline.cli import app
sys.argv = ["mlc", "extract", *sys.argv[1:]]
app()
"""


@pytest.mark.slow  # a whole extract in a subprocess on a filled tmpfs
def test_a_full_disk_during_the_hdf5_assembly_is_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        data = make_data_dir(tmp_path / "d", n_train=200, n_test=2)
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLC_PLUGINS": str(REPO / "tests" / "tiny_encoders.py")}
        proc = subprocess.run([sys.executable, "-c", FULL_AT_ASSEMBLY, str(data), "--image-encoder", "tiny-resnet",
                               "--text-encoder", "tiny-bert", "--random-init", "--workers", "0", "--backend", "torch",
                               "--cache-dir", str(disk / "c"), "--split", "train"],
                              capture_output=True, text=True, env=env, timeout=300)
        lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and "extract train" not in ln
                 and not (ln.startswith("[mlc extract] still:"))]  # the heartbeat of a slow start is not noise
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("error: cannot write") and lines[0].endswith("No space left on device"), lines
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ------------------------------------------------------------------------------------ found by the hostile sample


def test_force_never_writes_into_any_run_or_export(fitted, exports):
    sub = fitted["run"] / "submission.csv"
    assert _submit(fitted, "--out", sub)[0] == 0  # the run's own submission: its submit may write it
    before = snapshot(fitted["run"])
    for out in (sub, fitted["run"] / "notes.csv"):  # predicting with another model into this run
        code, text = mlc("predict", exports["onnx"], fitted["data"] / "data" / "1000.jpg", "--caption", "a dog",
                         *BACKEND, "--format", "csv", "--out", out, "--force")
        assert one_line_error(code, text, "an mlc run or export"), text
    assert snapshot(fitted["run"]) == before


def test_photos_that_are_no_regular_files_are_named_never_skipped(fitted, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.jpg").write_bytes((fitted["data"] / "data" / "1000.jpg").read_bytes())
    os.mkfifo(pics / "b.jpg")
    with no_hang():
        code, text = mlc("predict", fitted["run"], pics, "--caption", "x", *BACKEND)
        assert one_line_error(code, text, "b.jpg: not a regular file (a FIFO"), text
        (pics / "b.jpg").unlink()
        (pics / "c.jpg").symlink_to("/dev/zero")
        code, text = mlc("predict", fitted["run"], pics / "c.jpg", "--caption", "x", *BACKEND)
        assert one_line_error(code, text, "c.jpg: not a regular file (a character device)"), text


def test_model_files_that_are_no_regular_files_are_named(fitted, exports, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(exports["onnx"], model)
    (model / "export.json").unlink()
    os.mkfifo(model / "export.json")
    with no_hang():
        code, text = mlc("predict", model, fitted["data"] / "data" / "1000.jpg", "--caption", "x", *BACKEND)
        assert one_line_error(code, text, "export.json: not a regular file (a FIFO"), text
        (fitted["run"] / "thresholds.json").unlink()
        (fitted["run"] / "thresholds.json").symlink_to("/dev/zero")
        code, text = _submit(fitted)
        assert one_line_error(code, text, "thresholds.json: not a regular file"), text


def test_a_csv_that_is_a_link_to_a_device_is_named_not_missing(tmp_path):
    from pipeline.validate import validate_data_dir

    root = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    (root / "train.csv").unlink()
    (root / "train.csv").symlink_to("/dev/urandom")
    with no_hang():
        report = validate_data_dir(root, csv_only=True, progress=False)
        with pytest.raises(DataError, match="train.csv: not a regular file \\(a character device\\)"):
            DataDir.open(root).records("train")
    assert [str(p) for p in report.problems] == [f"{root / 'train.csv'}: not a regular file (a character device); "
                                                 "mlc reads a CSV file only from one"]
