"""The persistent cache in Supabase: one RPC round trip to get a request's keys, one to put.

Talks to PostgREST with `postgrest`, the client the `supabase` package itself uses
for `.rpc()`, without the rest of `supabase` (auth, storage, realtime): a cache hit
on a cold instance pays for that import, and this is the lightest honest way to
make the call (see the README's performance section for the measured figures).

One client per process, created on first use and shared by all request threads
(httpx clients are thread-safe). Timeouts are short and retries bounded: the cache
must never hold a request hostage, and any failure here becomes a cache miss in
the service. The service-role key is sent to Supabase only, never logged.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Entry

GET_FN = "embedding_cache_get"
PUT_FN = "embedding_cache_put"


class SupabaseError(Exception):
    """A failed cache call, described without the URL's query, the key, or the payload."""


class SupabaseCache:
    name = "supabase"
    trusted = False

    def __init__(self, url: str, key: str, *, timeout_s: float = 3.0, attempts: int = 2,
                 http_client: Any = None) -> None:
        self._url = url.rstrip("/")
        self._key = key
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._http_client = http_client
        self._client: Any = None
        self._lock = threading.Lock()

    def _rest(self) -> Any:
        with self._lock:
            if self._client is None:
                import httpx
                from postgrest import SyncPostgrestClient

                headers = {"apikey": self._key, "Authorization": f"Bearer {self._key}"}
                http = self._http_client or httpx.Client(
                    timeout=httpx.Timeout(self._timeout_s, connect=min(self._timeout_s, 2.0)),
                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
                )
                http.headers.update(headers)
                self._client = SyncPostgrestClient(f"{self._url}/rest/v1", headers=headers, http_client=http)
            return self._client

    def _rpc(self, fn: str, params: dict[str, Any]) -> Any:
        """One RPC with a bounded retry on transient failures (the client never retries a POST)."""
        import httpx
        from postgrest.exceptions import APIError as PostgrestAPIError
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, httpx.TransportError):
                return True
            return isinstance(exc, PostgrestAPIError) and str(getattr(exc, "code", "")).startswith(("5", "PGRST0"))

        client = self._rest()
        try:
            for attempt in Retrying(stop=stop_after_attempt(self._attempts), reraise=True,
                                    wait=wait_random_exponential(multiplier=0.05, max=0.2),
                                    retry=retry_if_exception(transient)):
                with attempt:
                    return client.rpc(fn, params).execute().data
        except PostgrestAPIError as exc:
            raise SupabaseError(f"{fn} failed: {getattr(exc, 'code', '')} {getattr(exc, 'message', '')}") from None
        except httpx.HTTPError as exc:
            raise SupabaseError(f"{fn} failed: {type(exc).__name__}") from None

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        if not keys:
            return {}
        rows = self._rpc(GET_FN, {"keys": list(keys)}) or []
        b64decode = base64.b64decode
        return {row["key"]: b64decode(row["vector"]) for row in rows}

    def put_many(self, entries: Sequence[Entry]) -> int:
        if not entries:
            return 0
        payload = [{"key": e.key, "model": e.model, "dimensions": e.dimensions,
                    "vector": base64.b64encode(e.vector).decode("ascii")} for e in entries]
        return int(self._rpc(PUT_FN, {"entries": payload}) or 0)

    def ping(self) -> bool:
        self._rpc(GET_FN, {"keys": []})
        return True
