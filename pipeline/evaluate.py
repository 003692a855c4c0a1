"""``mlc evaluate MODEL DATA``: how well a run or an exported model labels photos of a labelled CSV.

DATA is a data folder (its ``--split`` CSV, test by default, must carry labels) or a CSV file (its photos in
the folder's ``data/``, ``images/`` or beside it), read with the data layout options like every other
command. Prints samples-F1 (the competition's metric, with the model's thresholds and decision rule) and each
label's precision, recall, F1 and support; ``--out`` writes them as JSON. From Python::

    from pipeline import evaluate
    scores = evaluate("model/", "path/to/data")      # {"samples_f1": ..., "per_class": {...}, ...}
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json
from .config import as_paths, opt, require
from .data import DataDir, DataOptions
from .errors import DataError, MlcError
from .metrics import per_class, samples_f1
from .options import LoaderOptions
from .predictor import Predictor, load, photo_faults
from .records import read_csv


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(LoaderOptions, DataOptions):
    """Options of ``mlc evaluate``."""

    model: Path = opt(None, "A run folder or a folder `mlc export` wrote.", argument=True, required=True)
    data: Path = opt(None, "A data folder (its --split CSV) or a labelled CSV file.", argument=True, required=True)
    split: str = opt("test", "Which CSV of a data folder: test or train (it must carry labels).")
    skip_bad_images: bool = opt(False, "List photos that cannot be decoded and score the rest (default: stop at "
                                "the first, naming it).")
    out: Path | None = opt(None, "Also write the scores to this JSON file.")
    onnx_dir: Path = opt(Path("cache/onnx"), "Where exported ONNX graphs of a run's encoders are kept and reused.")

    def __post_init__(self) -> None:
        super().__post_init__()
        as_paths(self, "model", "data", "out", "onnx_dir")
        require([(self.model is not None and self.data is not None, "give a model folder and a data folder or CSV"),
                 (self.split in ("train", "test"), "--split must be train or test")])


def _say(msg: str) -> None:
    print(f"[mlc evaluate] {msg}", file=sys.stderr, flush=True)


def evaluate(cfg: EvaluateConfig, pred: Predictor | None = None) -> dict[str, Any]:
    """samples-F1 and per-label precision/recall/F1/support of the model on the labelled rows."""
    pred = pred or load(cfg.model, backend=cfg.backend, device=cfg.device, onnx_dir=cfg.onnx_dir)
    folder = cfg.data if cfg.data.is_dir() else cfg.data.parent
    data = DataDir.open(folder, cfg)
    path = data.csv_path(cfg.split) if cfg.data.is_dir() else cfg.data
    records = read_csv(path, labelled=True, layout=data.layout())
    y = np.zeros((len(records), len(pred.labels)), np.uint8)
    for i, r in enumerate(records):
        for token in r.labels or ():
            try:
                y[i, pred.labels.column(token)] = 1
            except KeyError:
                raise DataError(str(path), r.line, f"label {token!r} is not one the model knows "
                                f"({', '.join(map(str, pred.labels.ids))})") from None
    if not records:
        raise DataError(str(path), None, "no labelled rows")
    _say(f"{len(records)} rows of {path}")
    skipped, bad = photo_faults(cfg.skip_bad_images, _say)
    rows, probs = pred.proba_files([str(data.image_dir / r.image_id) for r in records], [r.caption for r in records],
                                   batch_size=cfg.batch_size, workers=cfg.workers, on_bad=bad, say=_say)
    if not rows:
        raise MlcError(f"no photo could be read ({len(skipped)} skipped)")
    y_true, y_pred = y[rows], pred.decide(probs)
    pc = per_class(y_true, y_pred)
    scores = {"samples_f1": samples_f1(y_true, y_pred), "rows": len(rows), "skipped": [e.path for e in skipped],
              "source": str(path), "model": str(cfg.model),
              "per_class": {str(lid): {"name": name, **{k: float(pc[k][j]) for k in ("precision", "recall", "f1")},
                                       "support": int(pc["support"][j])}
                            for j, (lid, name) in enumerate(zip(pred.labels.ids, pred.labels.names, strict=True))}}
    if cfg.out is not None:
        write_json(cfg.out, scores)
    return scores


def evaluate_model(model: str | Path | Predictor, data: str | Path, **options: Any) -> dict[str, Any]:
    """The Python form: a model folder (or a loaded Predictor) and a data folder or CSV; ``options`` as the command's
    (split, id_col, caption_col, batch_size, ...)."""
    pred = model if isinstance(model, Predictor) else None
    cfg = EvaluateConfig(model=Path(pred.source) if pred else Path(model), data=Path(data), **options)
    return evaluate(cfg, pred)


def render(scores: dict[str, Any]) -> str:
    lines = [f"samples-F1 {scores['samples_f1']:.4f} on {scores['rows']} photos of {scores['source']}"
             + (f" ({len(scores['skipped'])} skipped)" if scores["skipped"] else ""),
             f"{'label':<24} {'support':>7} {'precision':>9} {'recall':>7} {'F1':>7}"]
    for lid, c in scores["per_class"].items():
        lines.append(f"{(lid + ' ' + c['name'])[:24]:<24} {c['support']:7d} {c['precision']:9.3f} {c['recall']:7.3f} "
                     f"{c['f1']:7.3f}")
    return "\n".join(lines)
