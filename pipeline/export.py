"""``mlc export``: one self-contained folder that predicts without the training data, the caches or mlc.

    model/                  (--format onnx, the default)
      export.json           everything a client needs: the graph's inputs and outputs (names, dtypes, shapes),
                            how a photo becomes pixels (EXIF, RGB, resize rule, crop, interpolation; the graph
                            normalises), the tokenizer and max length, label ids and names, thresholds, the
                            decision rule; every file's size and sha256
      model.onnx            uint8 pixels + token ids + mask -> probabilities (the fold heads averaged inside),
                            checked against torch once, when written
      tokenizer.json        the `tokenizers` tokenizer, truncation and padding set
      README.md             the model card (card.py: encoders, weights and licences, training data, labels,
                            cross-fitted scores, the decision rule, intended use, limits) and the files
      client.py             a client with onnxruntime, tokenizers, Pillow and numpy alone, from any folder

    model/                  (--format safetensors: for torch, and for runs fused over several caches)
      export.json, encoders/<i>-image/, encoders/<i>-text/, head-K.safetensors

``--precision fp16`` stores the weights in half precision (model.onnx computes in float32 after loading),
``--precision int8`` quantises the graph's matrix products (onnx format only). ``mlc predict`` and
``pipeline.load`` take the folder; an onnx one runs without torch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__, schemas
from .atomic import OutputOptions, claim_output, owned, staged, write_json, write_safetensors, write_text
from .card import card_markdown, model_card
from .config import Config, group, opt, require
from .decision import RULES, client_source
from .errors import MlcError
from .export_files import CLIENT as CLIENT_TEMPLATE
from .export_files import README, SAFETENSORS_README
from .folders import listing
from .graphs import ATOL, PROBE_CAPTIONS, RTOL, BackendError, encoder_graph, mismatch, probe_inputs, to_onnx
from .log import get
from .onnx_dtypes import DTYPES, convert
from .portable import session
from .predictor import EXPORT_FILE, EXPORT_FORMAT, Predictor, export_decision, load
from .runs import RunDir
from .scoring import TorchScorer

FORMATS = ("onnx", "safetensors")
PRECISIONS = ("fp32", "fp16", "int8")  # DTYPES in mlc's precision vocabulary (docs/DESIGN.md)
_OLD_PRECISIONS = {"float32": "fp32", "float16": "fp16"}
GRAPH, TOKENIZER = "model.onnx", "tokenizer.json"

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class ExportConfig(Config):
    """Options of ``mlc export``."""

    run: Path = opt(None, "A run folder from `mlc fit-head` or `mlc finetune`.", argument=True, required=True)
    out: Path = opt(None, "The folder to write: a new or empty folder, or an earlier export it replaces whole.",
                    required=True)
    precision: str = opt("fp32", "What the weights are stored in: fp32; fp16 (half precision: half the size); int8 "
                         "(the graph's matrix products quantised; onnx format only). The old float32/float16 are "
                         "taken too, with a notice.", aliases=("--dtype",))
    format: str = opt("onnx", "onnx: one ONNX graph + tokenizer + export.json, runs without torch (a run over one "
                      "cache); safetensors: the encoders and heads, for torch (any run).")
    output: OutputOptions = group(OutputOptions)

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> dict[str, Any]:
        """mlc's one precision vocabulary (fp32, fp16, int8); numpy's float32/float16 of mlc 0.2 taken with a notice."""
        values = super().coerce(values)
        old = values.get("precision")
        if old in _OLD_PRECISIONS:
            logger.warning(f"warning: --precision {old} is the old spelling; use {_OLD_PRECISIONS[old]}")
            values["precision"] = _OLD_PRECISIONS[old]
        return values

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.run is not None and self.out is not None, "give the run folder and --out"),
                 (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
                 (self.format in FORMATS, f"--format must be one of {FORMATS}"),
                 (not (self.precision == "int8" and self.format == "safetensors"), "--precision int8 quantises the "
                  "ONNX graph: use it with --format onnx")])

    @property
    def dtype(self) -> str:
        """The storage dtype's numpy name (float32, float16, int8): what export.json and onnx_dtypes speak."""
        return dict(zip(PRECISIONS, DTYPES, strict=True))[self.precision]


