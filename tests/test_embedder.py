"""The in-process `Embedder`: the endpoint's service, cache, keys and rules, called from Python (issue 11)."""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
import pytest

from lib import Embedder, EmbeddingError, InvalidInputError
from tests.conftest import SERVICE_KEY, start_devserver, stop_devserver
from tests.upstreams import Scripted

KEY = "sk-test-SENTINEL-not-a-real-key"
MODEL = "text-embedding-3-small"


def openai_embedder(fake_openai, tmp_path, **options) -> Embedder:
    return Embedder(provider="openai", openai_api_key=KEY, openai_base_url=fake_openai.url, cache="sqlite",
                    sqlite_path=str(tmp_path / "cache.sqlite3"), **options)


def server_env(fake_openai, tmp_path) -> dict[str, str]:
    return {"EMBEDDINGS_PROVIDER": "openai", "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": fake_openai.url,
            "EMBEDDINGS_CACHE": "sqlite", "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "cache.sqlite3")}


def b64(item: dict) -> bytes:
    return base64.b64decode(item["embedding"])


# -- one cache, two doors ----------------------------------------------------------------------------------


def test_in_process_then_endpoint_shares_the_sqlite_cache(fake_openai, tmp_path):
    texts = ["shared one", "shared two", "shared one"]
    result = openai_embedder(fake_openai, tmp_path).embed(texts)
    assert (result.hits, result.misses) == (0, 2) and result.tokens > 0
    calls = fake_openai.calls
    proc, url = start_devserver(server_env(fake_openai, tmp_path))
    try:
        import httpx

        r = httpx.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
    finally:
        stop_devserver(proc)
    assert r.headers["x-cache-misses"] == "0" and fake_openai.calls == calls
    assert [b64(d) for d in r.json()["data"]] == result.vectors  # byte-identical


def test_endpoint_then_in_process_shares_the_sqlite_cache(fake_openai, tmp_path):
    texts = ["served first", "then read in-process"]
    proc, url = start_devserver(server_env(fake_openai, tmp_path))
    try:
        import httpx

        r = httpx.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
    finally:
        stop_devserver(proc)
    calls = fake_openai.calls
    result = openai_embedder(fake_openai, tmp_path).embed(texts)
    assert (result.hits, result.misses, result.tokens) == (2, 0, 0) and fake_openai.calls == calls
    assert result.vectors == [b64(d) for d in r.json()["data"]]


def test_both_directions_with_the_supabase_cache(monkeypatch, fake_openai, rest, serve):
    from tests.conftest import supabase_env

    embedder = Embedder(provider="openai", openai_api_key=KEY, openai_base_url=fake_openai.url,
                        supabase_url=rest.url, supabase_key=SERVICE_KEY, cache="supabase")
    first = embedder.embed(["in-process first"])
    supabase_env(monkeypatch, fake_openai.url, rest.url)
    server = serve()
    r = server.embed({"input": ["in-process first", "endpoint first"], "encoding_format": "base64"})
    assert r.headers["x-cache-hits"] == "1" and b64(r.json()["data"][0]) == first.vectors[0]
    calls = fake_openai.calls
    again = embedder.embed(["endpoint first"])
    assert (again.hits, again.misses) == (1, 0) and fake_openai.calls == calls
    assert again.vectors[0] == b64(r.json()["data"][1])


def test_from_env_reads_the_endpoints_variables_and_options_override(monkeypatch, fake_openai, tmp_path):
    for name, value in server_env(fake_openai, tmp_path).items():
        monkeypatch.setenv(name, value)
    assert Embedder.from_env().model == MODEL
    embedder = Embedder.from_env(cache="memory")
    assert embedder.embed(["x"]).misses == 1 and not (tmp_path / "cache.sqlite3").exists()
    with pytest.raises(TypeError, match="unknown option 'cahce'"):
        Embedder.from_env(cahce="memory")


# -- the call shapes ------------------------------------------------------------------------------------------


def test_sync_shapes_and_the_rich_result(fake_openai, tmp_path):
    embedder = openai_embedder(fake_openai, tmp_path)
    docs = embedder.embed_documents(["a", "b"])
    assert len(docs) == 2 and len(docs[0]) == 1536 and isinstance(docs[0][0], float)
    query = embedder.embed_query("a", dimensions=256)
    assert len(query) == 256
    expected = fake_openai.expected(MODEL, "a", 256)
    assert np.array_equal(np.asarray(query, dtype="<f4"), expected)
    result = embedder.embed(["a", "c", "a"], dimensions=256)
    arr = result.array()
    assert arr.dtype == np.float32 and arr.shape == (3, 256) and np.array_equal(arr[0], arr[2])
    assert (result.hits, result.misses) == (1, 1) and result.model == MODEL


def test_ten_thousand_texts_in_one_call(fake_openai, tmp_path):
    embedder = openai_embedder(fake_openai, tmp_path, max_inputs=2048)
    texts = [f"chunk {i % 5000}" for i in range(10_000)]  # half are repeats
    vectors = embedder.embed(texts)
    sent = fake_openai.sent_inputs()
    assert sorted(sent) == sorted(set(texts)) and len(sent) == 5000  # each distinct text paid once
    assert all(len(r["body"]["input"]) <= 2048 for r in fake_openai.requests)
    for i in (0, 1, 4999, 5000, 9999):
        assert vectors.vectors[i] == fake_openai.expected(MODEL, texts[i]).tobytes()


def test_concurrent_async_calls_pay_each_text_once_and_never_block_the_loop(fake_openai, tmp_path):
    embedder = openai_embedder(fake_openai, tmp_path)
    fake_openai.script = [Scripted(200, delay=0.05)] * 200  # each upstream call takes a while
    calls = [[f"text {(n * 5 + j) % 70}" for j in range(12)] + ["common"] * 2 for n in range(64)]

    async def main():
        ticks: list[float] = []
        stop = asyncio.Event()

        async def heartbeat():
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(heartbeat())
        results = await asyncio.gather(*(embedder.aembed_documents(c) for c in calls))
        stop.set()
        await beat
        return results, ticks

    results, ticks = asyncio.run(main())
    sent = fake_openai.sent_inputs()
    assert sorted(sent) == sorted({t for c in calls for t in c})  # every distinct text exactly once
    for texts, vectors in zip(calls, results, strict=True):
        assert [np.asarray(v, dtype="<f4").tobytes() for v in vectors] == \
            [fake_openai.expected(MODEL, t).tobytes() for t in texts]
    gaps = np.diff(ticks)
    assert len(ticks) > 10 and gaps.max() < 0.5  # the loop kept ticking while the calls ran


# -- errors: the endpoint's, as exceptions ------------------------------------------------------------------

BAD_CALLS = [
    (["ok", ""], {}),
    (["ok", 5], {}),
    (["x" * 50_001], {}),
    (["x"], {"model": "gpt-4"}),
    (["x"], {"model": ""}),
    (["x"], {"model": "text-embedding-ada-002", "dimensions": 8}),
    (["x"], {"dimensions": 5000}),
    (["x"], {"dimensions": 2.5}),
    ([], {}),
]


@pytest.mark.parametrize("texts,options", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_input_raises_the_endpoints_message_and_costs_nothing(fake_openai, tmp_path, serve, monkeypatch,
                                                                  texts, options):
    from tests.conftest import openai_env

    embedder = openai_embedder(fake_openai, tmp_path)
    with pytest.raises(InvalidInputError) as info:
        embedder.embed(texts, **options)
    assert isinstance(info.value, ValueError) and info.value.status == 400
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    answer = serve().embed({"input": texts, **options}).json()["error"]
    assert str(info.value) == answer["message"] and info.value.code == answer["code"]
    assert fake_openai.calls == 0
    if (tmp_path / "cache.sqlite3").exists():  # created empty at most: nothing was written
        import sqlite3

        with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
            assert db.execute("select count(*) from embedding_cache").fetchone()[0] == 0


def test_provider_failures_carry_status_code_and_retry_after(fake_openai, tmp_path):
    embedder = openai_embedder(fake_openai, tmp_path, timeout_s=2)
    fake_openai.script = [Scripted(429, {"error": {"message": "slow", "code": "rate_limit_exceeded"}},
                                   {"retry-after": "30"})]
    with pytest.raises(EmbeddingError) as info:
        embedder.embed(["limited"])
    assert (info.value.status, info.value.code, info.value.retry_after) == (429, "rate_limit_exceeded", 30.0)
    assert not isinstance(info.value, ValueError)
    fake_openai.script = [Scripted(200, raw=b'{"data": [], "usage": null}')]
    with pytest.raises(EmbeddingError) as info:
        embedder.embed(["garbled"])
    assert (info.value.status, info.value.code) == (502, "provider_malformed")
    assert "SENTINEL" not in repr(info.value) + str(info.value)


# -- adapters -------------------------------------------------------------------------------------------------


def test_langchain_adapter_with_a_real_vector_store(fake_openai, tmp_path):
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    texts = ["the cat sat on the mat", "stock prices fell today", "a recipe for bread"]
    lc = openai_embedder(fake_openai, tmp_path).as_langchain()
    assert isinstance(lc, Embeddings)
    store = InMemoryVectorStore(lc)
    store.add_texts(texts)
    assert store.similarity_search("stock prices fell today", k=1)[0].page_content == "stock prices fell today"
    calls = fake_openai.calls
    InMemoryVectorStore(openai_embedder(fake_openai, tmp_path).as_langchain()).add_texts(texts)  # re-index
    assert fake_openai.calls == calls  # a second indexing run costs no provider call


def test_the_local_model_in_process(tmp_path):
    embedder = Embedder(cache="sqlite", sqlite_path=str(tmp_path / "local.sqlite3"))
    a, b, c = embedder.embed(["A man is eating food.", "A man is eating a piece of bread.",
                              "A man is riding a horse."]).array()
    cos = lambda x, y: float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))  # noqa: E731
    assert cos(a, b) == pytest.approx(0.7553, abs=0.002) and cos(a, c) == pytest.approx(0.2474, abs=0.002)
