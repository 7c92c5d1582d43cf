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
