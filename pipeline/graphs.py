"""What an encoder's ONNX graph computes and how it is made: the torch module exported (uint8 pixels normalised
inside the graph, or token ids and mask, in; features and any trunk activations out: ``encoder_graph``), its
input and output names, the fixed probe batch, the exporter call (``to_onnx``, atomic, the exporter's chatter
kept off the terminal) and the comparison with torch (``mismatch``, within ``ATOL + RTOL * |torch|``).
``backends.py`` caches and runs these graphs; ``export.py`` builds a whole model's graph with them.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .encoders import ImageEncoder, TextEncoder
from .errors import MlcError

ATOL, RTOL = 1e-4, 1e-3  # below the float16 the caches store (relative step 1e-3)
PROBE_CAPTIONS = ("a dog", "two people riding horses across a green field near a fence", "a red bus on a street")


class BackendError(MlcError):
    """An encoder that cannot run through the asked-for backend."""


class _ImageGraph(nn.Module):
    """What gets exported for an image encoder: uint8 pixels (B, 3, H, W) -> normalised -> features
    (B, D), and with a cut also the trunk activations (B, C, h, w)."""

    def __init__(self, encoder: ImageEncoder, cut: str | None) -> None:
        super().__init__()
        self.encoder, self.cut = encoder, cut
        pre = encoder.preprocess
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> Any:
        x = (pixels.to(torch.float32) / 255 - self.mean) / self.std  # = ImagePreprocess.normalize
        if self.cut is None:
            return self.encoder(x)
        h = self.encoder.forward_trunk(x, self.cut)
        return self.encoder.forward_top(h, self.cut), h


class _TextGraph(nn.Module):
    """What gets exported for a text encoder: ids and mask (B, T) -> pooled (B, D), and with a cut also
    the token states (B, T, H)."""

    def __init__(self, encoder: TextEncoder, cut: str | None) -> None:
        super().__init__()
        self.encoder, self.cut = encoder, cut

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        if self.cut is None:
            return self.encoder(input_ids, attention_mask)
        h = self.encoder.forward_trunk(input_ids, attention_mask, self.cut)
        return self.encoder.forward_top(h, attention_mask, self.cut), h


def encoder_graph(encoder: Any, cut: str | None) -> nn.Module:
    """The module exported for ``encoder``: uint8 pixels, or token ids and mask, in; features out."""
    return (_ImageGraph if isinstance(encoder, ImageEncoder) else _TextGraph)(encoder, cut).eval()


def io_names(encoder: nn.Module, cut: str | None) -> tuple[list[str], list[str]]:
    """The graph's input names, and its output names (features, then the trunk's with a cut)."""
    kind = "image" if isinstance(encoder, ImageEncoder) else "text"
    inputs = ["pixels"] if kind == "image" else ["input_ids", "attention_mask"]
    return inputs, [kind] + ([f"{kind}_trunk"] if cut else [])


def probe_inputs(encoder: nn.Module) -> tuple[torch.Tensor, ...]:
    """A fixed small batch: 2 seeded images, or 3 captions of different lengths (so padding is exercised)."""
    if isinstance(encoder, ImageEncoder):
        g = torch.Generator().manual_seed(0)
        c = encoder.preprocess.crop
        return (torch.randint(0, 256, (2, 3, c, c), generator=g, dtype=torch.uint8),)
    tok = encoder.tokenize(list(PROBE_CAPTIONS))
    return tok["input_ids"], tok["attention_mask"]


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter prints progress lines and warnings; keep them out of the user's terminal."""
    import logging
    import warnings

    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


TOKEN_INPUTS = ("input_ids", "attention_mask")  # their axis 1 (tokens) is dynamic too


def to_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str], path: Path,
            metadata: dict[str, str] | None = None) -> None:
    """Export ``module`` on ``args`` to ``path`` (atomically) with a dynamic batch axis, and a dynamic token
    axis on the token inputs; ``metadata`` goes into the model's properties. BackendError (the exporter's
    one-line reason) when torch cannot export it."""
    import onnx

    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=4096)
    shapes = {k: {0: batch, 1: tokens} if k in TOKEN_INPUTS else {0: batch} for k in inputs}
    try:
        with quiet_exporter(), torch.no_grad():
            model = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                      dynamic_shapes=shapes, verbose=False).model_proto
    except Exception as e:
        raise BackendError(exporter_reason(e)) from e
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def exporter_reason(e: Exception) -> str:
    """One line out of torch.onnx.export's long, coloured error report: its exception summary."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        i = lines.index("## Exception summary")
        if i + 1 < len(lines):
            return lines[i + 1][:300]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def mismatch(names: list[str], got: list[np.ndarray], want: list[np.ndarray]) -> str | None:
    """Where ONNX Runtime's outputs ``got`` leave torch's ``want`` (beyond ATOL + RTOL x |want|, or not
    finite, or another shape), or None."""
    for name, g, w in zip(names, got, want, strict=True):
        if g.shape != w.shape:
            return f"{name}: shape {g.shape} instead of {w.shape}"
        err = np.abs(g - w) - (ATOL + RTOL * np.abs(w))
        if not np.isfinite(g).all() or err.max() > 0:
            return f"{name}: differs from torch by up to {float(np.abs(g - w).max()):.3g}"
    return None
