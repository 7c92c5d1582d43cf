"""The one interface every cache backend implements.

A cache maps a key (the hex SHA-256 of `lib.keys`) to a vector's raw float32
bytes. It knows nothing of providers or HTTP. Backends may raise on failure; the
service treats every cache error as a miss, so the cache is a speed layer and
never a point of failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol

from ..deadline import Deadline


class Entry(NamedTuple):
    """One vector to store. A named tuple: a corpus run or a collected batch makes 50,000 at a time, and a tuple
    is made in half the time of a frozen dataclass."""

    key: str
    model: str
    dimensions: int  # the length of the vector, in float32 values
    vector: bytes


@dataclass(frozen=True)
class CacheStats:
    """What a persistent cache holds for one model and size (the command line's `stats`)."""

    model: str
    dimensions: int
    rows: int
    vector_bytes: int  # the stored vectors themselves; the table's own size on disk is larger
    oldest: datetime | None
    newest: datetime | None
    unused_30_days: int
    unused_90_days: int


class Cache(Protocol):
    name: str
    # True when the tier only ever holds vectors this process validated (the memory LRU): its
    # hits are not checked again. Anything stored outside the process is checked on every read.
    trusted: bool

    def get_many(self, keys: Sequence[str], deadline: Deadline | None = None) -> Mapping[str, bytes]:
        """The vectors found for `keys` (absent keys are simply missing). One round trip, and no wait
        past a fraction of the deadline's time left: a slow cache is a miss, not a stall."""
        ...

    def put_many(self, entries: Sequence[Entry], deadline: Deadline | None = None) -> int:
        """Store entries that are not there yet; returns how many were new. One round trip."""
        ...

    def ping(self) -> bool:
        """Whether the backend answers (for /api/health)."""
        ...


class NoCache:
    """`EMBEDDINGS_CACHE=none`: every input is a miss."""

    name = "none"
    trusted = True

    def get_many(self, keys: Sequence[str], deadline: Deadline | None = None) -> Mapping[str, bytes]:
        return {}

    def put_many(self, entries: Sequence[Entry], deadline: Deadline | None = None) -> int:
        return 0

    def ping(self) -> bool:
        return True
