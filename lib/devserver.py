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
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

from .handler import Endpoint, NotFoundEndpoint

ROOT = Path(__file__).resolve().parent.parent


def routes(root: Path = ROOT) -> dict[str, type[Endpoint]]:
    """Path -> handler class: every `api/<name>.py` at `/api/<name>`, plus vercel.json's rewrites."""
    table: dict[str, type[Endpoint]] = {}
    for file in sorted((root / "api").glob("*.py")):
        if file.name.startswith(("_", ".")):
            continue  # Vercel does not make these functions either
        module = importlib.import_module(f"api.{file.stem}")
        table[f"/api/{file.stem}"] = module.handler
    config = json.loads((root / "vercel.json").read_text())
    for rule in config.get("rewrites", []):
        if rule["destination"] in table:
            table[rule["source"]] = table[rule["destination"]]
    return table


class Router(Endpoint):
    """Picks the route's handler class for each request on a keep-alive connection."""

    table: dict[str, type[Endpoint]] = {}

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self.__class__ = self.table.get(path, NotFoundEndpoint)
        try:
            self._dispatch()
        finally:
            self.__class__ = Router


for _m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
    setattr(Router, "do_" + _m, Router._dispatch)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default of 5 drops connections under a burst of clients


def make_server(host: str, port: int) -> Server:
    Router.table = routes()
    return Server((host, port), Router)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from . import app as app_module
    from .config import ConfigError

    try:
        app = app_module.get_app()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    server = make_server(args.host, args.port)
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    print(f"Embeddings dev server on {url}  (provider={app.settings.provider}, model={app.default_model}, "
          f"cache={app.settings.cache})", flush=True)
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
