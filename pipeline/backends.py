"""How frozen encoders run forward: torch, or ONNX Runtime on the CPU (2-8x faster here, same fp32 numbers).

``engine(image, text, ...)`` returns the two forward functions every encode loop calls (``extract``,
``submit``): uint8 images (B, 3, H, W) as ``ImagePreprocess.pixels`` makes them -> {"image": (B, Di)
[, "image_trunk": (B, C, h, w)]} and token ids + mask (B, T) -> {"text": (B, Dt)[, "text_trunk":
(B, T, H)]}, all float32 numpy. Normalisation is part of the image forward (inside the ONNX graph,
where it costs a fraction of what separate torch ops cost). On the CPU through ONNX Runtime, each call
runs on one core and callers keep one whole batch per core in flight (``Engine.lanes``).

ONNX graphs are exported once per encoder with ``torch.onnx.export`` (the dynamo exporter; dynamic
batch axis, and token axis for text), to ``<onnx_dir>/<kind>-<name>-<weights hash>-<cut>...onnx``,
written atomically, one process at a time (a lock beside the file; others wait, then reuse it). The
folder is one per user (``graph_dir``), shared by every command, data folder and output folder: a graph
depends only on the weights and mlc's export code, never on where the features go. The file records
the weights hash it was exported from; a file whose hash differs, that does not load, or whose outputs
differ from torch on a fixed probe batch by more than ``ATOL + RTOL * |torch|`` is rebuilt, never used.
A graph that still disagrees, or an encoder that cannot be exported, stops ``--backend onnx`` with the
reason; ``--backend auto`` says so once and runs that encoder in torch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path, lock
from .device import autocast
from .encoders import ImageEncoder, TextEncoder
from .errors import MlcError
from .log import get
from .options import BACKENDS

EXPORT_VERSION = 1  # bump when what an exported graph computes changes
ATOL, RTOL = 1e-4, 1e-3  # below the float16 the caches store (relative step 1e-3)
PROBE_CAPTIONS = ("a dog", "two people riding horses across a green field near a fence", "a red bus on a street")

Outputs = dict[str, np.ndarray]

logger = get(__name__)


class BackendError(MlcError):
    """An encoder that cannot run through the asked-for backend."""


@dataclass
class Engine:
    """Forward functions for both encoders, what ran them (recorded in the cache's metadata), and how
    many calls may run at once.

    ``lanes``: ONNX Runtime runs each call on one core (a single-threaded session), so a caller keeps
    ``lanes`` = torch's thread count of whole batches in flight (``pool``). Whole batches on
    independent lanes never wait on each other: when a decode worker preempts one core, only that
    lane's batch is late. torch (its own intra-op threads) and a mix of backends get one lane.
    """

    image: Callable[[torch.Tensor], Outputs] | None
    text: Callable[[torch.Tensor, torch.Tensor], Outputs] | None
    backends: dict[str, str] = field(default_factory=dict)  # {"image": "onnx (onnxruntime 1.x)", ...}
    lanes: int = 1

    def pool(self) -> ThreadPoolExecutor:
        """An executor with one thread per lane (ONNX Runtime and torch release the GIL while they run)."""
        return ThreadPoolExecutor(self.lanes, thread_name_prefix="mlc-lane")


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


def _names(encoder: nn.Module, cut: str | None) -> tuple[list[str], list[str]]:
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


def graph_dir(onnx_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where exported graphs are kept: ``onnx_dir`` when given, else ``$MLC_ONNX_DIR``, else
    ``$MLC_HOME/onnx``, else ``$XDG_CACHE_HOME/mlc/onnx`` (``~/.cache/mlc/onnx``). One folder per user,
    so a new cache or run folder never exports the same weights again."""
    if onnx_dir is not None:
        return Path(onnx_dir).expanduser()
    if os.environ.get("MLC_ONNX_DIR"):
        return Path(os.environ["MLC_ONNX_DIR"]).expanduser()
    if os.environ.get("MLC_HOME"):
        return Path(os.environ["MLC_HOME"]).expanduser() / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mlc" / "onnx"


def onnx_file(onnx_dir: Path, encoder: Any, cut: str | None) -> Path:
    """``<kind>-<name>-<hash16>-<cut|full>[-<options>]-v<EXPORT_VERSION>.onnx``: one per weights and graph."""
    opts = "".join(f"-{k}={v}" for k, v in sorted(encoder.options().items()))
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{encoder.kind}-{encoder.name}-{encoder.weights_hash[:16]}-"
                                              f"{cut or 'full'}{opts}-v{EXPORT_VERSION}")
    return Path(onnx_dir) / f"{name}.onnx"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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
        with _quiet(), torch.no_grad():
            model = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                      dynamic_shapes=shapes, verbose=False).model_proto
    except Exception as e:
        raise BackendError(_reason(e)) from e
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def export(encoder: Any, cut: str | None, path: Path) -> None:
    """Export ``encoder`` (its part above and below ``cut`` when given) to ``path``, atomically, with the
    weights hash in the model's metadata. BackendError when torch cannot export it."""
    inputs, outputs = _names(encoder, cut)
    meta = {"mlc_weights_hash": encoder.weights_hash, "mlc_cut": cut or "", "mlc_export_version": str(EXPORT_VERSION)}
    try:
        to_onnx(encoder_graph(encoder, cut), probe_inputs(encoder), inputs, outputs, path, meta)
    except BackendError as e:
        raise BackendError(f"{encoder.name} cannot be exported to ONNX ({e}); use --backend torch") from e


