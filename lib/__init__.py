"""Embeddings with a persistent cache: one service, four doors (HTTP, `Embedder`, the command line, a page).

`import lib` is cheap: the public names below are loaded on first use, and nothing heavy (openai, supabase,
numpy, torch) is imported until a call needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Embedder", "EmbeddingResult", "EmbeddingError", "InvalidInputError"]

if TYPE_CHECKING:
    from .embedder import Embedder, EmbeddingResult
    from .errors import EmbeddingError, InvalidInputError


def __getattr__(name: str) -> Any:
    if name in ("Embedder", "EmbeddingResult"):
        from . import embedder

        return getattr(embedder, name)
    if name in ("EmbeddingError", "InvalidInputError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'lib' has no attribute {name!r}")
