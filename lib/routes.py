"""Routes: which providers serve each model, in order (`EMBEDDINGS_ROUTES`), checked once from the environment.

    EMBEDDINGS_ROUTES='{"text-embedding-3-small": [{"provider": "openai"},
                                                   {"provider": "azure", "endpoint": "https://res.openai.azure.com",
                                                    "deployment": "emb-small", "api_key_env": "AZURE_OPENAI_API_KEY"}],
                        "sentence-transformers/all-MiniLM-L6-v2": [{"provider": "huggingface"}, {"provider": "onnx"}]}'

Every route of a model serves that model's vector space; a failing route hands over to the next of the same model,
never to another model (`lib/providers/router.py`). A route without settings takes today's variables for its
provider (`OPENAI_API_KEY`, `OPENAI_BASE_URL`, `HF_TOKEN`, ...). Secrets are named by variable (`api_key_env`),
never written inline. Every mistake is one configuration error naming the model and the route.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import ConfigError

AZURE_API_VERSION = "2024-10-21"  # the classic path's default; "v1" (or null) selects the /openai/v1 API
# The settings each provider's route may carry ("name" labels a route in headers, logs and health).
SETTINGS: dict[str, dict[str, str]] = {
    "openai": {"base_url": "an OpenAI-compatible base URL (default: OPENAI_BASE_URL, else OpenAI's)",
               "api_key_env": "the variable holding its key (default: OPENAI_API_KEY)",
               "upstream_model": "the name the upstream knows the model by (default: the model id)"},
    "azure": {"endpoint": "the resource, https://<name>.openai.azure.com", "deployment": "the deployment's name",
              "api_key_env": "the variable holding its key (default: AZURE_OPENAI_API_KEY)",
              "api_version": f"the classic path's api-version (default {AZURE_API_VERSION}); \"v1\" for /openai/v1"},
    "huggingface": {"url": "the Inference API base (default: HF_INFERENCE_URL)",
                    "api_key_env": "the variable holding its token (default: HF_TOKEN, else HF_API_KEY)"},
    "onnx": {"dir": "the model directory (default: EMBEDDINGS_ONNX_MODEL_DIR, else where the export writes)"},
    "local": {},
}
SECRET_WORDS = ("key", "token", "secret", "password")


@dataclass(frozen=True)
class Route:
    model: str  # the model id: the vector space every route of it serves
    index: int  # its place in the model's list, from 0
    provider: str
    name: str  # what headers, logs and health call it
    settings: dict[str, str] = field(default_factory=dict)
    secret: str = field(default="", repr=False)  # the key read from the variable the route names

    def where(self) -> str:
        return f"EMBEDDINGS_ROUTES: model {self.model!r}, route {self.index + 1} ({self.provider})"


def parse(raw: str, env: Mapping[str, str]) -> dict[str, list[Route]]:
    try:
        table = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"EMBEDDINGS_ROUTES is not valid JSON ({exc})") from None
    if not isinstance(table, dict) or not table:
        raise ConfigError('EMBEDDINGS_ROUTES must be a JSON object of model ids to lists of routes, like '
                          '{"text-embedding-3-small": [{"provider": "openai"}]}')
    routes: dict[str, list[Route]] = {}
    for model, entries in table.items():
        if not isinstance(model, str) or not model.strip():
            raise ConfigError("EMBEDDINGS_ROUTES: a model id must be a non-empty string")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"EMBEDDINGS_ROUTES: model {model!r} needs a non-empty list of routes")
        routes[model] = [_route(model, i, entry, env) for i, entry in enumerate(entries)]
        names = [r.name for r in routes[model]]
        if len(set(names)) != len(names):
            raise ConfigError(f"EMBEDDINGS_ROUTES: model {model!r} has two routes named alike: {names}")
    return routes


def _route(model: str, index: int, entry: object, env: Mapping[str, str]) -> Route:
    where = f"EMBEDDINGS_ROUTES: model {model!r}, route {index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a route is an object like {{\"provider\": \"openai\"}}")
    provider = entry.get("provider")
    if provider not in SETTINGS:
        raise ConfigError(f"{where}: 'provider' must be one of {', '.join(SETTINGS)}; got {provider!r}")
    where = f"{where} ({provider})"
    allowed = SETTINGS[provider]
    for key, value in entry.items():
        if key in ("provider", "name"):
            continue
        if key not in allowed:
            if any(word in key.lower() for word in SECRET_WORDS) and not key.endswith("_env"):
                raise ConfigError(f"{where}: secrets are never written inline; put it in a variable and name that "
                                  "variable with 'api_key_env'")
            known = ", ".join(allowed) or "none"
            raise ConfigError(f"{where}: unknown setting {key!r} (its settings: {known})")
        if not isinstance(value, str) and not (key == "api_version" and value is None):
            raise ConfigError(f"{where}: {key!r} must be a string")
    settings = {k: v for k, v in entry.items() if k not in ("provider", "name")}
    name = entry.get("name", f"{provider}#{index + 1}")
    if not isinstance(name, str) or not name.strip() or "," in name:
        raise ConfigError(f"{where}: 'name' must be a non-empty string without commas")
    if provider == "azure":  # what the route is, before whose key it needs
        for required in ("endpoint", "deployment"):
            if not (settings.get(required) or "").strip():
                raise ConfigError(f"{where}: {required!r} is required ({allowed[required]})")
        if not settings["endpoint"].startswith(("https://", "http://")):
            raise ConfigError(f"{where}: 'endpoint' must be an https URL")
    secret = ""
    if provider in ("openai", "azure", "huggingface"):
        defaults = {"openai": ("OPENAI_API_KEY",), "azure": ("AZURE_OPENAI_API_KEY",),
                    "huggingface": ("HF_TOKEN", "HF_API_KEY")}[provider]
        variables = (settings["api_key_env"],) if "api_key_env" in settings else defaults
        secret = next((env[v].strip() for v in variables if env.get(v, "").strip()), "")
        if not secret:
            raise ConfigError(f"{where}: its key is not set: set {' or '.join(variables)}"
                              + ("" if "api_key_env" in settings else ", or name another variable with 'api_key_env'"))
    if provider == "openai":
        settings.setdefault("base_url", env.get("OPENAI_BASE_URL", "").strip() or "https://api.openai.com/v1")
    elif provider == "azure":
        if settings.get("api_version", AZURE_API_VERSION) in (None, "v1"):
            settings["api_version"] = ""
        else:
            settings.setdefault("api_version", AZURE_API_VERSION)
    elif provider == "huggingface":
        settings.setdefault("url", env.get("HF_INFERENCE_URL", "").strip() or "https://router.huggingface.co/hf-inference")
    elif provider == "onnx":
        from .config import onnx_dir

        settings["dir"] = onnx_dir(env, settings.get("dir"))
    for key in ("base_url", "url"):
        if key in settings and not settings[key].startswith(("https://", "http://")):
            raise ConfigError(f"{where}: {key!r} must be an http(s) URL")
    return Route(model, index, provider, name.strip(), settings, secret)

