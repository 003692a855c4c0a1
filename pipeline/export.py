"""``mlc export``: one self-contained folder that predicts without the training data or the caches.

    model/
      export.json          format, labels and names, thresholds, head constructor, which encoder
                           folders feed which features, every file's size and sha256
      encoders/0-image/    the encoders (Encoder.save folders: weights, config, tokenizer)
      encoders/0-text/
      head-K.safetensors   the fold heads
      model.onnx           with --format onnx: the whole model as one graph (uint8 pixels + token ids +
                           mask -> probabilities), checked against torch

``--dtype float16`` stores every weight in half precision (predictions are computed in float32 after
loading): a finetuned lite0 + MiniLM run goes from ~110 MB to ~55 MB, under the assignment's 100 MB.
``mlc predict`` takes the folder like a run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, schemas
from .atomic import check_writable, staged, write_json, write_safetensors
from .backends import (
    ATOL,
    PROBE_CAPTIONS,
    RTOL,
    BackendError,
    encoder_graph,
    mismatch,
    ort_session,
    probe_inputs,
    to_onnx,
)
from .config import Config, as_paths, opt, require
from .errors import MlcError
from .predictor import EXPORT_FILE, EXPORT_FORMAT, Predictor, load
from .runs import listing

DTYPES = ("float32", "float16")
FORMATS = ("safetensors", "onnx")


@dataclass(frozen=True, kw_only=True)
class ExportConfig(Config):
    """Options of ``mlc export``."""

    run: Path = opt(None, "A run folder from `mlc fit-head` or `mlc finetune`.", argument=True, required=True)
    out: Path = opt(None, "The folder to write (replaced whole if it exists).", required=True)
    dtype: str = opt("float32", "float32, or float16: half the size, predictions within float16's precision.")
    format: str = opt("safetensors", "safetensors (encoders + heads), or onnx: also the whole model as one ONNX "
                      "graph (a single-cache run).")

    def __post_init__(self) -> None:
        super().__post_init__()
        as_paths(self, "run", "out")
        require([(self.run is not None and self.out is not None, "give the run folder and --out"),
                 (self.dtype in DTYPES, f"--dtype must be one of {DTYPES}"),
                 (self.format in FORMATS, f"--format must be one of {FORMATS}")])


def _cast(module: nn.Module, dtype: str) -> nn.Module:
    return copy.deepcopy(module).half() if dtype == "float16" else module


def export(cfg: ExportConfig) -> tuple[Path, int]:
    """Write the export folder (staged, then swapped in); returns it and its size in bytes."""
    pred = load(cfg.run, backend="torch")
    check_writable(cfg.out.parent)
    with staged(cfg.out) as stage:
        meta = _write(pred, stage, cfg)
        if cfg.format == "onnx":
            _write_graph(pred, stage)
        meta["files"] = listing(stage, (EXPORT_FILE,))
        write_json(stage / EXPORT_FILE, {**meta, schemas.CHECKSUM: schemas.checksum(meta)})
    return cfg.out, sum(f.stat().st_size for f in cfg.out.rglob("*") if f.is_file())


def _write(pred: Predictor, stage: Path, cfg: ExportConfig) -> dict[str, Any]:
    branches = []
    for i, b in enumerate(pred.branches):
        entry: dict[str, str | None] = {}
        for kind, enc in (("image", b.image), ("text", b.text)):
            if enc is None:
                entry[kind] = None
                continue
            folder = f"encoders/{i}-{kind}"
            _cast(enc, cfg.dtype).save(stage / folder)
            entry[kind] = folder
        branches.append(entry)
    heads = []
    for k, head in enumerate(pred.heads):
        name = f"head-{k}.safetensors"
        write_safetensors(stage / name, _cast(head, cfg.dtype))
        heads.append(name)
    return {"format": EXPORT_FORMAT, "mlc_version": __version__, "source_run": str(Path(cfg.run).resolve()),
            "dtype": cfg.dtype, "label_ids": list(pred.labels.ids), "label_names": list(pred.labels.names),
            "thresholds": [float(t) for t in pred.thresholds], "head": pred.head_config, "heads": heads,
            "branches": branches, "graph": "model.onnx" if cfg.format == "onnx" else None}


class _Whole(nn.Module):
    """uint8 pixels (B, 3, H, W), token ids and mask (B, T) -> (B, C) probabilities, mean over the heads.
    The encoders run as backends exports them (normalisation inside the graph)."""

    def __init__(self, pred: Predictor) -> None:
        super().__init__()
        (b,) = pred.branches
        self.image = encoder_graph(b.image, None) if b.image is not None else None
        self.text = encoder_graph(b.text, None) if b.text is not None else None
        self.heads = nn.ModuleList(pred.heads)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        zi = self.image(pixels) if self.image is not None else pixels.new_zeros((n, 0), dtype=torch.float32)
        zt = self.text(input_ids, attention_mask) if self.text is not None \
            else pixels.new_zeros((n, 0), dtype=torch.float32)
        return torch.stack([torch.sigmoid(h(zi, zt)) for h in self.heads]).mean(0)


def probe_batch(pred: Predictor) -> tuple[torch.Tensor, ...]:
    """pixels (2, 3, H, W) uint8, input_ids and attention_mask (2, T): backends' probe images and its first
    two probe captions (of different lengths, so padding is exercised)."""
    (b,) = pred.branches
    if b.image is not None:
        (pixels,) = probe_inputs(b.image)
    else:
        pixels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)  # an input the graph ignores
    if b.text is None:
        return pixels, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    tok = b.text.tokenize(list(PROBE_CAPTIONS[:2]))
    return pixels, tok["input_ids"], tok["attention_mask"]


def _write_graph(pred: Predictor, stage: Path) -> None:
    """model.onnx: the whole model in one graph, checked against torch on a probe batch."""
    if len(pred.branches) != 1:
        raise MlcError("--format onnx exports a model over one cache; this run fuses several (use safetensors)")
    whole = _Whole(pred).eval()
    args = probe_batch(pred)
    names, path = ["pixels", "input_ids", "attention_mask"], stage / "model.onnx"
    try:
        to_onnx(whole, args, names, ["probabilities"], path)
    except BackendError as e:
        raise MlcError(f"the model cannot be exported as one ONNX graph ({e}); use --format safetensors") from e
    got = ort_session(path).run(None, {k: a.numpy() for k, a in zip(names, args, strict=True)})
    with torch.no_grad():
        want = whole(*args).numpy()
    why = mismatch(["probabilities"], got, [want])
    if why is not None:
        raise MlcError(f"the exported graph does not reproduce torch ({why}; tolerance {ATOL} + {RTOL} x |value|); "
                       "use --format safetensors")
