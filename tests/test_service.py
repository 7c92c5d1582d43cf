"""The embedding service itself, driven step by step: single flight has no window to pay twice."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from lib.cache.memory import MemoryCache
from lib.deadline import Deadline
from lib.models import ModelSpec, Registry
from lib.providers.base import Batch
from lib.service import EmbeddingService

MODEL = ModelSpec("text-embedding-3-small", "openai", 4)


def vector(text: str) -> bytes:
    return np.full(4, len(text), dtype="<f4").tobytes()


class BlockingProvider:
    """Embeds only when told to, and counts what it was asked to pay for."""

    name = "blocking"
    concurrency = 1

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        return {}

    def plan(self, items: Sequence, model: ModelSpec) -> list[list[int]]:
        return [list(range(len(items)))]

    def embed(self, items: Sequence, model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        self.sent.extend(items)
        self.entered.set()
        assert self.release.wait(10)
        return Batch([vector(t) for t in items], len(items))


class SlowLookupTier(MemoryCache):
    """A persistent tier whose answer, once `hold` is set, is delayed after it was read (a slow round trip)."""

    name = "slow"
    trusted = False

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.reading = threading.Event()
        self.go = threading.Event()

    def get_many(self, keys: Sequence[str], deadline: Deadline | None = None) -> Mapping[str, bytes]:
        found = super().get_many(keys)
        if self.hold.is_set():
            self.reading.set()
            assert self.go.wait(10)
        return found


def test_a_flight_that_lands_between_lookup_and_claim_is_not_paid_again():
    provider = BlockingProvider()
    slow = SlowLookupTier()
    service = EmbeddingService(Registry("openai"), provider, [MemoryCache(), slow], timeout_s=10)
    results: dict[str, object] = {}

    first = threading.Thread(target=lambda: results.__setitem__("a", service.embed(["text"], MODEL, None)))
    first.start()
    assert provider.entered.wait(5)  # A has claimed "text" and is paying for it

    slow.hold.set()
    second = threading.Thread(target=lambda: results.__setitem__("b", service.embed(["text"], MODEL, None)))
    second.start()
    assert slow.reading.wait(5)  # B has looked "text" up (a miss) and its answer is on the way back

    provider.release.set()
    first.join(5)  # A lands: cached, and no longer in flight, before B claims
    slow.go.set()
    second.join(5)

    assert provider.sent == ["text"]  # paid once
    a, b = results["a"], results["b"]
    assert a.vectors == b.vectors == [vector("text")]
    assert (a.hits, a.misses, a.tokens) == (0, 1, 1)
    assert (b.hits, b.misses, b.tokens) == (1, 0, 0)


def test_concurrent_overlapping_calls_pay_each_text_once():
    provider = BlockingProvider()
    provider.release.set()
    service = EmbeddingService(Registry("openai"), provider, [MemoryCache()], timeout_s=10)
    texts = [f"text {i}" for i in range(40)]
    barrier = threading.Barrier(16)
    out: list = [None] * 16

    def call(n: int) -> None:
        mine = texts[n: n + 20] + texts[:3]  # overlapping, with duplicates across calls
        barrier.wait()
        out[n] = (mine, service.embed(mine, MODEL, None))

    threads = [threading.Thread(target=call, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(provider.sent) == sorted(set(provider.sent))
    for mine, result in out:
        assert result.vectors == [vector(t) for t in mine]
