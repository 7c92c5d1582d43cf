"""Hostile input, concurrency, faults: the endpoint lets in only its callers and keeps its cache whole."""

from __future__ import annotations

import base64
import hmac
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lib.cache.base import Entry
from lib.cache.sqlite import SQLiteCache
from tests.conftest import ROOT, openai_env
from tests.upstreams import Scripted


def b64vec(item: dict) -> bytes:
    return base64.b64decode(item["embedding"])


# -- access ----------------------------------------------------------------------------------------


def test_key_comparison_does_not_depend_on_the_offered_key(monkeypatch, fake_openai, tmp_path, serve):
    """Constant time: every comparison is of two SHA-256 digests with hmac.compare_digest, whatever was sent."""
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_API_KEYS="key-SENTINEL-one,key-SENTINEL-two")
    server = serve()
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for offered in ("k", "key-SENTINEL-on", "key-SENTINEL-one", "x" * 500):
        seen.clear()
        server.client.post("/v1/embeddings", json={"input": "x"}, headers={"authorization": f"Bearer {offered}"})
        assert seen == [(32, 32), (32, 32)]  # both configured keys, always, fixed-size inputs


def test_cors_is_off_by_default(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    server = serve()
    r = server.client.post("/v1/embeddings", json={"input": "x"}, headers={"origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = server.client.options("/v1/embeddings", headers={"origin": "https://evil.example",
                                                            "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_allow_list(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_CORS_ORIGINS="https://app.example")
    server = serve()
    ok = server.client.options("/v1/embeddings", headers={"origin": "https://app.example",
                                                           "access-control-request-method": "POST"})
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"]
    r = server.client.post("/v1/embeddings", json={"input": "x"}, headers={"origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-cache-hits" in r.headers["access-control-expose-headers"]
    other = server.client.post("/v1/embeddings", json={"input": "x"}, headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udc00"])
def test_lone_surrogates_are_a_400(monkeypatch, fake_openai, tmp_path, serve, escape):
    """Text that is not valid Unicode can be neither hashed as UTF-8 nor sent on: the JSON parser refuses it."""
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    r = serve().client.post("/v1/embeddings", content=b'{"input": ["ok", "bad ' + escape + b' text"]}',
                            headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "json" in r.json()["error"]["message"].lower()
    assert fake_openai.calls == 0


def test_a_provider_over_tls_must_show_a_trusted_certificate(monkeypatch, tmp_path, serve):
    """Provider calls over https verify the upstream's certificate against the system's CAs: a self-signed
    upstream (what a man in the middle would present) is never sent a request, let alone the provider key,
    and the caller gets a 502. Only an http:// upstream skips loading the CAs, and it never speaks TLS."""
    import ssl

    from tests.upstreams import FakeOpenAI

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    upstream = FakeOpenAI()
    upstream.server.socket = tls.wrap_socket(upstream.server.socket, server_side=True)
    upstream.server.handle_error = lambda *a: None  # the refused handshakes: expected here
    try:
        port = upstream.server.server_address[1]
        openai_env(monkeypatch, f"https://127.0.0.1:{port}/v1", tmp_path, EMBEDDINGS_TIMEOUT_S="2")
        r = serve().embed({"input": "over tls"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "provider_unreachable", r.text[:300]
        assert upstream.calls == 0
    finally:
        upstream.close()


# -- the published schema, and fuzzing against it ------------------------------------------------------


def test_openapi_document_is_current_and_served(monkeypatch, fake_openai, tmp_path, serve):
    from lib.openapi import PATH, render

    assert PATH.read_text() == render(), "lib/openapi.json is stale: run python -m lib.openapi > lib/openapi.json"
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    doc = serve().client.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and "/v1/embeddings" in doc["paths"]


def test_schemathesis_finds_no_5xx_and_no_schema_violation(monkeypatch, fake_openai, tmp_path, serve):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    from lib.openapi import document

    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_API_KEYS="fuzz-SENTINEL-key",
               EMBEDDINGS_MAX_BODY_BYTES="200000")
    server = serve()
    schema = schemathesis.openapi.from_dict(document())
    auth = {"Authorization": "Bearer fuzz-SENTINEL-key"}
    checked = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def run(case):
            # Valid-by-schema input may still be refused by a limit (empty strings, too long): not a check here.
            response = case.call_and_validate(base_url=server.url, headers=auth,
                                              excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500
            assert "SENTINEL" not in response.text
            checked.append(response.status_code)

        run()
    assert 200 in checked and any(400 <= s < 500 for s in checked)


# -- concurrency -------------------------------------------------------------------------------------------


def test_single_flight_one_provider_call_for_concurrent_misses(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    server = serve()
    answer = fake_openai.answer("/embeddings", {"model": "text-embedding-3-small", "input": ["hot text"],
                                                "encoding_format": "base64"})
    fake_openai.script = [Scripted(200, answer, delay=0.5)]  # slow, so all eight requests overlap
    results = []

    def call():
        results.append(server.embed({"input": ["hot text"], "encoding_format": "base64"}))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_openai.calls == 1
    assert all(r.status_code == 200 for r in results)
    expected = fake_openai.expected("text-embedding-3-small", "hot text").tobytes()
    assert all(b64vec(r.json()["data"][0]) == expected for r in results)


def test_load_mixed_hits_and_misses_no_error_no_wrong_vector(monkeypatch, fake_openai, tmp_path, serve):
    """Bounded: 16 threads x 25 requests on loopback, each request a mix of repeated and fresh texts."""
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    server = serve()
    pool = [f"shared text {i}" for i in range(60)]
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        import httpx

        client = httpx.Client(base_url=server.url, timeout=60)
        rng = random.Random(w)  # not numpy's: its lazy `np.random` import is not safe to race from threads
        for r in range(25):
            texts = [rng.choice(pool) for _ in range(6)] + [f"fresh {w}-{r}-{j}" for j in range(2)]
            t = time.perf_counter()
            resp = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
            if resp.status_code != 200:
                errors.append(f"{resp.status_code} {resp.text[:200]}")
                continue
            for text, item in zip(texts, resp.json()["data"]):
                if b64vec(item) != fake_openai.expected("text-embedding-3-small", text).tobytes():
                    errors.append(f"wrong vector for {text!r}")

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert errors == []
    assert len(latencies) == 400
    # every distinct text was paid for exactly once
    sent = fake_openai.sent_inputs()
    assert len(sent) == len(set(sent)) == len(pool) + 16 * 25 * 2
    lat = sorted(latencies)
    print(f"\nload: {len(lat) / elapsed:.0f} req/s, p50 {lat[len(lat) // 2] * 1000:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms")


def test_sqlite_concurrent_writers_and_readers(tmp_path):
    cache = SQLiteCache(str(tmp_path / "c.sqlite3"))
    entries = [Entry(f"{i:064x}", "m", 256, np.full(256, i, dtype="<f4").tobytes()) for i in range(200)]
    bad: list[str] = []

    def writer(offset: int) -> None:
        for i in range(0, 200, 20):
            cache.put_many(entries[(i + offset) % 200:][:20])

    def reader() -> None:
        for _ in range(50):
            for key, vec in cache.get_many([e.key for e in entries]).items():
                if vec != entries[int(key, 16)].vector:
                    bad.append(key)

    threads = [threading.Thread(target=writer, args=(o,)) for o in (0, 40, 80, 120)] + \
              [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
    with sqlite3.connect(tmp_path / "c.sqlite3") as db:
        assert db.execute("select count(*), count(distinct key) from embedding_cache").fetchone() == (200, 200)


_FIRST_LAYOUT = """CREATE TABLE embedding_cache (key TEXT PRIMARY KEY, model TEXT NOT NULL, dimensions INTEGER NOT NULL,
    vector BLOB NOT NULL CHECK (length(vector) = 4 * dimensions), created_at REAL NOT NULL) WITHOUT ROWID"""


def test_sqlite_rows_of_a_vector_take_about_their_size_on_disk(tmp_path):
    """1 KB vectors (256 dims) fit on the table's own pages: the file is not several times the vectors."""
    path = tmp_path / "c.sqlite3"
    cache = SQLiteCache(str(path))
    cache.put_many([Entry(f"{i:064x}", "m", 256, np.full(256, i, dtype="<f4").tobytes()) for i in range(5000)])
    with sqlite3.connect(path) as db:
        db.execute("pragma wal_checkpoint(TRUNCATE)")
    assert path.stat().st_size < 1.6 * 5000 * 1024


def test_sqlite_file_of_the_first_layout_is_migrated_whole(tmp_path):
    """A cache file written by an earlier version (WITHOUT ROWID, before last use was tracked) is rewritten once on
    open: every row, vector and date kept, and it takes new rows as before."""
    path = tmp_path / "old.sqlite3"
    vectors = {f"{i:064x}": np.full(256, i, dtype="<f4").tobytes() for i in range(300)}
    with sqlite3.connect(path) as db:
        db.execute("pragma journal_mode=wal")
        db.execute(_FIRST_LAYOUT)
        db.executemany("insert into embedding_cache values (?, 'm', 256, ?, 1000.0)", vectors.items())
    cache = SQLiteCache(str(path))
    assert cache.get_many(list(vectors)) == vectors
    cache.put_many([Entry(f"{300:064x}", "m", 256, np.full(256, 300, dtype="<f4").tobytes())])
    with sqlite3.connect(path) as db:
        (sql,) = db.execute("select sql from sqlite_master where name = 'embedding_cache'").fetchone()
        assert "WITHOUT ROWID" not in sql.upper()
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        assert db.execute("select count(*), min(created_at) from embedding_cache").fetchone() == (301, 1000.0)
    assert [s.rows for s in SQLiteCache(str(path)).stats()] == [301]  # a second open finds nothing to do


# -- faults ----------------------------------------------------------------------------------------------

_WRITER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from lib.cache.base import Entry
from lib.cache.sqlite import SQLiteCache
cache = SQLiteCache(sys.argv[1])
i = 0
while True:
    batch = [Entry(f"{i + j:064x}", "m", 512, np.full(512, i + j, dtype="<f4").tobytes()) for j in range(50)]
    cache.put_many(batch)
    i += 50
    print(i, flush=True)
"""


def test_sqlite_survives_sigkill_mid_write(tmp_path):
    path = tmp_path / "killed.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    written = 0
    while written < 3000:
        written = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = SQLiteCache(str(path))  # opens
    with sqlite3.connect(path) as db:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        keys = [k for (k,) in db.execute("select key from embedding_cache")]
    assert len(keys) >= 3000 and len(keys) % 50 == 0  # whole batches only
    for key, vec in cache.get_many(keys).items():
        assert vec == np.full(512, int(key, 16), dtype="<f4").tobytes()


def test_stalled_provider_leaves_no_thread_or_connection_behind(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_TIMEOUT_S="1")
    server = serve()
    server.embed({"input": "warm the pools"})
    before_threads = threading.active_count()
    before_sockets = open_sockets()
    fake_openai.script = [Scripted(200, None, delay=3)] * 10
    for i in range(3):
        r = server.embed({"input": [f"stall {i}", f"stall {i} b"]})
        assert r.status_code == 504
    time.sleep(3.5)  # the stalled upstream handlers finish their sleep
    assert threading.active_count() <= before_threads + 1
    assert open_sockets() <= before_sockets + 2  # timed-out connections are closed, not kept


def open_sockets() -> int:
    fds = os.listdir("/proc/self/fd")
    count = 0
    for fd in fds:
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def test_stalled_cache_does_not_hold_the_request_hostage(monkeypatch, fake_openai, tmp_path, serve):
    """A Supabase that accepts connections and never answers: the request is served from the provider."""
    import socket as socketlib

    from tests.conftest import supabase_env

    silent = socketlib.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (in the kernel), never reads, never answers
    try:
        supabase_env(monkeypatch, fake_openai.url, f"http://127.0.0.1:{silent.getsockname()[1]}",
                     SUPABASE_TIMEOUT_S="0.5", EMBEDDINGS_TIMEOUT_S="5")
        server = serve()
        server.embed({"input": ["warm the keep-alive connections"]})
        before_threads = threading.active_count()
        start = time.monotonic()
        r = server.embed({"input": ["stuck cache"], "encoding_format": "base64"})
        elapsed = time.monotonic() - start
        assert r.status_code == 200 and r.headers["x-cache-error"] == "supabase"
        assert b64vec(r.json()["data"][0]) == fake_openai.expected("text-embedding-3-small", "stuck cache").tobytes()
        assert elapsed < 4  # the read gives up after its short timeout and one retry; the write is skipped
        assert threading.active_count() <= before_threads + 1
        # the next requests of the outage do not wait on the cache again
        start = time.monotonic()
        again = server.embed({"input": ["stuck cache", "another"]})
        assert again.status_code == 200 and again.headers["x-cache-error"] == "supabase"
        assert time.monotonic() - start < 0.5
    finally:
        silent.close()
