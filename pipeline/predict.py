"""``mlc predict``: labels and probabilities for new photos (and captions), from a run or an exported model.

Photos are files, folders (every image in them) or globs; captions come from ``--caption`` (one for all) or
``--captions`` (a CSV read with the data layout options, like train.csv and test.csv: ``--id-col``,
``--caption-col``, the competition's forgiving parser; rows are matched to photos by file name). An ONNX
export runs without torch (this module imports none: ``predictor.load`` picks the scorer); a run folder or a
safetensors export runs its encoders through torch or ONNX Runtime. A photo without a caption for a model
that reads captions is refused, naming the photo: the heads were trained on both, and an empty caption is
not a measured fallback.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import OutputOptions, claim_output, write_text
from .config import Config, group, opt, require
from .data import DataOptions
from .errors import MlcError
from .log import get
from .options import LoaderOptions
from .output_rules import is_predictions
from .predictor import Predictor, csv_header, load, photo_faults
from .records import IMAGE_EXTENSIONS, CsvLayout, read_csv

FORMATS = ("table", "csv", "json")

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class PredictConfig(Config):
    """Options of ``mlc predict``."""

    model: Path = opt(None, "A run folder (fit-head or finetune) or a folder `mlc export` wrote.", argument=True,
                      required=True)
    paths: tuple[str, ...] = opt((), "Photos: files, folders (every image in them) or globs.", argument=True)
    caption: str | None = opt(None, "One caption for every photo.")
    captions: Path | None = opt(None, "A CSV of captions, read like test.csv (--id-col, --caption-col): a photo's "
                                "file name and its caption a row.")
    format: str = opt("table", "table (for people), csv (path, labels, then every label's probability) or json "
                      "(a JSON object a line, every label's probability).")
    top_k: int = opt(0, "Table: also show the K most probable labels with their probabilities (0: only the "
                     "predicted).")
    skip_bad_images: bool = opt(False, "List photos that cannot be decoded and predict the rest (default: stop at "
                                "the first, naming it).")
    out: Path | None = opt(None, "Write the predictions to this file instead of printing them: a new file, or "
                           "earlier predictions it replaces.")
    output: OutputOptions = group(OutputOptions)
    data: DataOptions = group(DataOptions)
    loader: LoaderOptions = group(LoaderOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.model is not None, "give a run or exported model folder"),
                 (self.format in FORMATS, f"--format must be one of {FORMATS}"),
                 (self.top_k >= 0, "--top-k must be 0 or more"),
                 (not (self.caption is not None and self.captions is not None), "give --caption or --captions, "
                  "not both")])


def image_paths(specs: tuple[str, ...]) -> list[str]:
    """Files, folders and globs -> image files, as given (a folder's files joined onto it), in the order given
    (folders and globs sorted)."""
    found: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            # every entry with an image's name but a folder: a FIFO or a device among them is refused by name when
            # read (or listed with --skip-bad-images), never silently left out
            found += sorted(os.path.join(spec, f.name) for f in p.iterdir()
                            if not f.is_dir() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists() or p.is_symlink():  # a FIFO, a device, a dangling link: load_image names what it is
            found.append(spec)
        elif any(ch in spec for ch in "*?["):
            found += sorted(m for m in glob.glob(spec, recursive=True) if Path(m).is_file())
        else:
            raise MlcError(f"{spec}: no such file or folder")
    if specs and not found:
        raise MlcError(f"no images in {', '.join(specs)}")
    return found


def read_captions(path: Path, options: DataOptions) -> dict[str, str]:
    """A captions CSV read with the data layout options: file name -> caption (DataError naming a faulty row). A
    CSV with a labels column (the competition's train.csv) is read as validate reads it, labels and all."""
    layout = CsvLayout(options.id_col, options.labels_col, options.caption_col, options.label_sep, options.images)
    labelled = options.labels_col.lower() in {c.lower() for c in csv_header(path)}
    return {r.image_id: r.caption for r in read_csv(path, labelled=labelled, layout=layout)}


def _captions_for(cfg: PredictConfig, keys: list[str], pred: Predictor, table: dict[str, str] | None) -> list[str]:
    if not pred.needs_captions:
        return [""] * len(keys)
    if cfg.caption is not None:
        return [cfg.caption] * len(keys)
    if table is None:
        raise MlcError(f"{cfg.model} reads captions too: give --caption TEXT or --captions CSV")
    missing = [k for k in keys if Path(k).name not in table]
    if missing:
        raise MlcError(f"{cfg.captions}: no caption for {', '.join(missing[:5])}" +
                       (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "") +
                       "; this model reads captions too")
    return [table[Path(k).name] for k in keys]


def _say(msg: str) -> None:
    logger.info(f"[mlc predict] {msg}")


def predict(cfg: PredictConfig, pred: Predictor | None = None) -> list[dict[str, Any]]:
    """One dict per photo (or caption): its path as given, labels and their names, every label's probability."""
    t0 = time.monotonic()
    if pred is None:
        pred = load(cfg.model, backend=cfg.loader.backend, device=cfg.loader.device, onnx_dir=cfg.loader.onnx_dir)
    table = read_captions(cfg.captions, cfg.data) if cfg.captions is not None else None
    keys = image_paths(cfg.paths) if pred.needs_images else \
        (list(table) if table is not None else list(cfg.paths))  # a text-only model: the captions CSV's rows
    if not keys:
        raise MlcError("nothing to predict: give photos (or, for a text-only model, --captions)")
    captions = _captions_for(cfg, keys, pred, table)
    skipped, bad = photo_faults(cfg.skip_bad_images, _say)
    rows_kept, probs = pred.proba_files(keys, captions, batch_size=cfg.loader.encode_batch, workers=cfg.loader.workers,
                                        on_bad=bad, say=_say)
    results = rows(pred, [keys[i] for i in rows_kept], probs)
    if skipped:
        _say(f"{len(skipped)} of {len(keys)} photos skipped (listed above): they could not be decoded")
    if not results:
        raise MlcError(f"no photo could be read ({len(skipped)} skipped)")
    _say(f"{len(results)} photos labelled in {time.monotonic() - t0:.1f} s")
    return results


def rows(pred: Predictor, keys: list[str], probs: np.ndarray) -> list[dict[str, Any]]:
    """Each row's labels and names (the decision rule) and every label's probability (id -> probability)."""
    ids, names = pred.labels.ids, pred.labels.names
    return [{"path": key, "labels": [ids[j] for j in np.flatnonzero(row)],
             "names": [names[j] for j in np.flatnonzero(row)],
             "probabilities": {str(i): round(float(v), 6) for i, v in zip(ids, p, strict=True)}}
            for key, p, row in zip(keys, probs, pred.decide(probs), strict=True)]


def render(results: list[dict[str, Any]], fmt: str, label_names: dict[str, str], top_k: int = 0) -> str:
    if fmt == "json":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "labels", *label_names])
        for r in results:
            w.writerow([r["path"], " ".join(map(str, r["labels"])), *(r["probabilities"][k] for k in label_names)])
        return buf.getvalue()
    width = max((len(r["path"]) for r in results), default=4)
    lines = [f"{'photo':<{width}}  labels (probability)"]
    for r in results:
        p = r["probabilities"]
        chosen = [f"{name} ({p[str(lid)]:.2f})" for lid, name in zip(r["labels"], r["names"], strict=True)]
        top = sorted(p, key=lambda k: -p[k])[:top_k]
        extra = [f"{label_names[k]} {p[k]:.2f}" for k in top if k not in map(str, r["labels"])]
        lines.append(f"{r['path']:<{width}}  {', '.join(chosen)}" + (f"   [also: {', '.join(extra)}]" if extra else ""))
    return "\n".join(lines) + "\n"


def _inputs(cfg: PredictConfig) -> list[Path]:
    """The photos (as found), the folders holding them (whose files --force never replaces) and the captions file."""
    try:
        photos = image_paths(cfg.paths)
    except MlcError:  # predict() says what is wrong with them, in its turn
        photos = []
    folders = sorted({Path(p).parent for p in photos})
    return [*photos, *folders] + ([cfg.captions] if cfg.captions is not None else [])


def run(cfg: PredictConfig) -> None:
    if cfg.out is not None:  # before any photo is read: never the model, a photo or the captions, nor a foreign file
        out = claim_output(cfg.out, what="a predictions file", folder=False, ours=is_predictions,
                           force=cfg.output.force, inputs=_inputs(cfg), sealed=[cfg.model])
    _say(f"loading {cfg.model}")
    pred = load(cfg.model, backend=cfg.loader.backend, device=cfg.loader.device, onnx_dir=cfg.loader.onnx_dir)
    names = {str(i): n for i, n in zip(pred.labels.ids, pred.labels.names, strict=True)}
    text = render(predict(cfg, pred), cfg.format, names, cfg.top_k)
    if cfg.out is not None:
        write_text(out, text)
        _say(f"wrote {cfg.out}")
    else:
        sys.stdout.write(text)
