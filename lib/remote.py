"""A deployed endpoint as an embedder: what `python -m lib embed --url` sends its batches to.

For a user who holds the endpoint's key but not the provider's or Supabase's secrets. It speaks the
endpoint's own contract (base64 answers, `x-cache-hits` / `x-cache-misses`, `usage`), waits out 429 and
503 as `retry-after` says (`lib.retry`), and turns any other error answer into the same `EmbeddingError`
the in-process `Embedder` raises.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from .embedder import EmbeddingResult
from .errors import EmbeddingError, parse_retry_after

ATTEMPTS = 8


class RemoteEmbedder:
    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float = 60.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))

    def embed(self, texts: Sequence[str], *, model: str | None = None,
              dimensions: int | None = None) -> EmbeddingResult:
        import httpx

        from .retry import call_again_while

        body: dict[str, Any] = {"input": list(texts), "encoding_format": "base64"}
        if model:
            body["model"] = model
        if dimensions:
            body["dimensions"] = dimensions

        def again(exc: BaseException) -> bool:
            return isinstance(exc, httpx.TransportError) or (isinstance(exc, EmbeddingError)
                                                             and exc.status in (429, 503))

        try:
            return call_again_while(lambda: self._once(body), again, attempts=ATTEMPTS, longest_wait=30)
        except httpx.TransportError as exc:
            raise EmbeddingError(502, f"could not reach the endpoint ({type(exc).__name__})",
                                 code="endpoint_unreachable") from None

    def _once(self, body: dict[str, Any]) -> EmbeddingResult:
        r = self._client.post("/embeddings", json=body)
        if r.status_code != 200:
            try:
                err = r.json()["error"]
                message, code = str(err.get("message", "")), err.get("code")
            except (ValueError, KeyError, TypeError, AttributeError):
                message, code = r.text[:200], None
            raise EmbeddingError(r.status_code, message or f"HTTP {r.status_code}", code=code,
                                 retry_after=parse_retry_after(r.headers.get("retry-after")))
        answer = r.json()
        data = sorted(answer["data"], key=lambda d: d["index"])
        if [d["index"] for d in data] != list(range(len(body["input"]))):
            raise EmbeddingError(502, "the endpoint answered the wrong number of vectors", code="endpoint_malformed")
        vectors = [base64.b64decode(d["embedding"]) for d in data]
        return EmbeddingResult(vectors, answer["model"], len(vectors[0]) // 4, int(r.headers.get("x-cache-hits", 0)),
                               int(r.headers.get("x-cache-misses", 0)), int(answer["usage"]["prompt_tokens"]))
