"""The Hugging Face Inference API, feature-extraction pipeline.

`POST {HF_INFERENCE_URL}/models/{model}/pipeline/feature-extraction` with
`{"inputs": [...], ...options}` at the top level, through one httpx client per
provider (`lib.providers.http`). Inputs always go as a list; the answer is
normalised by its number of dimensions:

- 2-D `[batch][dims]`: one sentence vector per input (text-embeddings-inference and
  sentence-transformers backends);
- 1-D `[dims]`: one vector (some backends answer a single input so);
- 3-D `[batch][tokens][hidden]`: token-level output of a raw transformer model. We refuse
  it with a 400 rather than pool it ourselves: the right pooling (mean over the attention
  mask, CLS, last token) and normalisation depend on how the model was trained, and a
  guessed pooling would put plausible but wrong vectors into a persistent cache.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..deadline import Deadline
from ..errors import ProviderError, parse_retry_after, upstream_reason
from ..models import ModelSpec
from ..retry import call_with_retries
from ..vectors import from_floats
from .base import Batch, Item, chunk_by_limits
from .http import Answer, HTTPClient


class HuggingFaceProvider:
    name = "huggingface"
    concurrency = 4

    def __init__(self, token: str, base_url: str, *, batch_size: int = 32, options: Mapping[str, object] | None = None,
                 timeout_s: float = 20.0, max_calls: int = 0) -> None:
        self._base_url = base_url.rstrip("/")
        self.batch_size = batch_size
        self.options = dict(options or {})
        self._timeout_s = timeout_s
        self._http = HTTPClient({"Authorization": f"Bearer {token}"}, self._base_url, max_calls)

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        return self.options

    def plan(self, items: Sequence[Item], model: ModelSpec) -> list[list[int]]:
        return chunk_by_limits(items, self.batch_size, 10**9)

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        if not all(isinstance(x, str) for x in items):
            raise ProviderError(400, "Token-id inputs are only accepted by OpenAI models", retryable=False,
                                code="invalid_input", type="invalid_request_error")
        body = json.dumps({"inputs": list(items), **self.options}, separators=(",", ":")).encode()
        url = f"{self._base_url}/models/{model.id}/pipeline/feature-extraction"

        def once() -> Batch:
            answer = self._http.post_json(url, body, min(self._timeout_s, deadline.remaining()))
            if answer.status != 200:
                raise _status_error(answer, model.id)
            data = answer.json()
            if data is None:
                raise _malformed("not JSON")
            return Batch([from_floats(v) for v in _sentence_vectors(data, len(items), model.id)], 0)

        return call_with_retries(once, deadline, what="huggingface")


def _malformed(why: str) -> ProviderError:
    return ProviderError(502, f"The embedding provider sent a malformed answer ({why})", retryable=False,
                         code="provider_malformed")


def _depth(x: Any) -> int:
    d = 0
    while isinstance(x, list) and x:
        x, d = x[0], d + 1
    return d if isinstance(x, (int, float)) and not isinstance(x, bool) else -1


def _sentence_vectors(data: Any, count: int, model_id: str) -> list[list[float]]:
    depth = _depth(data)
    if depth == 1 and count == 1:
        data = [data]
    elif depth == 3:
        raise ProviderError(400, f"The model '{model_id}' returns token-level embeddings (3-D), not sentence "
                            "embeddings; use a sentence-embedding model (pooling is not guessed here)",
                            retryable=False, code="unsupported_model_output", type="invalid_request_error")
    elif depth != 2:
        raise _malformed(f"a {depth}-D answer" if depth >= 0 else "not a list of numbers")
    if len(data) != count:
        raise _malformed(f"{len(data)} vectors for {count} inputs")
    for row in data:
        if not isinstance(row, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
            raise _malformed("a vector is not a list of numbers")
    return data


def _status_error(answer: Answer, model_id: str) -> ProviderError:
    status = answer.status
    payload = answer.json()
    err = payload.get("error") if isinstance(payload, dict) else None
    message = err if isinstance(err, str) else (err.get("message") if isinstance(err, dict) else None)
    retry_after = parse_retry_after(answer.headers.get("retry-after"))
    if status == 503 and isinstance(payload, dict) and "estimated_time" in payload:
        wait = parse_retry_after(payload["estimated_time"])
        wait = 5.0 if wait is None else wait
        return ProviderError(503, f"The model '{model_id}' is loading on the provider; retry shortly",
                             retryable=True, code="model_loading", retry_after=wait)
    if status == 429:
        return ProviderError(429, "The embedding provider is rate limiting this server; retry later",
                             retryable=True, code="rate_limit_exceeded", retry_after=retry_after, type="requests")
    if status in (400, 413, 422):
        return ProviderError(400, f"The embedding provider rejected the input: {upstream_reason(message)}", retryable=False,
                             code="invalid_input", type="invalid_request_error")
    if status in (401, 403):
        return ProviderError(502, "The embedding provider rejected the server's key", retryable=False,
                             code="provider_auth")
    if status in (404, 410):
        return ProviderError(502, f"The embedding provider does not serve '{model_id}' at this endpoint ({status})",
                             retryable=False, code="provider_model_not_found")
    if status >= 500 or status == 408:
        return ProviderError(503 if status == 503 else 502, f"The embedding provider failed ({status})",
                             retryable=True, code="provider_error", retry_after=retry_after)
    return ProviderError(502, f"The embedding provider answered {status}", retryable=False, code="provider_error")