def _say(msg: str) -> None:
    logger.info(f"[mlc export] {msg}")


@contextlib.contextmanager
def _ticking(what: str) -> Iterator[None]:
    """``what`` said now and every 5 s until done: the ONNX exporter is silent for half a minute. It silences
    logging meanwhile (``logging.disable``), so the ticks go straight to the handlers, if progress is on."""
    done, t0, speak = threading.Event(), time.monotonic(), logger.isEnabledFor(logging.INFO)
    _say(what)

    def tick() -> None:
        while not done.wait(5):
            if speak:
                msg = f"[mlc export] {what}: {time.monotonic() - t0:.0f} s"
                logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, msg, None, None))

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def export(cfg: ExportConfig) -> tuple[Path, int]:
    """Write the export folder (staged, then swapped in); returns it and its size in bytes."""
    # never the run it reads (nor inside it), nor a folder that is no export of mlc's
    out = claim_output(cfg.out, what="an mlc export folder", folder=True, sealed=[cfg.run], force=cfg.output.force,
                       ours=lambda p: owned(p, EXPORT_FILE, None))
    with _ticking(f"loading {cfg.run}"):
        pred = load(cfg.run, backend="torch")
    rule = RULES[pred.decision.rule]
    if cfg.format == "onnx" and rule.client is None:
        raise MlcError(f"{cfg.run}: its decision rule {rule.name!r} declares no numpy source, so the ONNX export's "
                       "torch-free client.py cannot apply it: export with --format safetensors, or fit with another "
                       "--decision")
    card = _card(cfg.run, pred)
    with staged(out) as stage:
        # the run by its folder name only: an export travels, the exporting machine's paths stay behind
        meta = {"format": EXPORT_FORMAT, "mlc_version": __version__, "source_run": Path(cfg.run).resolve().name,
                "kind": cfg.format, "dtype": cfg.dtype, "label_ids": list(pred.labels.ids),
                "label_names": list(pred.labels.names), "thresholds": [float(t) for t in pred.thresholds],
                "decision": export_decision(pred.decision),
                "card": card}
        if cfg.format == "onnx":
            meta |= _write_onnx(pred, stage, cfg.dtype)
        else:
            meta |= _write_safetensors(pred.scorer, stage, cfg.dtype)
        write_text(stage / "README.md", readme(meta, pred))
        meta["files"] = listing(stage, (EXPORT_FILE,))
        write_json(stage / EXPORT_FILE, {**meta, schemas.CHECKSUM: schemas.checksum(meta)})
    return cfg.out, sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def _card(run: Path, pred: Predictor) -> dict[str, Any]:
    """The model card (card.py) from the run folder's records and the loaded encoders."""
    rd = RunDir(run)
    encoders = [e for b in pred.scorer.branches for e in (b.image, b.text) if e is not None]
    rule = pred.decision.rule
    return model_card(encoders, rd.read_json("features.json"), rd.read_metrics(), pred.labels, rule,
                      len(pred.scorer.heads))


def _cast(module: nn.Module, dtype: str) -> nn.Module:
    return copy.deepcopy(module).half() if dtype == "float16" else module


def _write_safetensors(scorer: TorchScorer, stage: Path, dtype: str) -> dict[str, Any]:
    branches = []
    for i, b in enumerate(scorer.branches):
        entry: dict[str, str | None] = {}
        for kind, enc in (("image", b.image), ("text", b.text)):
            if enc is None:
                entry[kind] = None
                continue
            folder = f"encoders/{i}-{kind}"
            _cast(enc, dtype).save(stage / folder)
            entry[kind] = folder
        branches.append(entry)
    heads = []
    for k, head in enumerate(scorer.heads):
        name = f"head-{k}.safetensors"
        write_safetensors(stage / name, _cast(head, dtype))
        heads.append(name)
    return {"graph": None, "head": scorer.head_config, "heads": heads, "branches": branches}


