"""OpenAI's embeddings API: `POST {base_url}/embeddings`, spoken directly over httpx.

Not through the `openai` SDK: importing it costs about half a second (its types), on the
first miss of every cold function and at the start of every corpus run, and the SDK would
give us nothing we keep: its retries are off (ours, `lib.retry`, honour the deadline and
never retry what cannot succeed), its parse would cost a second copy of every vector, and
its timeout bounds each socket read, not a call (`lib.providers.http` bounds the call).
We send what the SDK sends that matters: the key as a bearer token, `OpenAI-Organization`
and `OpenAI-Project` when configured, and ask for base64, so the bytes we cache are exactly
the float32 values OpenAI computed.

The answer is read strictly, because a wrong answer here would be cached for good: every
index 0..n-1 exactly once, a non-negative integer usage, vectors as base64 or numbers.
Anything else is `provider_malformed`, and nothing is cached.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..deadline import Deadline
from ..errors import ProviderError, parse_retry_after, safe_code, upstream_reason
from ..models import ModelSpec
from ..retry import call_with_retries
from ..vectors import from_base64
from .base import Batch, Item, chunk_by_limits
from .http import Answer, HTTPClient

MAX_ITEMS = 2048
MAX_TOKENS = 300_000
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIProvider:
    name = "openai"
    concurrency = 4

    def __init__(self, api_key: str, base_url: str | None = None, timeout_s: float = 20.0, *,
                 organization: str | None = None, project: str | None = None, max_calls: int = 0,
                 url: str | None = None, headers: Mapping[str, str] | None = None,
                 upstream_model: str | None = None, send_model: bool = True) -> None:
        if headers is None:
            headers = {"Authorization": f"Bearer {api_key}"}
            if organization:
                headers["OpenAI-Organization"] = organization
            if project:
                headers["OpenAI-Project"] = project
        self._url = url or (base_url or DEFAULT_BASE_URL).rstrip("/") + "/embeddings"
        self._http = HTTPClient(headers, self._url, max_calls)
        self._timeout_s = timeout_s
        self._upstream_model = upstream_model  # the name the upstream knows the model by (None: the model id)
        self._send_model = send_model

    @classmethod
    def azure(cls, api_key: str, endpoint: str, deployment: str, *, api_version: str | None, timeout_s: float = 20.0,
              max_calls: int = 0) -> OpenAIProvider:
        """Azure OpenAI: the same bodies, an `api-key` header, and the deployment named in the path
        (`/openai/deployments/{name}/embeddings?api-version=`) or, with the v1 API (`api_version=None`), as the
        `model` of `{endpoint}/openai/v1/embeddings`."""
        from urllib.parse import quote

        base = endpoint.rstrip("/")
        if api_version:
            url = f"{base}/openai/deployments/{quote(deployment, safe='')}/embeddings?api-version={quote(api_version)}"
            return cls(api_key, url=url, headers={"api-key": api_key}, timeout_s=timeout_s, max_calls=max_calls,
                       send_model=False)
        return cls(api_key, url=f"{base}/openai/v1/embeddings", headers={"api-key": api_key}, timeout_s=timeout_s,
                   max_calls=max_calls, upstream_model=deployment)

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        return {}

    def plan(self, items: Sequence[Item], model: ModelSpec) -> list[list[int]]:
        return chunk_by_limits(items, MAX_ITEMS, MAX_TOKENS)

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        request: dict[str, Any] = {"input": [x if isinstance(x, str) else list(x) for x in items],
                                   "encoding_format": "base64"}
        if self._send_model:
            request["model"] = self._upstream_model or model.id
        if dimensions is not None:
            request["dimensions"] = dimensions
        body = json.dumps(request, separators=(",", ":")).encode()  # stdlib: a lone surrogate is escaped, not refused

        def once() -> Batch:
            answer = self._http.post_json(self._url, body, min(self._timeout_s, deadline.remaining()))
            if answer.status != 200:
                raise _status_error(answer)
            return _parse(answer, len(items))

        return call_with_retries(once, deadline, what="openai")


def _malformed(why: str) -> ProviderError:
    return ProviderError(502, f"The embedding provider sent a malformed answer ({why})", retryable=False,
                         code="provider_malformed")


_validator: Any = None


def _answer_validator() -> Any:
    """OpenAI's answer as far as we rely on it, strict where a wrong value would be cached: integer indexes,
    embeddings as a base64 string or a list of JSON numbers, a non-negative integer usage.

    A pydantic-core schema, not models: it is built in a fraction of a millisecond (models took 70 ms on the
    first miss). Each embedding becomes its float32 bytes as soon as it is read, so the vectors' strings are
    never all held at once beside the body they came from."""
    global _validator
    if _validator is None:
        from pydantic_core import SchemaValidator
        from pydantic_core import core_schema as cs

        from ..vectors import from_floats

        def decoded(text: str) -> bytes:
            try:
                return from_base64(text)
            except ValueError:
                raise ValueError("not base64") from None

        def packed(values: list[float]) -> bytes:
            try:
                return from_floats(values)
            except (ValueError, OverflowError):
                raise ValueError("not float32 numbers") from None

        embedding = cs.union_schema([
            cs.no_info_after_validator_function(decoded, cs.str_schema(strict=True)),
            cs.no_info_after_validator_function(packed, cs.list_schema(cs.float_schema(strict=True))),
        ])
        item = cs.typed_dict_schema({
            "index": cs.typed_dict_field(cs.int_schema(strict=True)),
            "embedding": cs.typed_dict_field(embedding),
        })
        usage = cs.typed_dict_schema({"prompt_tokens": cs.typed_dict_field(cs.int_schema(strict=True, ge=0))})
        _validator = SchemaValidator(cs.typed_dict_schema({
            "data": cs.typed_dict_field(cs.list_schema(item)),
            "usage": cs.typed_dict_field(cs.nullable_schema(usage), required=False),
        }))
    return _validator


def _parse(answer: Answer, count: int) -> Batch:
    raw, answer.body = answer.body, b""  # ours alone now: let go of it as soon as it is parsed
    return parse_body(raw, count)


def parse_body(body: bytes | bytearray | dict[str, Any], count: int) -> Batch:
    """An embeddings response body for `count` inputs, read strictly: raw JSON (an HTTP answer), or already parsed
    (a Batch API output line holds the body inside its own JSON). ProviderError if anything is off."""
    from pydantic_core import ValidationError

    validator = _answer_validator()
    try:
        parsed = validator.validate_python(body) if isinstance(body, dict) else validator.validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first.get("type") == "value_error" or "embedding" in first.get("loc", ()):
            raise _malformed("a vector is neither base64 float32 nor a list of numbers") from None
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise _malformed(f"{where}: {first.get('type', 'invalid')}") from None
    del body
    data = parsed["data"]
    indexes = sorted(d["index"] for d in data)
    if indexes != list(range(count)):
        # A repeated or missing index would hand one input another input's vector, and cache it.
        shown = ", ".join(map(str, indexes[:8])) + (", ..." if len(indexes) > 8 else "")
        raise _malformed(f"indexes [{shown}] for {count} inputs")
    data.sort(key=lambda d: d["index"])
    usage = parsed.get("usage")
    return Batch([d["embedding"] for d in data], usage["prompt_tokens"] if usage else 0)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = parse_retry_after(headers.get("retry-after-ms"))
    if ms is not None:
        return parse_retry_after(ms / 1000.0)
    return parse_retry_after(headers.get("retry-after"))


def _status_error(answer: Answer) -> ProviderError:
    """Map OpenAI's answer to what our caller should see. From a 400 the caller gets the reason only
    (scrubbed, bounded) and our code unless OpenAI's is a known-safe token; key problems say nothing
    of the upstream's text, which could echo the key."""
    status = answer.status
    body = answer.json()
    err = body.get("error", body) if isinstance(body, dict) else {}  # where the SDK looks too
    code = err.get("code") if isinstance(err, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    retry_after = _retry_after(answer.headers)
    if status == 429 and code == "insufficient_quota":
        return ProviderError(502, "The embedding provider refused: the server's account has no quota left",
                             retryable=False, code="provider_insufficient_quota")
    if status == 429:
        return ProviderError(429, "The embedding provider is rate limiting this server; retry later",
                             retryable=True, code="rate_limit_exceeded", retry_after=retry_after, type="requests")
    if status in (400, 422):
        return ProviderError(400, f"The embedding provider rejected the input: {upstream_reason(message)}",
                             retryable=False, code=safe_code(code, "invalid_input"), type="invalid_request_error")
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
