"""The wire contract as pydantic models: OpenAI's embeddings request, answer and error.

The request model validates every body; the answer and error models exist for the
published OpenAPI document (`lib.openapi`), while answers themselves are written
directly from cached bytes for speed (`lib.request`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

# JSON Schema's `integer` is any number with a zero fractional part: `256.0` is an integer (Python's
# `json.dumps(256.0)` sends exactly that). A float is accepted here and must be integral (`lib.request`);
# `true` and `"256"` stay refused.
Integer = Union[StrictInt, StrictFloat]
TokenId = Annotated[Integer, Field(ge=0, le=2**31 - 1)]


class EmbeddingRequest(BaseModel):
    """OpenAI's `POST /v1/embeddings` body. Unknown fields are refused, as OpenAI's document says
    (`additionalProperties: false`) and OpenAI does: a typo such as `dimension` must not pass unnoticed.
    `EMBEDDINGS_EXTRA_FIELDS=ignore` makes a deployment lenient (see `lib.request.parse`)."""

    model_config = ConfigDict(extra="forbid")

    # The shapes are disjoint, so the first that fits is the only one: left to right stops there (the default
    # "smart" union tries them all, a third of a millisecond for 256 texts on every request).
    input: Union[StrictStr, list[StrictStr], list[TokenId], list[list[TokenId]]] = Field(
        description="A string, an array of strings, an array of token ids, or an array of arrays of token ids.",
        union_mode="left_to_right",
    )
    model: StrictStr | None = Field(default=None, description="Model id; omitted means the configured default.")
    dimensions: Integer | None = Field(default=None, ge=1, description="Shorter vectors (text-embedding-3 only).")
    encoding_format: Literal["float", "base64"] | None = Field(default=None)
    user: StrictStr | None = Field(default=None, description="Accepted and ignored (not part of the cache key).")


class LenientEmbeddingRequest(EmbeddingRequest):
    """The same body with unknown fields ignored (`EMBEDDINGS_EXTRA_FIELDS=ignore`)."""

    model_config = ConfigDict(extra="ignore")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Model(BaseModel):
    """One model this deployment serves (`GET /v1/models/{model}`), in OpenAI's shape."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str = Field(description="The provider(s) of its routes, in order")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]
