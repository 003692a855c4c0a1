"""``mlc evaluate MODEL DATA``: how well a run or an exported model labels photos of a labelled CSV.

DATA is a data folder (its ``--split`` CSV, test by default, must carry labels) or a CSV file (its photos in
the folder's ``data/``, ``images/`` or beside it), read with the data layout options like every other
command. Prints samples-F1 (the competition's metric, with the model's thresholds and decision rule) and each
label's precision, recall, F1 and support; ``--out`` writes them as JSON. From Python (Predictor.evaluate)::

    from pipeline import load
    scores = load("model/").evaluate("path/to/data")      # {"samples_f1": ..., "per_class": {...}, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import OutputOptions, claim_output, write_json
from .config import Config, group, opt, require
from .data import DataDir, DataOptions
from .log import get
from .options import LoaderOptions
from .output_rules import is_scores
from .predictor import load

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Config):
    """Options of ``mlc evaluate``."""

    model: Path = opt(None, "A run folder or a folder `mlc export` wrote.", argument=True, required=True)
    data_dir: Path = opt(None, "A data folder (its --split CSV) or a labelled CSV file.", argument=True,
                         required=True)
    split: str = opt("test", "Which CSV of a data folder: test or train (it must carry labels).")
    skip_bad_images: bool = opt(False, "List photos that cannot be decoded and score the rest (default: stop at "
                                "the first, naming it).")
    out: Path | None = opt(None, "Also write the scores to this JSON file: a new file, or earlier scores it "
                           "replaces.")
    output: OutputOptions = group(OutputOptions)
    data: DataOptions = group(DataOptions)
    loader: LoaderOptions = group(LoaderOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.model is not None and self.data_dir is not None, "give a model folder and a data folder or CSV"),
                 (self.split in ("train", "test"), "--split must be train or test")])


def _say(msg: str) -> None:
    logger.info(f"[mlc evaluate] {msg}")


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """samples-F1 and per-label precision/recall/F1/support of the model on the labelled rows."""
    out = claim_out(cfg) if cfg.out is not None else None  # before the work: never an input, nor a foreign file
    if cfg.split == "train" and cfg.data_dir.is_dir():
        _say("warning: train.csv's rows trained this model, so these scores are optimistic; the run's cross-fitted "
             "scores are in its metrics.json (`mlc runs`)")
    pred = load(cfg.model, backend=cfg.loader.backend, device=cfg.loader.device, onnx_dir=cfg.loader.onnx_dir)
    scores = pred.evaluate(cfg.data_dir, split=cfg.split, options=cfg.data, batch_size=cfg.loader.encode_batch,
                           workers=cfg.loader.workers, skip_bad_images=cfg.skip_bad_images, say=_say)
    if out is not None:
        write_json(out, scores)
    return scores


def claim_out(cfg: EvaluateConfig) -> Path:
    """``--out`` proved safe (atomic.claim_output): never the model, the CSV, the data or image folder."""
    data = Path(cfg.data_dir)
    inputs = [data]
    if data.is_dir() or data.parent.is_dir():
        with_folder = DataDir.open(data if data.is_dir() else data.parent, cfg.data)
        inputs += [with_folder.root, with_folder.image_dir, with_folder.csv_path(cfg.split)]
    return claim_output(cfg.out, what="a scores file (mlc evaluate --out)", folder=False, ours=is_scores,
                        inputs=inputs, sealed=[cfg.model], force=cfg.output.force)


def render(scores: dict[str, Any]) -> str:
    lines = [f"samples-F1 {scores['samples_f1']:.4f} on {scores['rows']} photos of {scores['source']}"
             + (f" ({len(scores['skipped'])} skipped)" if scores["skipped"] else ""),
             f"micro-F1 {scores['micro_f1']:.4f}  macro-F1 {scores['macro_f1']:.4f}  mAP {scores['mAP']:.4f}",
             f"{'label':<24} {'support':>7} {'precision':>9} {'recall':>7} {'F1':>7}"]
    for lid, c in scores["per_class"].items():
        lines.append(f"{(lid + ' ' + c['name'])[:24]:<24} {c['support']:7d} {c['precision']:9.3f} {c['recall']:7.3f} "
                     f"{c['f1']:7.3f}")
    return "\n".join(lines)
