"""The HTTP contract: every bad request gets a clear 4xx in OpenAI's error shape, and changes nothing."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.conftest import openai_env


@pytest.fixture
def server(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_MAX_BODY_BYTES="100000")
    return serve()


def assert_error(r, status: int, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text and "sk-test" not in r.text
    if param is not None:
        assert err["param"] == param
    assert contains.lower() in err["message"].lower()
    assert r.headers.get("x-request-id", "").startswith("req_")
    return err


BAD_BODIES = [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": ["ok", ""]}, "input", "input[1]"),
    ({"input": [[]]}, "input", "empty"),
    ({"input": 42}, "input", "must be"),
    ({"input": None}, "input", "must be"),
    ({"input": ["a", 1]}, "input", "must be"),
    ({"input": [1.5, 2]}, "input", "must be"),
    ({"input": [True]}, "input", "must be"),
    ({"input": [-1]}, "input", "must be"),
    ({"input": {"text": "x"}}, "input", "must be"),
    ({}, "input", "is required"),
    ({"input": ["x"] * 2049}, "input", "2048"),
    ({"input": "x" * 50_001}, "input", "50000"),
    ({"input": [0] * 8193}, "input", "8192"),
    ({"input": "x", "model": "gpt-4"}, "model", "text-embedding-3-small"),
    ({"input": "x", "dimensions": 0}, "dimensions", ""),
    ({"input": "x", "dimensions": 1537}, "dimensions", "1536"),
    ({"input": "x", "dimensions": "256"}, "dimensions", "integer"),
    ({"input": "x", "dimensions": 256, "model": "text-embedding-ada-002"}, "dimensions", "does not support"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", "base64"),
    ({"input": "x", "user": 5}, "user", ""),
    ({"input": "x", "dimensions": 256.5}, "dimensions", "integer"),
    ({"input": "x", "dimensions": True}, "dimensions", "integer"),
    ({"input": [1212.5, 318]}, "input", "integers"),
    ({"input": "x", "model": ""}, "model", "text-embedding-3-small"),
    ({"input": "x", "dimension": 256}, "dimension", "unrecognized request argument supplied: dimension"),
]


@pytest.mark.parametrize("body,param,contains", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_input_is_a_400_that_costs_nothing(server, fake_openai, body, param, contains):
    r = server.client.post("/v1/embeddings", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_error(r, 400, param, contains)
    assert fake_openai.calls == 0
    ok = server.embed({"input": "still serving"})
    assert ok.status_code == 200


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"just a string"', b"\xff\xfe{}", b"[" * 10000])
def test_malformed_bodies(server, fake_openai, raw):
    r = server.client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert fake_openai.calls == 0
    assert server.embed({"input": "still serving"}).status_code == 200


def test_unknown_fields_are_refused_as_openai_does_unless_configured(server, monkeypatch, fake_openai, tmp_path,
                                                                     serve):
    err = assert_error(server.embed({"input": "x", "something_new": {"a": 1}, "user": "u1"}), 400, "something_new")
    assert err["code"] == "unknown_parameter" and fake_openai.calls == 0
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_EXTRA_FIELDS="ignore")
    lenient = serve()
    assert lenient.embed({"input": "x", "something_new": {"a": 1}, "user": "u1"}).status_code == 200


def test_unknown_path_and_wrong_method(server):
    assert_error(server.client.post("/v1/completions", json={}), 404)
    r = server.client.get("/v1/embeddings")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    assert_error(server.client.delete("/api/embeddings"), 405)
    assert_error(server.client.post("/api/health"), 405)


def test_too_large_body_is_refused_before_it_is_read(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/embeddings")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(10 * 1024**3))  # claims 10 GB, sends nothing
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    assert json.loads(r.read())["error"]["code"] == "request_too_large"


def test_missing_length_is_411(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/embeddings")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411


def test_both_paths_serve_and_health_tells_no_secret(server):
    assert server.client.post("/api/embeddings", json={"input": "x"}).status_code == 200
    h = server.client.get("/api/health")
    assert h.status_code == 200
    body = h.json()
    assert body["provider"] == "openai" and body["cache"] == "sqlite" and body["cache_ok"] is True
    assert body["model"] == "text-embedding-3-small"
    assert "sk-test" not in h.text


@pytest.fixture
def keyed(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_API_KEYS="key-SENTINEL-one, key-SENTINEL-two")
    return serve()


@pytest.mark.parametrize("header", [None, "", "Bearer ", "Bearer wrong", "Bearer KEY-SENTINEL-ONE", "Bearer key-SENTINEL-one ",
                                    "Bearer  key-SENTINEL-one", "Basic key-SENTINEL-one", "key-SENTINEL-one", "Bearer key-SENTINEL-on", "Bearer key-SENTINEL-one2"])
def test_wrong_keys_are_refused(keyed, fake_openai, header):
    host, port = keyed.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)  # httpx would refuse to send some of these
    body = b'{"input": "x"}'
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    if header is not None:
        headers["authorization"] = header
    conn.request("POST", "/v1/embeddings", body=body, headers=headers)
    r = conn.getresponse()
    assert r.status == 401
    err = json.loads(r.read())["error"]
    assert err["code"] == "invalid_api_key" and "key-SENTINEL-one" not in err["message"]
    assert fake_openai.calls == 0


def test_right_keys_are_accepted(keyed):
    for key in ("key-SENTINEL-one", "key-SENTINEL-two"):
        r = keyed.client.post("/v1/embeddings", json={"input": "x"}, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text


def test_vercel_without_keys_fails_closed(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, VERCEL="1")
    r = serve().embed({"input": "x"})
    err = assert_error(r, 500)
    assert "EMBEDDINGS_API_KEYS" in err["message"]
    assert fake_openai.calls == 0


def test_misconfiguration_names_the_variable_and_not_the_secret(monkeypatch, tmp_path, serve):
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "openai")
    monkeypatch.setenv("EMBEDDINGS_CACHE", "supabase")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value")
    r = serve().embed({"input": "x"})
    err = assert_error(r, 500)
    assert "SUPABASE_URL" in err["message"]
