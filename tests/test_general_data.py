"""mlc beyond the competition: other columns, string labels, a labels file, image-only and text-only data,
`mlc predict` on new photos (export: tests/test_export.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, make_data_dir
from typer.testing import CliRunner

from pipeline.cache import CacheReader
from pipeline.cli import app
from pipeline.data import DataDir, DataOptions
from pipeline.errors import DataError
from pipeline.export import ExportConfig, export
from pipeline.extract import ExtractConfig, extract
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.predict import PredictConfig, predict
from pipeline.predictor import load
from pipeline.submit import SubmitConfig, submit

TAGS = REPO / "examples" / "tags-mini"
MINI = REPO / "examples" / "comp5329-mini"
TINY = dict(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, workers=0, backend="torch")
COLUMNS = dict(id_col="file", labels_col="tags", caption_col="title", label_sep="|")
runner = CliRunner()


def test_string_labels_and_custom_columns_round_trip(tmp_path):
    (train,) = extract(ExtractConfig.build(data_dir=TAGS, cache_dir=tmp_path / "c", splits=("train",), **TINY,
                                           **COLUMNS))
    meta = CacheReader(train).meta
    assert meta.label_ids[:3] == ("person", "bicycle", "car")  # labels.csv's order
    assert meta.label_names[0] == "Person" and len(meta.label_ids) == 17
    fit_head(FitHeadConfig.build(caches=train, out=tmp_path / "run", epochs=3, folds=2), quiet=True)
    path, _ = submit(SubmitConfig.build(run=tmp_path / "run", data_dir=TAGS, cache_dir=tmp_path / "c", workers=0,
                                        backend="torch"))  # the run remembers the columns
    rows = list(csv.reader(path.read_text().splitlines()))
    test_ids = [r.image_id for r in DataDir.open(TAGS, DataOptions(**COLUMNS)).records("test")]
    assert [r[0] for r in rows[1:]] == test_ids and len(test_ids) == 21
    assert all(set(r[1].split()) <= set(meta.label_ids) for r in rows[1:])
    # predict on those photos with their titles gives the submission's labels
    (tmp_path / "titles.csv").write_text("file,title\n" + "".join(  # read with the data's own layout options
        f'{r.image_id},"{r.caption}"\n' for r in DataDir.open(TAGS, DataOptions(**COLUMNS)).records("test")))
    got = predict(PredictConfig.build(model=tmp_path / "run", paths=tuple(str(TAGS / "images" / i) for i in test_ids),
                                      captions=tmp_path / "titles.csv", workers=0, backend="torch", id_col="file",
                                      caption_col="title"))
    assert [" ".join(map(str, sorted(g["labels"], key=meta.label_ids.index))) for g in got] == \
        [" ".join(sorted(r[1].split(), key=meta.label_ids.index)) for r in rows[1:]]


def test_a_label_outside_the_labels_file_or_the_training_labels_names_its_row(tmp_path):
    data = tmp_path / "tags"
    shutil.copytree(TAGS, data)
    train = (data / "train.csv").read_text().splitlines()
    train[3] = train[3].replace("person", "persn", 1)
    (data / "train.csv").write_text("\n".join(train) + "\n")
    with pytest.raises(DataError, match=r"train.csv:4: label 'persn' is not in the labels file"):
        DataDir.open(data, DataOptions(**COLUMNS)).records("train")
    (data / "train.csv").write_text((TAGS / "train.csv").read_text())
    (data / "labels.csv").unlink()  # the labels are then the ones train.csv holds
    (data / "test.csv").write_text("file,title,tags\n30000.jpg,A photo.,person\n30050.jpg,Two cats.,unicorn\n")
    with pytest.raises(DataError, match=r"test.csv:3: label 'unicorn' does not occur in the training labels"):
        DataDir.open(data, DataOptions(**COLUMNS)).records("test")
    res = runner.invoke(app, ["validate", str(data), "--csv-only", "--id-col", "file", "--labels-col", "tags",
                              "--caption-col", "title", "--label-sep", "|"])
    assert res.exit_code == 1 and "test.csv:3: label 'unicorn'" in res.output


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_image_only_and_text_only_datasets(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=24, n_test=4)
    no_caps = tmp_path / "nocaps"
    shutil.copytree(data, no_caps)
    for split in ("train", "test"):  # drop the caption column: a proper CSV without it
        rows = DataDir.open(data).records(split)
        head = "ImageID,Labels\n" if split == "train" else "ImageID\n"
        (no_caps / f"{split}.csv").write_text(head + "".join(
            f"{r.image_id},{' '.join(r.labels)}\n" if split == "train" else f"{r.image_id}\n" for r in rows))
    res = runner.invoke(app, ["extract", str(no_caps), "--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert",
                              "--random-init", "--workers", "0", "--backend", "torch", "--cache-dir",
                              str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "an image-only dataset; no caption features" in res.output
    (train,) = (tmp_path / "c").rglob("train__*.h5")
    assert CacheReader(train).meta.text_encoder == "none" and not CacheReader(train).has("text")
    res = runner.invoke(app, ["fit-head", str(train), "--out", str(tmp_path / "img"), "--epochs", "2", "--folds", "2"])
    assert res.exit_code == 0 and "an image-only head instead of 'concat'" in res.output
    assert json.loads((tmp_path / "img" / "head.json").read_text())["name"] == "image"
    path, _ = submit(SubmitConfig.build(run=tmp_path / "img", data_dir=no_caps, cache_dir=tmp_path / "c", workers=0,
                                        backend="torch"))
    assert len(path.read_text().splitlines()) == 5
    # exported as one ONNX graph, it labels photos alone, as the run does
    exported, _ = export(ExportConfig.build(run=tmp_path / "img", out=tmp_path / "img-export"))
    photos = [no_caps / "data" / r.image_id for r in DataDir.open(no_caps).records("test")]
    assert load(exported).predict(photos) == load(tmp_path / "img", backend="torch").predict(photos)
    # text only: --no-images, ids need not be files
    res = runner.invoke(app, ["extract", str(data), "--no-images", "--image-encoder", "tiny-resnet", "--text-encoder",
                              "tiny-bert", "--random-init", "--workers", "0", "--backend", "torch", "--cache-dir",
                              str(tmp_path / "t")])
    assert res.exit_code == 0 and "a text-only dataset" in res.output
    (train,) = (tmp_path / "t").rglob("train__*.h5")
    res = runner.invoke(app, ["fit-head", str(train), "--out", str(tmp_path / "txt"), "--epochs", "2", "--folds", "2"])
    assert res.exit_code == 0 and "a text-only head" in res.output
    exported, _ = export(ExportConfig.build(run=tmp_path / "txt", out=tmp_path / "txt-export"))
    caps = [r.caption for r in DataDir.open(data).records("test")]
    assert load(exported).predict(None, caps) == load(tmp_path / "txt", backend="torch").predict(None, caps)


@pytest.mark.slow
def test_predict_on_real_photos_matches_submit(tmp_path):
    (train,) = extract(ExtractConfig.build(data_dir=MINI, cache_dir=tmp_path / "c", splits=("train",), **TINY))
    fit_head(FitHeadConfig.build(caches=train, out=tmp_path / "run", epochs=2, folds=2), quiet=True)
    path, _ = submit(SubmitConfig.build(run=tmp_path / "run", data_dir=MINI, cache_dir=tmp_path / "c", workers=0,
                                        backend="torch"))
    wanted = dict(line.split(",") for line in path.read_text().splitlines()[1:])
    records = DataDir.open(MINI).records("test")[:40]
    (tmp_path / "caps.csv").write_text("ImageID,Caption\n" + "".join(
        f'{r.image_id},"{r.caption.replace(chr(34), chr(34) * 2)}"\n' for r in records))
    photos = tmp_path / "photos"
    photos.mkdir()
    for r in records:
        shutil.copy(MINI / "data" / r.image_id, photos / r.image_id)
    res = runner.invoke(app, ["predict", str(tmp_path / "run"), str(photos), "--captions", str(tmp_path / "caps.csv"),
                              "--format", "json", "--workers", "0", "--backend", "torch", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert len(got) == 40
    for g in got:
        assert " ".join(map(str, sorted(g["labels"]))) == wanted[Path(g["path"]).name]
        assert len(g["probabilities"]) >= 3
    table = runner.invoke(app, ["predict", str(tmp_path / "run"), str(photos / records[0].image_id), "--caption",
                                "a photo", "--workers", "0", "--backend", "torch", "--top-k", "18"])
    assert table.exit_code == 0 and "labels (probability)" in table.output
    also = table.output.split("[also: ")[1].rstrip().rstrip("]").split(", ")
    names = set(DataDir.open(MINI).label_space().names)
    assert len(also) >= 10 and all(a.rsplit(" ", 1)[0] in names for a in also), also  # names, not ids
    missing = runner.invoke(app, ["predict", str(tmp_path / "run"), str(photos), "--workers", "0"])
    assert missing.exit_code == 2 and "give --caption TEXT or --captions CSV" in missing.output
    # decoded in 2 worker processes, 7 photos a batch: the same predictions, in the same order
    args = ["predict", str(tmp_path / "run"), str(photos), "--captions", str(tmp_path / "caps.csv"), "--format",
            "json", "--backend", "torch", "--top-k", "3"]
    again = runner.invoke(app, [*args, "--workers", "2", "--encode-batch", "7"])
    assert again.exit_code == 0, again.output
    regot = [json.loads(line) for line in again.output.splitlines() if line.startswith("{")]
    assert [(g["path"], g["labels"]) for g in regot] == [(g["path"], g["labels"]) for g in got]
    for a, b in zip(regot, got, strict=True):  # other batches: float sums in another order, hence 4 dp +- 1e-4
        common = a["probabilities"].keys() & b["probabilities"].keys()
        assert len(common) >= 3 and all(abs(a["probabilities"][k] - b["probabilities"][k]) <= 1e-4 for k in common)
    (photos / records[5].image_id).write_bytes(b"not a jpeg")
    broken = runner.invoke(app, [*args, "--workers", "2", "--encode-batch", "7"])
    assert broken.exit_code == 2 and f"{photos / records[5].image_id}: cannot decode image" in broken.output


def test_images_in_any_folder_with_image_dir(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=12, n_test=2)
    pics = tmp_path / "elsewhere" / "pics"
    shutil.move(str(data / "data"), str(pics))
    res = CliRunner().invoke(app, ["validate", str(data)])
    assert res.exit_code == 1 and "0.jpg" in res.output  # not found where mlc looks by default
    res = CliRunner().invoke(app, ["validate", str(data), "--image-dir", str(pics)])
    assert res.exit_code == 0, res.output
    assert DataDir.open(data, DataOptions(image_dir=pics)).image_dir == pics
    assert DataOptions().recorded().get("image_dir", "absent") == "absent"  # older caches keep their recipe
    assert DataOptions(image_dir=pics).recorded()["image_dir"] == str(pics.resolve())
    with pytest.raises(DataError, match="image folder not found"):
        DataDir.open(data, DataOptions(image_dir=tmp_path / "nope"))


def test_predict_captions_reads_the_competitions_train_csv_as_validate_does():
    from pipeline.predict import read_captions

    mini = REPO / "examples" / "comp5329-mini"
    for split in ("train", "test"):  # train.csv: labels column, unescaped quotes, multi-line captions
        want = {r.image_id: r.caption for r in DataDir.open(mini).records(split)}
        assert read_captions(mini / f"{split}.csv", DataOptions()) == want and len(want) > 200
