"""Failure semantics for every provider: retry what can succeed, stop in time, lose nothing paid for."""

from __future__ import annotations

import base64
import sqlite3
import time

import numpy as np
import pytest

from lib.keys import cache_key
from tests.conftest import hf_env, openai_env
from tests.upstreams import Scripted


def cached_keys(tmp_path) -> set[str]:
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
        return {k for (k,) in db.execute("select key from embedding_cache")}


def openai_error(status: int, code: str, message: str = "upstream says no") -> dict:
    return {"error": {"message": message, "type": "x", "param": None, "code": code}}


@pytest.fixture
def oa(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_TIMEOUT_S="4")
    return serve()


@pytest.fixture
def hf(monkeypatch, fake_hf, tmp_path, serve):
    hf_env(monkeypatch, fake_hf.url, tmp_path, EMBEDDINGS_TIMEOUT_S="4")
    return serve()


def test_hf_503_loading_waits_estimated_time_then_succeeds(hf, fake_hf, tmp_path):
    fake_hf.script = [Scripted(503, {"error": "Model x is currently loading", "estimated_time": 0.4})]
    start = time.monotonic()
    r = hf.embed({"input": "wake up"})
    assert r.status_code == 200 and fake_hf.calls == 2
    assert fake_hf.requests[1]["at"] - fake_hf.requests[0]["at"] >= 0.39
    assert time.monotonic() - start < 4


def test_hf_loading_longer_than_the_deadline_is_a_clear_503_now(hf, fake_hf):
    fake_hf.script = [Scripted(503, {"error": "Model x is currently loading", "estimated_time": 60})]
    start = time.monotonic()
    r = hf.embed({"input": "wake up"})
    assert r.status_code == 503 and fake_hf.calls == 1
    assert r.json()["error"]["code"] == "model_loading" and int(r.headers["retry-after"]) == 60
    assert time.monotonic() - start < 1


def test_openai_429_honours_retry_after(oa, fake_openai):
    fake_openai.script = [Scripted(429, openai_error(429, "rate_limit_exceeded"), {"retry-after-ms": "300"})]
    r = oa.embed({"input": "patience"})
    assert r.status_code == 200 and fake_openai.calls == 2
    assert fake_openai.requests[1]["at"] - fake_openai.requests[0]["at"] >= 0.29


def test_openai_429_past_the_deadline_passes_retry_after_on(oa, fake_openai):
    fake_openai.script = [Scripted(429, openai_error(429, "rate_limit_exceeded"), {"retry-after": "30"})]
    r = oa.embed({"input": "patience"})
    assert r.status_code == 429 and r.headers["retry-after"] == "30" and fake_openai.calls == 1


def test_insufficient_quota_is_not_retried(oa, fake_openai, tmp_path):
    fake_openai.script = [Scripted(429, openai_error(429, "insufficient_quota", "You exceeded your quota"))]
    r = oa.embed({"input": "broke"})
    assert r.status_code == 502 and fake_openai.calls == 1
    assert r.json()["error"]["code"] == "provider_insufficient_quota"
    assert cached_keys(tmp_path) == set()


@pytest.mark.parametrize("status,ours,code", [(400, 400, None), (401, 502, "provider_auth"),
                                               (403, 502, "provider_auth"), (404, 502, "provider_model_not_found"),
                                               (422, 400, None)])
def test_client_errors_are_never_retried(oa, fake_openai, status, ours, code):
    fake_openai.script = [Scripted(status, openai_error(status, "some_code",
                                                        "Incorrect API key provided: sk-test-***-key"))]
    r = oa.embed({"input": "nope"})
    assert r.status_code == ours and fake_openai.calls == 1
    if code:
        assert r.json()["error"]["code"] == code
        assert "server's key" in r.json()["error"]["message"] or "model" in r.json()["error"]["message"]
    assert "sk-test" not in r.text


def test_500_three_times_then_success(oa, fake_openai, tmp_path):
    fake_openai.script = [Scripted(500, openai_error(500, "server_error"))] * 3
    r = oa.embed({"input": "eventually", "encoding_format": "base64"})
    assert r.status_code == 200 and fake_openai.calls == 4
    assert cached_keys(tmp_path) == {cache_key("text-embedding-3-small", None, "eventually")}


def test_persistent_500_gives_up_in_time(oa, fake_openai, tmp_path):
    fake_openai.script = [Scripted(500, openai_error(500, "server_error"))] * 10
    start = time.monotonic()
    r = oa.embed({"input": "never"})
    assert r.status_code in (502, 504) and 2 <= fake_openai.calls <= 4
    assert time.monotonic() - start < 4.5
    assert cached_keys(tmp_path) == set()


def test_slow_answer_past_the_deadline_is_a_504(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_TIMEOUT_S="1.5")
    fake_openai.script = [Scripted(200, None, delay=5)] * 3
    start = time.monotonic()
    r = serve().embed({"input": "slow"})
    elapsed = time.monotonic() - start
    assert r.status_code == 504, r.text
    assert "1.5 s deadline" in r.json()["error"]["message"] or "did not" in r.json()["error"]["message"]
    assert elapsed < 2.5
    assert cached_keys(tmp_path) == set()


@pytest.mark.parametrize("raw", [b"{not json", b'{"object": "list"}', b"[]"])
def test_malformed_openai_answers_are_errors_never_cached(oa, fake_openai, tmp_path, raw):
    fake_openai.script = [Scripted(200, raw=raw)]
    r = oa.embed({"input": "garbled"})
    assert r.status_code == 502, r.text
    assert cached_keys(tmp_path) == set()


def test_vector_of_the_wrong_length_is_an_error_never_cached(oa, fake_openai, tmp_path):
    short = base64.b64encode(np.ones(10, dtype="<f4").tobytes()).decode()
    fake_openai.script = [Scripted(200, {"object": "list", "model": "text-embedding-3-small",
                                         "data": [{"object": "embedding", "index": 0, "embedding": short}],
                                         "usage": {"prompt_tokens": 1, "total_tokens": 1}})]
    r = oa.embed({"input": "short"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "provider_malformed"
    assert cached_keys(tmp_path) == set()


def test_wrong_count_and_nan_from_hf_are_errors(hf, fake_hf, tmp_path):
    fake_hf.script = [Scripted(200, [[0.1] * 384])]
    r = hf.embed({"input": ["one", "two"]})
    assert r.status_code == 502 and "2 inputs" in r.json()["error"]["message"]
    fake_hf.script = [Scripted(200, raw=b"[[NaN" + b", 0.1" * 383 + b"]]")]
    r = hf.embed({"input": ["one"]})
    assert r.status_code == 502
    fake_hf.script = [Scripted(200, raw=b"<html>oops</html>")]
    assert hf.embed({"input": ["one"]}).status_code == 502
    assert cached_keys(tmp_path) == set()


def test_batches_that_succeeded_are_cached_before_the_error(monkeypatch, fake_hf, tmp_path, serve):
    hf_env(monkeypatch, fake_hf.url, tmp_path, HF_BATCH_SIZE="2")
    fake_hf.script = [Scripted(400, {"error": "input too long"})]  # whichever batch arrives first fails
    texts = [f"text {i}" for i in range(6)]
    server = serve()
    r = server.embed({"input": texts})
    assert r.status_code == 400
    assert fake_hf.calls == 3
    assert len(cached_keys(tmp_path)) == 4  # the two batches that were paid for
    r2 = server.embed({"input": texts})
    assert r2.status_code == 200 and r2.headers["x-cache-hits"] == "4"
    assert fake_hf.calls == 4 and len(fake_hf.requests[-1]["body"]["inputs"]) == 2