# ---------------------------------------------------------------------------------------------- onnx


class _Whole(nn.Module):
    """uint8 pixels (B, 3, H, W), token ids and mask (B, T) -> (B, C) probabilities, mean over the heads.
    The encoders run as backends exports them (normalisation inside the graph)."""

    def __init__(self, scorer: TorchScorer) -> None:
        super().__init__()
        (b,) = scorer.branches
        self.image = encoder_graph(b.image, None) if b.image is not None else None
        self.text = encoder_graph(b.text, None) if b.text is not None else None
        self.heads = nn.ModuleList(scorer.heads)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        zi = self.image(pixels) if self.image is not None else pixels.new_zeros((n, 0), dtype=torch.float32)
        zt = self.text(input_ids, attention_mask) if self.text is not None \
            else pixels.new_zeros((n, 0), dtype=torch.float32)
        return torch.stack([torch.sigmoid(h(zi, zt)) for h in self.heads]).mean(0)


def probe_batch(scorer: TorchScorer) -> tuple[torch.Tensor, ...]:
    """pixels (2, 3, H, W) uint8, input_ids and attention_mask (2, T): backends' probe images and its first
    two probe captions (of different lengths, so padding is exercised)."""
    (b,) = scorer.branches
    if b.image is not None:
        (pixels,) = probe_inputs(b.image)
    else:
        pixels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)  # an input the graph ignores
    if b.text is None:
        return pixels, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    tok = b.text.tokenize(list(PROBE_CAPTIONS[:2]))
    return pixels, tok["input_ids"], tok["attention_mask"]


def _write_onnx(pred: Predictor, stage: Path, dtype: str) -> dict[str, Any]:
    """model.onnx (checked against torch in float32, then converted to ``dtype``), tokenizer.json, README.md, and
    export.json's description of them."""
    scorer: TorchScorer = pred.scorer
    if len(scorer.branches) != 1:
        raise MlcError("--format onnx exports a model over one cache; this run fuses several: use --format "
                       "safetensors")
    (b,) = scorer.branches
    meta: dict[str, Any] = {"image": None, "text": None}
    if b.text is not None:
        meta["text"] = _write_tokenizer(b.text, stage)
    if b.image is not None:
        meta["image"] = image_rule(b.image.preprocess)
    whole = _Whole(scorer).eval()
    args = probe_batch(scorer)
    names, path = ["pixels", "input_ids", "attention_mask"], stage / GRAPH
    try:
        with _ticking("writing the model as one ONNX graph"):
            to_onnx(whole, args, names, ["probabilities"], path)
    except BackendError as e:
        raise MlcError(f"the model cannot be exported as one ONNX graph ({e}); use --format safetensors") from e
    _say("checking the graph against torch")
    feed = {k: a.numpy() for k, a in zip(names, args, strict=True)}
    sess = session(path)
    got = sess.run(None, {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})
    with torch.no_grad():
        want = whole(*args).numpy()
    why = mismatch(["probabilities"], got, [want])
    if why is not None:
        raise MlcError(f"the exported graph does not reproduce torch ({why}; tolerance {ATOL} + {RTOL} x |value|); "
                       "use --format safetensors")
    if dtype != "float32":
        with _ticking(f"storing the graph in {dtype}"):
            convert(path, dtype)
        sess = session(path)
        got = sess.run(None, {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})
    meta["graph"] = {"file": GRAPH, "dtype": dtype, "inputs": _io(sess.get_inputs(), len(pred.labels)),
                     "outputs": _io(sess.get_outputs(), len(pred.labels)),
                     "probe_max_abs_diff_vs_torch": float(np.abs(got[0] - want).max())}
    write_text(stage / CLIENT_FILE, client(pred.decision.rule))
    return meta


