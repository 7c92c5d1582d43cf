"""The composition root: settings -> registry, provider, cache tiers -> one service per process.

Built on the first request, not at import, so a cold start that only imports the
handler pays for nothing, and a configuration error becomes a clear 500 answer
instead of a crash. Heavy modules (the openai SDK, supabase, torch) are imported by
the parts that use them, when they first need them.
"""

from __future__ import annotations

import threading

from . import config
from .cache.base import Cache, NoCache
from .cache.memory import MemoryCache
from .models import DEFAULT_MODEL, Registry
from .providers.base import Provider
from .service import EmbeddingService


class App:
    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.provider = make_provider(settings)
        if settings.provider == "onnx":  # the models are the directories configured, as loaded (and checked)
            self.registry = Registry("onnx", {mid: dims for mid, (dims, _) in self.provider.specs().items()})
            self.default_model = settings.model or next(iter(settings.onnx_models))
        else:
            self.registry = Registry(settings.provider, settings.hf_models)
            self.default_model = settings.model or DEFAULT_MODEL[settings.provider]
        if settings.model and settings.model not in self.registry.ids:
            raise config.ConfigError(
                f"EMBEDDINGS_MODEL={settings.model!r} is not served by EMBEDDINGS_PROVIDER={settings.provider}; "
                f"choose one of {', '.join(self.registry.ids)} (Hugging Face models can be added with HF_MODELS, "
                "ONNX models with EMBEDDINGS_ONNX_MODELS)")
        self.tiers = make_tiers(settings)
        self.service = EmbeddingService(self.registry, self.provider, self.tiers, settings.timeout_s)


def make_provider(s: config.Settings) -> Provider:
    if s.provider == "openai":
        from .providers.openai import OpenAIProvider

        return OpenAIProvider(s.openai_api_key, s.openai_base_url, timeout_s=s.timeout_s,
                              organization=s.openai_organization, project=s.openai_project,
                              max_calls=s.max_provider_calls)
    if s.provider == "huggingface":
        from .providers.huggingface import HuggingFaceProvider

        return HuggingFaceProvider(s.hf_token, s.hf_inference_url, batch_size=s.hf_batch_size, options=s.hf_options,
                                   max_calls=s.max_provider_calls)
    if s.provider == "onnx":
        from .providers.onnx import OnnxProvider

        return OnnxProvider(s.onnx_models, threads=s.onnx_threads or None)
    from .providers.local import LocalProvider

    return LocalProvider()


def make_tiers(s: config.Settings) -> list[Cache]:
    if s.cache == "none":
        return [NoCache()]
    # EMBEDDINGS_MEMORY_CACHE_MB=0 leaves the per-process tier out (benchmarks of the backends alone).
    front: list[Cache] = [MemoryCache(s.memory_cache_bytes)] if s.memory_cache_bytes else []
    if s.cache == "memory":
        return front or [NoCache()]
    if s.cache == "sqlite":
        from .cache.sqlite import SQLiteCache

        return [*front, SQLiteCache(s.sqlite_path)]
    from .cache.supabase import SupabaseCache

    return [*front, SupabaseCache(s.supabase_url, s.supabase_key, timeout_s=s.supabase_timeout_s)]


_app: App | None = None
_lock = threading.Lock()


def get_app() -> App:
    """The process's one App (shared by all request threads). Raises ConfigError, every time, if misconfigured."""
    global _app
    if _app is not None:
        return _app
    with _lock:
        if _app is None:
            _app = App(config.load())
        return _app


def reset() -> None:
    """Forget the App (tests that change the environment)."""
    global _app
    with _lock:
        _app = None
