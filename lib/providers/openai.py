"""OpenAI's embeddings API through the official SDK.

The SDK is imported on the first miss, never on a cache hit (it costs about a
second to import). Its own retries are off: ours (`lib.retry`) honour the
deadline and never retry what cannot succeed. We ask for base64 so the bytes we
cache are exactly the float32 values OpenAI computed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..deadline import Deadline
from ..errors import ProviderError, scrub
from ..models import ModelSpec
from ..retry import call_with_retries
from ..vectors import from_base64
from .base import Batch, Item, chunk_by_limits

MAX_ITEMS = 2048
MAX_TOKENS = 300_000


class OpenAIProvider:
    name = "openai"
    concurrency = 4

    def __init__(self, api_key: str, base_url: str | None = None, timeout_s: float = 20.0) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    def _sdk(self) -> Any:
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(
                    api_key=self._api_key, base_url=self._base_url, max_retries=0, timeout=self._timeout_s
                )
            return self._client

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        return {}

    def plan(self, items: Sequence[Item], model: ModelSpec) -> list[list[int]]:
        return chunk_by_limits(items, MAX_ITEMS, MAX_TOKENS)

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        client = self._sdk()
        payload = [x if isinstance(x, str) else list(x) for x in items]

        def once() -> Batch:
            return self._call(client, payload, model.id, dimensions, deadline)

        return call_with_retries(once, deadline, what="openai")

    def _call(self, client: Any, payload: list, model: str, dimensions: int | None, deadline: Deadline) -> Batch:
        import openai

        timeout = min(self._timeout_s, deadline.remaining())
        if timeout <= 0:
            raise ProviderError(504, "No time left to call the embedding provider", retryable=False, code="provider_timeout")
        kwargs: dict[str, Any] = {"input": payload, "model": model, "encoding_format": "base64", "timeout": timeout}
        if dimensions is not None:
            kwargs["dimensions"] = dimensions
        try:
            answer = client.embeddings.create(**kwargs)
        except openai.APIStatusError as exc:
            raise _status_error(exc) from None
        except openai.APITimeoutError:
            raise ProviderError(504, "The embedding provider timed out", retryable=True, code="provider_timeout") from None
        except openai.APIConnectionError:
            raise ProviderError(502, "Could not connect to the embedding provider", retryable=True,
                                code="provider_unreachable") from None
        except ValueError:
            raise ProviderError(502, "The embedding provider sent a malformed answer", retryable=False,
                                code="provider_malformed") from None
        try:
            data = sorted(answer.data, key=lambda d: d.index)
            vectors = [from_base64(d.embedding) if isinstance(d.embedding, str) else _floats(d.embedding) for d in data]
            tokens = int(answer.usage.prompt_tokens) if answer.usage else 0
        except (AttributeError, TypeError, ValueError):
            raise ProviderError(502, "The embedding provider sent a malformed answer", retryable=False,
                                code="provider_malformed") from None
        return Batch(vectors, tokens)


def _floats(values: list[float]) -> bytes:
    from ..vectors import from_floats

    return from_floats(values)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000.0
        if "retry-after" in headers:
            return float(headers["retry-after"])
    except ValueError:
        return None
    return None


def _status_error(exc: Any) -> ProviderError:
    """Map OpenAI's answer to what our caller should see. Upstream messages are passed on
    only for the caller's own mistakes (400/422); never for key problems, which could echo the key."""
    status = exc.status_code
    body = exc.body if isinstance(exc.body, dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    code = err.get("code") if isinstance(err, dict) else None
    message = str(err.get("message", "")) if isinstance(err, dict) else ""
    retry_after = _retry_after(exc.response.headers)
    if status == 429 and code == "insufficient_quota":
        return ProviderError(502, "The embedding provider refused: the server's account has no quota left",
                             retryable=False, code="provider_insufficient_quota")
    if status == 429:
        return ProviderError(429, "The embedding provider is rate limiting this server; retry later",
                             retryable=True, code="rate_limit_exceeded", retry_after=retry_after, type="requests")
    if status in (400, 422):
        return ProviderError(400, f"The embedding provider rejected the input: {scrub(message)[:500]}", retryable=False,
                             code=code or "invalid_input", type="invalid_request_error")
    if status in (401, 403):
        return ProviderError(502, "The embedding provider rejected the server's key", retryable=False,
                             code="provider_auth")
    if status == 404:
        return ProviderError(502, "The embedding provider does not know this model", retryable=False,
                             code="provider_model_not_found")
    if status >= 500 or status in (408, 409):
        return ProviderError(503 if status == 503 else 502, f"The embedding provider failed ({status})",
                             retryable=True, code="provider_error", retry_after=retry_after)
    return ProviderError(502, f"The embedding provider answered {status}", retryable=False, code="provider_error")