def _reason(e: Exception) -> str:
    """One line out of torch.onnx.export's long, coloured error report: its exception summary."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        i = lines.index("## Exception summary")
        if i + 1 < len(lines):
            return lines[i + 1][:300]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def ort_session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (1: the calling thread only)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # One thread per run by default: callers run whole batches on Engine.lanes threads instead, with no
    # barrier between them (2 intra-op threads wait for each other at every op; when a decode worker
    # preempts one core, the whole op waits).
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting between ops: the DataLoader workers decoding JPEGs need those cycles.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check(session: Any, encoder: Any, cut: str | None) -> str | None:
    """Why this graph may not be used for ``encoder``, or None: metadata, then outputs on the probe batch."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("mlc_weights_hash") != encoder.weights_hash or meta.get("mlc_cut", "") != (cut or "") \
            or meta.get("mlc_export_version") != str(EXPORT_VERSION):
        return "exported from other weights or by another mlc"
    args = probe_inputs(encoder)
    with torch.inference_mode():
        want = encoder_graph(encoder, cut)(*args)
    want = want if isinstance(want, tuple) else (want,)
    inputs, outputs = _names(encoder, cut)
    got = session.run(None, {k: a.numpy() for k, a in zip(inputs, args, strict=True)})
    return mismatch(outputs, got, [w.float().numpy() for w in want])


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


def _reuse(path: Path, encoder: Any, cut: str | None) -> tuple[Any, str | None]:
    """(a verified session, None) for the graph at ``path``; (None, why not) when it is stale or damaged;
    (None, None) when there is none."""
    if not path.is_file():
        return None, None
    try:
        session = ort_session(path)
        why = _check(session, encoder, cut)
    except Exception as e:  # a truncated or corrupt file
        return None, f"unreadable ({type(e).__name__})"
    return (session, None) if why is None else (None, why)


def onnx_session(encoder: Any, cut: str | None, onnx_dir: Path, log: Callable[[str], None]) -> Any:
    """A verified ONNX Runtime session for ``encoder``: reuse its exported file, or (re)build it."""
    path = onnx_file(onnx_dir, encoder, cut)
    session, _ = _reuse(path, encoder, cut)
    if session is not None:
        return session
    # One exporter per graph; a process that waited here finds the graph the other one wrote.
    with lock(path, f"the ONNX graph {path}", wait=True):
        session, why = _reuse(path, encoder, cut)
        if session is not None:
            return session
        if why is not None:
            log(f"{path}: {why}; exporting it again")
        log(f"exporting {encoder.name}{f' (cut {cut})' if cut else ''} to ONNX: {path}")
        export(encoder, cut, path)
        session = ort_session(path)
        why = _check(session, encoder, cut)
        if why is not None:
            path.unlink(missing_ok=True)
            raise BackendError(f"{encoder.name}: its ONNX graph does not reproduce torch ({why}; tolerance "
                               f"{ATOL} + {RTOL} x |value|); use --backend torch")
    return session


# ----------------------------------------------------------------------------------------- runners


def _torch_image(encoder: ImageEncoder, cut: str | None, device: torch.device,
                 channels_last: bool, precision: str) -> Callable[[torch.Tensor], Outputs]:
    @torch.inference_mode()
    def run(pixels: torch.Tensor) -> Outputs:
        x = encoder.preprocess.normalize(pixels.to(device, non_blocking=True))
        if channels_last:  # 1.4x on this CPU for the same numbers; the encoder was converted too
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            if cut is None:
                return {"image": encoder(x).float().cpu().numpy()}
            h = encoder.forward_trunk(x, cut)
            return {"image": encoder.forward_top(h, cut).float().cpu().numpy(),
                    "image_trunk": h.float().cpu().numpy()}
    return run


