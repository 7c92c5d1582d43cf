"""The composition root: settings -> registry, provider, cache tiers -> one service per process.

Built on the first request, not at import, so a cold start that only imports the
handler pays for nothing, and a configuration error becomes a clear 500 answer
instead of a crash. Heavy modules (the openai SDK, supabase, torch) are imported by
the parts that use them, when they first need them.
"""

from __future__ import annotations

import threading
from typing import Any

from . import config
from .cache.base import Cache, NoCache
from .cache.memory import MemoryCache
from .models import BUILTIN, DEFAULT_MODEL, ModelSpec, Registry
from .providers.base import Provider
from .service import EmbeddingService


class App:
    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        if settings.routes:  # each model through its own ordered routes (lib/routes.py, lib/providers/router.py)
            self.provider, specs = make_router(settings)
            self.registry = Registry.of(specs)
            self.default_model = settings.model or next(iter(settings.routes))
        elif settings.provider == "onnx":  # the models are the directories configured, as loaded (and checked)
            self.provider = make_provider(settings)
            self.registry = Registry("onnx", {mid: dims for mid, (dims, _) in self.provider.specs().items()})
            self.default_model = settings.model or next(iter(settings.onnx_models))
        else:
            self.provider = make_provider(settings)
            self.registry = Registry(settings.provider, settings.hf_models)
            self.default_model = settings.model or DEFAULT_MODEL[settings.provider]
        if settings.model and settings.model not in self.registry.ids:
            raise config.ConfigError(
                f"EMBEDDINGS_MODEL={settings.model!r} is not served here (EMBEDDINGS_PROVIDER={settings.provider}); "
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


def make_router(s: config.Settings) -> tuple[Provider, list[ModelSpec]]:
    """One provider per route, the router over them, and each model's spec (what every one of its routes can do)."""
    from .providers.router import RoutingProvider

    builtin = {spec.id: spec for spec in BUILTIN}
    local: Provider | None = None
    table: dict[str, list[tuple[str, str, Provider]]] = {}
    specs: list[ModelSpec] = []
    for model, routes in s.routes.items():
        entries: list[tuple[str, str, Provider]] = []
        dims = builtin[model].dimensions if model in builtin else s.hf_models.get(model)
        limit = builtin[model].max_input_tokens if model in builtin else 8192
        for route in routes:
            provider = _route_provider(route, s)
            if route.provider == "local":
                local = local or provider
                provider = local
            if route.provider == "onnx":
                onnx_dims, onnx_limit = provider.specs()[model]  # type: ignore[attr-defined]
                if dims is not None and onnx_dims != dims:
                    raise config.ConfigError(f"{route.where()}: its model gives {onnx_dims} dimensions; the model's "
                                             f"other routes give {dims}")
                dims, limit = onnx_dims, min(limit, onnx_limit)
            entries.append((route.name, route.provider, provider))
        kinds = [r.provider for r in routes]
        probe = ModelSpec(model, ",".join(dict.fromkeys(kinds)), dims)
        options = {name: dict(p.key_options(probe)) for name, _, p in entries}
        if len({repr(sorted(o.items())) for o in options.values()}) > 1:
            raise config.ConfigError(f"EMBEDDINGS_ROUTES: model {model!r}: its routes would not make the same "
                                     f"vectors ({options}): every route of a model must serve one vector space")
        remote_openai = set(kinds) <= {"openai", "azure"}
        spec = builtin.get(model)
        specs.append(ModelSpec(model, probe.provider, dims,
                               flexible_dimensions=bool(spec and spec.flexible_dimensions and remote_openai),
                               accepts_tokens=bool(spec and spec.accepts_tokens and remote_openai),
                               max_input_tokens=limit))
        table[model] = entries
    return RoutingProvider(table), specs


def _route_provider(route: Any, s: config.Settings) -> Provider:
    r = route.settings
    if route.provider == "openai":
        from .providers.openai import OpenAIProvider

        return OpenAIProvider(route.secret, r["base_url"], timeout_s=s.timeout_s, max_calls=s.max_provider_calls,
                              upstream_model=r.get("upstream_model") or None)
    if route.provider == "azure":
        from .providers.openai import OpenAIProvider

        return OpenAIProvider.azure(route.secret, r["endpoint"], r["deployment"], api_version=r["api_version"] or None,
                                    timeout_s=s.timeout_s, max_calls=s.max_provider_calls)
    if route.provider == "huggingface":
        from .providers.huggingface import HuggingFaceProvider

        return HuggingFaceProvider(route.secret, r["url"], batch_size=s.hf_batch_size, options=s.hf_options,
                                   max_calls=s.max_provider_calls)
    if route.provider == "onnx":
        from .providers.onnx import OnnxProvider

        try:
            return OnnxProvider({route.model: r["dir"]}, threads=s.onnx_threads or None)
        except config.ConfigError as exc:
            raise config.ConfigError(f"{route.where()}: {exc}") from None
    from .providers.local import LocalProvider, available

    if not available():
        raise config.ConfigError(f"{route.where()}: the local provider needs the development requirements")
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
