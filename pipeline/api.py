"""The Python API a notebook expects: ``fit`` a model from a folder or a DataFrame, then ``predict`` label names.

    import pipeline as mlc
    model = mlc.fit("path/to/comp5329", preset="offline")          # the recipe of `mlc run`; writes the run
    model = mlc.fit(df, image_col="path", labels_col="labels")      # or a DataFrame of paths, captions, labels
    model.predict("cat.jpg", "a cat on a bench")                     # ['cat', 'bench']  (ids=True for ids)
    model.predict(df, top_k=3)                                       # each row's 3 likeliest (name, p)
    model.predict_proba(paths, captions, as_pandas=True)             # a DataFrame, one column per label
    model.evaluate("path/to/data", split="train")                    # the keys of metrics.json
    model.fit_summary()                                              # the run's own cross-fitted metrics

``Model`` wraps a :class:`predictor.Predictor` (``model.predictor``) and only turns what it is given into
photos and captions and what it returns into names; every score comes from the one inference core. Loading
an ONNX export imports no torch; ``fit`` imports the training stages when called.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import MlcError
from .folders import read_json
from .log import get
from .predictor import EXPORT_FILE, Predictor
from .predictor import load as load_predictor

log = get(__name__)  # mlc.<module>: under the root the CLI configures

IMAGE_COLS = ("path", "image", "file", "filename", "photo", "imageid")  # tried in order, any case
CAPTION_COLS = ("caption", "text", "title", "description")
LABEL_COLS = ("labels", "label", "tags", "targets")


def load(path: str | os.PathLike[str], **engine: Any) -> Model:
    """A run folder or an export as a :class:`Model` (``engine``: backend, device, onnx_dir of predictor.load)."""
    return Model(load_predictor(path, **engine))


class Model:
    """A fitted model: label names in, label names out; photos as paths, PIL images, lists, Series or
    DataFrames (``image_col``/``caption_col`` name the columns, else the usual names are looked for)."""

    _PUBLIC = ("path", "labels", "label_ids", "predictor", "predict", "predict_proba", "evaluate", "fit_summary")

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, {len(self.labels)} labels)"

    def __dir__(self) -> list[str]:
        return sorted(set(self._PUBLIC) | set(super().__dir__()))

    @property
    def path(self) -> Path:
        return Path(self.predictor.source)

    @property
    def labels(self) -> list[str]:
        """The label names, in the column order of ``predict_proba``."""
        return [str(n) for n in self.predictor.labels.names]

    @property
    def label_ids(self) -> list[int | str]:
        return list(self.predictor.labels.ids)

    def predict_proba(self, photos: Any, captions: Any = None, *, as_pandas: bool = False, batch_size: int = 32,
                      image_col: str | None = None, caption_col: str | None = None) -> Any:
        """Probabilities: (C,) for one photo, (N, C) for many (columns = ``labels``); a DataFrame with
        ``as_pandas`` (one row per photo, one column per label name)."""
        rows = _Rows.of(photos, captions, image_col, caption_col)
        probs = self.predictor.predict_proba(rows.photos, rows.captions, batch_size=batch_size)
        if as_pandas:
            import pandas as pd

            return pd.DataFrame(probs, index=rows.keys, columns=self.labels)
        return probs[0] if rows.single else probs

    def predict(self, photos: Any, captions: Any = None, *, top_k: int | None = None, ids: bool = False,
                as_pandas: bool = False, batch_size: int = 32, image_col: str | None = None,
                caption_col: str | None = None) -> Any:
        """Each photo's labels after the model's thresholds and decision rule (names; ``ids=True`` for ids), or
        with ``top_k`` its k likeliest labels as (label, probability) pairs, most probable first. One photo
        gives one list, many a list of lists; ``as_pandas`` a DataFrame (column ``labels``, or label_1, p_1, ...)."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be a positive int, not {top_k!r}")
        if top_k is not None and top_k < 1:  # the right type, a wrong value: ValueError, as Python's own APIs do
            raise ValueError(f"top_k must be a positive int, not {top_k!r}")
        rows = _Rows.of(photos, captions, image_col, caption_col)
        probs = self.predictor.predict_proba(rows.photos, rows.captions, batch_size=batch_size)
        names = self.label_ids if ids else self.labels
        if top_k is None:
            out: list[Any] = [[names[j] for j in np.flatnonzero(r)] for r in self.predictor.decide(probs)]
        else:
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            out = [[(names[j], float(p[j])) for j in o] for o, p in zip(order, probs, strict=True)]
        if as_pandas:
            return _frame(out, rows.keys, top_k)
        return out[0] if rows.single else out

    def evaluate(self, data: Any = None, *, split: str = "test", image_col: str | None = None,
                 caption_col: str | None = None, labels_col: str | None = None, **data_options: Any) -> dict[str, Any]:
        """Samples-, micro- and macro-F1, mAP and each label's precision, recall, F1 and support (the keys of
        metrics.json). ``data``: a data folder (its ``split`` CSV) or a labelled CSV (``data_options``: the
        DataOptions, e.g. id_col), or a DataFrame with a labels column; None: the run's own cross-fitted
        metrics (``fit_summary``)."""
        if data is None:
            return self.fit_summary()
        if _is_frame(data):
            rows = _Rows.of(data, None, image_col, caption_col)
            col = _column(data, labels_col, LABEL_COLS, "labels")
            by_name = {str(n): str(i) for i, n in zip(self.label_ids, self.labels, strict=True)}
            tokens = [[t if t in self.predictor.labels else by_name.get(t, t) for t in _label_tokens(v, i)]
                      for i, v in enumerate(data[col])]
            y = self.predictor.truth(tokens, "the DataFrame")  # an unknown label fails before the photos are scored
            probs = self.predictor.predict_proba(rows.photos, rows.captions)
            return self.predictor.scores(y, probs, "the DataFrame")
        if not isinstance(data, str | os.PathLike):
            raise TypeError(f"evaluate takes a data folder, a CSV path or a DataFrame, not {type(data).__name__}")
        from .data import DataOptions

        if split == "train" and Path(data).is_dir():
            warnings.warn("train.csv's rows trained this model: these scores are optimistic; fit_summary() holds "
                          "its cross-fitted ones", stacklevel=2)
        return self.predictor.evaluate(data, split=split, options=DataOptions.build(**data_options))

    def fit_summary(self) -> dict[str, Any]:
        """The model's own cross-fitted scores: a run's metrics.json, or what an export recorded of it."""
        if (self.path / EXPORT_FILE).is_file():
            card = read_json(self.path / EXPORT_FILE, "the export folder").get("card") or {}
            if not card.get("metrics"):
                raise MlcError(f"{self.path}: this export records no scores (exported by an older mlc)")
            return dict(card["metrics"])
        from .runs import RunDir

        return RunDir(self.path).read_metrics()


