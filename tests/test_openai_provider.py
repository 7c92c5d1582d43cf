"""The cache in front of the `openai` provider, against a loopback OpenAI that counts calls."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

from tests.conftest import openai_env


def vec(item: dict) -> np.ndarray:
    emb = item["embedding"]
    if isinstance(emb, str):
        return np.frombuffer(base64.b64decode(emb), dtype="<f4")
    return np.array(emb, dtype=np.float32)


@pytest.fixture
def server(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    return serve()


def test_duplicates_in_a_batch_are_sent_once_and_answered_in_order(server, fake_openai):
    texts = ["apple", "banana", "apple", "cherry", "banana", "apple"]
    r = server.embed({"input": texts, "model": "text-embedding-3-small", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert fake_openai.calls == 1
    assert sorted(fake_openai.sent_inputs()) == ["apple", "banana", "cherry"]
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(6))
    for text, d in zip(texts, data):
        # bit-identical to what the provider computed for *this* text
        assert vec(d).tobytes() == fake_openai.expected("text-embedding-3-small", text).tobytes()
    assert r.headers["x-cache-misses"] == "3" and r.headers["x-cache-hits"] == "0"
    assert r.json()["usage"]["prompt_tokens"] == 3


def test_a_repeat_sends_nothing_and_reports_zero_usage(server, fake_openai):
    body = {"input": ["one", "two"], "encoding_format": "float"}
    first = server.embed(body).json()
    second = server.embed(body)
    assert fake_openai.calls == 1
    assert second.headers["x-cache-hits"] == "2" and second.headers["x-cache-misses"] == "0"
    assert second.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert second.json()["data"] == first["data"]


def test_partial_hit_sends_only_the_misses_and_keeps_order(server, fake_openai):
    server.embed({"input": ["b", "d"]})
    r = server.embed({"input": ["a", "b", "c", "d", "e"], "encoding_format": "base64"})
    assert fake_openai.calls == 2
    assert fake_openai.requests[1]["body"]["input"] == ["a", "c", "e"]
    assert r.headers["x-cache-hits"] == "2" and r.headers["x-cache-misses"] == "3"
    for text, d in zip("abcde", r.json()["data"]):
        assert vec(d).tobytes() == fake_openai.expected("text-embedding-3-small", text).tobytes()


@pytest.mark.parametrize("dims,count", [(1, 3), (2, 1), (5, 1500), (1536, 1), (1536, 15)])
def test_base64_answers_of_any_size_are_the_cached_bytes_with_an_exact_length(server, fake_openai, dims, count):
    """A base64 answer is encoded and sent a few items at a time behind a Content-Length worked out in advance.
    With or without base64's padding (4 and 8 bytes a vector), in one write or several (the last one partial),
    the length is exact, the keep-alive connection stays in step, and each item is its vector's bytes."""
    texts = [f"sized {dims} {i}" for i in range(count)]
    body = {"input": texts, "encoding_format": "base64", **({"dimensions": dims} if dims < 1536 else {})}
    r = server.embed(body)
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content)
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(count))
    for text, d in zip(texts, data):
        expected = fake_openai.expected("text-embedding-3-small", text, dims if dims < 1536 else None)
        assert base64.b64decode(d["embedding"]) == expected.tobytes()
    again = server.embed(body)  # on the same connection: the first answer's length left it in step
    assert again.headers["x-cache-hits"] == str(count) and again.json()["data"] == data


def test_float_and_base64_callers_share_entries_and_agree_exactly(server, fake_openai):
    f = server.embed({"input": "shared", "encoding_format": "float"}).json()["data"][0]
    b = server.embed({"input": "shared", "encoding_format": "base64"}).json()["data"][0]
    assert fake_openai.calls == 1
    assert vec(f).tobytes() == vec(b).tobytes() == fake_openai.expected("text-embedding-3-small", "shared").tobytes()


def sig_digits(number: str) -> int:
    mantissa = number.lstrip("-").lower().split("e")[0].replace(".", "")
    return len(mantissa.lstrip("0").rstrip("0")) or 1


