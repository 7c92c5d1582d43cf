"""The in-process door: `Embedder`, the embedding service called from your own Python code.

It is the endpoint without HTTP: the same settings, input rules and messages (`lib.request.check`), the
same service (dedupe, cache tiers, single flight, batching, retries), the same keys and the same cache.
A text embedded here is a hit on the endpoint, and the other way round. Nothing of the pipeline is
written again here; this file only adapts calls and results.

    from lib import Embedder

    embedder = Embedder.from_env()                    # the endpoint's environment variables
    vectors = embedder.embed_documents(["a", "b"])    # list[list[float]]
    result = embedder.embed(["a", "b"])               # raw float32 bytes, hits, misses, tokens
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import config
from .app import App, get_app
from .errors import APIError, EmbeddingError, ProviderError
from .vectors import to_floats

# Keyword options and the environment variables they stand for (the README's configuration table).
OPTIONS: dict[str, tuple[str, ...]] = {
    "provider": ("EMBEDDINGS_PROVIDER",),
    "model": ("EMBEDDINGS_MODEL",),
    "cache": ("EMBEDDINGS_CACHE",),
    "sqlite_path": ("EMBEDDINGS_SQLITE_PATH",),
    "memory_cache_mb": ("EMBEDDINGS_MEMORY_CACHE_MB",),
    "openai_api_key": ("OPENAI_API_KEY",),
    "openai_base_url": ("OPENAI_BASE_URL",),
    "openai_organization": ("OPENAI_ORG_ID",),
    "openai_project": ("OPENAI_PROJECT_ID",),
    "hf_token": ("HF_TOKEN",),
    "hf_inference_url": ("HF_INFERENCE_URL",),
    "hf_models": ("HF_MODELS",),
    "hf_batch_size": ("HF_BATCH_SIZE",),
    "models": ("EMBEDDINGS_ROUTES",),  # {"model id": [{"provider": ...}, ...]}: each model's routes, in order
    "onnx_model_dir": ("EMBEDDINGS_ONNX_MODEL_DIR",),
    "onnx_models": ("EMBEDDINGS_ONNX_MODELS",),
    "supabase_url": ("SUPABASE_URL",),
    # Either name is read from the environment; an explicit key replaces both.
    "supabase_key": ("SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY"),
    "supabase_timeout_s": ("SUPABASE_TIMEOUT_S",),
    "timeout_s": ("EMBEDDINGS_TIMEOUT_S",),
    "max_inputs": ("EMBEDDINGS_MAX_INPUTS",),
    "max_provider_calls": ("EMBEDDINGS_MAX_PROVIDER_CALLS",),
    "max_input_chars": ("EMBEDDINGS_MAX_INPUT_CHARS",),
}


def _as_env(options: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, value in options.items():
        if name not in OPTIONS:
            raise TypeError(f"unknown option {name!r}; the options are: {', '.join(OPTIONS)}")
        if value is None:
            continue
        if name == "models" and not isinstance(value, str):
            import json

            value = json.dumps(value)
        elif isinstance(value, Mapping) and name == "onnx_models":  # {"my/model": "/path/to/dir"}
            value = ",".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, Mapping):  # hf_models={"BAAI/bge-m3": 1024}
            value = ",".join(f"{k}:{v}" if v else k for k, v in value.items())
        for var in OPTIONS[name]:
            env[var] = str(value)
    return env


@dataclass(frozen=True)
class EmbeddingResult:
    """One call's vectors, in input order, and what the cache saved."""

    vectors: list[bytes]  # raw little-endian float32, exactly the cached bytes
    model: str
    dimensions: int
    hits: int  # distinct texts served from the cache
    misses: int  # distinct texts paid for (or waited for) in this call
    tokens: int  # tokens the provider billed for this call
    cache_errors: tuple[str, ...] = ()  # cache tiers that failed (the call was served all the same)
    routes: tuple[str, ...] = ()  # the routes that served its misses, when the models are routed

    def __len__(self) -> int:
        return len(self.vectors)

    def __repr__(self) -> str:
        # Not the dataclass's repr: that would print every vector's bytes (kilobytes per text).
        errors = f", cache_errors={self.cache_errors!r}" if self.cache_errors else ""
        return (f"EmbeddingResult({len(self.vectors)} vectors, model={self.model!r}, dimensions={self.dimensions}, "
                f"hits={self.hits}, misses={self.misses}, tokens={self.tokens}{errors})")

    def tolist(self) -> list[list[float]]:
        return [to_floats(v) for v in self.vectors]

    def array(self) -> Any:
        """A numpy float32 array of shape (n, dimensions): one copy of the bytes. Imports numpy now."""
        try:
            import numpy as np
        except ImportError:
            raise ImportError("EmbeddingResult.array() needs numpy (pip install numpy); "
                              "tolist() and the raw bytes in .vectors need nothing") from None
        return np.frombuffer(b"".join(self.vectors), dtype="<f4").reshape(len(self.vectors), self.dimensions)


