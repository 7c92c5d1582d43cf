"""The ceiling: a replay server on the same stdlib HTTP stack as the dev server.

`python -m bench.ceiling PORT RECORDING` answers each POST with the exact bytes recorded for its body (a
dict lookup): HTTP/1.1 keep-alive, TCP_NODELAY, a thread per connection, as `lib.devserver`. Nothing that
serves embeddings over HTTP in Python can beat it on this machine; the gap between it and the dev server
on the same requests is the product's own overhead.
"""

from __future__ import annotations

import pickle
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(port: int, answers: dict[bytes, tuple[bytes, list[tuple[str, str]]]]) -> None:
    class Replay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:  # health, for the harness's readiness check
            self._answer(b"{}", [])

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            data, headers = answers[body]
            self._answer(data, headers)

        def _answer(self, data: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Replay)
    server.daemon_threads = True
    server.request_queue_size = 128
    server.serve_forever()


if __name__ == "__main__":
    with open(sys.argv[2], "rb") as f:
        recorded = pickle.load(f)
    time.sleep(0)
    serve(int(sys.argv[1]), recorded)
