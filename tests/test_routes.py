"""One endpoint, many models (issue 21): routes per model, failover that never leaves the model, GET /v1/models.

Upstreams are loopback servers speaking OpenAI's, Azure OpenAI's and Hugging Face's wire formats, scripted to fail
mid-run; the ONNX export of all-MiniLM-L6-v2 is a real route beside Hugging Face.
"""

from __future__ import annotations

import base64
import json
import socket

import numpy as np
import pytest

from lib import Embedder, EmbeddingError, config
from lib.models import MINILM
from tests.conftest import app_module
from tests.upstreams import FakeAzure, FakeOpenAI, Scripted

SMALL = "text-embedding-3-small"
OPENAI_KEY = "sk-test-SENTINEL-not-a-real-key"
AZURE_KEY = "azure-SENTINEL-key-0000"


@pytest.fixture
def azure():
    up = FakeAzure({"emb-small": SMALL}, AZURE_KEY)
    yield up
    up.close()


@pytest.fixture
def second_openai():
    up = FakeOpenAI()
    yield up
    up.close()


def routes_env(monkeypatch, tmp_path, table: dict, **extra: str) -> None:
    monkeypatch.setenv("EMBEDDINGS_ROUTES", json.dumps(table))
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.setenv("EMBEDDINGS_CACHE", "sqlite")
    monkeypatch.setenv("EMBEDDINGS_SQLITE_PATH", str(tmp_path / "cache.sqlite3"))
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    app_module.reset()


def openai_then_azure(fake_openai, azure, api_version: str | None = "2024-10-21") -> dict:
    return {SMALL: [{"provider": "openai", "base_url": fake_openai.url},
                    {"provider": "azure", "endpoint": azure.url, "deployment": "emb-small", "api_version": api_version,
                     "api_key_env": "AZURE_OPENAI_API_KEY"}]}


def vectors(r) -> list[np.ndarray]:
    return [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]]


# -- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table, says", [
    ("not json", "not valid JSON"),
    ({}, "JSON object of model ids"),
    ({SMALL: []}, "needs a non-empty list"),
    ({SMALL: [{"provider": "bedrock"}]}, "route 1: 'provider' must be one of"),
    ({SMALL: [{"provider": "openai"}, {"provider": "azure", "deployment": "x"}]}, "route 2 (azure): 'endpoint' is required"),
    ({SMALL: [{"provider": "openai", "api_key": "sk-inline"}]}, "secrets are never written inline"),
    ({SMALL: [{"provider": "openai", "api_key_env": "NOT_SET_ANYWHERE"}]}, "its key is not set: set NOT_SET_ANYWHERE"),
    ({SMALL: [{"provider": "openai", "base_url": "ftp://x"}]}, "'base_url' must be an http(s) URL"),
    ({SMALL: [{"provider": "openai", "dimensions": "5"}]}, "unknown setting 'dimensions'"),
    ({SMALL: [{"provider": "openai", "name": "main"}, {"provider": "openai", "name": "main"}]}, "two routes named alike"),
])
def test_every_mistake_is_one_error_naming_the_model_and_route(table, says):
    raw = table if isinstance(table, str) else json.dumps(table)
    with pytest.raises(config.ConfigError) as info:
        config.load({"EMBEDDINGS_ROUTES": raw, "OPENAI_API_KEY": OPENAI_KEY, "EMBEDDINGS_CACHE": "memory"})
    assert says in str(info.value), str(info.value)
    assert "sk-inline" not in str(info.value) and OPENAI_KEY not in str(info.value)
    if isinstance(table, dict) and table.get(SMALL):
        assert "EMBEDDINGS_ROUTES" in str(info.value) and SMALL in str(info.value)


def test_routes_without_settings_take_todays_variables(monkeypatch, tmp_path, fake_openai, serve):
    routes_env(monkeypatch, tmp_path, {SMALL: [{"provider": "openai"}]}, OPENAI_BASE_URL=fake_openai.url)
    r = serve().embed({"input": "today's variables"})
    assert r.status_code == 200 and r.headers["x-embeddings-route"] == "openai#1"
    assert fake_openai.requests[0]["headers"]["Authorization"] == f"Bearer {OPENAI_KEY}"