def test_float_answer_uses_shortest_float32_digits(server, fake_openai):
    text = server.embed({"input": "digits", "encoding_format": "float"}).text
    numbers = text.split('"embedding":[')[1].split("]")[0].split(",")
    expected = fake_openai.expected("text-embedding-3-small", "digits")
    assert np.array([float(n) for n in numbers], dtype=np.float32).tobytes() == expected.tobytes()
    # as short as numpy's shortest float32 form, never 17-digit float64 noise
    assert [sig_digits(n) for n in numbers] == [sig_digits(str(x)) for x in expected]


def test_a_float_answer_too_large_to_hold_as_text_is_the_same_answer(server, fake_openai):
    """Past 4 MiB of vectors the float answer is made as it is sent (its length learnt in a first pass): the
    same bytes a small answer would have, the right Content-Length, and the same digits and order."""
    texts = [f"large float answer {i}" for i in range(800)]  # 800 x 6 KB of vectors: past the 4 MiB mark
    big = server.embed({"input": texts, "encoding_format": "float"})
    assert big.status_code == 200 and int(big.headers["content-length"]) == len(big.content)
    data = big.json()["data"]
    assert [d["index"] for d in data] == list(range(800))
    assert all(vec(d).tobytes() == fake_openai.expected("text-embedding-3-small", t).tobytes()
               for d, t in zip(data, texts))
    # Byte for byte what the same items say in small answers (all hits now).
    small = [server.embed({"input": texts[i:i + 100], "encoding_format": "float"}).json() for i in range(0, 800, 100)]
    assert json.dumps(data) == json.dumps([dict(d, index=d["index"] + 100 * n) for n, a in enumerate(small)
                                           for d in a["data"]])
    assert big.text.count('"embedding":[') == 800 and big.text.endswith('"total_tokens":3200}}')


def test_keys_differ_across_model_and_dimensions(server, fake_openai):
    server.embed({"input": "same text", "model": "text-embedding-3-small"})
    server.embed({"input": "same text", "model": "text-embedding-3-large"})
    r256 = server.embed({"input": "same text", "model": "text-embedding-3-small", "dimensions": 256})
    server.embed({"input": "same text", "model": "text-embedding-ada-002"})
    assert fake_openai.calls == 4
    assert len(vec(r256.json()["data"][0])) == 256
    assert fake_openai.requests[2]["body"]["dimensions"] == 256
    # asking for the native size is the same vector: served from the cache
    native = server.embed({"input": "same text", "model": "text-embedding-3-small", "dimensions": 1536})
    assert fake_openai.calls == 4 and native.headers["x-cache-hits"] == "1"


