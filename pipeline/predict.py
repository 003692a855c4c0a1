"""``mlc predict``: labels and probabilities for new photos (and captions), from a run or an exported model.

Photos are files, folders (every image in them) or globs; captions come from ``--caption`` (one for
all) or ``--captions`` (a CSV: a file name and its caption a row). The run's own encoders, thresholds
and labels; ONNX Runtime on the CPU where the encoders export. No cache and no fingerprint: it starts
as fast as the encoders load.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .atomic import OutputOptions, claim_output, first_line, write_text
from .config import as_paths, opt, require
from .data import load_image
from .device import select_device
from .errors import DataError, ImageError, MlcError
from .features import LoaderOptions
from .predictor import Predictor, load
from .records import IMAGE_EXTENSIONS

FORMATS = ("table", "csv", "json")


@dataclass(frozen=True, kw_only=True)
class PredictConfig(LoaderOptions, OutputOptions):
    """Options of ``mlc predict``."""

    model: Path = opt(None, "A run folder (fit-head or finetune) or a folder `mlc export` wrote.", argument=True,
                      required=True)
    paths: tuple[str, ...] = opt((), "Photos: files, folders (every image in them) or globs.", argument=True)
    caption: str | None = opt(None, "One caption for every photo.")
    captions: Path | None = opt(None, "A CSV of captions: a header, then a file name (or path) and its caption "
                                "a row.")
    format: str = opt("table", "table (for people), csv (file,labels) or json (a JSON object a line).")
    top_k: int = opt(0, "Also show the K most probable labels with their probabilities (0: only the predicted).")
    out: Path | None = opt(None, "Write the predictions to this file instead of printing them: a new file, or "
                           "earlier predictions it replaces.")
    onnx_dir: Path = opt(Path("cache/onnx"), "Where exported ONNX graphs of the encoders are kept and reused.")

    def __post_init__(self) -> None:
        super().__post_init__()
        as_paths(self, "model", "captions", "out", "onnx_dir")
        require([(self.model is not None, "give a run or exported model folder"),
                 (self.format in FORMATS, f"--format must be one of {FORMATS}"),
                 (self.top_k >= 0, "--top-k must be 0 or more"),
                 (not (self.caption is not None and self.captions is not None), "give --caption or --captions, "
                  "not both")])


def image_paths(specs: tuple[str, ...]) -> list[Path]:
    """Files, folders and globs -> image files, in the order given (folders and globs sorted)."""
    found: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found.append(p)
        elif any(ch in spec for ch in "*?["):
            found += sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
        else:
            raise MlcError(f"{spec}: no such file or folder")
    if specs and not found:
        raise MlcError(f"no images in {', '.join(specs)}")
    return found


def read_captions(path: Path) -> dict[str, str]:
    """A captions CSV: file name (or path) -> caption; DataError naming the row of a fault."""
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), None, f"cannot read ({e})") from e
    out: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataError(str(path), n, "expected a file name and a caption")
        out[row[0].strip()] = row[1].strip()
    return out


def _captions_for(cfg: PredictConfig, keys: list[str], pred: Predictor, table: dict[str, str] | None) -> list[str]:
    if not pred.needs_captions:
        return [""] * len(keys)
    if cfg.caption is not None:
        return [cfg.caption] * len(keys)
    if table is None:
        raise MlcError(f"{cfg.model} reads captions too: give --caption TEXT or --captions CSV")
    missing = [k for k in keys if k not in table and Path(k).name not in table]
    if missing:
        raise MlcError(f"{cfg.captions}: no caption for {', '.join(missing[:5])}" +
                       (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    return [table.get(k, table.get(Path(k).name, "")) for k in keys]


class _Photos(torch.utils.data.Dataset):
    """Photo i decoded to RGB in a DataLoader worker: (image or None, fault or None)."""

    def __init__(self, files: list[Path], draft: int | None) -> None:
        self.files, self.draft = files, draft

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, tuple[str, str] | None]:
        try:
            return load_image(self.files[i], self.draft), None
        except ImageError as e:  # raised again in the main process (ImageError itself does not pickle)
            return None, (e.path, e.fault)


def _image_batches(files: list[Path], pred: Predictor, cfg: PredictConfig) -> Iterator[list[Image.Image]]:
    loader = torch.utils.data.DataLoader(_Photos(files, pred.draft), batch_size=cfg.batch_size,
                                         num_workers=cfg.workers, collate_fn=list)
    for batch in loader:
        for _, fault in batch:
            if fault is not None:
                raise ImageError(*fault)
        yield [im for im, _ in batch]


def predict(cfg: PredictConfig) -> list[dict[str, Any]]:
    """One dict per photo (or caption): its labels, their names and probabilities."""
    pred = load(cfg.model, backend=cfg.backend, device=select_device(cfg.device), onnx_dir=cfg.onnx_dir)
    table = read_captions(cfg.captions) if cfg.captions is not None else None
    if pred.needs_images:
        files = image_paths(cfg.paths)
        keys = [str(f) for f in files]
    else:  # a text-only model: the rows are the captions CSV's
        files = []
        keys = list(table) if table is not None else [str(p) for p in cfg.paths]
    if not keys:
        raise MlcError("nothing to predict: give photos (or, for a text-only model, --captions)")
    captions = _captions_for(cfg, keys, pred, table)
    n = cfg.batch_size
    images = _image_batches(files, pred, cfg) if files else None
    results: list[dict[str, Any]] = []
    for s in range(0, len(keys), n):
        probs = pred.probabilities(next(images) if images is not None else None, captions[s:s + n], n)
        for key, p, row in zip(keys[s:s + n], probs, pred.decide(probs), strict=True):
            cols = np.flatnonzero(row)
            top = np.argsort(-p)[:cfg.top_k] if cfg.top_k else []
            shown = sorted(set(cols) | set(top), key=lambda j: -p[j])
            results.append({"path": key, "labels": [pred.labels.ids[j] for j in cols],
                            "names": [pred.labels.names[j] for j in cols],
                            # every label shown (predicted or top-k), most probable first: id -> probability
                            "probabilities": {str(pred.labels.ids[j]): round(float(p[j]), 4) for j in shown},
                            "label_names": {str(pred.labels.ids[j]): pred.labels.names[j] for j in shown}})
    return results


def render(results: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["ImageID", "Labels"])
        for r in results:
            w.writerow([Path(r["path"]).name, " ".join(map(str, r["labels"]))])
        return buf.getvalue()
    width = max((len(r["path"]) for r in results), default=4)
    lines = [f"{'photo':<{width}}  labels (probability)"]
    for r in results:
        shown = [f"{name} ({r['probabilities'][str(lid)]:.2f})" for lid, name in zip(r["labels"], r["names"],
                                                                                     strict=True)]
        extra = [f"{r['label_names'][k]} {v:.2f}" for k, v in r["probabilities"].items()
                 if k not in map(str, r["labels"])]
        lines.append(f"{r['path']:<{width}}  {', '.join(shown)}" + (f"   [also: {', '.join(extra)}]" if extra else ""))
    return "\n".join(lines) + "\n"


def is_predictions(path: Path) -> bool:
    """A file ``render`` wrote, in any format (its first line), which new predictions may replace."""
    line = first_line(path)
    if line == "ImageID,Labels" or line.startswith("photo "):
        return True
    try:
        return {"path", "labels"} <= set(json.loads(line))
    except (ValueError, TypeError):
        return False


def _inputs(cfg: PredictConfig) -> list[Path]:
    """The photos (as found) and the captions file."""
    try:
        photos = image_paths(cfg.paths)
    except MlcError:  # predict() says what is wrong with them, in its turn
        photos = []
    return photos + ([cfg.captions] if cfg.captions is not None else [])


def run(cfg: PredictConfig) -> None:
    if cfg.out is not None:  # before any photo is read: never the model, a photo or the captions, nor a foreign file
        out = claim_output(cfg.out, what="a predictions file", folder=False, ours=is_predictions, force=cfg.force,
                           inputs=_inputs(cfg), sealed=[cfg.model])
    text = render(predict(cfg), cfg.format)
    if cfg.out is not None:
        write_text(out, text)
        print(f"wrote {cfg.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