# -- failover ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [Scripted(500), Scripted(503), Scripted(429, {"error": {"code": "rate_limit_exceeded"}})])
def test_openai_failing_hands_over_to_azure_for_the_same_model(monkeypatch, tmp_path, fake_openai, azure, serve,
                                                               failure):
    fake_openai.script = [failure] * 8  # every retry of the first route fails
    routes_env(monkeypatch, tmp_path, openai_then_azure(fake_openai, azure), EMBEDDINGS_TIMEOUT_S="8")
    server = serve()
    texts = ["alpha", "beta", "alpha"]
    r = server.embed({"input": texts, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert r.headers["x-embeddings-route"] == "azure#2" and r.json()["model"] == SMALL
    assert [v.tobytes() for v in vectors(r)] == [azure.expected(SMALL, t).tobytes() for t in texts]
    sent = azure.requests[0]
    assert sent["path"].startswith("/openai/deployments/emb-small/embeddings?api-version=")
    assert sent["headers"]["api-key"] == AZURE_KEY and "Authorization" not in sent["headers"]
    assert "model" not in sent["body"]  # the classic path names the deployment, not the model
    # The cache key does not depend on the route: the same texts are hits, whoever serves next.
    again = server.embed({"input": ["beta", "alpha"]})
    assert again.headers["x-cache-hits"] == "2" and azure.calls == 1
    assert azure.sent_inputs() == ["alpha", "beta"]  # each distinct text paid once, on the route that answered


def test_azure_v1_path(monkeypatch, tmp_path, fake_openai, azure, serve):
    fake_openai.script = [Scripted(500)] * 8
    routes_env(monkeypatch, tmp_path, openai_then_azure(fake_openai, azure, api_version="v1"), EMBEDDINGS_TIMEOUT_S="8")
    r = serve().embed({"input": "via v1"})
    assert r.status_code == 200 and r.headers["x-embeddings-route"] == "azure#2"
    assert azure.requests[0]["path"] == "/openai/v1/embeddings" and azure.requests[0]["body"]["model"] == "emb-small"


def test_a_400_never_hands_over(monkeypatch, tmp_path, fake_openai, azure, serve):
    fake_openai.script = [Scripted(400, {"error": {"message": "bad input", "code": "invalid_value"}})]
    routes_env(monkeypatch, tmp_path, openai_then_azure(fake_openai, azure))
    r = serve().embed({"input": "refused"})
    assert r.status_code == 400 and azure.calls == 0


def test_when_every_route_fails_the_first_routes_error_goes_out(monkeypatch, tmp_path, fake_openai, azure, serve):
    fake_openai.script = [Scripted(429, {"error": {"code": "insufficient_quota"}})] * 8
    azure.script = [Scripted(503)] * 8
    routes_env(monkeypatch, tmp_path, openai_then_azure(fake_openai, azure), EMBEDDINGS_TIMEOUT_S="6")
    r = serve().embed({"input": "nobody answers"})
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "provider_insufficient_quota", r.text  # the first route's
    assert set(err) == {"message", "type", "param", "code"} and azure.calls >= 1


def test_failover_never_crosses_to_another_model(monkeypatch, tmp_path, fake_openai, second_openai, serve):
    fake_openai.script = [Scripted(500)] * 20
    table = {SMALL: [{"provider": "openai", "base_url": fake_openai.url}],
             "text-embedding-3-large": [{"provider": "openai", "base_url": second_openai.url}]}
    routes_env(monkeypatch, tmp_path, table, EMBEDDINGS_TIMEOUT_S="5")
    server = serve()
    assert server.embed({"input": "x", "model": SMALL}).status_code in (502, 503, 504)
    assert second_openai.calls == 0  # the other model's route was never asked
    ok = server.embed({"input": "x", "model": "text-embedding-3-large"})
    assert ok.status_code == 200 and len(vectors_of(ok)) == 3072


def vectors_of(r) -> list[float]:
    return r.json()["data"][0]["embedding"]


def test_a_failover_mid_request_keeps_what_was_paid_and_pays_nothing_twice(monkeypatch, tmp_path, fake_hf, exports,
                                                                          serve):
    """Hugging Face serves the first batches, then fails for good: the rest of the request goes to the ONNX export
    of the same model. Every vector is the model's; the batches Hugging Face answered are not paid again."""
    fake_hf.script = [Scripted(200), Scripted(200)] + [Scripted(500)] * 40
    table = {MINILM: [{"provider": "huggingface", "url": fake_hf.url},
                      {"provider": "onnx", "dir": str(exports["fp32"])}]}
    routes_env(monkeypatch, tmp_path, table, HF_TOKEN="hf_test_SENTINEL_not_a_real_token", HF_BATCH_SIZE="8",
               EMBEDDINGS_TIMEOUT_S="20", EMBEDDINGS_MAX_PROVIDER_CALLS="1")
    server = serve()
    texts = [f"sentence number {i} about caching" for i in range(40)]
    r = server.embed({"input": texts, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert set(r.headers["x-embeddings-route"].split(",")) == {"huggingface#1", "onnx#2"}
    got = np.stack(vectors(r))
    want = fake_hf.model().encode(texts, convert_to_numpy=True)
    assert ((got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)).min() > 0.9999
    answered = [x for q in fake_hf.requests[:2] for x in q["body"]["inputs"]]
    assert len(set(answered)) == 16  # two batches of 8 were paid for on Hugging Face, and kept
    again = server.embed({"input": texts})
    assert again.headers["x-cache-hits"] == "40" and again.headers.get("x-embeddings-route") is None


def test_a_route_that_keeps_failing_is_skipped_then_tried_again(monkeypatch, tmp_path, fake_openai, azure, serve):
    from lib.providers import router

    fake_openai.script = [Scripted(500)] * 100
    routes_env(monkeypatch, tmp_path, openai_then_azure(fake_openai, azure), EMBEDDINGS_TIMEOUT_S="6")
    server = serve()
    for i in range(router.DOWN_AFTER):
        assert server.embed({"input": f"warming {i}"}).headers["x-embeddings-route"] == "azure#2"
    asked = fake_openai.calls
    health = server.client.get("/v1/health").json()
    first, second = health["routes"][SMALL]
    assert first["name"] == "openai#1" and first["state"] == "down" and second["state"] == "up"
    assert AZURE_KEY not in json.dumps(health) and "azure" in second["provider"]
    for i in range(3):  # while it is down, no request spends time on it
        assert server.embed({"input": f"while down {i}"}).headers["x-embeddings-route"] == "azure#2"
    assert fake_openai.calls == asked
    # After its time out, one batch tries it again; it answers now, and is up.
    app = app_module.get_app()
    for state in app.provider._routes[SMALL]:
        state.down_until = 0.0
    fake_openai.script = []
    assert server.embed({"input": "back again"}).headers["x-embeddings-route"] == "openai#1"
    assert server.client.get("/v1/health").json()["routes"][SMALL][0]["state"] == "up"


def test_connection_refused_hands_over_within_the_deadline(monkeypatch, tmp_path, azure, serve):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    table = {SMALL: [{"provider": "openai", "base_url": dead},
                     {"provider": "azure", "endpoint": azure.url, "deployment": "emb-small"}]}
    routes_env(monkeypatch, tmp_path, table, EMBEDDINGS_TIMEOUT_S="10")
    server = serve()
    for i in range(3):
        r = server.embed({"input": f"refused {i}"})
        assert r.status_code == 200 and r.headers["x-embeddings-route"] == "azure#2"
    assert server.client.get("/v1/health").json()["routes"][SMALL][0]["state"] == "down"


# -- /v1/models ----------------------------------------------------------------------------------------------


def test_models_list_and_retrieve_with_the_openai_sdk(monkeypatch, tmp_path, fake_openai, azure, exports, serve):
    from openai import NotFoundError, OpenAI

    table = {**openai_then_azure(fake_openai, azure), MINILM: [{"provider": "onnx", "dir": str(exports["fp32"])}]}
    routes_env(monkeypatch, tmp_path, table, EMBEDDINGS_API_KEYS="models-SENTINEL-key")
    server = serve()
    client = OpenAI(base_url=server.url + "/v1", api_key="models-SENTINEL-key", max_retries=0)
    listed = client.models.list()
    assert sorted(m.id for m in listed.data) == sorted([SMALL, MINILM])
    assert all(m.object == "model" for m in listed.data)
    assert client.models.retrieve(MINILM).id == MINILM  # an id with a slash in it
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")
    anonymous = server.client.get("/v1/models")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    # The embeddings of each model, as listed.
    both = client.embeddings.create(model=MINILM, input=["listed and served"])
    assert len(both.data[0].embedding) == 384


def test_models_without_routes_lists_the_providers_models(monkeypatch, fake_openai, tmp_path, serve):
    from tests.conftest import openai_env

    openai_env(monkeypatch, fake_openai.url, tmp_path)
    body = serve().client.get("/v1/models").json()
    assert body["object"] == "list" and {m["id"] for m in body["data"]} == {
        "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"}


# -- every door ----------------------------------------------------------------------------------------------


def test_the_embedder_takes_models_and_reports_the_route(monkeypatch, fake_openai, azure, tmp_path):
    fake_openai.script = [Scripted(500)] * 8
    table = openai_then_azure(fake_openai, azure)
    # Embedder(...) reads no environment, so a route's key variable must be among its options, or it says so.
    with pytest.raises(config.ConfigError, match="AZURE_OPENAI_API_KEY"):
        Embedder(models=table, cache="memory", openai_api_key=OPENAI_KEY)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    embedder = Embedder.from_env(models=table, cache="sqlite", sqlite_path=str(tmp_path / "e.sqlite3"), timeout_s=6)
    assert embedder.models == [SMALL]
    result = embedder.embed(["in process"])
    assert result.routes == ("azure#2",) and result.misses == 1
    with pytest.raises(EmbeddingError):
        embedder.embed(["x"], model="text-embedding-3-large")


def test_the_command_line_uses_the_routes(fake_openai, azure, tmp_path):
    from tests.conftest import lib_command

    (tmp_path / "in.txt").write_text("one\ntwo\n")
    env = {"EMBEDDINGS_ROUTES": json.dumps(openai_then_azure(fake_openai, azure)), "OPENAI_API_KEY": OPENAI_KEY,
           "AZURE_OPENAI_API_KEY": AZURE_KEY, "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "c.sqlite3")}
    fake_openai.script = [Scripted(500)] * 8
    done = lib_command(["embed", "in.txt", "--model", SMALL, "--out", "v.npy"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "v.npy")[1], azure.expected(SMALL, "two"))
    bad = lib_command(["embed", "in.txt", "--model", "text-embedding-3-large"], env, tmp_path)
    assert bad.returncode == 2 and "change --model" in bad.stderr
