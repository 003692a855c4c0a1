"""``mlc serve MODEL``: a run folder or an export behind a local HTTP endpoint and a web page.

JSON endpoints (predict, labels, model card, health; see ``app.py``) and a page at ``/`` (``static/``: plain HTML
and JS, no build step, no CDN). Requests that arrive together are scored as one batch (``batcher.py``). An ONNX
export is served without torch, as ``mlc predict`` runs it (``predictor.load``). Needs the ``serve`` extra
(Starlette + uvicorn + python-multipart); this module imports none of it until the server starts, so
``mlc serve --help`` works without it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, borrow, opt, require
from ..errors import MlcError
from ..options import LoaderOptions

log = logging.getLogger(__name__)
INSTALL = "mlc serve needs the serve extra: pip install 'mlc[serve]' (starlette, uvicorn, python-multipart)"


@dataclass(frozen=True, kw_only=True)
class ServeConfig(Config):
    """Options of ``mlc serve``."""

    model: Path = opt(None, "A run folder (fit-head or finetune) or a folder `mlc export` wrote.", argument=True,
                      required=True)
    host: str = opt("127.0.0.1", "Address to listen on. The default answers this machine only; 0.0.0.0 opens the "
                    "server to the network (it has no authentication).")
    port: int = opt(8000, "Port to listen on (0: any free port, printed when the server starts).")
    allow_dir: tuple[Path, ...] = opt((), "A folder whose photos clients may name by path in JSON requests "
                                      "(repeatable; default: none, uploads only).")
    max_upload_mb: float = opt(20.0, "Largest request body in MB (413 above it).")
    max_photos: int = opt(64, "Most photos in one request.")
    timeout: float = opt(30.0, "Seconds a predict request may take, queueing included (504 after).")
    batch_size: int = opt(8, "Most photos scored together: requests that arrive together are batched up to this "
                          "(8: the best measured on a 2-core CPU, docs/benchmarks.md).")
    batch_wait_ms: float = opt(10.0, "How long the first request of a batch waits for others to join it (ms).")
    max_queue: int = opt(1024, "Most photos waiting to be scored (503 beyond it: the client retries).")
    backend: str = borrow(LoaderOptions, "backend", "auto")
    device: str = borrow(LoaderOptions, "device", "auto")
    onnx_dir: Path | None = borrow(LoaderOptions, "onnx_dir", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.model is not None, "give a run or exported model folder"),
                 (0 <= self.port <= 65535, "--port must be 0-65535"),
                 (self.max_upload_mb > 0, "--max-upload-mb must be above 0"),
                 (self.max_photos >= 1, "--max-photos must be at least 1"),
                 (self.timeout > 0, "--timeout must be above 0"),
                 (self.batch_size >= 1, "--batch-size must be at least 1"),
                 (self.batch_wait_ms >= 0, "--batch-wait-ms must be 0 or more"),
                 (self.max_queue >= self.max_photos, "--max-queue must be at least --max-photos")])
        for d in self.allow_dir:
            require([(Path(d).is_dir(), f"--allow-dir {d}: no such folder")])


def build(cfg: ServeConfig, pred: Any = None) -> Any:
    """The Starlette app serving ``cfg.model`` (or an already loaded Predictor ``pred``)."""
    try:
        from .app import Limits, Service, create_app
    except ImportError as e:
        raise MlcError(f"{INSTALL} ({e})") from e
    from ..predictor import load

    if pred is None:
        pred = load(cfg.model, backend=cfg.backend, device=cfg.device, onnx_dir=cfg.onnx_dir)
    limits = Limits(max_bytes=int(cfg.max_upload_mb * 2**20), max_photos=cfg.max_photos, timeout_s=cfg.timeout,
                    allow_dirs=tuple(Path(d).resolve() for d in cfg.allow_dir))
    service = Service(pred, cfg.model, limits, max_rows=cfg.batch_size, wait_s=cfg.batch_wait_ms / 1000,
                      max_queue=cfg.max_queue)
    return create_app(service)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound before the server starts, so port 0 gives a real port to print)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise MlcError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(app: Any, sock: socket.socket) -> None:
    """Run ``app`` on ``sock`` until Ctrl+C (uvicorn, one process: the model is loaded once)."""
    try:
        import uvicorn
    except ImportError as e:
        raise MlcError(f"{INSTALL} ({e})") from e
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
