"""A per-process LRU bounded in bytes, safe under threads.

Vercel runs concurrent requests as threads of one warm instance; this layer lets
that instance answer repeats without any round trip.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from ..deadline import Deadline
from .base import Entry

_OVERHEAD = 120  # rough bytes per entry beyond the vector: key string, dict slot


class MemoryCache:
    name = "memory"
    trusted = True

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get_many(self, keys: Sequence[str], deadline: Deadline | None = None) -> Mapping[str, bytes]:
        found: dict[str, bytes] = {}
        with self._lock:
            items = self._items
            for key in keys:
                vec = items.get(key)
                if vec is not None:
                    items.move_to_end(key)
                    found[key] = vec
        return found

    def put_many(self, entries: Sequence[Entry], deadline: Deadline | None = None) -> int:
        new = 0
        with self._lock:
            for e in entries:
                size = len(e.vector) + _OVERHEAD
                if size > self.max_bytes:
                    continue
                old = self._items.pop(e.key, None)
                if old is None:
                    new += 1
                else:
                    self.bytes -= len(old) + _OVERHEAD
                self._items[e.key] = e.vector
                self.bytes += size
            while self.bytes > self.max_bytes:
                _, vec = self._items.popitem(last=False)
                self.bytes -= len(vec) + _OVERHEAD
        return new

    def ping(self) -> bool:
        return True