def image_rule(pre: Any) -> dict[str, Any]:
    """export.json ``image``: how a photo becomes the graph's uint8 pixels (portable.ImageRule reads it)."""
    return {
        "decode": "Pillow; EXIF orientation applied first (PIL.ImageOps.exif_transpose), then converted to RGB "
                  "(transparent pixels composited on white; 16-bit grey scaled to 8 bits)",
        "jpeg_draft": pre.jpeg_draft,
        "jpeg_draft_rule": "when true, a JPEG whose shorter side is at least 2 x resize.shorter_side is decoded with "
                           "Image.draft('RGB', (ceil(w * s), ceil(h * s))), s = shorter_side / min(w, h)",
        "resize": {"shorter_side": pre.resize, "interpolation": pre.interpolation,
                   "rule": "the shorter side becomes shorter_side, the longer one int(shorter_side * long / short) "
                           "(PIL Image.resize with this interpolation; no resize when the size is already right)"},
        "crop": {"size": pre.crop, "rule": "centre square: top = round((h - size) / 2), left = round((w - size) / 2) "
                                           "(Python round)"},
        "layout": "uint8 RGB, (N, 3, size, size), channels first",
        "normalisation": {"where": "inside the graph", "formula": "(pixels / 255 - mean) / std", "mean": list(pre.mean),
                          "std": list(pre.std)},
    }


def _write_tokenizer(text: Any, stage: Path) -> dict[str, Any]:
    """tokenizer.json: the encoder's fast tokenizer with its truncation and padding, so a client calls encode_batch."""
    from tokenizers import Tokenizer

    backend = getattr(text.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MlcError(f"the text encoder {text.name} has no `tokenizers` tokenizer to export; use --format "
                       "safetensors")
    tok = Tokenizer.from_str(backend.to_str())
    pre = text.preprocess
    tok.enable_truncation(pre.max_length)
    pad_id = text.tokenizer.pad_token_id or 0
    tok.enable_padding(pad_id=pad_id, pad_token=text.tokenizer.pad_token or "[PAD]")
    write_text(stage / TOKENIZER, tok.to_str())
    return {"tokenizer": TOKENIZER, "library": "tokenizers (Tokenizer.from_file, encode_batch)",
            "lowercase": pre.lowercase, "max_length": pre.max_length, "pad_id": pad_id,
            "rule": "captions lowercased first (str.lower) when lowercase is true; special tokens added; cut at "
                    "max_length tokens; padded to the longest caption of the batch (truncation and padding are "
                    "set in tokenizer.json); attention_mask 1 on tokens, 0 on padding"}


def _io(args: Any, classes: int) -> list[dict[str, Any]]:
    dtypes = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(float)": "float32"}
    return [{"name": a.name, "dtype": dtypes.get(a.type, a.type),
             "shape": [d if isinstance(d, int) else ("batch" if i == 0 else "tokens") for i, d in enumerate(a.shape)]}
            for a in args]


def readme(meta: dict[str, Any], pred: Predictor) -> str:
    """README.md of an export: its model card, then what the folder holds (and for ONNX, its client)."""
    card = card_markdown(meta["card"])
    if meta.get("graph") is None:
        return SAFETENSORS_README.format(classes=len(pred.labels), card=card)
    return README.format(classes=len(pred.labels), dtype=meta["graph"]["dtype"], card=card,
                         inputs=", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in meta["graph"]["inputs"]))


CLIENT_FILE = "client.py"


def client(rule: str) -> str:
    """client.py for a model deciding by ``rule``: the template around the rule's own numpy source
    (decision.client_source, ``apply_decision`` there), so the same code decides in mlc and outside."""
    return CLIENT_TEMPLATE.replace("# {decision}\n", client_source(rule) + "\n")
