"""The HTTP API and the web page of the service (FastAPI; the OpenAPI document at ``/openapi.json``, its pages at
``/docs`` and ``/redoc``, served without a CDN).

Every refusal is a JSON object ``{"error": "<one line>", "kind": "<kind>"}`` with its status: 400 (not an
image, cut short, bad thresholds, malformed request), 401 (token), 413 (request or image too large),
503 (queue full or shutting down, with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from AnomalyCLIP_lib.errors import user_error_line
from pipeline.service.batcher import Batcher, QueueFull, ShuttingDown
from pipeline.service.config import ServeConfig
from pipeline.service.metrics import Metrics
from pipeline.service.model import RequestError, ServiceModel

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
# The API docs' scripts, styles and icon: Swagger UI's and ReDoc's builds as the fastapi-offline package ships them
# (only its files are used), served by this app so that /docs and /redoc work offline (no CDN).
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
DOCS_ASSETS_PATH = "/docs-assets"
PATHS = ("/", "/predict", "/health", "/model", "/metrics", "/thresholds", "/sample.png", "/sample-good.png",
         "/static/app.js", "/static/style.css", "/docs", "/redoc", "/openapi.json",
         *(f"{DOCS_ASSETS_PATH}/{name}" for name in DOCS_ASSETS))
_DISCONNECTED = "anomalyclip.disconnected"
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one-line JSON error of every refusal."""
    return JSONResponse({"error": " ".join(str(message).split()), "kind": kind}, status_code=status, headers=headers)


_FILES = File(..., description="one or more images (PNG, JPEG, BMP, TIFF, WebP)")
_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "1"}}


