"""Hardening, round two: a hostile upstream, a hostile client, and a cache that never holds a wrong vector.

Each test reproduces one finding of the adversarial review (issue 9) with a scripted loopback upstream,
raw sockets, or a second process holding the SQLite lock, and checks what a caller would see: the
status and shape of the answer, the time taken against the deadline, and what is cached afterwards.
Every answer is also checked for the sentinel secret by the `serve` fixture's client.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import hf_env, openai_env
from tests.upstreams import Scripted

KEY = "sk-test-SENTINEL-not-a-real-key"  # what openai_env configures as the provider key
OUR_CODES = {"invalid_input", "context_length_exceeded", "provider_error", "provider_malformed", "provider_timeout"}


def cached(tmp_path) -> dict[str, bytes]:
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
        return dict(db.execute("select key, vector from embedding_cache"))


def b64(item: dict) -> bytes:
    return base64.b64decode(item["embedding"])


@pytest.fixture
def oa(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_TIMEOUT_S="3")
    return serve()


# -- 1, 8: nothing of the upstream's text reaches the caller unchecked -----------------------------


@pytest.mark.parametrize("code", [f"Bearer {KEY}", {"nested": KEY}, ["x"], 7, "context_length_exceeded"])
def test_upstream_error_code_param_and_type_are_ours(oa, fake_openai, code):
    fake_openai.script = [Scripted(400, {"error": {"message": "no", "type": f"Bearer {KEY}", "param": KEY,
                                                   "code": code}})]
    r = oa.embed({"input": "x"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["code"], str) and err["code"] in OUR_CODES
    assert err["code"] == (code if code == "context_length_exceeded" else "invalid_input")
    assert err["type"] == "invalid_request_error" and err["param"] is None


def test_upstream_400_reason_is_scrubbed_of_encoded_keys_and_bounded(oa, fake_openai):
    encoded = [base64.b64encode(KEY.encode()).decode(), KEY.encode().hex(),
               base64.urlsafe_b64encode(f"Bearer {KEY}".encode()).decode().rstrip("=")]
    message = "Invalid input. Your key was " + " and ".join(encoded) + ". " + "blah " * 500
    fake_openai.script = [Scripted(400, {"error": {"message": message, "type": "x", "param": None, "code": None}})]
    r = oa.embed({"input": "x"})
    text = r.json()["error"]["message"]
    assert r.status_code == 400 and text.startswith("The embedding provider rejected the input: Invalid input.")
    assert not any(e in r.text for e in encoded) and not any(e[:20] in r.text for e in encoded)
    assert len(text) < 400


# -- 2: one deadline for the whole attempt, however slowly the body comes ---------------------------


def test_openai_body_trickled_past_the_deadline_is_a_timely_504_then_heals(oa, fake_openai, tmp_path):
    fake_openai.script = [Scripted(200, trickle=0.5)] * 4
    start = time.monotonic()
    r = oa.embed({"input": ["slow", "body"], "encoding_format": "base64"})
    elapsed = time.monotonic() - start
    assert r.status_code == 504, r.text
    message = r.json()["error"]["message"]
    assert "timed out" in message and "connect" not in message
    assert elapsed < 4.5  # 3 s deadline, not the ~40 minutes the trickle would take
    assert cached(tmp_path) == {}
    fake_openai.script = []
    ok = oa.embed({"input": ["slow", "body"], "encoding_format": "base64"})
    assert [b64(d) for d in ok.json()["data"]] == [fake_openai.expected("text-embedding-3-small", t).tobytes()
                                                   for t in ("slow", "body")]


def test_hugging_face_body_trickled_past_the_deadline_is_a_timely_504(monkeypatch, fake_hf, tmp_path, serve):
    hf_env(monkeypatch, fake_hf.url, tmp_path, EMBEDDINGS_TIMEOUT_S="3")
    server = serve()
    fake_hf.script = [Scripted(200, trickle=0.5)] * 4
    start = time.monotonic()
    r = server.embed({"input": "slow body"})
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    assert time.monotonic() - start < 4.5
    assert cached(tmp_path) == {}


# -- 3, 7: an answer that does not add up is never cached --------------------------------------------


def _answer(indexes: list[int], texts: list[str], fake_openai, usage: str = "2") -> bytes:
    data = []
    for slot, i in enumerate(indexes):
        v = fake_openai.expected("text-embedding-3-small", texts[min(slot, len(texts) - 1)])
        data.append({"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode()})
    body = json.dumps({"object": "list", "data": data, "model": "text-embedding-3-small",
                       "usage": {"prompt_tokens": 0, "total_tokens": 0}})
    return body.replace('"prompt_tokens": 0', f'"prompt_tokens": {usage}').encode()


@pytest.mark.parametrize("indexes", [[0, 0], [1, 1], [1, 2], [0, 1, 2], [0], [0, -1]])
def test_repeated_or_missing_indexes_are_malformed_and_nothing_is_cached(oa, fake_openai, tmp_path, indexes):
    texts = ["first text", "second text"]
    fake_openai.script = [Scripted(200, raw=_answer(indexes, texts, fake_openai))]
    r = oa.embed({"input": texts})
    assert r.status_code == 502 and r.json()["error"]["code"] == "provider_malformed", r.text
    assert cached(tmp_path) == {}
    good = oa.embed({"input": texts, "encoding_format": "base64"})  # the upstream turns good
    assert [b64(d) for d in good.json()["data"]] == [fake_openai.expected("text-embedding-3-small", t).tobytes()
                                                     for t in texts]


@pytest.mark.parametrize("usage", ["1e999", "-1", "2.5", '"2"', "true"])
def test_nonsense_usage_is_malformed_not_a_500(oa, fake_openai, tmp_path, usage):
    fake_openai.script = [Scripted(200, raw=_answer([0], ["x"], fake_openai, usage=usage))]
    r = oa.embed({"input": "x"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "provider_malformed", r.text
    assert cached(tmp_path) == {}


# -- 6: retry-after is a number of seconds in a sane range -----------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "1e30", "soon"])
def test_nonsense_retry_after_is_clamped(oa, fake_openai, value):
    fake_openai.script = [Scripted(429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}},
                                   {"retry-after": value})]
    r = oa.embed({"input": f"retry {value}"})
    assert r.status_code in (200, 429), r.text
    if r.status_code == 429:  # only a wait longer than the deadline is passed on, and clamped
        assert value == "1e30" and r.headers["retry-after"] == "600"
    else:
        assert fake_openai.calls == 2


# -- 4, 9, 10, 12: the connection stays in step, or closes -------------------------------------------


def exchange(url: str, data: bytes, *, half_close: bool = False, wait: float = 1.0) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back within `wait` seconds, and whether the server closed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out, closed = b"", False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            out += chunk
        return out, closed


def answers(raw: bytes) -> list[tuple[int, dict]]:
    """(status, JSON body) of each HTTP answer in a raw byte stream."""
    found = []
    while raw.startswith(b"HTTP/1.1 "):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert headers["content-type"] == "application/json", head
        length = int(headers["content-length"])
        found.append((int(lines[0].split()[1]), json.loads(rest[:length]) if length else None))
        raw = rest[length:]
    assert raw == b"", raw[:200]
    return found


SMUGGLED = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good-SENTINEL-key\r\n"
            b"Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"input\": \"billed\"}")


@pytest.fixture
def keyed(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_API_KEYS="good-SENTINEL-key")
    return serve()


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/api/health", 200), ("GET", "/api/openapi.json", 200), ("POST", "/v1/embeddings", 401),
    ("GET", "/nope", 404), ("PUT", "/v1/embeddings", 405), ("OPTIONS", "/v1/embeddings", 204)])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_nobody_reads_is_never_run_as_a_second_request(keyed, fake_openai, method, path, status, framing):
    if framing == "content-length":
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n".encode()
        body = SMUGGLED
    else:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        body = f"{len(SMUGGLED):x}\r\n".encode() + SMUGGLED + b"\r\n0\r\n\r\n"
    raw, _ = exchange(keyed.url, head + body)
    got = answers(raw)
    assert [s for s, _ in got] == [status]
    assert fake_openai.calls == 0


@pytest.mark.parametrize("lengths", [["13", "0"], ["13", "13"], ["+13"], ["1_3"], ["0x0d"], ["١٣"], ["-1"]])
def test_content_length_is_one_header_of_plain_digits(oa, fake_openai, lengths):
    body = b'{"input":"x"}'  # 13 bytes
    head = "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "".join(f"Content-Length: {v}\r\n" for v in lengths) + "\r\n"
    raw, closed = exchange(oa.url, head.encode("utf-8") + body)
    got = answers(raw)
    assert [s for s, _ in got] == [400] and "Content-Length" in got[0][1]["error"]["message"]
    assert closed and fake_openai.calls == 0


@pytest.mark.parametrize("length", ["9" * 18, "9" * 19, "1" + "0" * 40, "9" * 5000])
def test_any_run_of_digits_too_large_is_a_413(oa, fake_openai, length):
    """18 digits or 5,000: a length past the limit is 'too large', whatever its number of digits."""
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    raw, closed = exchange(oa.url, head.encode() + b'{"input":"x"}')
    got = answers(raw)
    assert [s for s, _ in got] == [413] and got[0][1]["error"]["code"] == "request_too_large", got
    assert closed and fake_openai.calls == 0


def test_a_short_body_then_half_close_is_a_400_never_a_request(oa, fake_openai):
    body = b'{"input": "cut short here"}'
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) + 40}\r\n\r\n".encode()
    raw, closed = exchange(oa.url, head + body, half_close=True)
    got = answers(raw)
    assert [s for s, _ in got] == [400] and "ended after" in got[0][1]["error"]["message"]
    assert closed and fake_openai.calls == 0


@pytest.mark.parametrize("request_bytes,status", [
    (b"TRACE /v1/embeddings HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"BREW /api/health HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GET /api/health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /api/health HTTX/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /api/health HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
], ids=["trace", "unknown-method", "http2", "bad-version", "long-url", "long-header"])
def test_http_server_errors_are_json_in_openai_shape(oa, request_bytes, status):
    raw, closed = exchange(oa.url, request_bytes)
    got = answers(raw)
    assert [s for s, _ in got] == [status] and closed
    err = got[0][1]["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status == 405:
        assert b"\r\nallow: " in raw.lower()


# -- 11: stalled clients cannot hold the server --------------------------------------------------------


def test_stalled_clients_are_cut_off_and_connections_are_bounded(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    server = serve(read_timeout_s=1.0, max_connections=16)
    host, port = server.url.removeprefix("http://").split(":")
    before = threading.active_count()
    stalled = []
    for i in range(40):
        s = socket.create_connection((host, int(port)))
        # Half a request: headers promise a body that never comes (or the headers never end).
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{" if i % 2 else
                  b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
        stalled.append(s)
    time.sleep(0.3)
    assert threading.active_count() <= before + 16
    busy = []
    for s in stalled:
        s.settimeout(3)
        data = b""
        while True:  # every stalled connection is answered or closed within the read timeout
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        busy.append(data)
        s.close()
    refused = [answers(d)[0] for d in busy if b" 503 " in d[:20]]
    assert len(refused) >= 40 - 16 and all(body["error"]["code"] == "server_busy" for _, body in refused)
    timed_out = [answers(d)[0][0] for d in busy if d and b" 503 " not in d[:20]]
    assert set(timed_out) <= {408}
    deadline = time.monotonic() + 5  # the server's threads end as their sockets close
    while threading.active_count() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before + 1
    assert server.embed({"input": "still serving"}).status_code == 200


# -- 5, 13: SQLite waits fit the deadline, a broken file heals, no descriptor is left behind ------------


HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_sqlite_write_lock_held_elsewhere_does_not_stall_the_request(oa, fake_openai, tmp_path):
    assert oa.embed({"input": "create the file"}).status_code == 200
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "cache.sqlite3"), "8"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        r = oa.embed({"input": "while locked", "encoding_format": "base64"})
        elapsed = time.monotonic() - start
        assert r.status_code == 200 and r.headers["x-cache-error"] == "sqlite"
        assert b64(r.json()["data"][0]) == fake_openai.expected("text-embedding-3-small", "while locked").tobytes()
        assert elapsed < 2.5  # the deadline is 3 s; the cache gets a fraction of it
    finally:
        holder.kill()
        holder.wait()
    again = oa.embed({"input": "while locked"})
    assert again.status_code == 200 and "x-cache-error" not in again.headers


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_sqlite_file_damaged_under_a_running_server_heals_without_restart(oa, fake_openai, tmp_path, damage):
    path = tmp_path / "cache.sqlite3"
    texts = [f"before {i}" for i in range(20)]
    assert oa.embed({"input": texts}).status_code == 200
    if damage == "truncate":
        os.truncate(path, 0)
    else:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.remove(f"{path}{suffix}")
    start = time.monotonic()
    r = oa.embed({"input": texts + ["after"], "encoding_format": "base64"})
    assert r.status_code == 200 and time.monotonic() - start < 3
    expected = [fake_openai.expected("text-embedding-3-small", t).tobytes() for t in texts + ["after"]]
    assert [b64(d) for d in r.json()["data"]] == expected  # whatever the file lost, no wrong vector
    calls = fake_openai.calls
    hit = oa.embed({"input": texts + ["after"], "encoding_format": "base64"})
    assert hit.headers["x-cache-misses"] == "0" and "x-cache-error" not in hit.headers
    assert fake_openai.calls == calls and [b64(d) for d in hit.json()["data"]] == expected
    assert all(cached(tmp_path)[k] in expected for k in cached(tmp_path))


def test_threads_leave_no_sqlite_connection_behind(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_MEMORY_CACHE_MB="0")
    server = serve()
    url = server.url

    def client(n: int) -> None:
        import httpx

        with httpx.Client(base_url=url) as c:  # its own connection, so its own server thread
            for i in range(5):
                assert c.post("/v1/embeddings", json={"input": [f"load {n} {i}", "shared"]}).status_code == 200

    threads = [threading.Thread(target=client, args=(n,)) for n in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.3)
    db = str(tmp_path / "cache.sqlite3")
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    from lib.cache.sqlite import POOL_SIZE

    assert sum(f.startswith(db) for f in open_files) <= 3 * POOL_SIZE  # file, -wal, -shm per pooled connection


# -- 14: the local model keeps the deadline too -----------------------------------------------------------


def test_local_model_stops_at_the_deadline_and_keeps_what_it_did(monkeypatch, tmp_path, serve):
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "local")
    monkeypatch.setenv("EMBEDDINGS_SQLITE_PATH", str(tmp_path / "cache.sqlite3"))
    monkeypatch.setenv("EMBEDDINGS_TIMEOUT_S", "3")
    server = serve()
    for _ in range(3):  # the first call may time out while the model loads; it stays loaded
        if server.embed({"input": "load the model"}).status_code == 200:
            break
    long_texts = [[f"{r} {i} " + "word " * 9_990 for i in range(80)] for r in range(2)]
    results: list = [None, None]

    def call(r: int) -> None:
        start = time.monotonic()
        results[r] = (server.embed({"input": long_texts[r]}), time.monotonic() - start)

    threads = [threading.Thread(target=call, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print([(r.status_code, round(e, 2)) for r, e in results])
    for response, elapsed in results:
        assert response.status_code in (200, 504), response.text
        assert elapsed < 3 + 2.5  # at most one batch of long texts past the deadline, not 25 s
    assert any(response.status_code == 504 for response, _ in results)
    from lib.keys import cache_key
    from lib.models import MINILM

    done = [t for t in long_texts[0] + long_texts[1] if cache_key(MINILM, None, t) in cached(tmp_path)]
    assert done  # batches finished before the deadline were kept...
    r = server.embed({"input": done[:4]})
    assert r.status_code == 200 and r.headers["x-cache-misses"] == "0"  # ...and are hits now
