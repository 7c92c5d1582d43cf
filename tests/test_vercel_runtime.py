"""The functions run as Vercel runs them: `vercel-runtime` (Python 3.12) serving `api/*.py`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, assert_no_sentinel

VENV312 = Path(os.environ.get("VENV312", ROOT / ".venv312"))


class Bridge:
    def __init__(self, entry: str, env: dict[str, str]) -> None:
        python = VENV312 / "bin" / "python"
        assert python.exists(), (
            f"{python} is missing: the Vercel bridge needs Python 3.12 with vercel-runtime "
            "(`make test` creates it)")
        name = Path(entry).stem
        full = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "VERCEL"))}
        full.update(env)
        full.update({
            "__VC_HANDLER_ENTRYPOINT": entry,
            "__VC_HANDLER_ENTRYPOINT_ABS": str(ROOT / entry),
            "__VC_HANDLER_MODULE_NAME": f"api.{name}",
            "__VC_HANDLER_VARIABLE_NAME": "handler",
            "PYTHONPATH": str(ROOT),
        })
        self.proc = subprocess.Popen([str(python), str(ROOT / "tests" / "vercel_bridge.py")], cwd=ROOT, env=full,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.logs: list[str] = []

    def call(self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> dict:
        raw = "" if body is None else (body if isinstance(body, str) else json.dumps(body))
        req = {"method": method, "path": path, "headers": {"content-type": "application/json", **(headers or {})},
               "body": raw}
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            assert line, "bridge died: " + (self.proc.stderr.read() if self.proc.stderr else "")
            if line.startswith("@@result "):
                assert_no_sentinel(line, "an answer through Vercel's bridge")
                return json.loads(line.removeprefix("@@result "))
            self.logs.append(line)

    def close(self) -> str:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(15)
        rest = (self.proc.stdout.read() if self.proc.stdout else "") + (self.proc.stderr.read() if self.proc.stderr else "")
        logs = "".join(self.logs) + rest
        assert_no_sentinel(logs, "the function's logs under Vercel's bridge")
        return logs


def header(result: dict, name: str) -> str | None:
    for k, v in result["headers"].items():
        if k.lower() == name:
            return v[0] if isinstance(v, list) else v
    return None


@pytest.fixture
def env(fake_openai, tmp_path):
    return {"EMBEDDINGS_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test-SENTINEL-not-a-real-key",
            "OPENAI_BASE_URL": fake_openai.url, "EMBEDDINGS_CACHE": "sqlite",
            "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "vc.sqlite3"), "VERCEL": "1",
            "EMBEDDINGS_API_KEYS": "caller-SENTINEL-key"}


def test_embeddings_function_under_the_vercel_bridge(env, fake_openai):
    bridge = Bridge("api/embeddings.py", env)
    try:
        auth = {"authorization": "Bearer caller-SENTINEL-key"}
        r = bridge.call("POST", "/v1/embeddings", {"input": ["x", "y", "x"]}, auth)  # the rewritten path
        assert r["statusCode"] == 200, r
        body = json.loads(r["body"])
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert np.array(body["data"][0]["embedding"], dtype=np.float32).tobytes() == \
            fake_openai.expected("text-embedding-3-small", "x").tobytes()
        assert header(r, "x-cache-misses") == "2"
        r2 = bridge.call("POST", "/api/embeddings", {"input": "y", "encoding_format": "base64"}, auth)
        assert header(r2, "x-cache-hits") == "1" and fake_openai.calls == 1
        raw = base64.b64decode(json.loads(r2["body"])["data"][0]["embedding"])
        assert raw == fake_openai.expected("text-embedding-3-small", "y").tobytes()
        # refused without the key; wrong method; bad input: all in OpenAI's shape
        for res, status in ((bridge.call("POST", "/api/embeddings", {"input": "x"}), 401),
                            (bridge.call("GET", "/api/embeddings"), 405),
                            (bridge.call("POST", "/api/embeddings", {"input": ""}, auth), 400)):
            assert res["statusCode"] == status, res
            assert set(json.loads(res["body"])["error"]) == {"message", "type", "param", "code"}
    finally:
        logs = bridge.close()
    assert "sk-test-SENTINEL-not-a-real-key" not in logs and "caller-SENTINEL-key" not in logs


def test_vercel_without_api_keys_refuses_everything(env, fake_openai):
    env = {k: v for k, v in env.items() if k != "EMBEDDINGS_API_KEYS"}
    bridge = Bridge("api/embeddings.py", env)
    try:
        r = bridge.call("POST", "/api/embeddings", {"input": "x"})
        assert r["statusCode"] == 500
        assert "EMBEDDINGS_API_KEYS" in json.loads(r["body"])["error"]["message"]
        assert fake_openai.calls == 0
    finally:
        bridge.close()


def test_health_function_under_the_vercel_bridge(env):
    bridge = Bridge("api/health.py", env)
    try:
        r = bridge.call("GET", "/api/health")
        assert r["statusCode"] == 200
        body = json.loads(r["body"])
        assert body["provider"] == "openai" and body["cache_ok"] is True
        assert "sk-test" not in r["body"]
    finally:
        bridge.close()


def test_bridge_runs_python_312():
    out = subprocess.run([str(VENV312 / "bin" / "python"), "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(3, 12)"
    assert sys.version_info[:2] >= (3, 11)


# -- production mode: VERCEL_IPC_PATH set, the handler served on the runtime's own HTTP server -------------------


class Platform:
    """Vercel's side of production mode, played on loopback: the IPC socket the runtime reports to (server-started,
    logs, one `end` per request), and requests sent to the HTTP port it announces, as the platform proxies them."""

    def __init__(self, entry: str, env: dict[str, str], tmp: Path) -> None:
        import socket
        import threading
        import time

        self.messages: list[dict] = []
        path = str(tmp / "ipc.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        threading.Thread(target=self._read, daemon=True).start()
        name = Path(entry).stem
        full = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "VERCEL"))}
        full.update(env)
        full.update({"VERCEL_IPC_PATH": path, "__VC_HANDLER_ENTRYPOINT": entry,
                     "__VC_HANDLER_ENTRYPOINT_ABS": str(ROOT / entry), "__VC_HANDLER_MODULE_NAME": f"api.{name}",
                     "__VC_HANDLER_VARIABLE_NAME": "handler", "PYTHONPATH": str(ROOT)})
        self.proc = subprocess.Popen([str(VENV312 / "bin" / "python"), "-c", "import vercel_runtime.vc_init"],
                                     cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while not any(m.get("type") == "server-started" for m in self.messages):
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                "the runtime never reported server-started: " + (self.proc.stdout.read() if self.proc.stdout else "")
            time.sleep(0.02)
        port = next(m for m in self.messages if m["type"] == "server-started")["payload"]["httpPort"]
        self.url = f"http://127.0.0.1:{port}"
        self._requests = 0

    def _read(self) -> None:
        conn, _ = self._listener.accept()
        buffer = b""
        while chunk := conn.recv(1 << 16):
            buffer += chunk
            *done, buffer = buffer.split(b"\0")
            self.messages += [json.loads(m) for m in done if m]

    def headers(self) -> dict[str, str]:
        """What the platform adds to each request it forwards."""
        self._requests += 1
        return {"x-vercel-internal-invocation-id": f"inv-{self._requests}",
                "x-vercel-internal-request-id": str(self._requests)}

    def close(self) -> str:
        self.proc.terminate()
        out = self.proc.communicate(timeout=15)[0]
        self._listener.close()
        logs = out + json.dumps(self.messages)
        assert_no_sentinel(logs, "the function's output in production mode")
        return logs


def test_a_thousand_input_langchain_request_beyond_4_5_mb_in_production_mode(env, fake_openai, tmp_path):
    """LangChain's OpenAIEmbeddings sends 1000 inputs a request by default: at 1536 dimensions that answer is about
    8 MB in base64 (20 MB as floats), past the 4.5 MB Vercel allows a buffered answer. In production the runtime
    serves the handler on its own HTTP server and the platform streams what it writes (the build marks every Python
    function `supportsResponseStreaming`, tests/test_vercel_build.py), so the whole answer arrives."""
    import httpx
    from langchain_openai import OpenAIEmbeddings

    platform = Platform("api/embeddings.py", env, tmp_path)
    try:
        texts = [f"chunk number {i} of a long document" for i in range(1000)]
        emb = OpenAIEmbeddings(base_url=platform.url + "/v1", api_key="caller-SENTINEL-key",
                               model="text-embedding-3-small", check_embedding_ctx_length=False,
                               default_headers=platform.headers(), max_retries=0)
        assert emb.chunk_size == 1000  # LangChain's default: one request for all of them
        vectors = emb.embed_documents(texts)
        assert len(vectors) == 1000 and fake_openai.calls == 1
        for i in (0, 499, 999):
            assert np.array_equal(np.array(vectors[i], dtype=np.float32),
                                  fake_openai.expected("text-embedding-3-small", texts[i]))
        # The same request by hand: its answer's size, in both formats, and every byte of it.
        for fmt, least in (("base64", 8_000_000), ("float", 15_000_000)):
            r = httpx.post(platform.url + "/v1/embeddings", timeout=120,
                           json={"input": texts, "model": "text-embedding-3-small", "encoding_format": fmt},
                           headers={"authorization": "Bearer caller-SENTINEL-key", **platform.headers()})
            assert r.status_code == 200 and r.headers["x-cache-hits"] == "1000", r.text[:300]
            assert int(r.headers["content-length"]) == len(r.content) > least
            assert len(r.json()["data"]) == 1000
        assert fake_openai.calls == 1
        # One `end` per request reached the platform: each answer was complete, none cut off.
        assert sum(m.get("type") == "end" for m in platform.messages) == 3
    finally:
        platform.close()
