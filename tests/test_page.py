"""The page at `/`, in a real browser: Debian's Chromium, headless, driven by Playwright (issue 14).

Against the dev server with the local model. The tests assert what a person reads (texts, numbers,
messages), never pixels. A screenshot after an embed is written to `test-output/` on every run.
"""

from __future__ import annotations

import base64
import json
import shutil
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from playwright.sync_api import expect

from tests.conftest import ROOT, start_devserver, stop_devserver

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = ROOT / "test-output"
pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed: "
                                "`make test` installs it (apt-get install chromium)")
SENTENCES = ["A man is eating a piece of bread.", "A man is riding a horse.", "The new movie is awesome",
             "The new movie is so great"]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def local_url(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "page.sqlite3"
    proc, url = start_devserver({"EMBEDDINGS_SQLITE_PATH": str(path), "HF_HUB_OFFLINE": "1"})
    yield url
    stop_devserver(proc)


@pytest.fixture(scope="module")
def keyed_url(tmp_path_factory):
    path = tmp_path_factory.mktemp("keyed") / "keyed.sqlite3"
    proc, url = start_devserver({"EMBEDDINGS_SQLITE_PATH": str(path), "HF_HUB_OFFLINE": "1",
                                 "EMBEDDINGS_API_KEYS": "page-SENTINEL-key"})
    yield url
    stop_devserver(proc)


class Watched:
    """A page with every console message, page error and request recorded."""

    def __init__(self, browser, url: str, width: int = 1280) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url + "/")
        self.page.wait_for_selector("#model option", state="attached")  # health has been read

    def embed(self, texts: list[str]) -> None:
        self.page.fill("#texts", "\n".join(texts))
        self.page.get_by_role("button", name="Embed").click()

    def wait_results(self) -> None:
        # Locators, not wait_for_function: the page's CSP forbids the string eval that one relies on.
        self.page.wait_for_selector("#heatmap tbody td", timeout=60_000)

    def cells(self) -> list[list[str]]:
        return self.page.eval_on_selector_all(
            "#heatmap tbody tr", "rows => rows.map(r => [...r.querySelectorAll('td')].map(td => td.textContent))")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, local_url):
    watched = Watched(browser, local_url)
    yield watched
    watched.close()


def api_vectors(url: str, texts: list[str], **headers: str) -> np.ndarray:
    r = httpx.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "base64"}, headers=headers)
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])


