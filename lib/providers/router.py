"""Failover within one vector space: a provider that holds, for each model, its ordered routes.

The service sees one provider; this one hands each batch to the model's first route that is up, and what a route
could not do to the next route *of the same model*: a failing route never hands over to another model, whose
vectors would be wrong for ever in a cache keyed by the model id. It hands over on what a retry elsewhere can fix
(429 after the route's own retries, 5xx, a timeout, a connection error), never on a 400 (the input is wrong, not
the route). Inputs a route embedded before it failed are kept (they are paid for); only the rest move on.

A route that keeps failing (DOWN_AFTER failed batches in a row) is skipped for DOWN_FOR_S seconds in this process,
so an outage costs each request nothing instead of a timeout; then one batch tries it again. Skipped routes are
still tried, last, when every other route has failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..deadline import Deadline
from ..errors import ProviderError
from ..models import ModelSpec
from .base import Batch, Item, Provider

log = logging.getLogger("embeddings")

DOWN_AFTER = 2  # failed batches in a row before a route is skipped
DOWN_FOR_S = 30.0
# A route with others after it gets this share of the time left, so that they still have time to answer.
FIRST_SHARE = 0.5


def hands_over(exc: ProviderError) -> bool:
    """Whether another route of the same model may succeed where this one failed."""
    return exc.status == 429 or exc.status >= 500


@dataclass
class RouteState:
    name: str
    provider_name: str
    provider: Provider
    failures: int = 0  # in a row
    down_until: float = 0.0
    served: int = 0  # batches served
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def succeeded(self) -> None:
        with self.lock:
            self.failures, self.down_until = 0, 0.0
            self.served += 1

    def failed(self, exc: ProviderError, now: float) -> None:
        with self.lock:
            self.failures += 1
            self.last_error = exc.code or str(exc.status)
            if self.failures >= DOWN_AFTER:
                self.down_until = now + DOWN_FOR_S


class RoutingProvider:
    name = "routes"

    def __init__(self, routes: Mapping[str, Sequence[tuple[str, str, Provider]]], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`routes`: model id -> [(route name, provider name, provider), ...] in order."""
        self._routes = {model: [RouteState(name, kind, p) for name, kind, p in entries]
                        for model, entries in routes.items()}
        self._clock = clock
        self.concurrency = max(state.provider.concurrency for states in self._routes.values() for state in states)

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        # The same for every route of a model (checked when the routes are built): the key never depends on it.
        return self._routes[model.id][0].provider.key_options(model)

    def plan(self, items: Sequence[Item], model: ModelSpec) -> list[list[int]]:
        return self._routes[model.id][0].provider.plan(items, model)

    def states(self) -> dict[str, list[dict[str, object]]]:
        """Each route's state, for /v1/health: names and counts, never a URL or a key."""
        now = self._clock()
        return {model: [{"name": s.name, "provider": s.provider_name, "state": "up" if s.up(now) else "down",
                         "failures_in_a_row": s.failures, "batches_served": s.served,
                         **({"retry_in_s": round(s.down_until - now, 1)} if not s.up(now) else {}),
                         **({"last_error": s.last_error} if s.last_error else {})}
                        for s in states]
                for model, states in self._routes.items()}

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        states = self._routes[model.id]
        now = self._clock()
        order = [s for s in states if s.up(now)] + [s for s in states if not s.up(now)]
        vectors: dict[int, bytes] = {}
        tokens = 0
        used: list[str] = []
        first_error: ProviderError | None = None
        for position, state in enumerate(order):
            pending = [i for i in range(len(items)) if i not in vectors]
            if not pending or deadline.expired():
                break
            last = position == len(order) - 1
            budget = deadline if last else Deadline(deadline.remaining() * FIRST_SHARE)
            try:
                tokens += self._on(state, items, pending, model, dimensions, budget, vectors)
                used.append(state.name)
                state.succeeded()
            except ProviderError as exc:
                if len(vectors) > 0 and state.name not in used:
                    used.append(state.name)  # it served part of the batch before failing
                if not hands_over(exc):
                    raise
                state.failed(exc, self._clock())
                first_error = first_error or exc
                if not last:
                    log.warning("route %s of %s failed (%s %s); handing over to the next route", state.name,
                                model.id, exc.status, exc.code)
        if len(vectors) == len(items):
            return Batch([vectors[i] for i in range(len(items))], tokens, route=",".join(used))
        assert first_error is not None or deadline.expired()
        # Every route failed: the caller gets the first route's error (the one its configuration prefers).
        raise first_error or ProviderError(504, "The request ran out of its deadline on every route",
                                           retryable=False, code="provider_timeout")

    def _on(self, state: RouteState, items: Sequence[Item], pending: list[int], model: ModelSpec,
            dimensions: int | None, deadline: Deadline, vectors: dict[int, bytes]) -> int:
        """The pending inputs on one route, in that route's own batches (its limits); each batch that succeeds
        is kept even if a later one fails."""
        tokens = 0
        subset = [items[i] for i in pending]
        for batch in state.provider.plan(subset, model):
            out = state.provider.embed([subset[j] for j in batch], model, dimensions, deadline)
            if len(out.vectors) != len(batch):
                raise ProviderError(502, f"The embedding provider returned {len(out.vectors)} vectors for "
                                    f"{len(batch)} inputs", retryable=False, code="provider_malformed")
            for j, vector in zip(batch, out.vectors):
                vectors[pending[j]] = vector
            tokens += out.tokens
        return tokens
