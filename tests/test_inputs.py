"""Issue 18 part B: every input is checked before use. Data faults found by validate and refused alike by
every command (label tokens, numbers spelled twice, unusable ids, rare labels, images that are not regular
files in the folder), photos turned upright by their EXIF orientation in every decode, model folders that
cannot run code, and the files a run, an export or a cache holds checked before they are used."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import make_data_dir
from PIL import Image

from pipeline.data import DataDir, DataOptions, fingerprint
from pipeline.datasets import ImageViews
from pipeline.errors import DataError, ImageError
from pipeline.images import check_images, load_image
from pipeline.labels import LabelSpace
from pipeline.records import CsvLayout, parse_csv
from pipeline.validate import format_report, validate_data_dir


@contextlib.contextmanager
def no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body blocks, as reading a FIFO did."""
    def fail(*_: object) -> None:
        raise AssertionError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def faults(path: Path, labelled: bool = True, layout: CsvLayout | None = None) -> list[str]:
    return [f"{p.line}: {p.fault}" for p in parse_csv(path, labelled=labelled, layout=layout)[1]]


# ----------------------------------------------------------------------------------- labels and ids


def test_label_tokens_that_the_submission_cannot_carry_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('file,title,tags\n1.jpg,a,traffic light|car\n2.jpg,b,"car|a,b"\n3.jpg,c,"say""hi|car"\n'
                    '4.jpg,d,car\n')  # a proper CSV (columns not in the competition's order)
    got = faults(path, layout=CsvLayout("file", "tags", "title", "|"))
    assert len(got) == 3, got
    assert got[0].startswith("2: label 'traffic light' holds a space, comma or quote")
    assert got[1].startswith("3: label 'a,b' holds") and got[2].startswith("4: label 'say\"hi' holds")
    (tmp_path / "labels.csv").write_text('id,name\ncar,Car\n"a,b",AB\n')
    with pytest.raises(DataError, match=r"labels.csv:3: label 'a,b' holds a space, comma or quote"):
        LabelSpace.from_file(tmp_path / "labels.csv")


def test_one_number_written_two_ways_is_refused_with_its_rows(tmp_path: Path) -> None:
    root = make_data_dir(tmp_path / "d", n_train=12, n_test=2)
    lines = (root / "train.csv").read_text().splitlines()
    lines[4] = lines[4].replace(",3,", ",03,", 1) if ",3," in lines[4] else lines[4].replace(",", ",03 ", 1)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    report = validate_data_dir(root, csv_only=True)
    assert [str(p) for p in report.problems] == [
        f"{root / 'train.csv'}:5: label '03' is the number 3 written another way than '3' (two spellings would "
        "be two classes); write it one way"]
    with pytest.raises(DataError, match=r"train.csv:5: label '03' is the number 3"):
        DataDir.open(root).label_space()  # every command: the same fault, not a KeyError deep in multi_hot
    (tmp_path / "labels.csv").write_text("id,name\n1,a\n01,b\n")
    with pytest.raises(DataError, match="labels.csv:3: label 01 is listed twice"):
        LabelSpace.from_file(tmp_path / "labels.csv")


@pytest.mark.parametrize("spelling", ["+3", "\u0663"])  # an Arabic-Indic 3: int() reads it as 3 too
def test_every_spelling_of_a_number_counts(spelling: str) -> None:
    from pipeline.labels import same_numbers

    assert same_numbers(["1", "3", spelling, "18"]) == {"3": sorted(["3", spelling])}


def test_zero_padded_labels_read_back_as_written(tmp_path: Path) -> None:
    space = LabelSpace.from_tokens(["001", "002", "010"])
    assert space.ids == ("001", "002", "010")  # text: as integers they would not find their own rows
    assert space.multi_hot([["002"], ["010", "001"]]).tolist() == [[0, 1, 0], [1, 0, 1]]


