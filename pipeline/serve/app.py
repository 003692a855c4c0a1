"""The ASGI app of ``mlc serve`` (Starlette): JSON endpoints over one Predictor, and the web page.

    GET  /                 the web page (static/index.html, app.js, style.css: plain HTML and JS, no CDN)
    GET  /api/health       {"status": "ok", ...} and the batcher's counts
    GET  /api/labels       ids, names, thresholds (column order) and the decision rule in words
    GET  /api/model        the model card
    POST /api/predict      multipart: ``photo`` (one or more files) and ``caption`` (one per photo, or one for all);
                           or JSON {"items": [{"path": ..., "caption": ...}]} for photos under --allow-dir
                           -> {"predictions": [{"photo", "caption", "labels", "names", "probabilities"}]}

Every fault of a request is a 4xx with {"error": "one line"}: a photo that cannot be decoded (400), a missing
caption (400), too many photos (400), a body over --max-upload-mb (413), a path outside --allow-dir (403), a
request over --timeout (504), a full queue (503). Anything else is a 500 with one line; the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ImageError, MlcError
from ..images import load_image
from ..predictor import Predictor
from . import card
from .batcher import MicroBatcher, QueueFull

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class Limits:
    """What one request may ask: body bytes, photos, seconds; the folders whose photos it may name by path."""

    max_bytes: int = 20 * 2**20
    max_photos: int = 64
    timeout_s: float = 30.0
    allow_dirs: tuple[Path, ...] = ()


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@dataclass
class _Row:
    name: str  # the upload's file name or the path as given
    caption: str
    data: bytes | None = None  # an upload's bytes
    path: Path | None = None  # a photo the server reads
    inside: Path | None = None  # the --allow-dir it lies in


class Service:
    """One model behind the endpoints: its labels, card and micro-batcher."""

    def __init__(self, pred: Predictor, path: Path, limits: Limits, *, max_rows: int = 8, wait_s: float = 0.01,
                 max_queue: int = 1024) -> None:
        self.pred, self.path, self.limits = pred, Path(path), limits
        self.rule = card.rule_of(pred)
        self.card = card.card(pred, self.path, pred.export)  # export.json as load() read and verified it
        self.labels = card.labels(pred, self.rule)
        self.batcher = MicroBatcher(self._score, max_rows=max_rows, wait_s=wait_s, max_queue=max_queue)
        self.started = time.monotonic()

    def _score(self, photos: list[Any], captions: list[str]) -> np.ndarray:
        return self.pred.predict_proba(photos if self.pred.needs_images else None, captions,
                                       batch_size=max(1, len(captions)))

    # ------------------------------------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> JSONResponse:
        s = self.batcher.stats
        up = round(time.monotonic() - self.started, 1)
        return JSONResponse({"status": "ok", "model": str(self.path), "uptime_s": up,
                             "requests": s.requests, "rows": s.rows, "batches": s.batches, "largest_batch": s.largest,
                             "recent_batch_sizes": s.sizes[-20:]})

    async def labels_(self, request: Request) -> JSONResponse:
        return JSONResponse(self.labels)

    async def model(self, request: Request) -> JSONResponse:
        return JSONResponse(self.card)

    async def predict(self, request: Request) -> JSONResponse:
        try:
            return await asyncio.wait_for(self._predict(request), self.limits.timeout_s)
        except BadRequest as e:
            return _error(e.status, e.message)
        except TimeoutError:
            return _error(504, f"the request took more than {self.limits.timeout_s:g} s (the server's --timeout)")
        except QueueFull as e:
            return _error(503, f"the server is busy: {e}; retry shortly")
        except MlcError as e:  # the model refused the input (one line, as the CLI says it)
            return _error(400, str(e))

    async def _predict(self, request: Request) -> JSONResponse:
        rows = await self._rows(request)
        photos = await run_in_threadpool(self._decode, rows) if self.pred.needs_images else [None] * len(rows)
        probs = await self.batcher.submit(photos, [r.caption for r in rows])
        decided = self.pred.decide(probs)
        ids, names = self.pred.labels.ids, self.pred.labels.names
        out = [{"photo": r.name, "caption": r.caption, "labels": [ids[j] for j in np.flatnonzero(d)],
                "names": [names[j] for j in np.flatnonzero(d)],
                "probabilities": {str(i): round(float(v), 6) for i, v in zip(ids, p, strict=True)}}
               for r, p, d in zip(rows, probs, decided, strict=True)]
        return JSONResponse({"predictions": out})

    # ------------------------------------------------------------------------------------------ requests

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it passes --max-upload-mb, announced or not."""
        limit = self.limits.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, f"the request is {int(declared) / 2**20:.1f} MB; the server takes at most "
                                  f"{limit / 2**20:g} MB (--max-upload-mb)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(413, f"the request is over {limit / 2**20:g} MB (--max-upload-mb)")
        return bytes(body)

    async def _rows(self, request: Request) -> list[_Row]:
        body = await self._body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            rows = await self._form_rows(request, body)
        elif kind == "application/json":
            rows = self._json_rows(body)
        else:
            raise BadRequest(415, "send multipart/form-data (photo, caption) or application/json "
                                  '({"items": [{"path": ..., "caption": ...}]})')
        if not rows:
            raise BadRequest(400, "no photo given: send one or more 'photo' files (multipart) or JSON items")
        if len(rows) > self.limits.max_photos:
            raise BadRequest(400, f"{len(rows)} photos in one request; the server takes at most "
                                  f"{self.limits.max_photos} (--max-photos)")
        if self.pred.needs_captions:
            for r in rows:
                if not r.caption.strip():
                    raise BadRequest(400, f"photo {r.name!r} has no caption: this model reads captions too "
                                          "(give 'caption', one per photo or one for all)")
        return rows

    async def _form_rows(self, request: Request, body: bytes) -> list[_Row]:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        n = self.limits.max_photos + 1  # one more than allowed, so _rows says what the limit is
        try:
            form = await Request(request.scope, replay).form(max_files=n, max_fields=n + 1,
                                                             max_part_size=self.limits.max_bytes)
        except MultiPartException as e:
            raise BadRequest(400, f"cannot read the form: {e.message}") from e
        except HTTPException as e:  # Starlette's own count limits
            raise BadRequest(400, f"cannot read the form: {e.detail} (at most {n - 1} photos: --max-photos)") from e
        files, captions = form.getlist("photo"), [str(c) for c in form.getlist("caption")]
        if not self.pred.needs_images:
            return [_Row(f"caption {i + 1}", c) for i, c in enumerate(captions)]
        if not files:
            return []  # _rows says what is missing
        for f in files:
            if not isinstance(f, UploadFile):
                raise BadRequest(400, "the form field 'photo' must be a file, not text")
        if len(captions) == 1 and len(files) > 1:
            captions = captions * len(files)
        if captions and len(captions) != len(files):
            raise BadRequest(400, f"{len(files)} photos and {len(captions)} captions: give one caption per photo, "
                                  "or one for all")
        captions = captions or [""] * len(files)
        return [_Row(f.filename or f"photo {i + 1}", c, data=await f.read())  # type: ignore[union-attr]
                for i, (f, c) in enumerate(zip(files, captions, strict=True))]

    def _json_rows(self, body: bytes) -> list[_Row]:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"the body is not JSON: {e}") from e
        items = doc.get("items", [doc] if "path" in doc or "caption" in doc else None) if isinstance(doc, dict) \
            else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise BadRequest(400, 'JSON must be {"items": [{"path": ..., "caption": ...}, ...]}')
        rows = []
        for k, item in enumerate(items):
            caption = item.get("caption", "")
            if not isinstance(caption, str):
                raise BadRequest(400, f"items[{k}].caption must be text")
            if not self.pred.needs_images:
                rows.append(_Row(f"items[{k}]", caption))
                continue
            if not isinstance(item.get("path"), str):
                raise BadRequest(400, f"items[{k}] has no 'path' (a photo the server may read, under --allow-dir)")
            path, inside = self._allowed(item["path"])
            rows.append(_Row(item["path"], caption, path=path, inside=inside))
        return rows

    def _allowed(self, given: str) -> tuple[Path, Path]:
        """The photo a client named, when it lies in a folder --allow-dir opened (links resolved); 403 otherwise."""
        if not self.limits.allow_dirs:
            raise BadRequest(403, "this server reads no photo by path (start it with --allow-dir FOLDER); "
                                  "upload the photo instead")
        real = Path(os.path.realpath(Path(given).expanduser()))
        for root in self.limits.allow_dirs:
            if real.is_relative_to(os.path.realpath(root)):
                return real, root
        raise BadRequest(403, f"{given}: not under a folder the server may read (--allow-dir)")

    def _decode(self, rows: list[_Row]) -> list[Any]:
        """Each row's photo decoded as mlc decodes (data.load_image: EXIF orientation, RGB, JPEG draft); 400 naming
        the first photo that cannot be."""
        out = []
        with tempfile.TemporaryDirectory(prefix="mlc-serve-") as tmp:
            for i, r in enumerate(rows):
                try:
                    if r.data is not None:
                        if not r.data:
                            raise ImageError(r.name, "the file is empty")
                        path = Path(tmp) / f"{i}"
                        path.write_bytes(r.data)
                        out.append(load_image(path, self.pred.draft))
                    else:
                        out.append(load_image(r.path, self.pred.draft, inside=r.inside))  # type: ignore[arg-type]
                except ImageError as e:
                    raise BadRequest(400, f"photo {r.name!r}: {e.fault}") from e
        return out


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}: {str(exc)[:200]}); the server goes on")


def create_app(service: Service) -> Starlette:
    """The Starlette app: the page, its static files and the JSON endpoints of ``service``."""
    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await service.batcher.close()

    routes = [Route("/", index), Route("/api/health", service.health), Route("/api/labels", service.labels_),
              Route("/api/model", service.model), Route("/api/predict", service.predict, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_found, Exception: _internal},
                    lifespan=lifespan)
    app.state.service = service
    return app
