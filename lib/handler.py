"""The HTTP door: `BaseHTTPRequestHandler` classes that Vercel and the dev server both serve.

Each `api/*.py` file subclasses one of these and adds nothing. A handler reads the
request (refusing a body that is too large before buffering it), asks `lib.request`
for the answer, and writes it. Any unexpected exception becomes a plain 500 in
OpenAI's shape: no traceback, no secret, ever reaches the caller.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler

from . import request as rq
from .app import get_app
from .config import ConfigError
from .errors import APIError

log = logging.getLogger("embeddings")

_ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class Endpoint(BaseHTTPRequestHandler):
    """One route. Subclasses set `method` and implement `answer`."""

    protocol_version = "HTTP/1.1"  # keep-alive for the openai SDK's connection pool
    method = "POST"
    needs_auth = True
    has_body = True

    def answer(self, body: bytes) -> rq.Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self) -> None:
        super().setup()
        try:  # answers go out in two writes (head, body): don't let Nagle hold the second one back
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        started = time.perf_counter()
        request_id = "req_" + uuid.uuid4().hex[:24]
        try:
            response = self._respond()
        except APIError as err:
            response = rq.error_response(err)
        except Exception:
            log.exception("unhandled error (request %s)", request_id)
            response = rq.error_response(APIError(500, "Internal server error", type="server_error"))
        response.headers["x-request-id"] = request_id
        self._send(response)
        log.info("%s %s %d inputs=%d hits=%d misses=%d %.1fms", self.command, self.path.split("?")[0],
                 response.status, response.inputs, response.hits, response.misses,
                 (time.perf_counter() - started) * 1000)

    def _respond(self) -> rq.Response:
        if self.command == "OPTIONS":
            return self._preflight()
        if self.command != self.method:
            self._drain()
            raise APIError(405, f"Method {self.command} is not allowed here; use {self.method}",
                           code="method_not_allowed", headers={"allow": self.method})
        try:
            app = get_app()
        except ConfigError as exc:
            self._drain()
            raise rq.config_error(exc) from None
        if self.needs_auth:
            try:
                rq.authorize(self.headers_lower(), app.settings)
            except APIError:
                self._drain()
                raise
        body = self._read_body(app.settings.max_body_bytes) if self.has_body else b""
        return self.answer(body)

    def headers_lower(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "Send the body with a Content-Length header (chunked bodies are not accepted)",
                           code="length_required")
        raw = self.headers.get("content-length")
        if raw is None:
            raise APIError(411, "A Content-Length header is required", code="length_required")
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise APIError(400, "Invalid Content-Length header", code="invalid_request") from None
        if length > limit:
            # Refuse before reading: never buffer what a client merely claims to send.
            self.close_connection = True
            raise APIError(413, f"The request body is {length} bytes; at most {limit} are allowed",
                           code="request_too_large")
        return self.rfile.read(length)

    def _drain(self) -> None:
        """Read a small body we will not use, so keep-alive stays in step; close on anything large."""
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if 0 <= length <= 64 * 1024:
            self.rfile.read(length)
        else:
            self.close_connection = True

    # -- CORS --------------------------------------------------------------------------------

    def _allowed_origin(self) -> str | None:
        origin = self.headers.get("origin")
        if not origin:
            return None
        try:
            allowed = get_app().settings.cors_origins
        except ConfigError:
            return None
        return origin if origin in allowed or "*" in allowed else None

    def _preflight(self) -> rq.Response:
        self._drain()
        origin = self._allowed_origin()
        if origin is None:
            return rq.Response(204, b"")
        return rq.Response(204, b"", {
            "access-control-allow-methods": f"{self.method}, OPTIONS",
            "access-control-allow-headers": "authorization, content-type",
            "access-control-max-age": "600",
        })

    # -- writing -----------------------------------------------------------------------------

    def _send(self, response: rq.Response) -> None:
        self.send_response(response.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(response.body)))
        origin = self._allowed_origin()
        if origin is not None:
            self.send_header("access-control-allow-origin", origin)
            self.send_header("access-control-expose-headers", "x-cache-hits, x-cache-misses, x-request-id")
            self.send_header("vary", "origin")
        for name, value in response.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr line: `_dispatch` logs one line per request instead."""


for _m in _ALL_METHODS:
    setattr(Endpoint, "do_" + _m, Endpoint._dispatch)


class EmbeddingsEndpoint(Endpoint):
    method = "POST"

    def answer(self, body: bytes) -> rq.Response:
        return rq.embeddings(body, get_app())


class HealthEndpoint(Endpoint):
    method = "GET"
    needs_auth = False
    has_body = False

    def answer(self, body: bytes) -> rq.Response:
        return rq.health(get_app())


class OpenAPIEndpoint(Endpoint):
    method = "GET"
    needs_auth = False
    has_body = False

    def answer(self, body: bytes) -> rq.Response:
        from .openapi import PATH

        return rq.Response(200, PATH.read_bytes())


class NotFoundEndpoint(Endpoint):
    """What the dev server answers for a path no route matches."""

    def _respond(self) -> rq.Response:
        self._drain()
        raise APIError(404, f"Unknown path {self.path.split('?')[0]!r}; POST /v1/embeddings",
                       code="not_found")