class Guard:
    """Outermost ASGI layer: the request-size limit (413 before the app reads a byte too many) and the
    request counter by path and status code.

    A body announced larger than the limit is refused from its ``Content-Length``; a chunked body is
    counted as it arrives, and past the limit the app sees the client gone and the answer is 413.
    """

    def __init__(self, app: Any, metrics: Metrics, max_bytes: int) -> None:
        self.app, self.metrics, self.max_bytes = app, metrics, max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in PATHS else "other"
        sent = {"status": 0, "replace": False}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send, sent)
            self.metrics.request(path, 413)
            return
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    sent["replace"] = True
                    return {"type": "http.disconnect"}
            elif message["type"] == "http.disconnect":
                scope[_DISCONNECTED] = True
            return message

        async def recording_send(message: dict) -> None:
            if sent["replace"]:
                return  # the app's answer to a body cut at the limit: replaced by the 413 below
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, recording_send)
        except Exception:
            if not sent["replace"]:
                raise
        if sent["replace"] and not sent["status"]:
            sent["replace"] = False
            await self._too_large(scope, receive, recording_send, sent)
        self.metrics.request(path, sent["status"] or 500)

    async def _too_large(self, scope: dict, receive: Receive, send: Send, sent: dict) -> None:
        self.metrics.error("request_too_large")
        sent["status"] = 413
        response = error_response(413, "request_too_large", f"the request body is larger than this service takes "
                                  f"(--max_request_mb, {self.max_bytes} bytes): send fewer or smaller images")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def create_app(model: ServiceModel, batcher: Batcher, metrics: Metrics, config: ServeConfig) -> Guard:
    """The ASGI application: FastAPI routes inside :class:`Guard`. Starts and stops ``batcher`` with its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        # SIGTERM: uvicorn has stopped accepting and waited for the requests in flight; drain what is queued.
        if not await asyncio.to_thread(batcher.close, config.grace_s):
            logger.warning("the model worker did not finish within --grace_s %s", config.grace_s)

    app = FastAPI(title="AnomalyCLIP inspection service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Zero-shot anomaly scores, verdicts, defect masks and overlays for images "
                              "(AnomalyCLIP, ICLR 2024). The web page is at /.")

    def require_token(authorization: str | None = Header(default=None, description="Bearer TOKEN")) -> None:
        if config.token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.token.encode()):
            raise RequestError(401, "unauthorized", "this service needs 'Authorization: Bearer TOKEN' with the "
                               "token it was started with (--token)")

    guarded = [Depends(require_token)]

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        metrics.error(error.kind)
        return error_response(error.status, error.kind, str(error), _HEADERS.get(error.status))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in error.errors())
        metrics.error("bad_request")
        return error_response(400, "bad_request", f"malformed request ({problems}); POST /predict takes multipart "
                              "field 'files' with one or more images")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "client_disconnected" if request.scope.get(_DISCONNECTED) else \
            {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        metrics.error(kind)
        return error_response(error.status_code, kind, str(error.detail), getattr(error, "headers", None))

    @app.post("/predict", dependencies=guarded, summary="Score images: verdicts, defect pixels, optional PNGs")
    async def predict(request: Request, files: list[UploadFile] = _FILES, mask: bool = False,
                      overlay: bool = False) -> JSONResponse:
        """Each image's ``score``, ``verdict`` (``score >= image threshold``), ``defect_pixels`` (map resized to
        the image, ``>= pixel threshold``), the thresholds in force with their provenance, the model id and
        timings; with ``?mask=1`` / ``?overlay=1`` the mask and overlay PNGs in base64. The numbers are
        ``test_one_example.py``'s for the same file and settings."""
        started = time.perf_counter()
        thresholds = model.thresholds
        if len(files) > config.max_queue:
            raise RequestError(413, "too_many_images", f"{len(files)} images in one request, more than the queue holds "
                               f"(--max_queue {config.max_queue}): send them in smaller requests")
        uploads = [(upload.filename, await upload.read()) for upload in files]
        prepared = await asyncio.gather(*(run_in_threadpool(model.prepare, name, data) for name, data in uploads))
        try:
            futures = batcher.submit([(one.row, one.image.size) for one in prepared])
        except QueueFull:
            raise RequestError(503, "queue_full", f"the queue is full ({batcher.depth} of {config.max_queue} images "
                               "waiting): retry after a moment") from None
        except ShuttingDown:
            raise RequestError(503, "shutting_down", "the service is shutting down: retry on another instance"
                               ) from None
        results = await _results_or_disconnect(request, futures)
        if results is None:
            metrics.error("client_disconnected")
            return Response(status_code=499)  # nobody reads it: the client is gone
        predictions = await run_in_threadpool(_judge_all, model, prepared, results, thresholds, mask, overlay)
        total_ms = 1000 * (time.perf_counter() - started)
        for one, result, prediction in zip(prepared, results, predictions):
            prediction["timings_ms"] = {"decode": round(1000 * one.decode_s, 3),
                                        "queue": round(1000 * result.queue_s, 3),
                                        "model": round(1000 * result.model_s, 3), "batch_size": result.batch_size,
                                        "total": round(total_ms, 3)}
        metrics.predict_latency(time.perf_counter() - started)
        return JSONResponse({"predictions": predictions})

    @app.get("/health", summary="Liveness: the model is loaded and the worker runs")
    async def health() -> dict:
        return {"status": "shutting_down" if batcher.closed else "ok", "model_loaded": True,
                "queue_depth": batcher.depth, "model_id": model.model_id}

    @app.get("/model", dependencies=guarded, summary="The manifest: hashes, image size, design, thresholds, memory")
    async def manifest() -> dict:
        return model.manifest()

    @app.get("/metrics", dependencies=guarded, response_class=PlainTextResponse,
             summary="Prometheus text format: requests, errors by kind, latency, batch sizes, queue depth")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(batcher.depth), media_type="text/plain; version=0.0.4")

    @app.get("/thresholds", dependencies=guarded, summary="The thresholds in force, their source and provenance")
    async def get_thresholds() -> dict:
        return model.thresholds_document()

    @app.put("/thresholds", dependencies=guarded, summary="Change the thresholds (checked as the CLI checks them)")
    async def put_thresholds(request: Request) -> dict:
        """Body: a thresholds.json (``classes``; optional ``class_name``, ``accept_thresholds``) or
        ``{"image_threshold": X, "pixel_threshold": Y}``. Swapped in as one; written to ``--thresholds`` FILE
        only with ``--thresholds_file_writable``."""
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(400, "bad_thresholds", "the PUT /thresholds body is not JSON: send a thresholds.json "
                               'or {"image_threshold": X, "pixel_threshold": Y}') from None
        await run_in_threadpool(model.put_thresholds, body)
        return model.thresholds_document()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(_static(name), media_type=types[name], headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def swagger_page() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                                   swagger_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS_PATH}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no call to validator.swagger.io

    @app.get("/redoc", include_in_schema=False)
    async def redoc_page() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                              redoc_js_url=f"{DOCS_ASSETS_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS_PATH}/favicon.png", with_google_fonts=False)

    @app.get(DOCS_ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in DOCS_ASSETS:
            raise HTTPException(404, f"no API docs file {name!r}")
        return Response(_docs_asset(name), media_type=DOCS_ASSETS[name], headers={"Cache-Control": "max-age=86400"})

    @app.get("/sample.png", include_in_schema=False)
    async def sample() -> Response:
        return Response(sample_png(True), media_type="image/png")

    @app.get("/sample-good.png", include_in_schema=False)
    async def sample_good() -> Response:
        return Response(sample_png(False), media_type="image/png")

    return Guard(app, metrics, config.max_request_bytes)


async def _results_or_disconnect(request: Request, futures: list) -> list | None:
    """The batch results of ``futures``, or ``None`` when the client went away first (its images are then
    taken out of the queue where no forward pass has started: a gone client costs no model time)."""
    results = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(future) for future in futures)))
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not results.done():
        for future in futures:
            future.cancel()
        results.cancel()
        return None
    try:
        return results.result()
    except Exception as error:  # noqa: BLE001 - the model failed on this batch: one line, the service goes on
        line = user_error_line(error) if isinstance(error, (OSError, MemoryError, RuntimeError)) else None
        raise RequestError(500, "model_error", line or f"scoring failed ({type(error).__name__}: {error})") from None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _judge_all(model: ServiceModel, prepared: list, results: list, thresholds: Any, mask: bool,
               overlay: bool) -> list[dict]:
    return [model.judged(one, result.scored.score, result.scored.anomaly_map, thresholds, mask, overlay)
            for one, result in zip(prepared, results)]


@cache
def _static(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@cache
def _docs_asset(name: str) -> bytes:
    """One of :data:`DOCS_ASSETS`, read from the installed fastapi-offline package (requirements*.txt)."""
    return (resources.files("fastapi_offline") / "static" / name).read_bytes()


@cache
def sample_png(defective: bool = True) -> bytes:
    """A synthetic part (pipeline.synthetic, seed 0), with a scratch or without: the demo images of
    ``/?try=/sample.png`` and ``/?try=/sample-good.png``."""
    import numpy as np
    from PIL import Image

    from pipeline.synthetic import add_defect, class_style, render_normal

    rng = np.random.default_rng(0)
    size = (160, 160)
    image = render_normal(class_style("weave", rng, size), rng, size)
    if defective:
        image, _ = add_defect(image, "scratch", rng)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
