"""Shared fixtures: loopback upstreams, an in-process server, the dev server in a subprocess."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib import app as app_module  # noqa: E402
from tests.upstreams import FakeHuggingFace, FakeOpenAI  # noqa: E402

# Never let a developer's real keys or settings leak into a test run.
_OURS = ("EMBEDDINGS_", "OPENAI_", "HF_", "SUPABASE_", "VERCEL")


# Every secret the tests configure (provider keys, the Supabase key, callers' API keys) contains this
# sentinel. Every answer our servers give and every log line they write is checked for it.
SENTINEL = "SENTINEL"


def assert_no_sentinel(text: str, where: str) -> None:
    assert SENTINEL not in text, f"a secret leaked into {where}: ...{text[max(0, text.find(SENTINEL) - 80):][:200]}"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@pytest.fixture(autouse=True)
def no_secret_in_logs() -> Iterator[None]:
    capture = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    yield
    root.removeHandler(capture)
    root.setLevel(old_level)
    assert_no_sentinel("\n".join(capture.lines), "a log line")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(_OURS) and name != "HF_HUB_OFFLINE":
            monkeypatch.delenv(name, raising=False)
    app_module.reset()
    yield
    app_module.reset()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    up = FakeOpenAI()
    yield up
    up.close()


class Running:
    """A server under test: its base URL and an httpx client."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=60, event_hooks={"response": [self._check]})

    @staticmethod
    def _check(response: httpx.Response) -> None:
        response.read()
        assert_no_sentinel(response.text + repr(dict(response.headers)), f"an answer to {response.request.url}")

    def embed(self, payload: object, **headers: str) -> httpx.Response:
        return self.client.post("/v1/embeddings", json=payload, headers=headers)


def openai_env(monkeypatch: pytest.MonkeyPatch, upstream_url: str, tmp_path: Path, cache: str = "sqlite",
               **extra: str) -> None:
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "openai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SENTINEL-not-a-real-key")
    monkeypatch.setenv("OPENAI_BASE_URL", upstream_url)
    monkeypatch.setenv("EMBEDDINGS_CACHE", cache)
    monkeypatch.setenv("EMBEDDINGS_SQLITE_PATH", str(tmp_path / "cache.sqlite3"))
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    app_module.reset()


@pytest.fixture
def serve() -> Iterator[callable]:
    """Start the dev server's router in this process (with the environment as set by the test)."""
    from lib.devserver import make_server

    servers = []

    def start(**options: object) -> Running:
        server = make_server("127.0.0.1", 0, **options)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return Running(f"http://127.0.0.1:{server.server_address[1]}")

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def stop_devserver(proc: subprocess.Popen) -> str:
    """Stop a dev server started by `start_devserver`; returns its output, checked for secrets."""
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    assert_no_sentinel(out, "the dev server's output")
    return out


def start_devserver(env: dict[str, str], port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m lib.devserver` in a subprocess; waits until it answers /api/health."""
    port = port or free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    full.update(env)
    full["PORT"] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "lib.devserver"], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("dev server exited: " + (proc.stdout.read() if proc.stdout else ""))
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("dev server did not start")


@pytest.fixture(scope="session")
def pg():
    """One throwaway PostgreSQL 15 cluster for the session, with Supabase's roles and our migrations."""
    from tests.pg import Cluster

    cluster = Cluster()
    cluster.migrate()
    yield cluster
    cluster.destroy()


@pytest.fixture
def rest(pg):
    """A loopback PostgREST stand-in over the real database, with an empty cache table."""
    from tests.fake_postgrest import FakePostgREST

    pg.psql("-c", "truncate public.embedding_cache")
    server = FakePostgREST(pg.dsn_as("authenticator"))
    yield server
    server.close()


SERVICE_KEY = "sb_secret_SENTINEL_test_only_0000"
assert SENTINEL in SERVICE_KEY


def supabase_env(monkeypatch: pytest.MonkeyPatch, upstream_url: str, rest_url: str, **extra: str) -> None:
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "openai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SENTINEL-not-a-real-key")
    monkeypatch.setenv("OPENAI_BASE_URL", upstream_url)
    monkeypatch.setenv("SUPABASE_URL", rest_url)
    monkeypatch.setenv("SUPABASE_SECRET_KEY", SERVICE_KEY)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    app_module.reset()


@pytest.fixture
def fake_hf() -> Iterator[FakeHuggingFace]:
    up = FakeHuggingFace()
    yield up
    up.close()


def hf_env(monkeypatch: pytest.MonkeyPatch, upstream_url: str, tmp_path: Path, **extra: str) -> None:
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "huggingface")
    monkeypatch.setenv("HF_TOKEN", "hf_test_SENTINEL_not_a_real_token")
    monkeypatch.setenv("HF_INFERENCE_URL", upstream_url)
    monkeypatch.setenv("EMBEDDINGS_CACHE", "sqlite")
    monkeypatch.setenv("EMBEDDINGS_SQLITE_PATH", str(tmp_path / "cache.sqlite3"))
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    app_module.reset()


def lib_command(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m lib ...` in a subprocess, with our variables cleared but for `env`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "SUPABASE_"))}
    full.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run([sys.executable, "-m", "lib", *args], cwd=cwd or ROOT, env=full, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """fp32 and int8 exports of the packaged all-MiniLM-L6-v2, made once by the real command."""
    root = tmp_path_factory.mktemp("onnx")
    fp32 = lib_command(["export-onnx", "--out", str(root / "minilm")])
    assert fp32.returncode == 0, fp32.stderr
    int8 = lib_command(["export-onnx", "--out", str(root / "minilm-int8"), "--int8"])
    assert int8.returncode == 0, int8.stderr
    return {"fp32": root / "minilm", "int8": root / "minilm-int8", "fp32_log": fp32.stderr, "int8_log": int8.stderr}
