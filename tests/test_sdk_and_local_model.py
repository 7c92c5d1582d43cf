"""The real `openai` SDK against the dev server in a subprocess, with the real packaged local model."""

from __future__ import annotations

import numpy as np
import pytest
from openai import OpenAI

from tests.conftest import start_devserver, stop_devserver


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "dev.sqlite3"
    proc, url = start_devserver({"EMBEDDINGS_SQLITE_PATH": str(path), "HF_HUB_OFFLINE": "1"})
    yield url
    out = stop_devserver(proc)
    # the dev server announces itself and logs one line per request
    assert url in out and "curl" in out
    assert "POST /v1/embeddings 200 inputs=3" in out


def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]


def test_local_model_through_the_sdk_default_base64(local_server):
    client = OpenAI(base_url=local_server + "/v1", api_key="unused-locally", max_retries=0)
    res = client.embeddings.create(input=SENTENCES, model="sentence-transformers/all-MiniLM-L6-v2")
    vecs = [d.embedding for d in res.data]
    assert [d.index for d in res.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vecs)
    assert cos(vecs[0], vecs[1]) == pytest.approx(0.7553, abs=0.002)
    assert cos(vecs[0], vecs[2]) == pytest.approx(0.2474, abs=0.002)
    assert res.model == "sentence-transformers/all-MiniLM-L6-v2"


def test_float_and_base64_through_the_sdk_are_identical(local_server):
    client = OpenAI(base_url=local_server + "/v1", api_key="unused-locally", max_retries=0)
    floats = client.embeddings.create(input="The new movie is awesome", model="sentence-transformers/all-MiniLM-L6-v2",
                                      encoding_format="float").data[0].embedding
    b64 = client.embeddings.create(input="The new movie is awesome",
                                   model="sentence-transformers/all-MiniLM-L6-v2").data[0].embedding
    assert np.array(floats, dtype=np.float32).tobytes() == np.array(b64, dtype=np.float32).tobytes()
    other = client.embeddings.create(input="The new movie is so great",
                                     model="sentence-transformers/all-MiniLM-L6-v2").data[0].embedding
    assert cos(floats, other) == pytest.approx(0.8939, abs=0.002)


def test_sdk_sees_errors_in_openai_shape(local_server):
    import openai

    client = OpenAI(base_url=local_server + "/v1", api_key="unused-locally", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input=[[1, 2, 3]], model="sentence-transformers/all-MiniLM-L6-v2")
    assert "OpenAI models" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input="x", model="text-embedding-3-small")
    assert info.value.code == "model_not_found"


def test_sdk_against_openai_provider_is_bit_identical(fake_openai, tmp_path):
    env = {"EMBEDDINGS_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test-SENTINEL-not-a-real-key",
           "OPENAI_BASE_URL": fake_openai.url, "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "c.sqlite3"),
           "EMBEDDINGS_API_KEYS": "caller-SENTINEL-key"}
    proc, url = start_devserver(env)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="caller-SENTINEL-key", max_retries=0)
        texts = ["alpha", "beta", "alpha"]
        got = client.embeddings.create(input=texts, model="text-embedding-3-small")  # SDK default: base64
        for t, d in zip(texts, got.data):
            assert np.array(d.embedding, dtype=np.float32).tobytes() == \
                fake_openai.expected("text-embedding-3-small", t).tobytes()
        again = client.embeddings.with_raw_response.create(input=texts, model="text-embedding-3-small",
                                                           encoding_format="float")
        assert again.headers["x-cache-hits"] == "2"
        assert got.usage.prompt_tokens == 2 and again.parse().usage.prompt_tokens == 0
        import openai

        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(input="x",
                                                                                          model="text-embedding-3-small")
        assert fake_openai.calls == 1
    finally:
        stop_devserver(proc)


def test_readme_langchain_example_works_as_written(local_server):
    """The README's LangChain snippet, against the dev server's default (local) model."""
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(base_url=local_server + "/v1", api_key="anything-locally",
                           model="sentence-transformers/all-MiniLM-L6-v2", check_embedding_ctx_length=False)
    docs = emb.embed_documents(["A man is eating food.", "A man is eating a piece of bread."])
    assert len(docs) == 2 and len(docs[0]) == 384
    assert cos(docs[0], docs[1]) == pytest.approx(0.7553, abs=0.002)
    assert cos(emb.embed_query("A man is eating food."), docs[0]) == pytest.approx(1.0, abs=1e-6)


def test_token_ids_to_a_non_openai_model_say_how_to_send_text(local_server):
    """What LangChain sends by default (tiktoken ids): the 400 names the way out."""
    import httpx

    r = httpx.post(local_server + "/v1/embeddings", json={"input": [[1212, 318]],
                                                          "model": "sentence-transformers/all-MiniLM-L6-v2"})
    assert r.status_code == 400 and "check_embedding_ctx_length=False" in r.json()["error"]["message"]
