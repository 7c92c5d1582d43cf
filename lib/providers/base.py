"""The one interface every provider implements.

A provider turns a batch of inputs into float32 vectors for one model. It knows
nothing of caches or HTTP requests: it is handed the inputs that missed the cache,
already deduplicated, and the request's deadline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

from ..deadline import Deadline
from ..models import ModelSpec

Item = Union[str, Sequence[int]]  # a text, or token ids (OpenAI models only)


@dataclass
class Batch:
    vectors: list[bytes]  # little-endian float32, one per input, in input order
    tokens: int  # what the provider billed for this call (0 if nothing is billed)
    route: str = ""  # which route(s) served it, when the provider is a router (`lib/providers/router.py`)


class Provider(Protocol):
    name: str
    concurrency: int  # how many batches may be in flight at once

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        """Provider options that change the vector, for the cache key ({} if none)."""
        ...

    def plan(self, items: Sequence[Item], model: ModelSpec) -> list[list[int]]:
        """Split the inputs (by index) into batches that respect the provider's limits."""
        ...

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        """Embed one batch (retrying what may succeed, within the deadline)."""
        ...


def estimate_tokens(item: Item) -> int:
    """A safe over-estimate of an input's tokens without a tokenizer (UTF-8 bytes / 2)."""
    if isinstance(item, str):
        return len(item.encode("utf-8", "surrogatepass")) // 2 + 1
    return len(item)


def chunk_by_limits(items: Sequence[Item], max_items: int, max_tokens: int) -> list[list[int]]:
    # At most 2 tokens a character (a text's UTF-8 bytes / 2 + 1; a token list's length): when even that bound
    # fits, there is one chunk, found with one pass in C instead of an estimate per input.
    if len(items) <= max_items and 2 * sum(map(len, items)) + len(items) <= max_tokens:
        return [list(range(len(items)))] if items else []
    chunks: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, item in enumerate(items):
        cost = estimate_tokens(item)
        if current and (len(current) >= max_items or tokens + cost > max_tokens):
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += cost
    if current:
        chunks.append(current)
    return chunks
