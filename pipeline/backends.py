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

import importlib.metadata
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import lock
from .device import autocast
from .encoders import ImageEncoder, TextEncoder
from .errors import MlcError
from .folders import user_cache
from .graphs import ATOL, RTOL, BackendError, encoder_graph, io_names, mismatch, probe_inputs, to_onnx
from .log import get
from .options import BACKENDS

EXPORT_VERSION = 1  # bump when what an exported graph computes changes

Outputs = dict[str, np.ndarray]

logger = get(__name__)


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


def graph_dir(onnx_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where exported graphs are kept: ``onnx_dir`` when given, else ``$MLC_ONNX_DIR``, else
    ``$MLC_HOME/onnx``, else ``$XDG_CACHE_HOME/mlc/onnx`` (``~/.cache/mlc/onnx``). One folder per user,
    so a new cache or run folder never exports the same weights again."""
    if onnx_dir is not None:
        return Path(onnx_dir).expanduser()
    if os.environ.get("MLC_ONNX_DIR"):
        return Path(os.environ["MLC_ONNX_DIR"]).expanduser()
    return user_cache("onnx")


def onnx_file(onnx_dir: Path, encoder: Any, cut: str | None) -> Path:
    """``<kind>-<name>-<hash16>-<cut|full>[-<options>]-v<EXPORT_VERSION>.onnx``: one per weights and graph."""
    opts = "".join(f"-{k}={v}" for k, v in sorted(encoder.options().items()))
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{encoder.kind}-{encoder.name}-{encoder.weights_hash[:16]}-"
                                              f"{cut or 'full'}{opts}-v{EXPORT_VERSION}")
    return Path(onnx_dir) / f"{name}.onnx"


def export(encoder: Any, cut: str | None, path: Path) -> None:
    """Export ``encoder`` (its part above and below ``cut`` when given) to ``path``, atomically, with the
    weights hash in the model's metadata. BackendError when torch cannot export it."""
    inputs, outputs = io_names(encoder, cut)
    meta = {"mlc_weights_hash": encoder.weights_hash, "mlc_cut": cut or "", "mlc_export_version": str(EXPORT_VERSION)}
    try:
        to_onnx(encoder_graph(encoder, cut), probe_inputs(encoder), inputs, outputs, path, meta)
    except BackendError as e:
        raise BackendError(f"{encoder.name} cannot be exported to ONNX ({e}); use --backend torch") from e


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
    inputs, outputs = io_names(encoder, cut)
    got = session.run(None, {k: a.numpy() for k, a in zip(inputs, args, strict=True)})
    return mismatch(outputs, got, [w.float().numpy() for w in want])


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
    inputs, outputs = io_names(encoder, cut)

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
           calibration: Callable[[int], Any] | None = None) -> Engine:
    """The forward functions for ``backend``: ``auto`` is ONNX Runtime on the CPU and torch on CUDA. A
    modality without an encoder (None) gets no forward function. Graphs live in ``graph_dir(onnx_dir)``.
    ``precision``: fp32, bf16/fp16 (torch autocast) or int8 (``int8`` or ``int8-<calibration>``: ONNX graphs
    quantized by ``quantize``; ``calibration(n)`` gives the image graph's first n images)."""
    from .quantize import int8_calibration, int8_session, is_int8  # quantize builds on this module's sessions

    log = log or logger.info
    onnx_dir = graph_dir(onnx_dir)
    if backend not in BACKENDS:
        raise MlcError(f"--backend must be one of {BACKENDS}, not {backend!r}")
    int8 = is_int8(precision)
    if (int8 and backend == "torch") or (precision in ("bf16", "fp16") and backend == "onnx"):
        raise MlcError(f"--precision {precision} runs with --backend {'onnx' if int8 else 'torch'}")
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
    if backend == "onnx" or int8 or (backend == "auto" and device.type == "cpu"):
        for kind, enc, cut in (("image", image, image_cut), ("text", text, text_cut)):
            if enc is None:
                continue
            try:
                sessions[kind] = (onnx_session(enc, cut, onnx_dir, log), enc, cut, onnx_file(onnx_dir, enc, cut))
                if int8:
                    session, path, cos = int8_session(sessions[kind][3], sessions[kind][0], enc, cut, log, calibration,
                                                      int8_calibration(precision))
                    sessions[kind] = (session, enc, cut, path)
                    names[kind] = f"onnxruntime {_version('onnxruntime')} int8 (cosine {cos:.4f} to fp32)"
            except BackendError as e:
                if backend == "onnx" or int8:
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
