"""What a new user tripped over (issue 23): messages, small conventions, and a suite that says why it skips."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lib import Embedder, InvalidInputError
from tests.conftest import ROOT, openai_env


@pytest.fixture
def oa(monkeypatch, fake_openai, tmp_path, serve):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    return serve()


@pytest.mark.parametrize("body, message", [
    ({}, "'input' is required"),
    ({"model": "text-embedding-3-small"}, "'input' is required"),
    ({"input": ["a", None]}, "'input[1]' is null"),
    ({"input": ["a", "b", {"text": "c"}]}, "'input[2]' is an object"),
    ({"input": ["a", 7]}, "'input[1]' is a number but 'input[0]' is a string"),
    ({"input": [[1, 2], [3, "x"]]}, "'input[1][1]' is a string; token ids are integers"),
    ({"input": [True]}, "'input[0]' is a boolean"),
    ({"input": None}, "'input' is null"),
])
def test_a_bad_or_missing_input_is_named_exactly(oa, fake_openai, body, message):
    r = oa.embed(body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    assert message in r.json()["error"]["message"], r.text
    assert fake_openai.calls == 0


def test_embedder_names_the_bad_index_too(monkeypatch, fake_openai, tmp_path):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    with pytest.raises(InvalidInputError, match=r"'input\[1\]' is null"):
        Embedder.from_env().embed(["fine", None])  # type: ignore[list-item]


def test_empty_documents_give_no_vectors_the_langchain_way(monkeypatch, fake_openai, tmp_path):
    import asyncio

    from langchain_core.vectorstores import InMemoryVectorStore

    openai_env(monkeypatch, fake_openai.url, tmp_path)
    embedder = Embedder.from_env()
    assert embedder.embed_documents([]) == []
    assert asyncio.run(embedder.aembed_documents([])) == []
    store = InMemoryVectorStore(embedder.as_langchain())
    assert store.add_texts([]) == []
    assert len(store.add_texts(["one", "two"])) == 2  # and a real call still embeds
    assert fake_openai.calls == 1
    with pytest.raises(InvalidInputError, match="must not be empty"):
        embedder.embed([])  # the rich call, like the endpoint and OpenAI, refuses an empty input


def test_result_repr_is_a_summary_not_kilobytes_of_bytes(monkeypatch, fake_openai, tmp_path):
    openai_env(monkeypatch, fake_openai.url, tmp_path)
    result = Embedder.from_env().embed(["short", "texts"])
    text = repr(result)
    assert text == ("EmbeddingResult(2 vectors, model='text-embedding-3-small', dimensions=1536, hits=0, misses=2, "
                    f"tokens={result.tokens})")
    assert len(text) < 200


SKIPPING = """
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="the widget is not installed")
def test_needs_a_widget():
    pass
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_skip_says_why_and_fails_under_ci(tmp_path, ci):
    (tmp_path / "test_widget.py").write_text(SKIPPING)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "tests.skips", "-p", "no:cacheprovider",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if ci:
        # A skip decided before the test runs (a mark) fails at setup: pytest counts that as an error.
        assert run.returncode == 1 and "1 passed, 1 error" in run.stdout, run.stdout
        assert "skipped under CI, where nothing may skip: the widget is not installed" in run.stdout
    else:
        assert run.returncode == 0 and "1 passed, 1 skipped" in run.stdout, run.stdout
        assert "SKIPPED" in run.stdout and "the widget is not installed" in run.stdout


def test_the_suite_itself_is_set_to_list_skips():
    ini = (ROOT / "pytest.ini").read_text()
    assert "-rs" in ini and "-p tests.skips" in ini
    assert (ROOT / "tests" / "openai-spec" / "openai-embeddings.yaml").is_file()  # shipped, not beside the repo


def test_on_vercel_a_body_limit_the_platform_would_refuse_first_is_a_configuration_error():
    from lib import config

    env = {"VERCEL": "1", "EMBEDDINGS_PROVIDER": "openai", "OPENAI_API_KEY": "sk-x"}
    assert config.load(env).max_body_bytes == 4 * 1024 * 1024  # the default is within Vercel's 4.5 MB
    with pytest.raises(config.ConfigError, match="EMBEDDINGS_MAX_BODY_BYTES=5000000 is more than Vercel passes"):
        config.load({**env, "EMBEDDINGS_MAX_BODY_BYTES": "5000000"})
    assert config.load({**env, "VERCEL": ""}).max_body_bytes == 4 * 1024 * 1024
    assert config.load({"EMBEDDINGS_PROVIDER": "openai", "OPENAI_API_KEY": "sk-x",
                        "EMBEDDINGS_MAX_BODY_BYTES": "5000000"}).max_body_bytes == 5_000_000  # elsewhere, as set


def test_a_body_too_large_says_what_to_send_instead(oa, fake_openai):
    import httpx

    r = httpx.post(oa.url + "/v1/embeddings", content=b"x" * (4 * 1024 * 1024 + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "send fewer or shorter inputs per request" in r.json()["error"]["message"]


def test_env_example_names_only_variables_the_code_reads_and_promises_no_dotenv():
    import re

    example = (ROOT / ".env.example").read_text()
    assert "Nothing in this project reads a .env file" in example and "Copy to .env" not in example
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    code = "".join(p.read_text() for p in (ROOT / "lib").rglob("*.py"))
    assert names and all(f'"{name}"' in code for name in names), names - {n for n in names if f'"{n}"' in code}


def test_stopping_make_dev_by_makes_pid_stops_the_server(tmp_path):
    """Killing the `make dev` process (not its process group) must not leave the server running on its port."""
    import signal
    import time

    import httpx

    from tests.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "HF_", "SUPABASE_"))}
    env.update({"EMBEDDINGS_CACHE": "memory"})
    # -o: take the installed environment as it is (this suite runs inside it); the recipe is the README's.
    make = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "dev", f"PORT={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + 60
    while True:
        assert make.poll() is None and time.monotonic() < deadline, make.stdout.read() if make.stdout else ""
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    make.send_signal(signal.SIGTERM)  # make's PID alone, as `kill <pid>` would
    make.wait(15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
        except httpx.ConnectError:
            break  # nobody listens on the port any more
        time.sleep(0.1)
    else:
        raise AssertionError("the dev server kept serving after make was stopped")