def test_the_page_loads_clean_under_its_csp_and_stays_on_its_origin(page, local_url):
    page.embed(SENTENCES[:2])
    page.wait_results()
    assert page.console == []  # no error, no CSP violation, nothing logged at all
    origin = urlsplit(local_url).netloc
    assert page.requests and all(urlsplit(u).netloc == origin for u in page.requests), page.requests
    csp = httpx.get(local_url + "/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe" not in csp
    status = page.page.inner_text("#status")
    assert "local" in status and "sentence-transformers/all-MiniLM-L6-v2" in status and "answering" in status


def test_heatmap_shows_the_apis_cosines_and_the_second_click_is_all_hits(page, local_url):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    page.embed(texts)
    page.wait_results()
    OUTPUT.mkdir(exist_ok=True)
    page.page.screenshot(path=str(OUTPUT / "page-after-embed.png"), full_page=True)
    v = api_vectors(local_url, texts).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    expected = [[f"{v[i] @ v[j]:.2f}" for j in range(3)] for i in range(3)]
    assert page.cells() == expected
    assert [page.cells()[i][i] for i in range(3)] == ["1.00"] * 3
    headers = page.page.eval_on_selector_all("#heatmap th[scope=row]", "hs => hs.map(h => h.textContent)")
    assert [h.split(". ", 1)[1][:10] for h in headers] == [t[:10] for t in texts]  # labelled rows
    page.page.get_by_role("button", name="Embed").click()
    expect(page.page.locator("#summary")).to_contain_text("3 hits, 0 misses")
    assert "0 tokens billed" in page.page.inner_text("#summary")
    assert page.page.locator("#map circle").count() == 3  # the PCA map has one point per text


def test_query_ranks_the_nearest_text_first(page):
    page.embed(SENTENCES)
    page.wait_results()
    page.page.fill("#query", "A man is eating food.")
    page.page.get_by_role("button", name="Rank").click()
    page.page.wait_for_selector("#ranking li")
    ranked = page.page.eval_on_selector_all("#ranking li", "items => items.map(li => li.textContent)")
    assert len(ranked) == 4 and ranked[0].endswith("A man is eating a piece of bread.")
    assert ranked[0].startswith("0.76")


def test_errors_are_said_in_words(page):
    page.embed(["earlier", "results"])
    page.wait_results()
    assert page.page.is_visible("#results")
    page.embed(["first", "", "third"])
    page.page.wait_for_selector("#message:not([hidden])")
    message = page.page.inner_text("#message")
    assert "line 2" in message and "empty" in message
    assert not page.page.is_visible("#results")  # the earlier texts' heatmap is not shown beside this error
    page.page.evaluate("""() => { const o = document.createElement('option'); o.value = 'no-such-model';
                                  o.textContent = 'no-such-model'; document.querySelector('#model').append(o); }""")
    page.page.select_option("#model", "no-such-model")
    page.embed(["fine"])
    expect(page.page.locator("#message")).to_contain_text("Unknown model")
    assert "sentence-transformers/all-MiniLM-L6-v2" in page.page.inner_text("#message")


def test_a_key_is_asked_for_and_kept_out_of_urls_and_local_storage(browser, keyed_url):
    watched = Watched(browser, keyed_url)
    page = watched.page
    try:
        assert page.is_visible("#api-key") and page.inner_text("label[for=api-key]") == "API key"
        watched.embed(["keyed text"])
        page.wait_for_selector("#message:not([hidden])")
        said = httpx.post(keyed_url + "/v1/embeddings", json={"input": "x"}).json()["error"]["message"]
        assert said in page.inner_text("#message") and "API key" in page.inner_text("#message")
        page.fill("#api-key", "page-SENTINEL-key")
        page.get_by_role("button", name="Embed").click()
        watched.wait_results()
        assert page.is_hidden("#message")
        assert all("SENTINEL" not in u for u in watched.requests) and "SENTINEL" not in page.url
        assert page.evaluate("JSON.stringify(localStorage)") == "{}"
        assert "page-SENTINEL-key" in page.evaluate("JSON.stringify(sessionStorage)")
    finally:
        watched.close()


def test_phone_width_keyboard_and_labels(browser, local_url):
    watched = Watched(browser, local_url, width=375)
    page = watched.page
    try:
        unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(e => !(e.labels && e.labels.length) && !e.textContent.trim() && !e.getAttribute('aria-label'))
            .map(e => e.id)""")
        assert unlabeled == []
        page.fill("#texts", "\n".join(SENTENCES[:3]))
        page.focus("#texts")
        for _ in range(6):  # Tab from the text area to the Embed button, then Enter
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "embed":
                break
        assert page.evaluate("document.activeElement.id") == "embed"
        page.keyboard.press("Enter")
        watched.wait_results()
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
        assert watched.console == []
    finally:
        watched.close()


def test_the_dev_server_serves_public_and_nothing_else(local_url):
    for path in ("/", "/index.html", "/app.js", "/style.css", "/favicon.svg"):
        r = httpx.get(local_url + path)
        assert r.status_code == 200 and r.headers["content-security-policy"], path
    assert httpx.get(local_url + "/").text == (ROOT / "public" / "index.html").read_text()
    for path in ("/../README.md", "/public/index.html", "/%2e%2e/vercel.json", "/lib/app.py", "/.env",
                 "/api/../vercel.json", "//etc/passwd"):
        r = httpx.get(local_url + path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", path
        assert json.loads(r.text)["error"]["code"] == "not_found"


def test_routed_models_show_their_routes_and_the_one_that_served(browser, monkeypatch, tmp_path, serve):
    """With EMBEDDINGS_ROUTES the status names the selected model's routes and their state, and each embed says
    which route paid for its misses (here the first route fails and the second answers)."""
    import json

    from tests.conftest import app_module
    from tests.upstreams import FakeAzure, FakeOpenAI, Scripted

    openai, azure = FakeOpenAI(), FakeAzure({"emb-small": "text-embedding-3-small"}, "azure-SENTINEL-key")
    try:
        openai.script = [Scripted(500)] * 8
        routes = {"text-embedding-3-small": [
            {"provider": "openai", "base_url": openai.url},
            {"provider": "azure", "endpoint": azure.url, "deployment": "emb-small"}]}
        monkeypatch.setenv("EMBEDDINGS_ROUTES", json.dumps(routes))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SENTINEL-not-a-real-key")
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-SENTINEL-key")
        monkeypatch.setenv("EMBEDDINGS_CACHE", "memory")
        monkeypatch.setenv("EMBEDDINGS_TIMEOUT_S", "8")
        app_module.reset()
        watched = Watched(browser, serve().url)
        try:
            assert watched.page.inner_text("#status-provider") == "openai#1 (up) → azure#2 (up)"
            watched.embed(["routed one", "routed two"])
            watched.wait_results()
            expect(watched.page.locator("#summary")).to_contain_text("text-embedding-3-small via azure#2")
            assert watched.console == []
        finally:
            watched.close()
    finally:
        openai.close()
        azure.close()