def test_token_id_inputs_are_forwarded_and_cached_apart_from_text(server, fake_openai):
    r = server.embed({"input": [[1, 2, 3], [4, 5]], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert fake_openai.requests[0]["body"]["input"] == [[1, 2, 3], [4, 5]]
    one = server.embed({"input": [1, 2, 3], "encoding_format": "base64"})
    assert one.headers["x-cache-hits"] == "1" and fake_openai.calls == 1
    assert vec(one.json()["data"][0]).tobytes() == fake_openai.expected("text-embedding-3-small", [1, 2, 3]).tobytes()


def test_cache_survives_a_restart(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    serve().embed({"input": ["persist me"]})
    from lib import app

    app.reset()  # a new process: new memory tier, same SQLite file
    r = serve().embed({"input": ["persist me"]})
    assert r.headers["x-cache-hits"] == "1" and fake_openai.calls == 1


def test_broken_cache_still_serves_from_the_provider(monkeypatch, fake_openai, tmp_path, serve, caplog):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_MEMORY_CACHE_MB="1")
    server = serve()
    assert server.embed({"input": "warm"}).status_code == 200
    from lib import app

    # Close this process's connections first: closing the last one checkpoints its WAL into the file, which
    # would otherwise rewrite a valid database over the garbage whenever the garbage collector got to it.
    app.get_app().tiers[-1].close()
    (tmp_path / "cache.sqlite3").write_bytes(b"this is not a database" * 1000)
    for name in ("cache.sqlite3-wal", "cache.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    app.reset()
    r = server.embed({"input": ["fresh", "warm"], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-cache-error") == "sqlite"
    assert vec(r.json()["data"][0]).tobytes() == fake_openai.expected("text-embedding-3-small", "fresh").tobytes()
    assert any("cache sqlite" in m for m in caplog.messages)


def test_a_row_of_the_wrong_length_is_ignored_and_replaced(monkeypatch, fake_openai, tmp_path, serve):
    import sqlite3

    from lib.keys import cache_key

    openai_env(monkeypatch, fake_openai.url, tmp_path)
    server = serve()
    server.embed({"input": "victim"})
    key = cache_key("text-embedding-3-small", None, "victim")
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
        db.execute("UPDATE embedding_cache SET vector = ?, dimensions = 3 WHERE key = ?",
                   (np.ones(3, dtype="<f4").tobytes(), key))
    from lib import app

    app.reset()
    r = server.embed({"input": "victim", "encoding_format": "base64"})
    assert r.headers["x-cache-misses"] == "1" and fake_openai.calls == 2
    assert vec(r.json()["data"][0]).tobytes() == fake_openai.expected("text-embedding-3-small", "victim").tobytes()
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
        (length,) = db.execute("SELECT length(vector) FROM embedding_cache WHERE key = ?", (key,)).fetchone()
    assert length == 4 * 1536


def test_what_goes_upstream_is_openais_request(monkeypatch, fake_openai, tmp_path, serve):
    """The key as a bearer token, organization and project headers when configured, base64 asked for, and the
    body OpenAI documents (the provider speaks the wire format itself, not through the SDK)."""
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-test")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj_test")
    r = serve().embed({"input": ["pear"], "model": "text-embedding-3-small", "dimensions": 256})
    assert r.status_code == 200, r.text
    sent = fake_openai.requests[-1]
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert sent["path"] == "/embeddings"
    assert headers["authorization"] == f"Bearer {os.environ['OPENAI_API_KEY']}"
    assert headers["openai-organization"] == "org-test" and headers["openai-project"] == "proj_test"
    assert headers["content-type"] == "application/json"
    assert sent["body"] == {"input": ["pear"], "model": "text-embedding-3-small", "encoding_format": "base64",
                            "dimensions": 256}


@pytest.mark.parametrize("limit,expected", [(2, 2), (0, 6)])
def test_max_provider_calls_bounds_the_requests_in_flight_across_threads(fake_openai, limit, expected):
    """EMBEDDINGS_MAX_PROVIDER_CALLS (the corpus command's --concurrency): six threads miss at once; no more
    than the limit of requests reach the provider together, and every thread gets its own vector."""
    import threading

    from lib.deadline import Deadline
    from lib.models import Registry
    from lib.providers.openai import OpenAIProvider
    from tests.upstreams import Scripted

    fake_openai.script = [Scripted(200, latency=0.3)] * 6
    provider = OpenAIProvider("sk-test-SENTINEL-not-a-real-key", fake_openai.url, max_calls=limit)
    model = Registry("openai").get("text-embedding-3-small")
    barrier = threading.Barrier(6)
    got: dict[int, bytes] = {}

    def call(n: int) -> None:
        barrier.wait()
        got[n] = provider.embed([f"in flight {n}"], model, None, Deadline(10)).vectors[0]

    threads = [threading.Thread(target=call, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {n: fake_openai.expected("text-embedding-3-small", f"in flight {n}").tobytes() for n in range(6)}
    arrivals = [r["at"] for r in fake_openai.requests]
    assert max(sum(a <= t < a + 0.3 for a in arrivals) for t in arrivals) == expected  # each lasts 0.3 s at least


def _chunks_one_by_one(items, max_items, max_tokens):
    """The rule, input by input: a chunk closes when the next input would pass either limit."""
    from lib.providers.base import estimate_tokens

    chunks, current, tokens = [], [], 0
    for i, item in enumerate(items):
        cost = estimate_tokens(item)
        if current and (len(current) >= max_items or tokens + cost > max_tokens):
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += cost
    return chunks + ([current] if current else [])


def test_requests_are_split_by_the_input_and_token_limits():
    """Every input in one request when the limits allow, in order, else split exactly where the rule says (the
    one-chunk shortcut bounds tokens by 2 per character, never under the estimate)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lib.providers.base import chunk_by_limits

    item = st.one_of(st.text(max_size=40), st.lists(st.integers(0, 50_000), max_size=40))

    @settings(max_examples=400, deadline=None)
    @given(st.lists(item, max_size=30), st.integers(1, 12), st.integers(1, 200))
    def check(items, max_items, max_tokens):
        assert chunk_by_limits(items, max_items, max_tokens) == _chunks_one_by_one(items, max_items, max_tokens)

    check()