@pytest.mark.parametrize(("row_id", "fault"), [
    ("a,b.jpg", "holds a comma or quote"),
    ("a\nb.jpg", "holds a line break"),
    ("x" * 252 + ".jpg", "is 256 bytes long; a file name may have at most 255"),
])
def test_ids_a_file_system_or_the_submission_cannot_hold_are_refused(tmp_path: Path, row_id: str,
                                                                      fault: str) -> None:
    path = tmp_path / "train.csv"
    quoted = '"' + row_id.replace('"', '""') + '"'
    path.write_text(f"file,title,tags\n1.jpg,a,car\n{quoted},b,car\n")
    got = faults(path, layout=CsvLayout("file", "tags", "title"))
    assert len(got) == 1 and got[0].startswith("3: ") and fault in got[0], got
    no_images = CsvLayout("file", "tags", "title", images=False)
    if "file name" not in fault:
        assert fault in faults(path, layout=no_images)[0]  # text-only ids are written to the submission too


def test_a_stray_label_is_a_warning_naming_its_rows_and_the_way_out(tmp_path: Path, caplog) -> None:
    root = make_data_dir(tmp_path / "d", n_train=24, n_test=2)
    lines = (root / "train.csv").read_text().splitlines()
    lines[7] = lines[7].replace(",", ",12 ", 1)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    report = validate_data_dir(root, csv_only=True)
    assert report.ok and len(report.warnings) == 1
    warning = report.warnings[0]
    assert "label 12 is on only 1 row(s) (line 8)" in warning and "--labels" in warning
    assert f"warning: {warning}" in format_report(report)
    space = DataDir.open(root).label_space()
    assert f"warning: {warning}" in caplog.text  # every command says it, not only validate
    assert dict(zip(space.ids, space.names, strict=True))[1] == "person"  # the COCO names are kept
    (root / "labels.csv").write_text("id,name\n1,person\n3,car\n18,dog\n")  # the way out named
    with pytest.raises(DataError, match=r"train.csv:8: label '12' is not in the labels file"):
        DataDir.open(root).records("train")


# ------------------------------------------------------------------------------------------ images


def _images(root: Path) -> tuple[DataDir, list]:
    data = DataDir.open(root)
    return data, data.records("train")


@pytest.mark.parametrize("kind", ["fifo", "device", "link-to-fifo", "folder"])
def test_images_must_be_regular_files(tmp_path: Path, kind: str) -> None:
    root = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    bad = root / "data" / "3.jpg"
    bad.unlink()
    if kind == "fifo":
        os.mkfifo(bad)
        want = "not a regular file (a FIFO (named pipe))"
    elif kind == "device":
        bad.symlink_to("/dev/zero")
        want = "not a regular file (a character device)"
    elif kind == "folder":
        bad.mkdir()
        want = "not a regular file (a folder)"
    else:
        os.mkfifo(tmp_path / "store.jpg")
        bad.symlink_to(tmp_path / "store.jpg")  # a link is followed: what it reaches must be a regular file
        want = "not a regular file (a FIFO (named pipe))"
    data, records = _images(root)
    with no_hang():
        with pytest.raises(ImageError, match="3.jpg: " + want.replace("(", r"\(").replace(")", r"\)")):
            fingerprint(records, data.image_dir)  # what extract and submit read first
        with pytest.raises(ImageError, match="3.jpg"):
            data.image("3.jpg")  # every decode: extract's and finetune's datasets
        assert ImageViews(data, records[3:4], [lambda im: np.zeros(1)])[0][2] == (str(bad), want)
        _, skipped = check_images(data, records, skip_bad=True, progress=False)
        assert skipped == [("3.jpg", want)]
        report = validate_data_dir(root, csv_only=False, progress=False)
    assert [str(p) for p in report.problems] == [f"{bad}: {want}"]


def test_a_link_out_of_the_folder_into_an_image_store_is_followed(tmp_path: Path) -> None:
    """The policy of docs/data.md: links to regular files anywhere are read (bench/_subset.py builds such folders)."""
    root = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    store = tmp_path / "store"
    store.mkdir()
    (root / "data" / "3.jpg").rename(store / "3.jpg")
    (root / "data" / "3.jpg").symlink_to(store / "3.jpg")
    data, records = _images(root)
    assert data.image("3.jpg").size == (64, 48)
    assert check_images(data, records, skip_bad=False, progress=False)[1] == []
    assert fingerprint(records, data.image_dir) == fingerprint(records, data.image_dir)


