"""The HTTP plumbing both remote providers share.

One httpx client per provider (connection reuse, thread-safe), made on the first miss:
httpx is never imported on a cache hit. One POST is bounded as a whole by the request's
deadline, not per socket read: a client timeout bounds each read, so an upstream that
trickles its body a byte at a time would never time out. The body is streamed and
collected in a worker (`lib.deadline.run_within`), abandoned between chunks on time-out.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..deadline import collect, run_within
from ..errors import ProviderError


def client_for(upstream: str, **kwargs: Any) -> Any:
    """An httpx client for one upstream. A plain-HTTP one (a local inference server, a proxy on localhost) never
    makes a TLS connection: its client does not load the system's CA certificates (about 40 ms a process)."""
    import httpx

    verify: Any = True
    if upstream.lower().startswith("http://"):
        import ssl

        # Verifying, trusting no CA at all: should TLS ever be attempted, it fails closed.
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return httpx.Client(verify=verify, **kwargs)


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive (httpx.Headers)
    body: bytes | bytearray

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON (an error page, an empty body)."""
        import orjson

        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


class HTTPClient:
    """A lazily made httpx client with fixed headers (the provider's credentials), for one base URL.

    `max_calls` (EMBEDDINGS_MAX_PROVIDER_CALLS; 0: 16) bounds the requests in flight across the process: it is the
    size of the connection pool, so a request waits for a free connection (within its own time budget), and a
    connection is free again as soon as its answer has been read, before the answer is parsed and cached. The
    corpus command's --concurrency is this bound: its lookups, parsing and cache writes run beside the calls."""

    def __init__(self, headers: Mapping[str, str], base_url: str, max_calls: int = 0) -> None:
        self._headers = dict(headers)
        self._max_calls = max_calls or 16
        self._base_url = base_url
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import httpx

                self._client = client_for(
                    self._base_url, headers=self._headers,
                    limits=httpx.Limits(max_connections=self._max_calls,
                                        max_keepalive_connections=min(8, self._max_calls)),
                )
            return self._client

    def post_json(self, url: str, body: bytes, budget: float) -> Answer:
        """POST a JSON body; the whole answer within `budget` seconds, or a 504 `provider_timeout`."""
        import httpx

        if budget <= 0:
            raise ProviderError(504, "No time left to call the embedding provider", retryable=False,
                                code="provider_timeout")
        client = self.client()

        def fetch(gave_up: threading.Event) -> Answer:
            with client.stream("POST", url, content=body, headers={"content-type": "application/json"},
                               timeout=budget) as response:
                return Answer(response.status_code, response.headers, collect(response.iter_bytes(), gave_up))

        try:
            return run_within(fetch, budget)
        except (TimeoutError, httpx.TimeoutException):
            raise ProviderError(504, "The embedding provider timed out", retryable=True,
                                code="provider_timeout") from None
        except httpx.TransportError:
            raise ProviderError(502, "Could not connect to the embedding provider", retryable=True,
                                code="provider_unreachable") from None