class _Rows:
    """Photos and captions as Predictor takes them, the keys that name the rows, and whether one was given."""

    def __init__(self, photos: list[Any], captions: list[str] | None, keys: list[Any], single: bool) -> None:
        self.photos, self.captions, self.keys, self.single = photos, captions, keys, single

    @classmethod
    def of(cls, photos: Any, captions: Any, image_col: str | None, caption_col: str | None) -> _Rows:
        if _is_frame(photos):
            if captions is not None:
                raise TypeError("a DataFrame carries its captions: name their column with caption_col=, "
                                "not captions=")
            col = _column(photos, image_col, IMAGE_COLS, "photo paths")
            cap = _column(photos, caption_col, CAPTION_COLS, "captions", required=False)
            caps = None if cap is None else ["" if _missing(c) else str(c) for c in photos[cap]]
            return cls([_photo(p) for p in photos[col]], caps, list(photos.index), False)
        if isinstance(photos, str | os.PathLike | Image.Image):
            if captions is not None and not isinstance(captions, str):
                raise TypeError(f"one photo takes one caption (a str), not {type(captions).__name__}")
            key = "image 0" if isinstance(photos, Image.Image) else str(photos)
            return cls([_photo(photos)], None if captions is None else [captions], [key], True)
        if _is_series(photos) or isinstance(photos, Sequence | np.ndarray):
            items = list(photos)
            keys = list(photos.index) if _is_series(photos) else [
                f"image {i}" if isinstance(p, Image.Image) else str(p) for i, p in enumerate(items)]
            return cls([_photo(p) for p in items], _captions(captions, len(items)), keys, False)
        raise TypeError(f"photos must be a path, a PIL image, a list or Series of them, or a DataFrame with a "
                        f"column of paths; not {type(photos).__name__}")


def _captions(captions: Any, n: int) -> list[str] | None:
    if captions is None:
        return None
    if isinstance(captions, str):  # one caption for every photo, as `mlc predict --caption` does
        return [captions] * n
    if _is_series(captions) or isinstance(captions, Sequence | np.ndarray):
        return ["" if _missing(c) else str(c) for c in captions]
    raise TypeError(f"captions must be a str or a list or Series of str, not {type(captions).__name__}")


def _photo(p: Any) -> Any:
    if isinstance(p, Image.Image):
        return p
    if isinstance(p, str | os.PathLike):
        if Path(p).is_dir():
            raise MlcError(f"{p}: a folder; give its photos (a list of paths) or use `mlc predict FOLDER`")
        return p
    raise TypeError(f"a photo is a path or a PIL image, not {type(p).__name__} ({p!r:.60})")


def _is_frame(x: Any) -> bool:
    return type(x).__name__ == "DataFrame" and hasattr(x, "columns")  # pandas, without importing it


def _is_series(x: Any) -> bool:
    return type(x).__name__ == "Series" and hasattr(x, "index")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None or NaN


