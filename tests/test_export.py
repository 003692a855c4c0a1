"""`mlc export` (an ONNX folder that describes itself; float16, int8; safetensors), a client that knows only
export.json, torch-free `mlc predict` and `pipeline.load` on an export, `mlc evaluate`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from pipeline.data import DataDir
from pipeline.decision import RULES
from pipeline.errors import MlcError
from pipeline.export import ExportConfig, export
from pipeline.images import load_image
from pipeline.predictor import load

MINI = REPO / "examples" / "comp5329-mini"
runner = CliRunner()


@pytest.fixture(scope="module")
def onnx_export(finetuned, tmp_path_factory) -> Path:
    return export(ExportConfig.build(run=finetuned, out=tmp_path_factory.mktemp("exp") / "model"))[0]


@pytest.fixture(scope="module")
def photos(finetuned, tmp_path_factory) -> tuple[list[Path], list[str]]:
    """Generated photos of the tiny data (upscaled by the resize), real sample photos (downscaled), an odd-sized
    one (crop rounding) and a PNG with transparency, each with a caption."""
    folder = tmp_path_factory.mktemp("photos")
    records = DataDir.open(finetuned.parent / "tiny").records("train")[:6]
    paths = [finetuned.parent / "tiny" / "data" / r.image_id for r in records]
    caps = [r.caption for r in records]
    for r in DataDir.open(MINI).records("test")[:4]:
        paths.append(MINI / "data" / r.image_id)
        caps.append(r.caption)
    Image.open(paths[-1]).resize((101, 37)).save(folder / "odd.jpg")  # resized: 72 x 196, cropped
    Image.open(paths[-1]).resize((95, 72)).save(folder / "half.jpg")  # not resized; crop left = round(15.5)
    rgba = np.zeros((50, 80, 4), np.uint8)
    rgba[:, :40] = (200, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    return [*paths, folder / "odd.jpg", folder / "half.jpg", folder / "alpha.png"], \
        [*caps, "a dog", "a bus", "two people riding horses"]


def test_export_json_describes_the_graph_the_preprocessing_and_the_rule(onnx_export, finetuned):
    meta = json.loads((onnx_export / "export.json").read_text())
    run = load(finetuned, backend="torch")
    (branch,) = run.scorer.branches
    pre = branch.image.preprocess
    assert meta["format"] == 2 and meta["kind"] == "onnx" and meta["dtype"] == "float32"
    assert {i["name"]: (i["dtype"], i["shape"]) for i in meta["graph"]["inputs"]} == {
        "pixels": ("uint8", ["batch", 3, pre.crop, pre.crop]), "input_ids": ("int64", ["batch", "tokens"]),
        "attention_mask": ("int64", ["batch", "tokens"])}
    assert meta["graph"]["outputs"] == [{"name": "probabilities", "dtype": "float32",
                                         "shape": ["batch", len(run.labels)]}]
    image = meta["image"]
    assert (image["resize"]["shorter_side"], image["crop"]["size"], image["resize"]["interpolation"]) == \
        (pre.resize, pre.crop, pre.interpolation)
    assert image["normalisation"]["where"] == "inside the graph" and image["normalisation"]["mean"] == list(pre.mean)
    assert "exif_transpose" in image["decode"]
    assert meta["text"]["max_length"] == branch.text.preprocess.max_length
    assert meta["text"]["tokenizer"] in meta["files"]
    assert meta["label_ids"] == list(run.labels.ids) and meta["thresholds"] == pytest.approx(run.thresholds.tolist())
    assert meta["decision"]["at_least_one"] is True and meta["decision"]["rule"] in RULES
    assert meta["decision"]["rule"] == run.decision.rule and meta["decision"]["help"] == RULES[run.decision.rule].help
    assert sorted(meta["files"]) == ["README.md", "client.py", "model.onnx", "tokenizer.json"]  # no torch weights


def test_the_model_card_carries_encoders_data_scores_and_no_absolute_path(onnx_export, finetuned):
    meta = json.loads((onnx_export / "export.json").read_text())
    card, metrics = meta["card"], json.loads((finetuned / "metrics.json").read_text())
    features = json.loads((finetuned / "features.json").read_text())
    assert [(e["kind"], e["name"]) for e in card["encoders"]] == [("image", "tiny-resnet"), ("text", "tiny-bert")]
    assert all(e["weights"] and e["licence"] and len(e["weights_sha256"]) == 64 for e in card["encoders"])
    assert card["training_data"]["fingerprints"] == [features[0]["data_fingerprint"]] and \
        card["training_data"]["held_out_rows"] == metrics["held_out_rows"]
    assert [lab["id"] for lab in card["labels"]] == meta["label_ids"]
    assert card["metrics"]["samples_f1"] == metrics["samples_f1"] and "samples_f1_at_0.5" in card["metrics"]
    assert card["decision_rule"] == meta["decision"]["rule"] and card["intended_use"] and card["limits"]
    readme = (onnx_export / "README.md").read_text()
    assert "## Model card" in readme and f"{metrics['samples_f1']:.4f}" in readme and "tiny-resnet" in readme
    assert "Known limits" in readme and "client.py" in readme
    for text in ((onnx_export / "export.json").read_text(), readme):
        assert str(finetuned) not in text and "/tmp/" not in text and str(REPO) not in text
    assert meta["source_run"] == finetuned.name


def _client(folder: Path, tmp: Path, photos: list[Path], caps: list[str]) -> dict:
    """Run the export's own client.py from another folder in a fresh interpreter that cannot import mlc: its
    labels and pixels, and which modules it loaded."""
    probe = (f"import hashlib, json, runpy, sys\nns = runpy.run_path({str(folder / 'client.py')!r})\n"
             f"paths, caps = {[str(p) for p in photos]!r}, {caps!r}\n"
             "print(json.dumps({'labels': ns['predict_ids'](paths, caps), 'named': ns['predict'](paths, caps), "
             "'pixels': [hashlib.sha256(ns['pixels'](p).tobytes()).hexdigest() for p in paths], "
             "'modules': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pipeline', 'transformers'))}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_the_shipped_client_alone_gets_mlcs_pixels_and_labels(onnx_export, finetuned, photos, tmp_path):
    paths, caps = photos
    got = _client(onnx_export, tmp_path, paths, caps)
    assert got["modules"] == []  # onnxruntime, tokenizers, Pillow, numpy: no torch, no mlc
    (branch,) = load(finetuned, backend="torch").scorer.branches
    pre = branch.image.preprocess
    want = [hashlib.sha256(pre.pixels(0)(load_image(p, pre.draft_size())).numpy().tobytes()).hexdigest()
            for p in paths]
    assert got["pixels"] == want  # the resize/crop rule written out in export.json = torchvision's
    rule = load(onnx_export).scorer.image  # and mlc's own torch-free reading of it
    assert [hashlib.sha256(rule.pixels(load_image(p, rule.draft)).tobytes()).hexdigest() for p in paths] == want
    assert got["labels"] == load(finetuned, backend="torch").predict(paths, caps)
    assert [sorted(n for n, _ in row) for row in got["named"]] == [sorted(r) for r in pipeline.load(finetuned).predict(
        paths, caps)]  # names, as the Python API gives them
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cli = subprocess.run([sys.executable, str(onnx_export / "client.py"), str(paths[0]), caps[0]], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    line = cli.stdout.strip()
    assert line.startswith(str(paths[0])) and re.search(r"\w+ 0\.\d{3}", line)  # names with probabilities
    missing = subprocess.run([sys.executable, str(onnx_export / "client.py"), str(paths[0]), " "], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no caption" in missing.stderr  # the missing-caption rule
    res = runner.invoke(app, ["predict", str(onnx_export), str(paths[0]), "--caption", caps[0]])
    assert res.exit_code == 0, res.output  # the shipped client is a listed file: the folder still checks out


def test_predict_from_an_export_imports_no_torch_and_matches_the_run(onnx_export, finetuned, photos, tmp_path):
    paths, caps = photos
    (tmp_path / "caps.csv").write_text("ImageID,Caption\n" + "".join(f'{p.name},"{c}"\n' for p, c in
                                                                      zip(paths, caps, strict=True)))
    args = ["predict", str(onnx_export), *map(str, paths), "--captions", str(tmp_path / "caps.csv"), "--format",
            "json"]
    probe = (f"import runpy, sys\nsys.argv = ['mlc', *{args!r}]\ntry:\n    runpy.run_module('pipeline.cli', "
             "run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "NO-TORCH"
    rows = [json.loads(line) for line in out.stdout.splitlines()[:-1]]
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # the paths as given
    run = load(finetuned, backend="torch")
    assert [r["labels"] for r in rows] == run.predict(paths, caps)
    p = np.array([[r["probabilities"][str(i)] for i in run.labels.ids] for r in rows])  # every label's probability
    np.testing.assert_allclose(p, run.predict_proba(paths, caps), atol=1e-4)


def test_the_python_api_loads_an_export_or_a_run(onnx_export, finetuned, photos):
    paths, caps = photos
    model = load(onnx_export)  # the inference core; pipeline.load wraps it in a Model (names: tests/test_api.py)
    assert isinstance(pipeline.load(onnx_export).predictor, pipeline.Predictor)
    assert isinstance(model, pipeline.Predictor) and model.needs_images and model.needs_captions
    probs = model.predict_proba(paths, caps)
    assert probs.shape == (len(paths), len(model.labels)) and ((probs >= 0) & (probs <= 1)).all()
    labels = model.predict([load_image(p, model.draft) for p in paths], caps)  # PIL images too
    assert all(len(x) >= 1 for x in labels) and labels == model.predict(paths, caps)
    assert labels == load(finetuned, backend="torch").predict(paths, caps)
    with pytest.raises(MlcError, match="give one caption per photo"):
        model.predict(paths)


@pytest.mark.slow  # a second whole export (~6 s), as int8's below: the fast suite keeps to 2 minutes
def test_float16_halves_the_graph_and_keeps_its_labels(onnx_export, finetuned, photos, tmp_path):
    paths, caps = photos
    out, _ = export(ExportConfig.build(run=finetuned, out=tmp_path / "float16", precision="fp16"))
    assert json.loads((out / "export.json").read_text())["graph"]["dtype"] == "float16"
    assert (out / "model.onnx").stat().st_size < (onnx_export / "model.onnx").stat().st_size
    assert _weight_bytes(out / "model.onnx") <= 0.51 * _weight_bytes(onnx_export / "model.onnx")  # (nodes stay)
    model, full = load(out), load(onnx_export)
    np.testing.assert_allclose(model.predict_proba(paths, caps), full.predict_proba(paths, caps), atol=5e-3)
    assert model.predict(paths, caps) == full.predict(paths, caps)


@pytest.mark.slow  # one more export (15 s)
def test_int8_shrinks_the_graph_further(onnx_export, finetuned, photos, tmp_path):
    paths, caps = photos
    out, _ = export(ExportConfig.build(run=finetuned, out=tmp_path / "int8", precision="int8"))
    assert json.loads((out / "export.json").read_text())["graph"]["dtype"] == "int8"
    assert _weight_bytes(out / "model.onnx") < 0.51 * _weight_bytes(onnx_export / "model.onnx")
    p = load(out).predict_proba(paths, caps)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, load(onnx_export).predict_proba(paths, caps), atol=0.1)


def _weight_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)


def test_safetensors_export_float16_is_smaller_and_predicts_the_same_labels(finetuned, photos, tmp_path):
    paths, caps = photos
    full, full_size = export(ExportConfig.build(run=finetuned, out=tmp_path / "fp32", format="safetensors"))
    half, half_size = export(ExportConfig.build(run=finetuned, out=tmp_path / "fp16", format="safetensors",
                                                precision="fp16"))
    assert half_size < 0.6 * full_size
    run = load(finetuned, backend="torch")
    for folder in (full, half):
        model = load(folder, backend="torch")
        np.testing.assert_allclose(model.predict_proba(paths, caps), run.predict_proba(paths, caps),
                                   atol=2e-2 if folder == half else 1e-5)
    (half / "head-0.safetensors").write_bytes(b"broken")
    with pytest.raises(MlcError, match="head-0.safetensors: not as it was written"):
        load(half)
    with pytest.raises(MlcError, match="--precision int8 quantises the ONNX graph"):
        ExportConfig.build(run=finetuned, out=tmp_path / "x", format="safetensors", precision="int8")


@pytest.mark.parametrize("edit, fault", [
    (lambda m: m.update(thresholds=m["thresholds"][:-1]), r"export.json: thresholds: expected \d+ thresholds"),
    (lambda m: m["thresholds"].__setitem__(0, 1.5), r"export.json: thresholds\[0\] .*: expected a finite number"),
    (lambda m: m["image"]["crop"].update(size=10 ** 4), r"export.json: image.crop.size: larger than"),
    (lambda m: m["image"]["resize"].update(interpolation="lanczos"), r"export.json: image.resize.interpolation"),
    (lambda m: m["text"].update(tokenizer="vocab.txt"), r"export.json: text.tokenizer: 'vocab.txt' is not one"),
    (lambda m: m["graph"].update(file="other.onnx"), r"export.json: graph.file: 'other.onnx' is not one"),
    (lambda m: m.update(format=1), r"export format 1; this mlc reads format 2"),
])
def test_an_edited_export_json_names_the_file_and_field(onnx_export, tmp_path, edit, fault):
    out = tmp_path / "x"
    shutil.copytree(onnx_export, out)
    meta = json.loads((out / "export.json").read_text())
    edit(meta)
    (out / "export.json").write_text(json.dumps(meta))
    with pytest.raises(MlcError, match=fault):
        load(out)


def test_a_changed_graph_is_refused_naming_it(onnx_export, tmp_path):
    out = tmp_path / "x"
    shutil.copytree(onnx_export, out)
    with open(out / "model.onnx", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0\0\0\0")
    with pytest.raises(MlcError, match=r"model.onnx: not as it was written \(its content changed\)"):
        load(out)


def test_predict_skips_bad_photos_only_when_asked(onnx_export, photos, tmp_path):
    paths, _ = photos
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in paths[:4]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    args = ["predict", str(onnx_export), str(folder), "--caption", "a photo", "--format", "csv"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and f"error: {folder / 'broken.jpg'}: cannot decode image" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, [*args, "--skip-bad-images"])
    assert res.exit_code == 0, res.output
    assert f"skipped {folder / 'broken.jpg'}: cannot decode image" in res.output
    rows = [line for line in res.output.splitlines() if line.startswith(str(folder))]
    assert len(rows) == 4 and all(len(r.split(",")) == 2 + len(load(onnx_export).labels) for r in rows)
    (folder / "broken.jpg").unlink()
    for p in folder.iterdir():
        p.write_bytes(b"broken too")
    res = runner.invoke(app, [*args, "--skip-bad-images"])
    assert res.exit_code == 2 and "no photo could be read (4 skipped)" in res.output


def test_a_photo_without_a_caption_is_refused_naming_it(onnx_export, photos, tmp_path):
    paths, caps = photos
    (tmp_path / "caps.csv").write_text("ImageID,Caption\n" + f'{paths[0].name},"{caps[0]}"\n')
    res = runner.invoke(app, ["predict", str(onnx_export), str(paths[0]), str(paths[1]), "--captions",
                              str(tmp_path / "caps.csv")])
    assert res.exit_code == 2 and f"no caption for {paths[1]}" in res.output


def test_evaluate_scores_a_labelled_csv_from_the_cli_and_python(onnx_export, finetuned, tmp_path):
    data = finetuned.parent / "tiny"
    model = load(onnx_export)
    scores = model.evaluate(data, split="train")
    records = DataDir.open(data).records("train")
    pred = model.predict([data / "data" / r.image_id for r in records], [r.caption for r in records])
    true = [sorted(map(int, r.labels)) for r in records]
    per_image = [2 * len(set(p) & set(t)) / (len(p) + len(t)) for p, t in zip(pred, true, strict=True)]
    assert scores["samples_f1"] == pytest.approx(np.mean(per_image)) and scores["rows"] == len(records)
    lid = str(model.labels.ids[0])
    tp = sum(int(lid) in p and int(lid) in t for p, t in zip(pred, true, strict=True))
    assert scores["per_class"][lid]["support"] == sum(int(lid) in t for t in true)
    assert scores["per_class"][lid]["recall"] == pytest.approx(tp / max(1, scores["per_class"][lid]["support"]))
    res = runner.invoke(app, ["evaluate", str(onnx_export), str(data / "train.csv"), "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert f"samples-F1 {scores['samples_f1']:.4f} on {len(records)} photos" in res.output
    assert json.loads((tmp_path / "s.json").read_text())["per_class"] == scores["per_class"]
    no_caps = tmp_path / "no-caps.csv"  # a model that reads captions, a CSV without them: refused, not guessed
    no_caps.write_text("ImageID,Labels\n" + "".join(f"{r.image_id},{' '.join(r.labels)}\n" for r in records))
    shutil.copytree(data / "data", tmp_path / "data")
    res = runner.invoke(app, ["evaluate", str(onnx_export), str(no_caps)])
    assert res.exit_code == 2 and "reads captions too, and every caption given is empty" in res.output
    bad = runner.invoke(app, ["evaluate", str(onnx_export), str(data)])  # test.csv has no labels
    assert bad.exit_code == 2 and "test.csv" in bad.output and "Traceback" not in bad.output


def test_captions_from_the_competitions_own_test_csv(onnx_export):
    records = DataDir.open(MINI).records("test")[:5]  # the dirty file: unescaped quotes inside captions
    paths = [MINI / "data" / r.image_id for r in records]
    res = runner.invoke(app, ["predict", str(onnx_export), *map(str, paths), "--captions", str(MINI / "test.csv"),
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [r["labels"] for r in rows] == load(onnx_export).predict(paths, [r.caption for r in records])
    other = runner.invoke(app, ["predict", str(onnx_export), str(paths[0]), "--captions", str(MINI / "test.csv"),
                                "--caption-col", "Title"])
    assert other.exit_code == 2 and "error: " + str(MINI / "test.csv") in other.output  # read with those options
    assert "Traceback" not in other.output
