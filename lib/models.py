"""The model registry: which model ids exist, who serves them, and their shape.

A model id names a vector space. The cache key is built from it (never from the
provider that served it), so the same model reached two ways shares one cache,
and two different models can never share an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import invalid


@dataclass(frozen=True)
class ModelSpec:
    id: str
    provider: str  # "openai" | "local" | "huggingface" | "onnx", or the routes' providers ("openai,azure")
    dimensions: int | None  # native size; None until learned (Hugging Face models not in config)
    flexible_dimensions: bool = False  # whether `dimensions` may shorten the vector
    accepts_tokens: bool = False  # whether token-id inputs are understood
    max_input_tokens: int = 8192


MINILM = "sentence-transformers/all-MiniLM-L6-v2"

BUILTIN: tuple[ModelSpec, ...] = (
    ModelSpec("text-embedding-3-small", "openai", 1536, flexible_dimensions=True, accepts_tokens=True),
    ModelSpec("text-embedding-3-large", "openai", 3072, flexible_dimensions=True, accepts_tokens=True),
    ModelSpec("text-embedding-ada-002", "openai", 1536, accepts_tokens=True),
    ModelSpec(MINILM, "local", 384, max_input_tokens=256),
)

DEFAULT_MODEL = {"openai": "text-embedding-3-small", "local": MINILM, "huggingface": MINILM}


class Registry:
    """The models one deployment serves: those of its configured provider."""

    def __init__(self, provider: str, extra: dict[str, int | None] | None = None) -> None:
        self.provider = provider
        self._models: dict[str, ModelSpec] = {}
        for spec in BUILTIN:
            # all-MiniLM-L6-v2 is one vector space whether it runs here or on Hugging Face.
            if spec.provider == provider or (provider == "huggingface" and spec.id == MINILM):
                self._models[spec.id] = ModelSpec(
                    spec.id, provider, spec.dimensions, spec.flexible_dimensions, spec.accepts_tokens,
                    spec.max_input_tokens,
                )
        for model_id, dims in (extra or {}).items():
            self._models[model_id] = ModelSpec(model_id, provider, dims)

    @classmethod
    def of(cls, specs: list[ModelSpec]) -> Registry:
        """Exactly these models (a deployment configured with routes)."""
        self = cls.__new__(cls)
        self.provider = "routes"
        self._models = {spec.id: spec for spec in specs}
        return self

    @property
    def ids(self) -> list[str]:
        return sorted(self._models)

    def get(self, model_id: str) -> ModelSpec:
        spec = self._models.get(model_id)
        if spec is None:
            raise invalid(
                f"The model '{model_id}' is not served here. Allowed models: {', '.join(self.ids)}.",
                param="model",
                code="model_not_found",
            )
        return spec

    def learn_dimensions(self, model_id: str, dimensions: int) -> ModelSpec:
        """Record a model's native size from its first answer (models named only in config)."""
        spec = self._models[model_id]
        if spec.dimensions is None:
            spec = ModelSpec(spec.id, spec.provider, dimensions, spec.flexible_dimensions, spec.accepts_tokens,
                             spec.max_input_tokens)
            self._models[model_id] = spec
        return spec