def _column(frame: Any, given: str | None, names: tuple[str, ...], what: str, required: bool = True) -> str | None:
    """The DataFrame's column of ``what``: the one named, else the first of ``names`` it has (any case)."""
    columns = [str(c) for c in frame.columns]
    if given is not None:
        if given not in columns:
            raise TypeError(f"the DataFrame has no column {given!r} (columns: {', '.join(columns)})")
        return given
    lower = {c.lower(): c for c in columns}
    found = next((lower[n] for n in names if n in lower), None)
    if found is None and required:
        raise TypeError(f"the DataFrame has no column of {what} (looked for {', '.join(names)}; columns: "
                        f"{', '.join(columns)}): name it with {'image' if what == 'photo paths' else 'labels'}_col=")
    return found


def _label_tokens(value: Any, row: int) -> list[str]:
    """A row's labels: a list/tuple/set of labels, or one string of them separated by spaces, '|' or ';'."""
    if isinstance(value, str):
        for sep in ("|", ";", ","):
            if sep in value:
                return [t.strip() for t in value.split(sep) if t.strip()]
        return value.split()
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        return [str(v) for v in value]
    if isinstance(value, int | np.integer):
        return [str(value)]
    raise TypeError(f"row {row}: labels must be a list of labels or a string of them, not {type(value).__name__}")


def _frame(out: list[Any], keys: list[Any], top_k: int | None) -> Any:
    import pandas as pd

    if top_k is None:
        return pd.DataFrame({"labels": out}, index=keys)
    cols: dict[str, list[Any]] = {}
    for k in range(top_k):
        cols[f"label_{k + 1}"] = [r[k][0] if k < len(r) else None for r in out]
        cols[f"p_{k + 1}"] = [r[k][1] if k < len(r) else np.nan for r in out]
    return pd.DataFrame(cols, index=keys)


def fit(data: Any, *, out: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] = "cache",
        image_col: str | None = None, caption_col: str | None = None, labels_col: str | None = None,
        **options: Any) -> Model:
    """Fit a model with the recipe of ``mlc run`` (validate, extract, fit-head with 5 folds, submit when there is
    a test.csv, report) and return it loaded. ``data``: a data folder, or a DataFrame of photo paths, captions
    and labels (written as a data folder under ``cache_dir``/frames/, so a second fit of the same rows reuses
    every cache). ``options``: any option of ``mlc run`` by its Python name (preset="offline", folds=5,
    head="sum", id_col=..., image_dir=...)."""
    from .workflow import RunConfig, run

    if _is_frame(data):
        folder, layout = frame_folder(data, Path(cache_dir), image_col, caption_col, labels_col)
        options = {**layout, **options}
        data = folder
    elif not isinstance(data, str | os.PathLike):
        raise TypeError(f"fit takes a data folder or a DataFrame, not {type(data).__name__}")
    cfg = RunConfig.build(data_dir=Path(data), out=None if out is None else Path(out), cache_dir=Path(cache_dir),
                          **options)
    result = run(cfg)
    log.info("fitted %s: cross-fitted samples-F1 %.4f", result["run"], result["samples_f1"])
    return load(result["run"])


def frame_folder(frame: Any, cache_dir: Path, image_col: str | None, caption_col: str | None,
                 labels_col: str | None) -> tuple[Path, dict[str, Any]]:
    """A DataFrame as a data folder mlc reads (train.csv, the photos' own folder as --image-dir), named after a
    digest of its rows; and the data options that read it."""
    import csv
    import io

    img = _column(frame, image_col, IMAGE_COLS, "photo paths")
    cap = _column(frame, caption_col, CAPTION_COLS, "captions", required=False)
    lab = _column(frame, labels_col, LABEL_COLS, "labels")
    paths = [Path(str(p)).expanduser().resolve() for p in frame[img]]
    if not paths:
        raise MlcError("the DataFrame has no rows")
    folders = sorted({str(p.parent) for p in paths})
    if len(folders) > 1:
        raise MlcError(f"the DataFrame's photos sit in {len(folders)} folders ({', '.join(folders[:3])}, ...): mlc "
                       "reads the photos of one folder (move them into one, or give a data folder)")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "labels", *(["caption"] if cap is not None else [])])  # none: an image-only head
    for i, (p, v) in enumerate(zip(paths, frame[lab], strict=True)):
        tokens = _label_tokens(v, i)
        if any("|" in t for t in tokens):
            raise MlcError(f"row {i}: a label holds '|', which mlc uses to join a row's labels")
        c = [] if cap is None else ["" if _missing(frame[cap].iloc[i]) else str(frame[cap].iloc[i])]
        writer.writerow([p.name, "|".join(tokens), *c])
    text = buf.getvalue()
    digest = hashlib.sha256((folders[0] + "\n" + text).encode()).hexdigest()[:10]
    folder = cache_dir / "frames" / f"frame-{digest}"
    if not (folder / "train.csv").is_file():
        from .atomic import write_text

        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "train.csv", text)
    layout = {"id_col": "image", "labels_col": "labels", "caption_col": "caption", "label_sep": "|",
              "image_dir": Path(folders[0])}
    return folder, layout
