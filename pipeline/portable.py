"""An exported model run with ONNX Runtime, tokenizers, Pillow and numpy alone: no torch.

``mlc export`` writes ``model.onnx`` (uint8 pixels + token ids + mask -> probabilities, the fold heads
averaged inside) and ``export.json``, which says everything a client needs; this module is mlc's own
such client. Its image rule is torchvision's ``resize`` + ``center_crop`` on a PIL image, written out
(PIL resizes in both), so the pixels are the ones the model was verified on when exported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import MlcError

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class ImageRule:
    """export.json ``image``: shorter side resized to ``resize`` (the longer one to int(resize * long / short)),
    then a centre ``crop`` x ``crop`` square (top = round((h - crop) / 2), left likewise)."""

    resize: int
    crop: int
    interpolation: str
    jpeg_draft: bool

    @classmethod
    def of(cls, d: dict[str, Any]) -> ImageRule:
        return cls(d["resize"]["shorter_side"], d["crop"]["size"], d["resize"]["interpolation"], d["jpeg_draft"])

    @property
    def draft(self) -> int | None:
        return self.resize if self.jpeg_draft else None

    def pixels(self, im: Image.Image) -> np.ndarray:
        """A PIL image -> (3, crop, crop) uint8 (another mode converted to RGB as torchvision's path does)."""
        if im.mode != "RGB":
            im = im.convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if w <= h else (new_long, self.resize)
        if size != (w, h):
            im = im.resize(size, _RESAMPLE[self.interpolation])
        w, h = im.size
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        im = im.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


class Tokens:
    """export.json ``text``: tokenizer.json (truncation and padding to the longest caption set in it), captions
    lowercased first when ``lowercase``."""

    def __init__(self, path: Path, lowercase: bool) -> None:
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type
            raise MlcError(f"{path}: cannot read the tokenizer ({e})") from e
        self.lowercase = lowercase

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask, (B, T) int64."""
        texts = [str(c).lower() if self.lowercase else str(c) for c in captions]
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        return ids, np.array([e.attention_mask for e in enc], dtype=np.int64)


def session(path: Path) -> Any:
    """An ONNX Runtime CPU session on every core, not spinning between ops (photo decoding needs the cycles)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = min(4, os.cpu_count() or 1)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types
        raise MlcError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {str(e)[:200]})") from e


_ONNX_TYPES = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(float)": "float32",
               "tensor(float16)": "float16"}


def _described(args: Any) -> dict[str, str]:
    return {a.name: _ONNX_TYPES.get(a.type, a.type) for a in args}


def agree(sess: Any, meta: dict[str, Any], path: Path) -> None:
    """The graph is the one export.json describes: its input and output names and types as ``graph.inputs`` and
    ``graph.outputs`` list them, and one probability a label (``label_ids``); MlcError naming the field else."""
    classes = len(meta["label_ids"])
    for field, args in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        declared = meta["graph"].get(field)
        if not isinstance(declared, list) or not all(isinstance(d, dict) for d in declared):
            raise MlcError(f"{path}: graph.{field}: expected a list of {{name, dtype, shape}}, found {declared!r:.60}")
        have, said = _described(args), {d.get("name"): d.get("dtype") for d in declared}
        if have != said:
            raise MlcError(f"{path}: graph.{field}: the graph's {field} are {have}, export.json says {said}")
    out = {o.name: o.shape for o in sess.get_outputs()}.get("probabilities")
    if out is None:
        raise MlcError(f"{path}: graph.outputs: the graph has no output 'probabilities'")
    width = out[-1] if out and isinstance(out[-1], int) else None
    if width is not None and width != classes:
        raise MlcError(f"{path}: label_ids: {classes} labels, but the graph gives {width} probabilities a photo")
    for d in meta["graph"]["outputs"]:
        shape = d.get("shape")
        if d.get("name") == "probabilities" and isinstance(shape, list) and shape and shape[-1] != classes:
            raise MlcError(f"{path}: graph.outputs: probabilities of width {shape[-1]!r}, but {classes} labels")


class OnnxScorer:
    """model.onnx: photos and captions -> (N, C) probabilities."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.session = session(folder / meta["graph"]["file"])
        agree(self.session, meta, folder / "export.json")
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.image = ImageRule.of(meta["image"]) if meta.get("image") else None
        self.tokens = Tokens(folder / meta["text"]["tokenizer"], meta["text"]["lowercase"]) if meta.get("text") \
            else None
        self.classes = len(meta["label_ids"])

    needs_images = property(lambda self: self.image is not None)
    needs_captions = property(lambda self: self.tokens is not None)
    draft = property(lambda self: self.image.draft if self.image is not None else None)

    def proba(self, images: Sequence[Image.Image] | None, captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
        n = len(images) if images is not None else len(captions)
        out = [np.zeros((0, self.classes), np.float32)]
        for s in range(0, n, batch_size):
            feed: dict[str, np.ndarray] = {}
            if self.image is not None and images is not None:
                feed["pixels"] = np.stack([self.image.pixels(im) for im in images[s:s + batch_size]])
            if self.tokens is not None:
                feed["input_ids"], feed["attention_mask"] = self.tokens(captions[s:s + batch_size])
            m = len(next(iter(feed.values())))
            feed.setdefault("pixels", np.zeros((m, 3, 8, 8), np.uint8))  # inputs a one-modality graph ignores
            feed.setdefault("input_ids", np.zeros((m, 4), np.int64))
            feed.setdefault("attention_mask", np.ones((m, 4), np.int64))
            out.append(self.session.run(["probabilities"], {k: v for k, v in feed.items() if k in self.inputs})[0])
        return np.concatenate(out).astype(np.float32)
