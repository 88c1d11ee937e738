"""The FastAPI application of ``maskport serve`` (API in docs/serve.md).

Every error answer is ``{"error": "<one line>"}`` with a 4xx status for anything the client sent (400 malformed
field, 401 missing/wrong bearer token, 413 body or image too large, 415 unsupported content type, 422 unknown
route parameters) and 503/504 when the server is full or too slow; a failure inside the model is a 500 with one
line, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..io.jsonfile import loads_bounded
from .engine import Batcher, ClientGone, Job, QueueFull, Replica, RequestTimeout
from .page import PAGE

log = logging.getLogger("maskport.serve")


@dataclass
class Limits:
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_prompt_chars: int = 2000
    max_new_tokens: int = 512          # the most a request may ask for
    default_max_new_tokens: int = 64   # when a request does not say
    timeout_s: float = 120.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message.splitlines()[0] if message else "error"
        self.headers = headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ request parsing
def _parse_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ApiError(400, f"{name}: expected true or false, got {str(v)[:40]!r}")


def _parse_threshold(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
    except (TypeError, ValueError):
        raise ApiError(400, f"threshold: expected a number in [0, 1], got {str(v)[:40]!r}") from None
    if not 0.0 <= f <= 1.0:
        raise ApiError(400, f"threshold: {f:g} is outside [0, 1]")
    return f


def _parse_max_new(v: Any, limits: Limits) -> int:
    if v is None or v == "":
        return limits.default_max_new_tokens
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        n = int(v)
    except (TypeError, ValueError):
        raise ApiError(400, f"max_new_tokens: expected an integer, got {str(v)[:40]!r}") from None
    if not 1 <= n <= limits.max_new_tokens:
        raise ApiError(400, f"max_new_tokens: {n} is outside 1..{limits.max_new_tokens}")
    return n


def _decode_image(data: bytes, limits: Limits):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, "image: empty")
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ApiError(400, f"image: not an image PIL can read ({_one_line(exc)})") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ApiError(400, f"image: size {w} x {h}")
    if w * h > limits.max_pixels:
        raise ApiError(413, f"image: {w} x {h} = {w * h} pixels is over the limit of {limits.max_pixels}")
    try:
        im.seek(0)
        im.load()
        return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data: PIL raises many types
        raise ApiError(400, f"image: cannot decode ({_one_line(exc)})") from None


def _b64(name: str, v: Any) -> bytes:
    if not isinstance(v, str):
        raise ApiError(400, f"{name}: expected a base64 string")
    if v.startswith("data:"):
        head, _, v = v.partition(",")
        if ";base64" not in head:
            raise ApiError(400, f"{name}: a data: URL must be base64")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name}: not valid base64") from None


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise ApiError(400, "content-length: not an integer") from None
        if n > limit:
            raise ApiError(413, f"body: {n} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body: over the limit of {limit} bytes")
    return bytes(body)


async def parse_segment_request(request: Request, limits: Limits) -> dict[str, Any]:
    """multipart/form-data (``image`` file or base64 field, ``prompt``, ...), a url-encoded form (``image`` base64)
    or JSON (``image`` base64)."""
    body = await _read_body(request, limits.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, Any]
    image_bytes: bytes | None = None
    if ctype == "application/json":
        try:
            fields = loads_bounded(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body: not valid JSON ({_one_line(exc)})") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "body: expected a JSON object")
        if fields.get("image") is not None:
            image_bytes = _b64("image", fields["image"])
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except Exception as exc:  # noqa: BLE001 - malformed multipart: the parser raises several types
            raise ApiError(400, f"body: malformed multipart form ({_one_line(exc)})") from None
        fields = {}
        for key, value in form.multi_items():
            if key in fields:
                raise ApiError(400, f"{key}: given more than once")
            fields[key] = value
        img = fields.get("image")
        if img is not None:
            if hasattr(img, "read"):
                image_bytes = await img.read()
            else:
                image_bytes = _b64("image", img)
    else:
        raise ApiError(415, f"content-type: expected multipart/form-data, application/json or application/x-www-form-urlencoded, got {ctype or 'none'}")
    known = {"image", "prompt", "threshold", "max_new_tokens", "return_probabilities"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)[:200]} (expected {', '.join(sorted(known))})")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt: required, a non-empty string")
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(413, f"prompt: {len(prompt)} characters is over the limit of {limits.max_prompt_chars}")
    if "\x00" in prompt:
        raise ApiError(400, "prompt: contains a NUL character")
    image = _decode_image(image_bytes, limits) if image_bytes is not None else None
    if image is None and "<image>" in prompt:
        raise ApiError(400, "prompt: places <image> but no image was sent")
    if image is not None and "<image>" not in prompt:
        prompt = "<image>" + prompt  # the export puts the image where Sa2VA's prompts say <image>
    return {"image": image, "prompt": prompt, "threshold": _parse_threshold(fields.get("threshold")),
            "max_new_tokens": _parse_max_new(fields.get("max_new_tokens"), limits),
            "return_probabilities": _parse_bool("return_probabilities", fields.get("return_probabilities", False))}


# ------------------------------------------------------------------------------------------------------ the app
def create_app(replicas: list[Replica], info: dict[str, Any], *, limits: Limits | None = None,
               api_key: str | None = None, max_batch: int = 8, max_wait_s: float = 0.01,
               max_queue: int = 64) -> FastAPI:
    limits = limits or Limits()
    batcher = Batcher(replicas, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="maskport serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.limits = limits

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail).splitlines()[0] if exc.detail else "error",
                      getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.error("internal error on %s: %s", request.url.path, _one_line(exc))
        return _error(500, f"internal error: {_one_line(exc)}")

    def auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <api key>)",
                           {"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "replicas": len(replicas), "queued_or_running": batcher.pending}

    @app.get("/v1/model", dependencies=[Depends(auth)])
    async def model():
        return {**info, "auth": api_key is not None,
                "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_s * 1e3, "max_queue": max_queue},
                "limits": asdict(limits), "stats": dict(batcher.stats)}

    @app.post("/v1/segment", dependencies=[Depends(auth)])
    async def segment(request: Request):
        t0 = time.perf_counter()
        try:
            req = await parse_segment_request(request, limits)
        except ClientDisconnect:
            return _error(499, "client disconnected")
        t1 = time.perf_counter()
        job = Job(future=asyncio.get_running_loop().create_future(), **req)
        try:
            payload, timings = await batcher.submit(job, limits.timeout_s, request.is_disconnected)
        except QueueFull as exc:
            raise ApiError(503, f"server busy: {exc}", {"Retry-After": "1"}) from None
        except RequestTimeout as exc:
            raise ApiError(504, f"timeout: {exc}") from None
        except ClientGone:
            return _error(499, "client disconnected")
        except Exception as exc:  # noqa: BLE001 - the model failed: one line, logged
            log.error("inference failed: %s", _one_line(exc))
            raise ApiError(500, f"inference failed: {_one_line(exc)}") from None
        t2 = time.perf_counter()
        payload["timings"] = {"parse_ms": round((t1 - t0) * 1e3, 2), **timings,
                              "total_ms": round((t2 - t0) * 1e3, 2)}
        return payload

    return app
