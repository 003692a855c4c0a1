"""The Python API as a notebook uses it: fit from a folder or a DataFrame, predict names, top-k, evaluate."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SIGNALS, make_data_dir
from PIL import Image

import pipeline as mlc
from pipeline.errors import MlcError

TINY = {"image_encoder": "tiny-resnet", "text_encoder": "tiny-bert", "random_init": True, "workers": 0,
        "backend": "torch", "folds": 2}
NAMES = {1: "person", 3: "car", 18: "dog"}  # the COCO names of the generated data's labels


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[mlc.Model, Path]:
    root = tmp_path_factory.mktemp("api")
    data = make_data_dir(root / "tiny", n_train=30, n_test=4)
    return mlc.fit(data, out=root / "runs" / "nb", cache_dir=root / "cache", **TINY), data


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_a_notebook_session_from_a_folder(folder_model):
    model, data = folder_model
    assert isinstance(model, mlc.Model) and (model.path / "submission.csv").is_file()
    assert set(model.labels) == set(NAMES.values()) and set(model.label_ids) == set(NAMES)
    photo, caption = str(data / "data" / "0.jpg"), "A photo of a person."
    one = model.predict(photo, caption)
    assert one and all(name in model.labels for name in one)  # names, for one photo one list
    assert model.predict(photo, caption, ids=True) == [model.label_ids[model.labels.index(n)] for n in one]
    many = model.predict([photo, Path(photo)], [caption, caption])
    assert many == [one, one]
    top3 = model.predict(photo, caption, top_k=3)
    assert [n for n, _ in top3] and len(top3) == 3 and [p for _, p in top3] == sorted((p for _, p in top3),
                                                                                       reverse=True)
    probs = model.predict_proba(photo, caption)
    assert probs.shape == (3,) and np.isclose(max(probs), top3[0][1])
    with Image.open(photo) as im:  # a PIL image scores like its file (the same decode when already RGB)
        assert model.predict(im.convert("RGB"), caption) == one
    frame = model.predict_proba([photo], [caption], as_pandas=True)
    assert list(frame.columns) == model.labels and list(frame.index) == [photo]
    table = model.predict(pd.Series([photo, photo]), pd.Series([caption, caption]), top_k=2, as_pandas=True)
    assert list(table.columns) == ["label_1", "p_1", "label_2", "p_2"] and len(table) == 2
    with pytest.warns(UserWarning, match="trained this model"):
        scores = model.evaluate(data, split="train")
    assert {"samples_f1", "micro_f1", "macro_f1", "mAP", "per_class"} <= set(scores)
    assert 0 <= scores["samples_f1"] <= 1 and set(scores["per_class"]) == {str(i) for i in NAMES}
    own = model.fit_summary()
    assert own == model.evaluate() and "samples_f1" in own  # the run's cross-fitted metrics.json
    assert {"predict", "predict_proba", "evaluate", "labels", "fit_summary"} <= set(dir(model))
    assert {"fit", "load", "Model"} <= set(dir(mlc))


def test_evaluate_on_an_unlabelled_test_csv_says_what_works(folder_model):
    model, data = folder_model
    with pytest.raises(MlcError, match="no labels column.*--split train"):
        model.evaluate(data)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.evaluate(data, split="train")
    assert any("trained this model" in str(w.message) for w in seen)


def test_wrong_inputs_are_type_errors_naming_what_was_given(folder_model):
    model, data = folder_model
    with pytest.raises(TypeError, match="not int"):
        model.predict(42)
    with pytest.raises(TypeError, match="not dict"):
        model.predict({"a": 1})
    with pytest.raises(ValueError, match="top_k must be a positive int, not 0"):
        model.predict(str(data / "data" / "0.jpg"), "a", top_k=0)
    with pytest.raises(TypeError, match="top_k must be a positive int, not 2.5"):
        model.predict(str(data / "data" / "0.jpg"), "a", top_k=2.5)
    with pytest.raises(TypeError, match="no column of photo paths"):
        model.predict(pd.DataFrame({"x": [1]}))
    with pytest.raises(TypeError, match="one photo takes one caption"):
        model.predict(str(data / "data" / "0.jpg"), ["a", "b"])
    with pytest.raises(MlcError, match="a folder"):
        model.predict(str(data / "data"), "a")
    with pytest.raises(TypeError, match="fit takes a data folder or a DataFrame"):
        mlc.fit(3.5)


@pytest.mark.slow  # a second whole fit (~20 s): the fast suite keeps to 2 minutes
def test_a_notebook_session_from_a_dataframe(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    pics = tmp_path / "pics"
    (data / "data").rename(pics)  # photos in a folder of their own name
    rows = [line.split(",", 2) for line in (data / "train.csv").read_text().splitlines()[1:]]
    frame = pd.DataFrame({"path": [str(pics / r[0]) for r in rows],
                          "caption": [r[2].strip('"') for r in rows],
                          "labels": [[NAMES[int(t)] for t in r[1].split()] for r in rows]})
    model = mlc.fit(frame, out=tmp_path / "runs" / "df", cache_dir=tmp_path / "cache", **TINY)
    assert set(model.labels) == set(NAMES.values()) and not (model.path / "submission.csv").exists()
    got = model.predict(frame.head(3))
    assert len(got) == 3 and all(set(r) <= set(model.labels) for r in got)
    assert model.predict(frame.head(3), as_pandas=True)["labels"].tolist() == got
    scores = model.evaluate(frame)
    assert scores["rows"] == 30 and 0 <= scores["mAP"] <= 1
    assert set(scores["per_class"]) == set(NAMES.values())  # labels given by name are the model's ids
    assert len(SIGNALS) == len(model.labels)
    again = mlc.fit(frame, out=tmp_path / "runs" / "df", cache_dir=tmp_path / "cache", **TINY)
    assert again.path == model.path and len(list((tmp_path / "cache" / "frames").iterdir())) == 1


@pytest.mark.slow  # two more whole fits (a folder and a DataFrame): the fast suite keeps to 2 minutes
def test_the_python_page_runs(tmp_path, monkeypatch):
    """Every block of docs/python.md, in order, on tiny data with tiny encoders."""
    import re

    from conftest import REPO

    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    text = (REPO / "docs" / "python.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    code = (code.replace("examples/comp5329-mini/data/30000.jpg", str(data / "data" / "0.jpg"))
            .replace("examples/comp5329-mini", str(data))
            .replace('preset="offline"', f"**{TINY!r}, cache_dir={str(tmp_path / 'cache')!r}"))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        exec(compile(code, "docs/python.md", "exec"), ns)
    assert isinstance(ns["model"], mlc.Model) and isinstance(ns["framed"], mlc.Model)
    assert len(ns["top3"].columns) == 6 and 0 <= ns["scores"]["samples_f1"] <= 1


def test_an_unknown_label_is_refused_before_any_photo_is_scored(folder_model, tmp_path):
    """Hostile case M07: evaluate scored every photo, then refused the CSV's unknown label. The labels are checked
    first: the refusal names the file and row, though the first row's photo is missing (scoring first would stop
    there, or after minutes of work on a real set)."""
    from pipeline.errors import DataError

    model, data = folder_model
    rows = (data / "train.csv").read_text().splitlines()
    (tmp_path / "data").symlink_to(data / "data")
    first, last = rows[1].split(",", 2), rows[-1].split(",", 2)
    bad = tmp_path / "labelled.csv"
    bad.write_text("\n".join([rows[0], ",".join(["missing.jpg", *first[1:]]), *rows[2:-1],
                              ",".join([last[0], "99", last[2]])]) + "\n")
    with pytest.raises(DataError, match=rf"{bad.name}:{len(rows)}: label '99' is not one the model knows"):
        model.evaluate(bad)
    photo = str(tmp_path / "missing.jpg")
    frame = pd.DataFrame({"image": [photo], "caption": ["a"], "labels": ["99"]})
    with pytest.raises(DataError, match="label '99' is not one the model knows"):
        model.evaluate(frame)
