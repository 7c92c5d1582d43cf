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
_HUGE = 10**18  # a Content-Length of 19 digits or more
_MAX_DRAIN = 64 * 1024  # an unused body up to this size is read and dropped; a larger one closes the connection
_HTTP_ERRORS = {
    408: "Timed out reading the request",
    414: "The request URL is too long",
    431: "The request's header fields are too large",
    505: "HTTP version not supported; use HTTP/1.1",
}


class Endpoint(BaseHTTPRequestHandler):
    """One route. Subclasses set `method` and implement `answer`."""

    protocol_version = "HTTP/1.1"  # keep-alive for the openai SDK's connection pool
    extra_headers: tuple[tuple[str, str], ...] = ()  # the dev server's copy of vercel.json's headers
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
        self._body_read = False
        try:
            response = self._respond()
        except APIError as err:
            response = rq.error_response(err)
        except TimeoutError:
            self.close_connection = True
            response = rq.error_response(APIError(408, "Timed out reading the request body", code="request_timeout"))
        except Exception:
            log.exception("unhandled error (request %s)", request_id)
            response = rq.error_response(APIError(500, "Internal server error", type="server_error"))
        self._settle_body()
        response.headers["x-request-id"] = request_id
        self._send(response)
        log.info("%s %s %d inputs=%d hits=%d misses=%d%s %.1fms", self.command, self.path.split("?")[0],
                 response.status, response.inputs, response.hits, response.misses,
                 f" route={response.route}" if response.route else "", (time.perf_counter() - started) * 1000)

    def _respond(self) -> rq.Response:
        length = self._declared_length()  # before anything else: a request we cannot frame gets nothing
        if self.command == "OPTIONS":
            return self._preflight()
        if self.command != self.method:
            raise APIError(405, f"Method {self.command} is not allowed here; use {self.method}",
                           code="method_not_allowed", headers={"allow": self.method})
        try:
            app = get_app()
        except ConfigError as exc:
            raise rq.config_error(exc) from None
        if self.needs_auth:
            rq.authorize(self.headers_lower(), app.settings)
        body = self._read_body(length, app.settings.max_body_bytes) if self.has_body else b""
        return self.answer(body)

    def headers_lower(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    # -- framing: every answer leaves a keep-alive connection in step, or closes it ---------------

    def _declared_length(self) -> int | None:
        """The body length the request declares (None: no body). Exactly one Content-Length of plain
        digits, or none; anything else could be read two ways, so it is a 400 and the connection closes."""
        values = self.headers.get_all("content-length") or []
        if not values:
            return None
        raw = values[0].strip()
        if len(values) != 1 or not (raw.isascii() and raw.isdigit()):
            self.close_connection = True
            raise APIError(400, "Invalid Content-Length header: send exactly one, of digits only",
                           code="invalid_request")
        if "transfer-encoding" in self.headers:
            self.close_connection = True
            raise APIError(400, "A request may not have both Content-Length and Transfer-Encoding",
                           code="invalid_request")
        # More digits than any real body has is simply too large (413 when read), never a parse of 4,000 digits.
        return int(raw) if len(raw) <= 18 else _HUGE

    def _read_body(self, length: int | None, limit: int) -> bytes:
        if "transfer-encoding" in self.headers:
            self.close_connection = True
            raise APIError(411, "Send the body with a Content-Length header (chunked bodies are not accepted)",
                           code="length_required")
        if length is None:
            raise APIError(411, "A Content-Length header is required", code="length_required")
        if length > limit:
            # Refuse before reading: never buffer what a client merely claims to send.
            self.close_connection = True
            size = f"{length} bytes" if length < _HUGE else "over 10^18 bytes"
            raise APIError(413, f"The request body is {size}; at most {limit} bytes are allowed: send fewer or "
                                "shorter inputs per request (LangChain: a smaller chunk_size)", code="request_too_large")
        self._body_read = True
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise APIError(400, f"The request body ended after {len(body)} of the {length} bytes its "
                                "Content-Length declared", code="invalid_request")
        return body

    def _settle_body(self) -> None:
        """A body this answer did not use is read and dropped (a small one) or the connection closes:
        left unread, it would be taken for the next request on the connection."""
        if self._body_read or self.close_connection:
            return
        if "transfer-encoding" in self.headers:
            self.close_connection = True
            return
        try:
            length = self._declared_length() or 0
            if length > _MAX_DRAIN or len(self.rfile.read(length)) != length:
                self.close_connection = True
        except (APIError, OSError):
            self.close_connection = True

    # -- http.server's own errors (bad request line, 414, 431, unknown method) in OpenAI's shape -----

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # never answer without a status line and headers
        if code == 501:  # http.server's answer to a method it has no do_ method for
            err = APIError(405, f"Method {str(self.command)[:32]!r} is not allowed here; use {self.allowed()}",
                           code="method_not_allowed", headers={"allow": self.allowed()})
        else:
            reason = _HTTP_ERRORS.get(code) or f"Bad request ({(message or '')[:120]})"
            err = APIError(code, reason, code="invalid_request")
        self._send(rq.error_response(err))

    def allowed(self) -> str:
        return self.method

    # -- CORS --------------------------------------------------------------------------------

    def _allowed_origin(self) -> str | None:
        headers = getattr(self, "headers", None)  # absent when the request line itself was refused
        origin = headers.get("origin") if headers is not None else None
        if not origin:
            return None
        try:
            allowed = get_app().settings.cors_origins
        except ConfigError:
            return None
        return origin if origin in allowed or "*" in allowed else None

    def _preflight(self) -> rq.Response:
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
        body = response.body
        self.send_response(response.status)
        self.send_header("content-type", response.content_type)
        if isinstance(body, rq.Streamed):
            length = body.length
        else:
            length = len(body) if isinstance(body, bytes) else sum(map(len, body))
        self.send_header("content-length", str(length))
        origin = self._allowed_origin()
        if origin is not None:
            self.send_header("access-control-allow-origin", origin)
            self.send_header("access-control-expose-headers",
                             "x-cache-hits, x-cache-misses, x-request-id, x-embeddings-route")
            self.send_header("vary", "origin")
        for name, value in response.headers.items():
            self.send_header(name, value)
        for name, value in self.extra_headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if isinstance(body, bytes):
            self.wfile.write(body)
        elif isinstance(body, rq.Streamed):
            for group in body:
                self._write_parts(group)
        else:
            self._write_parts(body)

    def _write_parts(self, parts: list[bytes]) -> None:
        """The answer's parts in as few system calls as the kernel allows, without first joining them into one
        more copy of the answer (sendmsg takes up to IOV_MAX buffers a call; partial sends are resumed)."""
        sendmsg = getattr(self.connection, "sendmsg", None)
        if sendmsg is None:  # not a socket (a bridge or a test double): one write of one join
            self.wfile.write(b"".join(parts))
            return
        views = [memoryview(p) for p in parts if p]
        start = 0
        while start < len(views):
            sent = sendmsg(views[start:start + 1000])
            while sent and start < len(views):
                if sent >= len(views[start]):
                    sent -= len(views[start])
                    start += 1
                else:
                    views[start] = views[start][sent:]
                    sent = 0

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


class ModelsEndpoint(Endpoint):
    """GET /v1/models and /v1/models/{id}: behind the same API keys as embeddings."""

    method = "GET"
    has_body = False

    def answer(self, body: bytes) -> rq.Response:
        return rq.models(get_app(), self.path)


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
        self._declared_length()
        raise APIError(404, f"Unknown path {self.path.split('?')[0]!r}; POST /v1/embeddings",
                       code="not_found")