def test_a_link_within_the_image_folder_is_fine(tmp_path: Path) -> None:
    root = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    (root / "data" / "3.jpg").rename(root / "data" / "real.jpg")
    (root / "data" / "3.jpg").symlink_to("real.jpg")
    data, records = _images(root)
    assert data.image("3.jpg").size == (64, 48)
    assert check_images(data, records, skip_bad=False, progress=False)[1] == []


# ----------------------------------------------------------------------------- EXIF orientation


def _upright() -> Image.Image:
    """20 wide, 40 high: red top half, blue bottom half."""
    arr = np.zeros((40, 20, 3), np.uint8)
    arr[:20] = (230, 20, 20)
    arr[20:] = (20, 20, 230)
    return Image.fromarray(arr)


def _sideways(path: Path) -> None:
    """The upright photo as a phone stores a portrait: turned, with EXIF Orientation 6 (turn 90 clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _upright().rotate(90, expand=True).save(path, quality=95, exif=exif)


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path: Path) -> None:
    _sideways(tmp_path / "phone.jpg")
    with Image.open(tmp_path / "phone.jpg") as raw:
        assert raw.size == (40, 20)  # as stored
    im = load_image(tmp_path / "phone.jpg")
    assert im.size == (20, 40)
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    assert load_image(tmp_path / "phone.jpg", draft=4).size[1] > load_image(tmp_path / "phone.jpg", draft=4).size[0]


def test_extract_and_finetune_decode_the_photo_upright(tmp_path: Path) -> None:
    from pipeline.datasets import ImageCaptionRows
    from pipeline.encoders.transforms import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess

    root = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    _sideways(root / "data" / "0.jpg")
    _upright().save(root / "data" / "1.jpg", quality=95)
    data, records = _images(root)
    pre = ImagePreprocess(40, 40, IMAGENET_MEAN, IMAGENET_STD)
    views = ImageViews(data, records[:2], [pre.pixels(0)])
    a, b = views[0][1].float(), views[1][1].float()
    assert (a - b).abs().mean() < 3  # the same photo, however stored
    rows = ImageCaptionRows(data, records[:2], pre.transform(0), np.zeros((2, 3), np.float32))
    assert (rows[0][0] - rows[1][0]).abs().mean() < 0.05
    assert pre.to_dict()["orientation"] == "exif"  # in every cache's and run's preprocess record


def test_data_options_do_not_change_the_image_checks(tmp_path: Path) -> None:
    root = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    (root / "data" / "2.jpg").unlink()
    os.mkfifo(root / "data" / "2.jpg")
    with no_hang():
        report = validate_data_dir(root, csv_only=False, progress=False, options=DataOptions())
    assert len(report.problems) == 1 and "FIFO" in str(report.problems[0])


# ------------------------------------------------------------------ model folders never run code

EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('foreign code ran')\n"


def _bert_folder(folder: Path, model_type: str = "bert") -> Path:
    """A tiny Hugging Face BERT folder whose config asks for custom code (auto_map -> modeling_evil.py)."""
    import json

    from pipeline.encoders import create_text_encoder

    enc = create_text_encoder("tiny-bert", random_init=True, seed=0)
    enc.model.save_pretrained(str(folder))
    enc.tokenizer.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                "AutoModel": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(EVIL)
    return folder


def test_an_hf_folder_that_asks_for_its_own_code_is_refused(tmp_path: Path) -> None:
    from pipeline.encoders import create_text_encoder
    from pipeline.errors import WeightsError

    folder = _bert_folder(tmp_path / "evil")
    for weights in (None, folder):  # hf:FOLDER, and --text-weights FOLDER
        with pytest.raises(WeightsError, match=r"evil/config.json: auto_map: .* never runs code"):
            create_text_encoder(f"hf:{folder}" if weights is None else "tiny-bert", weights=weights)
    assert not (folder / "RAN").exists()


def test_transformers_is_told_never_to_run_or_ask_for_custom_code(tmp_path: Path, monkeypatch) -> None:
    """Behind the folder check, every load passes trust_remote_code=False: transformers refuses (it would
    prompt on stdin with None), and the refusal is one line."""
    from pipeline.encoders import create_text_encoder, hf_models
    from pipeline.errors import WeightsError

    folder = _bert_folder(tmp_path / "evil", model_type="evil-bert")  # no class transformers knows
    monkeypatch.setattr(hf_models, "refuse_custom_code", lambda *a: None)
    with pytest.raises(WeightsError, match=r"asks to run code of its own \(trust_remote_code\)"):
        create_text_encoder(f"hf:{folder}")
    assert not (folder / "RAN").exists()


def test_a_known_model_type_that_asks_for_custom_code_is_refused_too(tmp_path: Path, monkeypatch) -> None:
    """A hub repository (no folder to look into first) whose model type transformers knows, with an auto_map:
    transformers would load its own class quietly; mlc refuses it like the folder."""
    from pipeline.encoders import create_text_encoder, hf_models
    from pipeline.errors import WeightsError

    folder = _bert_folder(tmp_path / "evil")
    monkeypatch.setattr(hf_models, "refuse_custom_code", lambda *a: None)
    with pytest.raises(WeightsError, match=r"config.json: auto_map: asks to run code of its own"):
        create_text_encoder(f"hf:{folder}")
    assert not (folder / "RAN").exists()


def test_a_saved_encoder_folder_that_asks_for_custom_code_is_refused(tmp_path: Path) -> None:
    import json

    from pipeline.encoders import create_text_encoder, load_encoder
    from pipeline.errors import WeightsError

    create_text_encoder("tiny-bert", random_init=True, seed=0).save(tmp_path / "text")
    cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    (tmp_path / "text" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(WeightsError, match="text/config.json: auto_map"):
        load_encoder(tmp_path / "text")


@pytest.mark.parametrize(("edit", "fault"), [
    ({"options": {"evil": 1}}, r"encoder.json: options.evil: not an option of tiny-bert \(it takes: pooling\)"),
    ({"options": {"pooling": "max"}}, r"encoder.json: options: pooling must be mean, cls or pooler"),
    ({"name": "tiny-gpt"}, r"encoder.json: name: unknown text encoder 'tiny-gpt'"),
])
def test_encoder_json_options_are_checked_against_the_encoder(tmp_path: Path, edit: dict, fault: str) -> None:
    import json

    from pipeline.encoders import create_text_encoder, load_encoder
    from pipeline.errors import MlcError

    create_text_encoder("tiny-bert", random_init=True, seed=0).save(tmp_path / "text")
    d = json.loads((tmp_path / "text" / "encoder.json").read_text())
    (tmp_path / "text" / "encoder.json").write_text(json.dumps({**d, **edit}))
    with pytest.raises(MlcError, match=fault):
        load_encoder(tmp_path / "text")


# ------------------------------------------------------------- runs, exports and caches checked


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    from pipeline.export import ExportConfig, export
    from pipeline.extract import ExtractConfig, extract
    from pipeline.fit_head import FitHeadConfig, fit_head

    tmp = tmp_path_factory.mktemp("exp")
    data = make_data_dir(tmp / "tiny", n_train=24, n_test=2)
    (cache,) = extract(ExtractConfig.build(data_dir=data, cache_dir=tmp / "cache", splits=("train",), workers=0,
                                           image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True,
                                           backend="torch"))
    fit_head(FitHeadConfig.build(caches=cache, out=tmp / "run", epochs=2, folds=2), quiet=True)
    out, _ = export(ExportConfig.build(run=tmp / "run", out=tmp / "model", format="safetensors"))
    return {"cache": cache, "run": tmp / "run", "model": out}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit, rehash: bool = False) -> None:
    import json

    from pipeline.schemas import checksum

    d = json.loads(path.read_text())
    edit(d)
    if rehash:  # as a foreign writer that knows the format would leave it
        d["sha256"] = checksum(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(("edit", "fault"), [
    (lambda d: d["thresholds"].__setitem__(0, 0.123), r"export.json: sha256: does not match the file's content"),
    (lambda d: d.pop("sha256"), r"export.json: sha256: missing"),
    (lambda d: d["head"].update(num_classes=len(d["label_ids"]) + 1), r"export.json: head.num_classes: 4 outputs but "
                                                                      "3 labels"),
    (lambda d: d.update(heads=["../run/head-0.safetensors"]), r"export.json: heads\[0\]: '../run/head-0.safetensors' "
                                                              "leads out of the folder"),
    (lambda d: d["branches"][0].update(text="/etc"), r"export.json: branches\[0\].text: '/etc' leads out"),
    (lambda d: d["files"].update({"../../x": d["files"]["head-0.safetensors"]}), r"export.json: files\['../../x'\]: "
                                                                                 "'../../x' leads out"),
    (lambda d: d["head"].update(hidden=10 ** 9), r"export.json: hidden: 1000000000 is beyond any real head"),
    (lambda d: d.update(graph={"file": "/tmp/model.onnx"}), r"export.json: graph.file: '/tmp/model.onnx' leads out of "
                                                         "the folder"),
])
def test_export_json_is_covered_by_its_checksum_and_its_paths_stay_inside(exported, tmp_path, edit, fault) -> None:
    from pipeline.errors import MlcError
    from pipeline.predictor import load

    model = _copy(exported["model"], tmp_path / "model")
    _edit_json(model / "export.json", edit, rehash="sha256" not in fault)
    with pytest.raises(MlcError, match=fault):
        load(model, backend="torch")


def test_manifest_json_is_covered_by_its_checksum_and_head_sizes_are_bounded(exported, tmp_path) -> None:
    from conftest import refresh_manifest

    from pipeline.errors import MlcError
    from pipeline.runs import RunDir

    run = _copy(exported["run"], tmp_path / "run")
    _edit_json(run / "manifest.json", lambda d: d.update(mlc_version="0.0"))
    with pytest.raises(MlcError, match=r"manifest.json: sha256: does not match the file's content"):
        RunDir(run).load()
    run = _copy(exported["run"], tmp_path / "run2")
    _edit_json(run / "head.json", lambda d: d.update(hidden=10 ** 9))
    refresh_manifest(run)
    with pytest.raises(MlcError, match=r"head.json: hidden: 1000000000 is beyond any real head \(at most 65536\)"):
        RunDir(run).load()


def test_cache_meta_is_checksummed_and_old_caches_are_rebuilt_not_mixed(exported, tmp_path) -> None:
    import json
    import shutil

    import h5py

    from pipeline.cache import read_meta
    from pipeline.errors import MlcError

    cache = tmp_path / exported["cache"].name
    shutil.copy(exported["cache"], cache)
    with h5py.File(cache, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        f.attrs["meta"] = json.dumps({**meta, "label_names": ["a", "b", "c"]}, sort_keys=True)
    with pytest.raises(MlcError, match=r"meta: does not match its checksum \(meta_sha256\)"):
        read_meta(cache)
    with h5py.File(cache, "r+") as f:  # a cache of the mlc before: format 2, no checksum
        f.attrs["meta"] = json.dumps({**meta, "format": 2}, sort_keys=True)
        del f.attrs["meta_sha256"]
    with pytest.raises(MlcError, match=r"cache format 2: photos decoded before EXIF orientation was applied\); "
                                       r"this mlc reads format 3. Extract again with --overwrite to rebuild it"):
        read_meta(cache)


def test_cache_datasets_must_have_the_shapes_their_meta_says(exported, tmp_path) -> None:
    import shutil

    import h5py

    from pipeline.cache import CacheReader
    from pipeline.errors import MlcError

    cache = tmp_path / exported["cache"].name
    shutil.copy(exported["cache"], cache)
    with h5py.File(cache, "r+") as f:  # one label column more than the meta's label ids
        n, c = f["labels"].shape
        del f["labels"]
        f.create_dataset("labels", data=np.zeros((n, c + 1), np.uint8), fletcher32=True)
    with pytest.raises(MlcError, match=rf"labels: shape \({n}, {c + 1}\), but its meta says \({n}, {c}\)"):
        CacheReader(cache).labels()


def test_head_weights_that_do_not_fit_their_json_are_one_line(exported, tmp_path) -> None:
    from pipeline.errors import MlcError
    from pipeline.predictor import load

    model = _copy(exported["model"], tmp_path / "model")
    _edit_json(model / "export.json", lambda d: d["head"].update(image_dim=7), rehash=True)
    # caught by the export's agreement with itself (issue 25) before the weights are even loaded
    with pytest.raises(MlcError, match=r"export.json: head.image_dim/text_dim: 7/\d+, but the exported encoders give "
                                       r"\d+/\d+ features") as info:
        load(model, backend="torch")
    assert "\n" not in str(info.value)
