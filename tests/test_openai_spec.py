"""Conformance to OpenAI's own OpenAPI document for `POST /embeddings` (issue 15).

`tests/openai-spec/openai-embeddings.yaml` is cut unchanged out of OpenAI's official `openapi.yaml` (MIT;
see SOURCE.md beside it). It ships with the tests, so a fresh clone runs these tests instead of skipping them.
Answers, errors and the requests the openai provider sends upstream are validated against it with
`jsonschema`; schemathesis then fuzzes the dev server (openai mode, loopback OpenAI) from it.
"""

from __future__ import annotations

import base64
import copy
import functools
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, openai_env

SPEC = ROOT / "tests" / "openai-spec" / "openai-embeddings.yaml"


@functools.lru_cache(maxsize=1)
def spec() -> dict:
    import yaml

    return yaml.safe_load(Path(SPEC).read_text())


@functools.lru_cache(maxsize=8)
def validator(name: str):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:openai", Resource(contents=spec(), specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry)


def assert_valid(name: str, instance: object) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(instance)]
    assert not errors, f"not a valid {name}: {errors[:3]}"


@pytest.fixture
def server(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_MAX_BODY_BYTES="300000")
    return serve()


GOOD = [
    {"input": "one text", "model": "text-embedding-3-small"},
    {"input": ["a", "b", "a"], "model": "text-embedding-3-small"},
    {"input": [1212, 318, 257], "model": "text-embedding-3-small"},
    {"input": [[1212, 318], [257]], "model": "text-embedding-3-large", "dimensions": 64},
    {"input": "shorter", "model": "text-embedding-3-small", "dimensions": 256.0},
    {"input": [1212.0, 318.0], "model": "text-embedding-3-small", "encoding_format": "float", "user": "u-1"},
    {"input": "ada", "model": "text-embedding-ada-002"},
]


def test_float_answers_and_upstream_requests_validate_against_openais_document(server, fake_openai):
    for body in GOOD:
        assert_valid("CreateEmbeddingRequest", body)  # the cases themselves are valid by OpenAI's document
        for _ in range(2):  # a miss, then a hit
            r = server.embed(body)
            assert r.status_code == 200, r.text
            assert_valid("CreateEmbeddingResponse", r.json())
    assert fake_openai.requests
    for sent in fake_openai.requests:
        assert_valid("CreateEmbeddingRequest", sent["body"])


BAD = [
    {"input": ""}, {"input": []}, {"input": "x", "model": ""}, {"input": "x", "model": "gpt-4"},
    {"input": "x", "dimensions": 256.5}, {"input": "x", "dimensions": True}, {"input": "x", "dimensions": "256"},
    {"input": [1212.5]}, {"input": "x", "dimension": 256}, {"input": "x", "encoding_format": "hex"},
    {"input": "x" * 50_001}, {"input": "x", "model": "text-embedding-ada-002", "dimensions": 8},
]


def test_every_error_body_validates_against_openais_error_response(server, fake_openai):
    answers = [server.embed(body) for body in BAD]
    answers += [server.client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "x"}),
                server.client.get("/v1/embeddings"), server.client.post("/v1/nothing", json={}),
                server.client.request("TRACE", "/v1/embeddings"), server.client.request("BREW", "/api/health"),
                server.client.post("/v1/embeddings", content=b"x" * 400_000)]
    for r in answers:
        assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/json", r.text
        assert_valid("ErrorResponse", r.json())
    assert fake_openai.calls == 0


def test_integral_numbers_are_integers(server, fake_openai):
    as_float = server.embed({"input": "x", "dimensions": 256.0, "encoding_format": "base64"})
    as_int = server.embed({"input": "x", "dimensions": 256, "encoding_format": "base64"})
    assert as_float.status_code == as_int.status_code == 200
    assert as_int.headers["x-cache-misses"] == "0"  # the same request, the same cache entry
    assert as_float.json()["data"] == as_int.json()["data"]
    assert len(base64.b64decode(as_int.json()["data"][0]["embedding"])) == 256 * 4
    tokens_f = server.embed({"input": [1212.0, 318.0], "encoding_format": "base64"})
    tokens_i = server.embed({"input": [1212, 318], "encoding_format": "base64"})
    assert tokens_i.headers["x-cache-misses"] == "0" and tokens_f.json()["data"] == tokens_i.json()["data"]
    assert fake_openai.sent_inputs().count([1212, 318]) == 1  # sent upstream as integers, once


def test_empty_model_is_a_400_naming_the_allowed_models(server, fake_openai):
    err = server.embed({"input": "x", "model": ""}).json()["error"]
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert "text-embedding-3-small" in err["message"] and fake_openai.calls == 0


def test_length_cap_says_which_limit_and_that_it_is_configurable(server):
    err = server.embed({"input": "x" * 50_001}).json()["error"]
    assert "50000 characters" in err["message"] and "EMBEDDINGS_MAX_INPUT_CHARS" in err["message"]
    assert err["code"] == "input_too_long"


# -- fuzzing from OpenAI's document -------------------------------------------------------------------------

SERVED = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


def justified_refusal(body: dict, err: dict) -> str | None:
    """Why a request valid by OpenAI's document may be refused by this deployment; None if it may not."""
    model = body.get("model")
    if err["code"] == "model_not_found" and model not in SERVED:
        return "a model this deployment does not serve"
    if err["param"] == "dimensions" and (model == "text-embedding-ada-002" or body["dimensions"] > SERVED[model]):
        return "`dimensions` the model does not support"
    if err["param"] == "input":
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if body["input"] == "" or "" in inputs:
            return "an empty string (the document's description: 'cannot be an empty string')"
        if err["code"] == "input_too_long":
            return "over the model's 8192 tokens or this server's per-input character cap"
        flat = [t for x in inputs if isinstance(x, list) for t in x] + [x for x in inputs if isinstance(x, int)]
        if any(not 0 <= t < 2**31 for t in flat):
            return "a token id outside any tokenizer's range"
    return None


def _fuzz(server_url: str, document: dict, examples: int) -> list[int]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import content_type_conformance, not_a_server_error

    schema = schemathesis.openapi.from_dict(document)
    seen: list[int] = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same cases on every run: a failure reproduces
        @given(case=op.as_strategy())
        def run(case):
            response = case.call(base_url=server_url + "/v1")
            case.validate_response(response, checks=[not_a_server_error, content_type_conformance])
            seen.append(response.status_code)
            body = response.json()
            if response.status_code == 200:
                if case.body.get("encoding_format") == "base64":
                    # Outside OpenAI's schema, and what OpenAI itself sends (and its SDKs decode): strings.
                    assert all(isinstance(d["embedding"], str) for d in body["data"])
                    body = copy.deepcopy(body)
                    for d in body["data"]:
                        d["embedding"] = np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()[:4]
                assert_valid("CreateEmbeddingResponse", body)
            else:
                assert response.status_code in (400, 413), response.text
                assert_valid("ErrorResponse", body)
                if response.status_code == 400:
                    assert justified_refusal(case.body, body["error"]), (case.body, body)

        run()
    return seen


def test_schemathesis_from_openais_document(server):
    # As published: `model` is any string, so most cases name a model this deployment does not serve.
    seen = _fuzz(server.url, spec(), 40)
    # And narrowed to the models served here, so the rest of the contract is exercised too.
    narrowed = copy.deepcopy(spec())
    props = narrowed["components"]["schemas"]["CreateEmbeddingRequest"]["properties"]
    props["model"] = {"type": "string", "enum": sorted(SERVED)}
    seen += _fuzz(server.url, narrowed, 60)
    assert seen.count(200) >= 5 and 400 in seen