class Embedder:
    """The embedding service in your process.

    `Embedder.from_env(**overrides)` reads the endpoint's environment variables (`EMBEDDINGS_PROVIDER`,
    `OPENAI_API_KEY`, `EMBEDDINGS_CACHE`, ...); keyword options override them. With no options at all it
    shares this process's service with the endpoint (one memory tier, one single flight).
    `Embedder(**options)` reads no environment: what is not given takes its default (the local model and
    SQLite). Options: see `OPTIONS` (`provider`, `model`, `cache`, `openai_api_key`, `supabase_url`,
    `supabase_key`, `timeout_s`, ...).
    """

    def __init__(self, **options: Any) -> None:
        self._app = App(config.load(_as_env(options)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Embedder:
        if env is None and not overrides:
            return cls._over(get_app())
        merged = {**(os.environ if env is None else env), **_as_env(overrides)}
        return cls._over(App(config.load(merged)))

    @classmethod
    def _over(cls, app: App) -> Embedder:
        self = cls.__new__(cls)
        self._app = app
        return self

    @property
    def settings(self) -> config.Settings:
        """The configuration in force (the endpoint's variables, with this embedder's options)."""
        return self._app.settings

    @property
    def service(self) -> Any:
        """The embedding service itself (`lib.service.EmbeddingService`): keys, cache lookups and writes, for the
        corpus command's Batch API path, which pays elsewhere and stores here."""
        return self._app.service

    def resolve(self, model: str | None = None, dimensions: int | None = None) -> tuple[Any, int | None]:
        """The model's spec and the dimensions as the cache keys them (the endpoint's rules: InvalidInputError)."""
        from .request import check

        try:
            _, spec, dims = check(["x"], model, dimensions, self._app, max_inputs=None, texts_only=True)
        except APIError as err:
            raise EmbeddingError.from_api(err) from None
        return spec, dims

    def route_of(self, model: str, provider: str = "openai") -> tuple[str, dict[str, str], str]:
        """(provider, settings, secret) of the model's first route through `provider`, or else its first route
        (for the Batch API path, which only OpenAI offers)."""
        s = self._app.settings
        if s.routes:
            route = next((r for r in s.routes[model] if r.provider == provider), s.routes[model][0])
            return route.provider, dict(route.settings), route.secret
        return s.provider, {"base_url": s.openai_base_url or "https://api.openai.com/v1"}, s.openai_api_key

    @property
    def model(self) -> str:
        """The model used when a call names none."""
        return self._app.default_model

    @property
    def models(self) -> list[str]:
        """The model ids served (with routes: exactly those configured)."""
        return self._app.registry.ids

    # -- the one real call -------------------------------------------------------------------------

    def embed(self, texts: Sequence[str] | str, *, model: str | None = None,
              dimensions: int | None = None) -> EmbeddingResult:
        """Embed texts (any number: long lists go to the service in requests within its limits).

        Raises `InvalidInputError` (a `ValueError`) for bad input, before anything is sent or cached,
        and `EmbeddingError` with the endpoint's status and code when the provider fails; vectors paid
        for before a failure stay cached."""
        from .request import check

        texts = [texts] if isinstance(texts, str) else list(texts)
        try:
            items, spec, dims = check(texts, model, dimensions, self._app, max_inputs=None, texts_only=True)
        except APIError as err:
            raise EmbeddingError.from_api(err) from None
        distinct = list(dict.fromkeys(items))  # each text once across the whole call, not just per request
        limit = self._app.settings.max_inputs
        found: dict[str, bytes] = {}
        hits = misses = tokens = 0
        errors: list[str] = []
        routes: list[str] = []
        for start in range(0, len(distinct), limit):
            part = distinct[start:start + limit]
            try:
                result = self._app.service.embed(part, spec, dims)
            except ProviderError as exc:
                raise EmbeddingError.from_api(exc.to_api_error()) from None
            found.update(zip(part, result.vectors))
            hits, misses, tokens = hits + result.hits, misses + result.misses, tokens + result.tokens
            errors += [e for e in result.cache_errors if e not in errors]
            routes += [r for r in result.routes if r not in routes]
        vectors = [found[t] for t in items]
        return EmbeddingResult(vectors, spec.id, len(vectors[0]) // 4, hits, misses, tokens, tuple(errors),
                               tuple(routes))

    # -- the names vector stores and LangChain call ------------------------------------------------------

    def embed_documents(self, texts: Sequence[str], *, model: str | None = None,
                        dimensions: int | None = None) -> list[list[float]]:
        # No documents, no vectors: LangChain's convention (a vector store's add_texts([]) relies on it). The
        # endpoint and `embed` refuse an empty input, as OpenAI does.
        if not isinstance(texts, str) and len(texts) == 0:
            return []
        return self.embed(texts, model=model, dimensions=dimensions).tolist()

    def embed_query(self, text: str, *, model: str | None = None, dimensions: int | None = None) -> list[float]:
        return self.embed([text], model=model, dimensions=dimensions).tolist()[0]

    async def aembed(self, texts: Sequence[str] | str, *, model: str | None = None,
                     dimensions: int | None = None) -> EmbeddingResult:
        import asyncio  # here, not at import: `import lib` stays cheap

        # The same synchronous service in a worker thread: the event loop never waits on it.
        return await asyncio.to_thread(self.embed, texts, model=model, dimensions=dimensions)

    async def aembed_documents(self, texts: Sequence[str], *, model: str | None = None,
                               dimensions: int | None = None) -> list[list[float]]:
        if not isinstance(texts, str) and len(texts) == 0:
            return []
        return (await self.aembed(texts, model=model, dimensions=dimensions)).tolist()

    async def aembed_query(self, text: str, *, model: str | None = None,
                           dimensions: int | None = None) -> list[float]:
        return (await self.aembed([text], model=model, dimensions=dimensions)).tolist()[0]

    # -- adapters ------------------------------------------------------------------------------------------

    def as_langchain(self, *, model: str | None = None, dimensions: int | None = None) -> Any:
        """A real `langchain_core.embeddings.Embeddings` backed by this embedder (for vector stores that
        check the type). Needs `langchain-core`, which this product does not install in production."""
        try:
            from langchain_core.embeddings import Embeddings
        except ImportError:
            raise ImportError("Embedder.as_langchain() needs langchain-core (pip install langchain-core); "
                              "the embedder itself needs nothing more") from None
        embedder = self

        class CachedEmbeddings(Embeddings):
            """LangChain's embeddings interface over the cached embedding service."""

            def embed_documents(self, texts: list[str]) -> list[list[float]]:
                return embedder.embed_documents(texts, model=model, dimensions=dimensions)

            def embed_query(self, text: str) -> list[float]:
                return embedder.embed_query(text, model=model, dimensions=dimensions)

            async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
                return await embedder.aembed_documents(texts, model=model, dimensions=dimensions)

            async def aembed_query(self, text: str) -> list[float]:
                return await embedder.aembed_query(text, model=model, dimensions=dimensions)

        return CachedEmbeddings()
