"""Errors in OpenAI's shape.

Every failure a caller can see is an `APIError`: an HTTP status plus the
`{"error": {"message", "type", "param", "code"}}` body that the `openai` SDK
parses. Nothing else (no traceback, no upstream URL, no key) ever reaches a body.
"""

from __future__ import annotations

import json
import re


class APIError(Exception):
    """An error answer, ready to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        ).encode()


class EmbeddingError(Exception):
    """What the in-process `Embedder` raises: the HTTP answer the endpoint would give, as an exception.

    `status`, `code`, `type`, `param` and `retry_after` (seconds, for 429 and 503) are the answer's;
    `str(error)` is its `error.message`. Never a raw SDK exception, never a secret.
    """

    def __init__(self, status: int, message: str, *, code: str | None = None, type: str = "api_error",
                 param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def from_api(cls, err: APIError) -> EmbeddingError:
        kind = InvalidInputError if err.status == 400 else EmbeddingError
        retry = err.headers.get("retry-after")
        return kind(err.status, err.message, code=err.code, type=err.type, param=err.param,
                    retry_after=float(retry) if retry else None)


class InvalidInputError(EmbeddingError, ValueError):
    """Bad input (status 400): the same rule and message as the endpoint's. Nothing was sent or cached."""


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request itself is wrong; retrying it unchanged cannot succeed."""
    return APIError(400, message, param=param, code=code)


class ProviderError(Exception):
    """A provider failed. `retryable` says whether the same call may succeed later.

    Providers raise this; the service turns it into an `APIError` for the caller
    (`to_api_error`), so providers never need to know about HTTP answers.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retryable: bool,
        code: str | None = None,
        retry_after: float | None = None,
        type: str = "api_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.code = code
        self.retry_after = retry_after
        self.type = type

    def to_api_error(self) -> APIError:
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after)))
        # Providers set codes from fixed strings; this is the last line of defence if one ever does not.
        code = self.code if self.code is not None and _OUR_CODE.fullmatch(self.code) else "provider_error"
        return APIError(self.status, self.message, type=self.type, code=code, headers=headers)


_OUR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")

# The upstream codes a caller may see as they are: OpenAI's documented invalid-request codes. Any other
# upstream `code` is replaced by ours: it is the upstream's text, and text can carry anything (a key
# echoed back, an object). `param` and `type` are always ours.
SAFE_UPSTREAM_CODES = frozenset({
    "context_length_exceeded", "invalid_value", "invalid_type", "missing_required_parameter",
    "unknown_parameter", "string_above_max_length", "array_above_max_length", "empty_array",
    "invalid_input", "invalid_encoding_format", "unsupported_value",
})


def safe_code(code: object, default: str) -> str:
    """An upstream error code if it is one of the known-safe tokens, else `default` (ours)."""
    return code if isinstance(code, str) and code in SAFE_UPSTREAM_CODES else default


_SECRETISH = re.compile(
    r"(sk-[\w*.-]{3,}|sb_(?:secret|publishable)_[\w-]+|hf_[\w]{3,}|eyJ[\w-]+\.[\w-]+\.[\w-]*|"
    r"[Bb]earer\s+\S+|https?://\S+|"
    # Any long unbroken run of base64/hex-like characters: a key may come back encoded. No word
    # of a human-readable reason is that long.
    r"[A-Za-z0-9+/_-]{28,}=*)"
)

MAX_REASON_CHARS = 300


def scrub(text: str) -> str:
    """Remove anything shaped like a key or token from upstream text before it is passed on."""
    return _SECRETISH.sub("[redacted]", text)


def upstream_reason(message: object) -> str:
    """What a caller needs from an upstream 400: the reason, scrubbed, on one line, bounded in length.

    The bound is applied before scrubbing too, so a huge message costs nothing, and again after."""
    if not isinstance(message, str):
        return "no reason given"
    text = " ".join(message[: 4 * MAX_REASON_CHARS].split())
    text = scrub(text)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


MAX_RETRY_AFTER_S = 600.0


def parse_retry_after(raw: object) -> float | None:
    """A provider's retry-after in seconds, clamped to [0, 600]; None when it is not a finite number."""
    try:
        value = float(str(raw).strip())
    except (TypeError, ValueError):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return min(max(value, 0.0), MAX_RETRY_AFTER_S)
