"""The OpenAPI document of the endpoint, generated from the pydantic models in `lib.schemas`.

`python -m lib.openapi > lib/openapi.json` writes it; the committed file is what
`/api/openapi.json` serves (no pydantic work at request time), and a test fails if the
file and the models ever disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("openapi.json")

_ERRORS = {
    "400": "Bad JSON or bad input; the message names the field",
    "401": "Missing or wrong API key",
    "404": "Unknown path",
    "405": "Wrong method",
    "411": "No Content-Length",
    "413": "Body too large (refused before it is read)",
    "429": "The provider is rate limiting; see retry-after",
    "500": "Server misconfigured (the message names the variable)",
    "502": "The provider failed or rejected the server's key",
    "503": "The provider is unavailable or loading; see retry-after",
    "504": "The provider did not answer within the deadline",
}


def document() -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    from .schemas import EmbeddingRequest, EmbeddingResponse, ErrorResponse, Model, ModelList

    _, schema = models_json_schema(
        [(EmbeddingRequest, "validation"), (EmbeddingResponse, "serialization"), (ErrorResponse, "serialization"),
         (Model, "serialization"), (ModelList, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    count = {"schema": {"type": "string", "pattern": "^[0-9]+$"}}
    embeddings = {
        "post": {
            "summary": "Create embeddings (OpenAI-compatible), answered from the cache where possible",
            "operationId": "createEmbeddings",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}}},
            "responses": {
                "200": {
                    "description": "Vectors in input order",
                    "headers": {"x-cache-hits": count, "x-cache-misses": count,
                                "x-request-id": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingResponse"}}},
                },
                **{code: {"description": text, **error} for code, text in _ERRORS.items()},
            },
        }
    }
    def listing(summary: str, operation: str, ref: str, **extra: Any) -> dict[str, Any]:
        return {"get": {"summary": summary, "operationId": operation, "security": [{"bearer": []}], **extra,
                        "responses": {"200": {"description": summary, "content": {"application/json": {
                            "schema": {"$ref": f"#/components/schemas/{ref}"}}}},
                                      "401": {"description": _ERRORS["401"], **error},
                                      "404": {"description": "No such model here", **error}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "Embeddings with a persistent cache", "version": "1.0.0",
                 "description": "OpenAI's embeddings API; each distinct input is paid for once."},
        "paths": {
            "/v1/embeddings": embeddings,
            "/api/embeddings": embeddings,
            "/v1/models": listing("The models this deployment serves", "listModels", "ModelList"),
            "/v1/models/{model}": listing("One model this deployment serves", "retrieveModel", "Model", parameters=[
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]),
            "/api/health": {"get": {"summary": "Configuration and cache status (no secrets)",
                                    "operationId": "health",
                                    "responses": {"200": {"description": "Status", "content": {
                                        "application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": schema["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def render() -> str:
    return json.dumps(document(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
