"""The Hugging Face provider against a loopback upstream that answers with real vectors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.conftest import hf_env
from tests.upstreams import FakeHuggingFace

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]


def vecs(r) -> list[np.ndarray]:
    return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]


def cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", ["2d", "1d"])
def test_answer_shapes_and_wire_format(monkeypatch, tmp_path, serve, shape):
    up = FakeHuggingFace(shape)
    try:
        hf_env(monkeypatch, up.url, tmp_path, HF_NORMALIZE="true")
        server = serve()
        for inputs in (TEXTS[0], TEXTS):
            r = server.embed({"input": inputs, "encoding_format": "base64"})
            assert r.status_code == 200, r.text
        req = up.requests[0]
        assert req["path"] == f"/models/{MINILM}/pipeline/feature-extraction"
        assert req["headers"]["Authorization"] == "Bearer hf_test_SENTINEL_not_a_real_token"
        assert req["body"] == {"inputs": [TEXTS[0]], "normalize": True}
        assert up.requests[1]["body"]["inputs"] == TEXTS[1:]  # the first was cached
        got = vecs(r)
        assert cos(got[0], got[1]) == pytest.approx(0.7553, abs=0.002)
    finally:
        up.close()


def test_token_level_output_is_refused_clearly(monkeypatch, tmp_path, serve):
    up = FakeHuggingFace("3d")
    try:
        hf_env(monkeypatch, up.url, tmp_path)
        r = serve().embed({"input": TEXTS[:2]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "unsupported_model_output" and "token-level" in err["message"]
        assert up.calls == 1  # not retried
    finally:
        up.close()


def test_local_and_huggingface_share_one_vector_space_and_one_cache(monkeypatch, tmp_path, serve, fake_hf):
    from lib import app

    # fill the cache with the local model, as in development
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "local")
    monkeypatch.setenv("EMBEDDINGS_CACHE", "sqlite")
    monkeypatch.setenv("EMBEDDINGS_SQLITE_PATH", str(tmp_path / "cache.sqlite3"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app.reset()
    server = serve()
    local = vecs(server.embed({"input": TEXTS, "encoding_format": "base64"}))

    # production: same model through Hugging Face, same cache file
    hf_env(monkeypatch, fake_hf.url, tmp_path)
    r = server.embed({"input": TEXTS + ["The new movie is awesome"], "encoding_format": "base64"})
    assert r.headers["x-cache-hits"] == "3" and fake_hf.requests[0]["body"]["inputs"] == ["The new movie is awesome"]
    remote = vecs(r)
    for a, b in zip(local, remote):
        assert a.tobytes() == b.tobytes()  # served from the shared cache

    # and on fresh texts the two providers agree
    hf_env(monkeypatch, fake_hf.url, tmp_path, EMBEDDINGS_CACHE="none")
    fresh = vecs(server.embed({"input": TEXTS, "encoding_format": "base64"}))
    for a, b in zip(local, fresh):
        assert cos(a, b) > 0.999


def test_batches_follow_hf_batch_size(monkeypatch, tmp_path, serve, fake_hf):
    hf_env(monkeypatch, fake_hf.url, tmp_path, HF_BATCH_SIZE="2")
    texts = [f"sentence number {i}" for i in range(5)]
    r = serve().embed({"input": texts, "encoding_format": "base64"})
    assert r.status_code == 200
    assert sorted(len(q["body"]["inputs"]) for q in fake_hf.requests) == [1, 2, 2]
    assert sorted(fake_hf.sent_inputs()) == sorted(texts)
    expected = FakeHuggingFace.model().encode(texts)
    for e, g in zip(expected, vecs(r)):
        assert cos(e, g) > 0.9999


def test_configured_models_learn_their_size(monkeypatch, tmp_path, serve, fake_hf):
    hf_env(monkeypatch, fake_hf.url, tmp_path, HF_MODELS="acme/mini-clone")
    server = serve()
    r = server.embed({"input": ["x", "y"], "model": "acme/mini-clone", "encoding_format": "base64"})
    assert r.status_code == 200 and len(vecs(r)[0]) == 384
    again = server.embed({"input": "x", "model": "acme/mini-clone"})
    assert again.headers["x-cache-hits"] == "1"
    from lib import app

    app.reset()  # a cold instance that has not learned the size yet still finds what was paid for
    cold = server.embed({"input": ["x", "y"], "model": "acme/mini-clone"})
    assert cold.headers["x-cache-hits"] == "2" and fake_hf.calls == 1
    assert fake_hf.requests[0]["path"] == "/models/acme/mini-clone/pipeline/feature-extraction"
