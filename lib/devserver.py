"""`python -m lib.devserver`: the Vercel functions on your machine, with the same routes.

Serves the very `handler` classes of `api/*.py`, routed as `vercel.json` says, on a
threading HTTP server (as Vercel runs concurrent requests as threads). Defaults to
the local sentence-transformers model and the SQLite cache: no keys, no network.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from . import request as rq
from .handler import Endpoint, NotFoundEndpoint

ROOT = Path(__file__).resolve().parent.parent


_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
          ".json": "application/json", ".txt": "text/plain; charset=utf-8"}


class StaticFile(Endpoint):
    """One file of `public/`, as Vercel serves it (read per request: edits show on reload)."""

    method = "GET"
    needs_auth = False
    has_body = False
    file: Path

    def answer(self, body: bytes) -> rq.Response:
        return rq.Response(200, self.file.read_bytes(), {"cache-control": "no-cache"},
                           content_type=_TYPES.get(self.file.suffix, "application/octet-stream"))


def static_routes(root: Path = ROOT) -> dict[str, type[Endpoint]]:
    """`/`, `/index.html` and each file directly in `public/`: a fixed table made at start, so no request
    path can ever name a file outside `public/` (nothing is joined from the URL)."""
    public = root / "public"
    table: dict[str, type[Endpoint]] = {}
    for file in sorted(public.iterdir()) if public.is_dir() else []:
        if file.is_file() and not file.name.startswith("."):
            table["/" + file.name] = type("StaticFile", (StaticFile,), {"file": file})
    if "/index.html" in table:
        table["/"] = table["/index.html"]
    return table


def headers(root: Path = ROOT) -> list[tuple[str, str]]:
    """vercel.json's catch-all response headers (the Content-Security-Policy among them), sent by the dev
    server too, so the page is tested under the policy it is deployed with."""
    config = json.loads((root / "vercel.json").read_text())
    return [(h["key"], h["value"]) for rule in config.get("headers", []) if rule.get("source") == "/(.*)"
            for h in rule["headers"]]


def routes(root: Path = ROOT) -> dict[str, type[Endpoint]]:
    """Path -> handler class: every `api/<name>.py` at `/api/<name>`, plus vercel.json's rewrites."""
    table: dict[str, type[Endpoint]] = dict(static_routes(root))
    for file in sorted((root / "api").glob("*.py")):
        if file.name.startswith(("_", ".")):
            continue  # Vercel does not make these functions either
        module = importlib.import_module(f"api.{file.stem}")
        table[f"/api/{file.stem}"] = module.handler
    config = json.loads((root / "vercel.json").read_text())
    for rule in config.get("rewrites", []):
        destination = rule["destination"].split("?", 1)[0]
        if destination in table:
            # `/v1/models/:id*` matches every path under `/v1/models/` (kept as a prefix ending in "/").
            source = rule["source"].split(":", 1)[0] if rule["source"].endswith("*") else rule["source"]
            table[source] = table[destination]
    return table


class Router(Endpoint):
    """Picks the route's handler class for each request on a keep-alive connection."""

    table: dict[str, type[Endpoint]] = {}
    response_headers: tuple[tuple[str, str], ...] = ()  # vercel.json's; not `headers`: that is the request's
    # Seconds to wait for each read of a request line, header or body (idle keep-alive included): a
    # client that stalls mid-request loses its connection instead of holding a thread for ever.
    timeout = 15.0

    def _route(self) -> type[Endpoint]:
        raw = self.path.split("?", 1)[0]
        path = raw.rstrip("/") or "/"
        if path in self.table:
            return self.table[path]
        prefix = raw[:raw.rfind("/") + 1] if "/" in raw else ""
        while prefix not in ("", "/"):  # the longest prefix rule (`/v1/models/`) that covers the path
            if prefix in self.table:
                return self.table[prefix]
            prefix = prefix[:prefix.rstrip("/").rfind("/") + 1]
        return NotFoundEndpoint

    def _dispatch(self) -> None:
        own = self.__class__
        self.extra_headers = own.response_headers  # kept on the instance across the class swap below
        self.__class__ = self._route()
        try:
            self._dispatch()
        finally:
            self.__class__ = own

    def allowed(self) -> str:
        return self._route().method if getattr(self, "path", None) else "POST"


for _m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
    setattr(Router, "do_" + _m, Router._dispatch)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default of 5 drops connections under a burst of clients
    max_connections = 512  # one thread each: past this, new connections get a 503 and are closed

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


_BUSY_BODY = b'{"error":{"message":"The server has too many open connections; retry shortly","type":"server_error",' \
    b'"param":null,"code":"server_busy"}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


def make_server(host: str, port: int, *, read_timeout_s: float | None = None,
                max_connections: int | None = None) -> Server:
    Router.table = routes()
    Router.response_headers = tuple(headers())
    handler = Router
    if read_timeout_s is not None:
        handler = type("Router", (Router,), {"timeout": read_timeout_s})
    server_cls = Server
    if max_connections is not None:
        server_cls = type("Server", (Server,), {"max_connections": max_connections})
    return server_cls((host, port), handler)


def _stop_with_parent() -> None:
    """Stop cleanly on SIGTERM, and when the process that started the server dies (`make dev` stopped by make's
    PID): otherwise an orphan keeps serving, and holds the port, after its terminal and its make are gone."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # serve_forever ends, and the finally below closes the socket

    signal.signal(signal.SIGTERM, stop)
    if sys.platform.startswith("linux"):
        import ctypes

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent ends
        if os.getppid() != parent:  # it ended before the request was made
            os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # The format names no source line: skip the stack walk each record would make to find it (the logging
    # HOWTO's "Optimization" section documents this switch). One access line per request stays cheap.
    logging._srcfile = None

    from . import app as app_module
    from .config import ConfigError

    try:
        app = app_module.get_app()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    server = make_server(args.host, args.port)
    _stop_with_parent()
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    print(f"Embeddings dev server on {url}  (provider={app.settings.provider}, model={app.default_model}, "
          f"cache={app.settings.cache})", flush=True)
    print(f"  open {url}/ for the playground, or", flush=True)
    print(f"""  curl -s {url}/v1/embeddings -H 'content-type: application/json' """
          f"""-d '{{"input": "hello world"}}'""", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