def _torch_text(encoder: TextEncoder, cut: str | None, device: torch.device, precision: str) -> Callable[..., Outputs]:
    @torch.inference_mode()
    def run(ids: torch.Tensor, mask: torch.Tensor) -> Outputs:
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device, precision):
            if cut is None:
                return {"text": encoder(ids, mask).float().cpu().numpy()}
            h = encoder.forward_trunk(ids, mask, cut)
            return {"text": encoder.forward_top(h, mask, cut).float().cpu().numpy(),
                    "text_trunk": h.float().cpu().numpy()}
    return run


def _onnx_runner(session: Any, encoder: Any, cut: str | None) -> Callable[..., Outputs]:
    """One session call per batch (thread-safe: lanes share the session)."""
    inputs, outputs = _names(encoder, cut)

    def run(*args: torch.Tensor) -> Outputs:
        got = session.run(outputs, {k: a.cpu().numpy() for k, a in zip(inputs, args, strict=True)})
        return dict(zip(outputs, got, strict=True))
    return run


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def engine(image: ImageEncoder | None, text: TextEncoder | None, *, backend: str, device: torch.device,
           image_cut: str | None, text_cut: str | None, onnx_dir: Path | None = None,
           log: Callable[[str], None] | None = None, channels_last: bool = True, precision: str = "fp32",
           calibration: Callable[[], Any] | None = None) -> Engine:
    """The forward functions for ``backend``: ``auto`` is ONNX Runtime on the CPU and torch on CUDA. A
    modality without an encoder (None) gets no forward function. Graphs live in ``graph_dir(onnx_dir)``.
    ``precision``: fp32, bf16/fp16 (torch autocast) or int8 (ONNX graphs quantized by ``quantize``;
    ``calibration`` gives the image graph's images)."""
    log = log or logger.info
    onnx_dir = graph_dir(onnx_dir)
    if backend not in BACKENDS:
        raise MlcError(f"--backend must be one of {BACKENDS}, not {backend!r}")
    if (precision == "int8" and backend == "torch") or (precision in ("bf16", "fp16") and backend == "onnx"):
        raise MlcError(f"--precision {precision} runs with --backend {'onnx' if precision == 'int8' else 'torch'}")
    if precision in ("bf16", "fp16"):
        backend = "torch"  # autocast is torch's; the ONNX graphs are fp32 (or int8)
    if backend == "onnx" and device.type != "cpu":
        raise MlcError("--backend onnx runs on the CPU (onnxruntime's CPU provider); use --device cpu, or "
                       "--backend torch on CUDA")
    for enc in (image, text):
        if enc is not None:
            enc.to(device).eval()
    runs: dict[str, Any] = {"image": None} if image is None else {}
    names: dict[str, str] = {}
    if text is None:
        runs["text"] = None
    sessions: dict[str, tuple[Any, Any, str | None, Path]] = {}
    if backend == "onnx" or precision == "int8" or (backend == "auto" and device.type == "cpu"):
        for kind, enc, cut in (("image", image, image_cut), ("text", text, text_cut)):
            if enc is None:
                continue
            try:
                sessions[kind] = (onnx_session(enc, cut, onnx_dir, log), enc, cut, onnx_file(onnx_dir, enc, cut))
                if precision == "int8":
                    from .quantize import int8_session

                    session, path, cos = int8_session(sessions[kind][3], sessions[kind][0], enc, cut, log, calibration)
                    sessions[kind] = (session, enc, cut, path)
                    names[kind] = f"onnxruntime {_version('onnxruntime')} int8 (cosine {cos:.4f} to fp32)"
            except BackendError as e:
                if backend == "onnx" or precision == "int8":
                    raise
                log(f"note: {e}; running {enc.name} with torch instead")
    threads = torch.get_num_threads()
    # Lanes only when every forward is ONNX: a torch forward already uses every core.
    lanes = threads if sessions and all(runs.get(k, 0) is None or k in sessions for k in ("image", "text")) else 1
    for kind, (session, enc, cut, path) in sessions.items():
        if lanes == 1 and threads > 1:  # beside a torch forward: one call at a time, on every core
            session = ort_session(path, threads)
        runs[kind] = _onnx_runner(session, enc, cut)
        names.setdefault(kind, f"onnxruntime {_version('onnxruntime')}")
    if "image" not in runs:
        if channels_last:  # after any export: the exported graph is traced from the plain layout
            image.to(memory_format=torch.channels_last)
        runs["image"] = _torch_image(image, image_cut, device, channels_last, precision)
    if "text" not in runs:
        runs["text"] = _torch_text(text, text_cut, device, precision)
    for kind in ("image", "text"):
        names.setdefault(kind, "none" if runs[kind] is None else f"torch {torch.__version__}")
    return Engine(runs["image"], runs["text"], names, lanes)
