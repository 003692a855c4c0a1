"""One inference core: a run folder or an exported model as an object that labels photos and captions.

``mlc submit`` (cached features), ``mlc predict``, ``mlc evaluate``, ``mlc export`` and ``mlc run`` all score
through :class:`Predictor`: labels, tuned thresholds, the decision rule, and a scorer that turns photos and
captions (or cached features) into probabilities. The scorer of a run folder (or a safetensors export) is
torch's (``scoring.TorchScorer``, built from the run's features.json entries); the scorer of an ONNX export
is ONNX Runtime's (``portable.OnnxScorer``). This module imports no torch, so an ONNX export loads and
predicts without it::

    from pipeline import load
    model = load("model/")                        # a run folder or an exported one
    model.predict(["cat.jpg"], ["a cat on a bench"])   # [[label ids], ...]
    model.predict_proba(["cat.jpg"], ["a cat on a bench"])   # (N, C) probabilities, columns = model.labels.ids
    model.evaluate("path/to/data", split="train")     # samples-F1 and per-label F1 on labelled rows
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import schemas
from .data import DataDir
from .decision import RULES, Decision
from .errors import DataError, ImageError, MlcError
from .folders import check_listing, read_json
from .images import DECODE_ERRORS, decode_image, load_image
from .labels import LabelSpace
from .metrics import macro_f1, mean_average_precision, micro_f1, per_class, samples_f1
from .reading import CSV_BYTES, read_bytes
from .records import read_csv

EXPORT_FILE = "export.json"
EXPORT_FORMAT = 2  # 1: encoders + heads only (mlc 0.2.0); 2: + export.json describing preprocessing and the rule
Photo = str | os.PathLike[str] | Image.Image
# The decision rule export.json records and Predictor.decide applies: read back field by field, so an export
# asking for another rule is refused rather than scored by this one.
DECISION = {  # export.json's decision: these beside the rule's name and parameters (decision.Decision.to_dict())
    "at_least_one": True,
    "columns": "probabilities[:, j] and thresholds[j] belong to label_ids[j] (named label_names[j])",
}


def _raise(e: ImageError) -> None:
    raise e


def photo_faults(skip: bool, say: Callable[[str], None]) -> tuple[list[ImageError], Callable[[ImageError], None]]:
    """``on_bad`` for Predictor.proba_files: raise (one line naming the photo), or with ``skip`` list the photo,
    say so and go on; and the list it fills."""
    skipped: list[ImageError] = []

    def on_bad(e: ImageError) -> None:
        if not skip:
            raise e
        skipped.append(e)
        say(f"skipped {e.path}: {e.fault}")

    return skipped, on_bad


@dataclass
class Predictor:
    """Labels + thresholds + the decision rule, over a scorer (photos and captions -> probabilities)."""

    source: Path
    labels: LabelSpace
    thresholds: np.ndarray  # (C,) per label
    scorer: Any  # scoring.TorchScorer | portable.OnnxScorer
    rule: Decision | None = None  # the run's chosen decision rule; None: the thresholds (per-class)
    export: dict[str, Any] | None = None  # export.json as read and verified (None: a run folder)

    @property
    def needs_images(self) -> bool:
        return bool(self.scorer.needs_images)

    @property
    def needs_captions(self) -> bool:
        return bool(self.scorer.needs_captions)

    @property
    def draft(self) -> int | None:
        """The shorter side a JPEG may be decoded down to (data.load_image), or None."""
        return self.scorer.draft

    def predict_proba(self, photos: Sequence[Photo] | None = None, captions: Sequence[str] | None = None, *,
                      batch_size: int = 32) -> np.ndarray:
        """(N, C) probabilities, columns in the order of ``labels.ids``. ``photos``: paths (decoded as mlc decodes:
        data.load_image) or PIL images (taken as they are; convert('RGB') if needed), None for a text-only model;
        ``captions``: one per photo (None for a model without a text branch)."""
        images = self._images(photos)
        n = len(images) if images is not None else len(captions or [])
        return self.scorer.proba(images, self._captions(captions, n), batch_size)

    def _captions(self, captions: Sequence[str] | None, n: int) -> list[str]:
        """One caption per row for a model that reads them (refused when missing or all empty: the heads were
        trained on image and caption together, and an empty caption is not a measured fallback)."""
        if not self.needs_captions:
            return [""] * n
        if captions is None or len(captions) != n:
            raise MlcError(f"{self.source} reads captions too: give one caption per photo "
                           f"({n} photos, {0 if captions is None else len(captions)} captions)")
        if n and not any(str(c).strip() for c in captions):
            raise MlcError(f"{self.source} reads captions too, and every caption given is empty (a CSV without "
                           "its caption column? see --caption-col)")
        return list(captions)

    @property
    def decision(self) -> Decision:
        """The decision rule this model applies (decision.RULES), with its tuned parameters."""
        return self.rule or Decision("per-class", tuple(float(t) for t in self.thresholds))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) 0/1 by the model's decision rule (``decision``): thresholds, or the expected-F1 label set of each
        photo. Every photo gets at least one label, as submissions have."""
        return self.decision.apply(probs)

    def predict(self, photos: Sequence[Photo] | None = None, captions: Sequence[str] | None = None, *,
                batch_size: int = 32) -> list[list[int | str]]:
        """Each photo's predicted label ids (``labels.names`` has their names)."""
        decided = self.decide(self.predict_proba(photos, captions, batch_size=batch_size))
        return [[self.labels.ids[j] for j in np.flatnonzero(row)] for row in decided]

    def proba_files(self, paths: Sequence[str], captions: Sequence[str], *, batch_size: int = 32, workers: int = 2,
                    on_bad: Callable[[ImageError], None] = _raise,
                    say: Callable[[str], None] | None = None) -> tuple[list[int], np.ndarray]:
        """Photo files (decoded on ``workers`` threads, ``batch_size`` at a time) and their captions -> the rows
        scored and their (len(rows), C) probabilities. A photo that cannot be decoded goes to ``on_bad`` (which
        raises by default) and is left out; ``say`` hears a progress line every 5 s."""
        captions = self._captions(captions, len(paths))
        kept: list[int] = []
        out = [np.zeros((0, len(self.labels)), np.float32)]
        shown = time.monotonic()
        for s in range(0, len(paths), batch_size):
            rows = list(range(s, min(s + batch_size, len(paths))))
            images = None
            if self.needs_images:
                decoded = decode_all([Path(paths[i]) for i in rows], self.draft, workers, on_bad)
                rows = [i for i, im in zip(rows, decoded, strict=True) if im is not None]
                images = [im for im in decoded if im is not None]
                if not rows:
                    continue
            out.append(self.scorer.proba(images, [captions[i] for i in rows], batch_size))
            kept += rows
            if say is not None and time.monotonic() - shown > 5:
                say(f"{rows[-1] + 1}/{len(paths)} photos")
                shown = time.monotonic()
        return kept, np.concatenate(out)

    def evaluate(self, data: str | os.PathLike[str], *, split: str = "test", options: Any = None,
                 batch_size: int = 32, workers: int = 2, skip_bad_images: bool = False,
                 say: Callable[[str], None] | None = None) -> dict[str, Any]:
        """samples-, micro- and macro-F1 (thresholds and decision rule applied), mAP and each label's precision,
        recall, F1 and support on labelled rows: ``data`` a data folder (its ``split`` CSV) or a CSV file (photos
        in its folder's data/, images/ or beside it), read with ``options`` (data.DataOptions; default columns
        otherwise)."""
        data = Path(data)
        folder = DataDir.open(data if data.is_dir() else data.parent, options)
        path = folder.csv_path(split) if data.is_dir() else data  # type: ignore[arg-type]
        header, layout = {c.lower() for c in csv_header(path)}, folder.layout()
        if layout.id_col.lower() in header and layout.labels_col.lower() not in header:
            raise MlcError(unlabelled(path, data, split, self.source))
        records = read_csv(path, labelled=True, layout=layout)
        if not records:
            raise DataError(str(path), None, "no labelled rows")
        y = self.truth([r.labels or [] for r in records], str(path), [(str(path), r.line) for r in records])
        if say is not None:
            say(f"{len(records)} rows of {path}")
        skipped, bad = photo_faults(skip_bad_images, say or (lambda _: None))
        rows, probs = self.proba_files([str(folder.image_dir / r.image_id) for r in records],
                                       [r.caption for r in records], batch_size=batch_size, workers=workers,
                                       on_bad=bad, say=say)
        if not rows:
            raise MlcError(f"no photo could be read ({len(skipped)} skipped)")
        out = self.scores(y[rows], probs, str(path))
        return {**out, "skipped": [e.path for e in skipped]}

    def truth(self, tokens: Sequence[Sequence[Any]], source: str,
              where: Sequence[tuple[str, int | None]] | None = None) -> np.ndarray:
        """Each row's true labels (tokens: ids or names the model knows) as an (N, C) 0/1 matrix, checked before
        any photo is scored: DataError naming the file and row (``where``) of the first label the model does not
        know."""
        y = np.zeros((len(tokens), len(self.labels)), np.uint8)
        for i, row in enumerate(tokens):
            for token in row:
                try:
                    y[i, self.labels.column(token)] = 1
                except KeyError:
                    file, line = where[i] if where is not None else (source, None)
                    raise DataError(file, line if where is not None else i, f"label {token!r} is not one the model "
                                    f"knows ({', '.join(map(str, self.labels.ids))})") from None
        return y

    def scores(self, y: np.ndarray, probs: np.ndarray, source: str) -> dict[str, Any]:
        """True labels ``y`` (``truth``) against the probabilities, through ``decide``: samples-, micro- and
        macro-F1, mAP and each label's precision, recall, F1 and support (keyed by label id)."""
        y_pred = self.decide(probs)
        pc = per_class(y, y_pred)
        return {"samples_f1": samples_f1(y, y_pred), "micro_f1": micro_f1(y, y_pred),
                "macro_f1": macro_f1(y, y_pred), "mAP": mean_average_precision(y, probs), "rows": len(y),
                "source": source, "model": str(self.source),
                "per_class": {str(lid): {"name": name, **{k: float(pc[k][j]) for k in ("precision", "recall", "f1")},
                                         "support": int(pc["support"][j])}
                              for j, (lid, name) in enumerate(zip(self.labels.ids, self.labels.names, strict=True))}}

    def from_features(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """Cached features image (N, V, Di), text (N, Dt) -> (N, C) probabilities (a run's scorer only)."""
        return self.scorer.from_features(image, text)

    def _images(self, photos: Sequence[Photo] | None) -> list[Image.Image] | None:
        if not self.needs_images:
            return None
        if photos is None:
            raise MlcError(f"{self.source}: this model reads images; give photos")
        return [_as_rgb(p, i, self.draft) if isinstance(p, Image.Image) else load_image(p, self.draft)
                for i, p in enumerate(photos)]

    @classmethod
    def of_run(cls, run: Any, **engine: Any) -> Predictor:
        """A loaded run (runs.Run): its heads only (scores cached features), or with ``encoders=True`` (and the
        backend, device and onnx_dir of scoring.run_scorer) its encoders too."""
        from .scoring import run_scorer

        return cls(run.path, run.labels, run.thresholds, run_scorer(run, encoders=engine.pop("encoders", False),
                                                                     **engine), run.decision)


def load(path: str | os.PathLike[str], *, backend: str = "auto", device: Any = None,
         onnx_dir: Path | None = None) -> Predictor:
    """A run folder (fit-head or finetune) or a folder `mlc export` wrote. An ONNX export loads without torch;
    ``backend``, ``device`` and ``onnx_dir`` are for the torch path (run folders, safetensors exports)."""
    path = Path(path)
    if not path.is_dir():
        found = "it is a file, not a folder" if path.exists() else "no such folder"
        raise MlcError(f"{path}: {found}; a model is a run folder (mlc fit-head, mlc finetune) or an export folder "
                       "(mlc export)")
    if (path / EXPORT_FILE).exists():  # anything there but a regular file is refused by name when read
        meta = read_export(path)
        labels = LabelSpace(tuple(meta["label_ids"]), tuple(meta["label_names"]))
        th = np.asarray(meta["thresholds"], np.float32)
        rule = Decision.from_dict(meta["decision"]) if "thresholds" in meta.get("decision", {}) else None
        if meta.get("graph"):
            from .portable import OnnxScorer

            return Predictor(path, labels, th, OnnxScorer(path, meta), rule, meta)
        from .scoring import export_scorer

        return Predictor(path, labels, th, export_scorer(path, meta, backend=backend, device=device,
                                                         onnx_dir=onnx_dir), rule, meta)
    from .runs import RunDir
    from .scoring import run_scorer

    run = RunDir(path).load()
    return Predictor(path, run.labels, run.thresholds, run_scorer(run, encoders=True, backend=backend,
                                                                  device=device, onnx_dir=onnx_dir), run.decision)


def csv_header(path: Path) -> list[str]:
    """The first line's cells (an empty list for a missing or empty file: the reader then says why)."""
    try:  # bounded and never blocking (a FIFO, /dev/zero): reading.read_bytes; the reader then names the fault
        line = read_bytes(path, limit=CSV_BYTES, what="CSV file").split(b"\n", 1)[0].decode("utf-8-sig", "replace")
    except (OSError, DataError):
        return []
    return [c.strip().strip('"') for c in line.rstrip("\r").split(",")]


def unlabelled(path: Path, data: Path, split: str, model: Path) -> str:
    """What to say of a CSV without labels, and what works instead."""
    offer = "score a labelled CSV"
    if data.is_dir() and split == "test":
        own = f"its model card ({model / 'README.md'})" if (model / EXPORT_FILE).is_file() else \
            f"`mlc runs {model}` (its metrics.json)"
        offer = (f"--split train scores train.csv (rows that trained the model: optimistic), or {own} shows the "
                 "model's own cross-fitted scores")
    return f"{path} has no labels column, so there is nothing to score against: {offer}"


def read_export(path: Path) -> dict[str, Any]:
    """export.json, schema-checked, after checking the folder against its file list (sizes and sha256)."""
    meta = read_json(path / EXPORT_FILE, "the export folder")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != EXPORT_FORMAT:
        raise MlcError(f"{path}: export format {fmt!r}; this mlc reads format {EXPORT_FORMAT} (export the run "
                       "again with this mlc)")
    meta = schemas.export(meta, path / EXPORT_FILE)
    honoured(meta, path / EXPORT_FILE)
    check_listing(path, meta["files"], (EXPORT_FILE,), "export the run again")
    return meta


def export_decision(decision: Decision) -> dict[str, Any]:
    """export.json's ``decision``: the rule's name and parameters, its help, and ``DECISION``. ``mlc export`` writes
    it, and ``honoured`` requires exactly it back."""
    return {**decision.to_dict(), "help": RULES[decision.rule].help, **DECISION}


def honoured(meta: dict[str, Any], path: Path) -> None:
    """Every field of export.json that decides something is one this mlc applies exactly, else MlcError naming the
    file and field: the decision rule (each field of ``DECISION``), and the kind and dtype against the graph."""
    decision = meta.get("decision")
    if not isinstance(decision, dict):
        raise MlcError(f"{path}: decision: expected the decision rule (an object), found {decision!r:.60}")
    rule = decision.get("rule")
    if rule not in RULES:
        raise MlcError(f"{path}: decision.rule: {rule!r:.60} is not a rule this mlc applies ({', '.join(RULES)}); "
                       "export the run again")
    try:
        parsed = Decision.from_dict(decision)
    except (ValueError, TypeError, KeyError) as e:
        raise MlcError(f"{path}: decision: {e}; export the run again") from None
    expected = export_decision(parsed)  # what this mlc writes, and so applies
    for key in sorted(set(decision) | set(expected)):
        if decision.get(key) != expected.get(key):
            want = f"{expected[key]!r:.80}" if key in expected else "no such field"
            raise MlcError(f"{path}: decision.{key}: {decision.get(key)!r:.80} is not the rule this mlc applies "
                           f"({want}); it would be ignored, so the export is refused: export the run again")
    # the README's "per-label thresholds" must be the rule's own (float32-rounded); schemas.export has checked both
    # lists (one number in [0, 1] per label) before this runs
    top = meta["thresholds"]
    same = all(abs(a - b) <= 1e-6 for a, b in zip(top, decision["thresholds"], strict=True))
    if not same:
        raise MlcError(f"{path}: thresholds: {top!r:.80} disagree with decision.thresholds "
                       f"({decision['thresholds']!r:.80}), which mlc applies; export the run again")
    graph = meta.get("graph")
    kind = "onnx" if graph else "safetensors"
    if meta.get("kind", kind) != kind:
        raise MlcError(f"{path}: kind: {meta.get('kind')!r}, but the folder is a {kind} export"
                       f" ({'a graph' if graph else 'no graph'} is listed)")
    if graph and "dtype" in meta and graph.get("dtype", meta["dtype"]) != meta["dtype"]:
        raise MlcError(f"{path}: dtype: {meta['dtype']!r}, but graph.dtype says {graph.get('dtype')!r}")


def _as_rgb(im: Image.Image, i: int, draft: int | None) -> Image.Image:
    """A photo given as a Pillow image, decoded by the rule a path is (data.decode_image), on a copy when it is
    already decoded (the caller's image is left as it was)."""
    try:
        return decode_image(im if getattr(im, "fp", None) is not None else im.copy(), draft)
    except DECODE_ERRORS as err:
        raise ImageError(f"photo {i} (a {type(im).__name__})", f"cannot decode image: {err}") from err


def decode_all(paths: Sequence[Path], draft: int | None, threads: int,
               on_bad: Callable[[ImageError], None]) -> list[Image.Image | None]:
    """Photos decoded to RGB (data.load_image) on ``threads`` threads (Pillow decodes without the GIL), in order;
    a photo that cannot be decoded is None after ``on_bad`` saw its error (which may raise it)."""
    def one(p: Path) -> Image.Image | ImageError:
        try:
            return load_image(p, draft)
        except ImageError as e:
            return e

    with ThreadPoolExecutor(max(1, threads)) as pool:
        out = list(pool.map(one, paths))
    for i, im in enumerate(out):
        if isinstance(im, ImageError):
            on_bad(im)
            out[i] = None
    return out  # type: ignore[return-value]
