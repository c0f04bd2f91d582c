"""The server's HTTP-level protection and error bodies: the API key, the request-body size limit and read deadline
(`Guard`), a deadline on request heads and a connection cap (`GuardedH11Protocol`, `uvicorn_config`), and
OpenAI-shaped JSON errors for every failure, unexpected ones included (`install_error_handlers`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time

import h11
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen35.serve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                503: "service_unavailable_error"}
# The statuses the API routes answer besides 200, for the OpenAPI document.
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": description} for status, description in (
    (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"), (408, "Body too slow"),
    (413, "Body too large"), (500, "Internal error"), (503, "Server busy or shutting down"))}



def check_api_key(api_key: str | None) -> None:
    """A key clients can send in a header: non-empty, no control characters, no surrounding whitespace."""
    if api_key is not None and (not api_key or api_key != api_key.strip() or not api_key.isprintable()):
        raise ValueError("the API key must be non-empty, without control characters or surrounding whitespace")

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "internal_error"),
                                         param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, on_error) -> None:
    """Every error leaves as an OpenAI error body; `on_error()` is called for each (the error counter)."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        on_error()
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        on_error()
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            msg = errors[0].get("msg", "")
            hint = " (strings must be valid Unicode: no lone surrogate escapes such as \\ud800)" if (
                "surrogate" in msg or "hex escape" in msg) else ""
            return error_response(400, f"malformed JSON body: {msg}{hint}")
        locs = [[str(p) for p in err.get("loc", ()) if p != "body"] for err in errors]
        message = "; ".join(f"{'.'.join(loc)}: {err.get('msg')}" for loc, err in zip(locs, errors))
        return error_response(400, message or "invalid request", locs[0][0] if locs and locs[0] else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=e.headers)  # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        # Starlette re-raises after sending this, so the traceback still reaches the log.
        on_error()
        return error_response(500, f"internal error ({type(e).__name__}); the server log has the details")


class InFlight:
    """How many HTTP requests the app is handling, so that shutdown can let cancelled ones send their 503."""

    def __init__(self):
        self.count = 0

    async def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class Guard:
    """ASGI middleware, before any route runs: the API key (401) on every path but the open ones, the body size
    (413) and the time to receive it (408), read here so that a chunked or trickled upload is bounded too. A request
    cancelled by the server's shutdown ends with a 503 instead of a traceback."""

    def __init__(self, app, api_key: str | None, open_paths: tuple[str, ...], max_body_bytes: int,
                 body_timeout: float, in_flight: InFlight):
        self.app, self.open_paths, self.in_flight = app, open_paths, in_flight
        self.api_key = api_key.encode() if api_key else None  # compared as UTF-8 bytes, as clients send them
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.in_flight.count += 1
        try:
            await self._guard(scope, receive, send)
        finally:
            self.in_flight.count -= 1

    async def _guard(self, scope, receive, send):
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in self.open_paths:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                return await error_response(401, "missing or invalid API key")(scope, receive, send)
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return await self._refuse(413, f"request body exceeds {self.max_body_bytes} bytes", scope, send)
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
            except asyncio.TimeoutError:
                return await self._refuse(408, f"the request body did not arrive within {self.body_timeout:g} s",
                                          scope, send)
            if body is None:
                return await self._refuse(413, f"request body exceeds {self.max_body_bytes} bytes", scope, send)
            receive = _replay(body, receive)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:  # uvicorn cancels what still runs when its graceful shutdown times out
            if not started:
                with contextlib.suppress(Exception):
                    await error_response(503, "the server is shutting down")(scope, receive, send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body (b"" if the client left), or None when it is too large."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def _refuse(status: int, message: str, scope, send):
        # The body was not read to its end: close the connection rather than parse the rest as a new request.
        await error_response(status, message, headers={"Connection": "close"})(scope, _no_more, send)


async def _no_more():
    return {"type": "http.disconnect"}


def _replay(body: bytes, receive):
    """A `receive` that gives the body already read, then passes on to the client's (for disconnects)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two bounds against slow or numerous clients: a connection whose request head
    (request line and headers) is not complete `head_timeout` seconds after it opened or sent its first byte is
    closed (uvicorn itself only times out idle keep-alive connections), and a connection opened while
    `max_connections` others are open answers its request with a 503 and closes."""

    def __init__(self, *args, head_timeout: float, max_connections: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout, self.max_connections, self._head_timer = head_timeout, max_connections, None

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self.app = _too_many_connections
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc):
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        # h11 stays IDLE on the client's side until a whole request head has arrived.
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._cancel_head_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()


async def _too_many_connections(scope, receive, send):
    response = error_response(503, "too many open connections; retry later", headers={"Connection": "close"})
    await response(scope, receive, send)


def uvicorn_config(app, head_timeout: float = 10.0, max_connections: int | None = 512, **kwargs) -> uvicorn.Config:
    """uvicorn settings for the server: request heads time out after `head_timeout` s, and beyond
    `max_connections` open connections new requests get a 503."""
    protocol = functools.partial(GuardedH11Protocol, head_timeout=head_timeout, max_connections=max_connections)
    return uvicorn.Config(app, http=protocol, **kwargs)
