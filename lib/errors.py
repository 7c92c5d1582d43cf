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
        return APIError(self.status, self.message, type=self.type, code=self.code, headers=headers)


_SECRETISH = re.compile(
    r"(sk-[\w*.-]{3,}|sb_(?:secret|publishable)_[\w-]+|hf_[\w]{3,}|eyJ[\w-]+\.[\w-]+\.[\w-]*|"
    r"[Bb]earer\s+\S+|https?://\S+)"
)


def scrub(text: str) -> str:
    """Remove anything shaped like a key or token from upstream text before it is passed on."""
    return _SECRETISH.sub("[redacted]", text)
