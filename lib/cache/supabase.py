"""The persistent cache in Supabase: one RPC round trip to get a request's keys, one to put.

An RPC is `POST {SUPABASE_URL}/rest/v1/rpc/<function>` with the named arguments as a JSON
object, as `supabase.create_client(...).rpc()` sends it (the tests run the real client against the same
functions), and the key as Supabase's API-keys guide says for its kind (`auth_headers`). Reads ask for the packed binary
form (`Accept: application/octet-stream`) and fall back to the JSON function. We send it with httpx
directly: measured alone, importing httpx costs about 0.3 s against 0.8 s for `supabase` and 0.5 s
for its `postgrest` client, and every read skips the client's response models (about 10 ms on 256
vectors). See the README's performance section.

One httpx client per process, created on first use and shared by all request threads
(httpx clients are thread-safe). Timeouts are short and retries bounded: the cache must never
hold a request hostage, and any failure here becomes a cache miss in the service. The
service-role key is sent to Supabase only, never logged.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..deadline import Deadline
from .base import CacheStats, Entry

GET_FN = "embedding_cache_get"
GET_PACKED_FN = "embedding_cache_get_packed"
PUT_FN = "embedding_cache_put"
_BINARY = {"Accept": "application/octet-stream"}
BACKOFF_S = 5.0  # how long an unreachable cache is skipped before the next try
JSON_CHUNK = 1000  # keys per JSON read: Supabase's default db-max-rows


def auth_headers(key: str) -> dict[str, str]:
    """How Supabase's API gateway wants each kind of key. A new `sb_secret_...` key is not a JWT: it goes in
    `apikey` alone (a bearer token that is not a JWT is refused unless it equals `apikey` exactly, and users
    report 401s). A legacy `service_role` JWT goes in both `apikey` and `Authorization: Bearer`."""
    if key.startswith("sb_"):
        return {"apikey": key}
    return {"apikey": key, "Authorization": f"Bearer {key}"}


class SupabaseError(Exception):
    """A failed cache call, described without the key or the payload."""

    def __init__(self, message: str, *, transient: bool = False, status: int = 0) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status

    @classmethod
    def from_response(cls, fn: str, response: Any) -> SupabaseError:
        try:
            err = response.json()
            detail = f"{err.get('code', '')} {err.get('message', '')}".strip()
        except ValueError:
            detail = ""
        status = response.status_code
        return cls(f"{fn} failed: HTTP {status} {detail[:200]}", transient=status >= 500 or status == 429,
                   status=status)


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
        self._client: Any = None  # the httpx client, made on first use
        self._packed = True  # until the server shows it cannot answer in binary
        self._down_until = 0.0  # after a timeout or connection failure, skip the cache for a moment
        self._lock = threading.Lock()

    def _http(self) -> Any:
        with self._lock:
            if self._client is None:
                import httpx

                self._client = self._http_client or httpx.Client(
                    timeout=httpx.Timeout(self._timeout_s, connect=min(self._timeout_s, 2.0)),
                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
                )
                self._client.headers.update({**auth_headers(self._key), "Content-Type": "application/json"})
            return self._client

    def _rpc(self, fn: str, params: dict[str, Any], binary: bool = False, deadline: Deadline | None = None) -> Any:
        """One RPC, retried once on a transient failure (no client retries a POST by itself). Each attempt
        waits at most the configured timeout, and never more than half the request's time left."""
        import httpx
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, httpx.TransportError) or (isinstance(exc, SupabaseError) and exc.transient)

        if time.monotonic() < self._down_until:
            # Don't make every request of an outage wait out the same timeouts: fail fast for a moment.
            raise SupabaseError(f"{fn} skipped: the cache was unreachable moments ago", transient=True)
        client = self._http()
        url = f"{self._url}/rest/v1/rpc/{fn}"
        body = json.dumps(params, separators=(",", ":"))

        def once() -> Any:
            timeout = self._timeout_s if deadline is None else min(self._timeout_s, deadline.remaining() / 2)
            if timeout < 0.01:
                raise SupabaseError(f"{fn} skipped: no time left in the request", transient=False)
            response = client.post(url, content=body, headers=_BINARY if binary else None,
                                   timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)))
            if response.status_code >= 400:
                raise SupabaseError.from_response(fn, response)
            if binary:
                return response.content
            return json.loads(response.content) if response.content else None

        try:
            for attempt in Retrying(stop=stop_after_attempt(self._attempts), reraise=True,
                                    wait=wait_random_exponential(multiplier=0.05, max=0.2),
                                    retry=retry_if_exception(transient)):
                with attempt:
                    return once()
        except httpx.HTTPError as exc:
            self._down_until = time.monotonic() + BACKOFF_S
            raise SupabaseError(f"{fn} failed: {type(exc).__name__}", transient=True) from None
        except ValueError:
            raise SupabaseError(f"{fn} answered something that is not JSON") from None

    def get_many(self, keys: Sequence[str], deadline: Deadline | None = None) -> Mapping[str, bytes]:
        if not keys:
            return {}
        if self._packed:
            try:
                return _unpack(self._rpc(GET_PACKED_FN, {"keys": list(keys)}, binary=True, deadline=deadline))
            except SupabaseError as exc:
                if exc.status not in (404, 406, 415):
                    raise
                # An older migration or a PostgREST without binary output: use the JSON function from now on.
                self._packed = False
        # The JSON function returns a set, and PostgREST caps a set at `db-max-rows` (1,000 on Supabase) without
        # a word: read in chunks under the cap, or rows past it would silently be misses, paid for again.
        found: dict[str, bytes] = {}
        b64decode = base64.b64decode
        for i in range(0, len(keys), JSON_CHUNK):
            rows = self._rpc(GET_FN, {"keys": list(keys[i:i + JSON_CHUNK])}, deadline=deadline) or []
            found.update((row["key"], b64decode(row["vector"])) for row in rows)
        return found

    def put_many(self, entries: Sequence[Entry], deadline: Deadline | None = None) -> int:
        if not entries:
            return 0
        payload = [{"key": e.key, "model": e.model, "dimensions": e.dimensions,
                    "vector": base64.b64encode(e.vector).decode("ascii")} for e in entries]
        return int(self._rpc(PUT_FN, {"entries": payload}, deadline=deadline) or 0)

    def ping(self) -> bool:
        self._rpc(GET_FN, {"keys": []})
        return True

    # -- administration (the command line's `stats` and `prune`; sql/003) ----------------------------

    def stats(self) -> list[CacheStats]:
        rows = self._rpc("embedding_cache_stats", {}) or []
        return [CacheStats(r["model"], r["dimensions"], r["row_count"], r["vector_bytes"], _ts(r["oldest"]),
                           _ts(r["newest"]), r["unused_30_days"], r["unused_90_days"]) for r in rows]

    def prune(self, unused_days: float | None = None, max_rows: int | None = None, dry_run: bool = False) -> int:
        since = None
        if unused_days is not None:
            since = (datetime.now(timezone.utc) - timedelta(days=unused_days)).isoformat()
        fn = "embedding_cache_prune_preview" if dry_run else "embedding_cache_prune"
        return int(self._rpc(fn, {"unused_since": since, "max_rows": max_rows}) or 0)


def _ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _unpack(blob: bytes) -> dict[str, bytes]:
    """(32-byte key, 4-byte big-endian length, vector) repeated: see embedding_cache_get_packed."""
    found: dict[str, bytes] = {}
    view = memoryview(blob)
    offset, end = 0, len(blob)
    while offset < end:
        if offset + 36 > end:
            raise SupabaseError("embedding_cache_get_packed answered a truncated record")
        key = view[offset:offset + 32].hex()
        length = int.from_bytes(view[offset + 32:offset + 36], "big")
        offset += 36
        if offset + length > end:
            raise SupabaseError("embedding_cache_get_packed answered a truncated record")
        found[key] = bytes(view[offset:offset + length])
        offset += length
    return found
