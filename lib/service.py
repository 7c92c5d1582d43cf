"""The embedding service: dedupe, keys, cache lookup, provider for the misses, cache write, reassembly.

This is the `CacheBackedEmbeddings` idea made per-input and batch-wise:

1. one key per input (`lib.keys`); repeated inputs share a key and are computed once;
2. one `get_many` per cache tier (memory first, then the persistent backend);
   a tier that errors is skipped and logged, never fatal; a stored vector of the
   wrong length or not finite is a miss (and is replaced when recomputed);
3. the misses go to the provider in batches that respect its limits; a miss that
   another thread of this process is already computing is waited for, not paid twice
   (and a miss whose computation finished between our lookup and our claim is looked up
   again before it is paid for);
4. each batch is validated and written to every tier as soon as it arrives, so a later
   failure loses nothing already paid for;
5. the answer is reassembled in input order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from .cache.base import Cache, Entry
from .deadline import Deadline
from .errors import ProviderError
from .keys import key_function
from .models import ModelSpec, Registry
from .providers.base import Item, Provider
from .vectors import is_valid

log = logging.getLogger("embeddings")


@dataclass
class Result:
    vectors: list[bytes]  # one per input, in input order
    hits: int  # distinct inputs served from a cache
    misses: int  # distinct inputs computed (or waited for) in this request
    tokens: int  # tokens the provider billed for this request
    cache_errors: list[str] = field(default_factory=list)  # tiers that failed (names only)
    routes: list[str] = field(default_factory=list)  # the routes that served this request's misses, if routed


class EmbeddingService:
    def __init__(self, registry: Registry, provider: Provider, tiers: Sequence[Cache], timeout_s: float) -> None:
        self.registry = registry
        self.provider = provider
        self.tiers = list(tiers)
        self.timeout_s = timeout_s
        self._inflight: dict[str, Future[bytes]] = {}
        self._inflight_lock = threading.Lock()
        self._landed = 0  # flights finished so far: a claim made after one landed must look again

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None,
              deadline: Deadline | None = None) -> Result:
        deadline = deadline or Deadline(self.timeout_s)
        options = self.provider.key_options(model)
        make_key = key_function(model.id, dimensions, options)
        keys = [make_key(item) for item in items]
        distinct: dict[str, Item] = {}
        for key, item in zip(keys, items):
            distinct.setdefault(key, item)

        expected = dimensions or model.dimensions
        landed = self._landed
        found, errors = self._lookup(list(distinct), model.id, expected, deadline)
        missing = [k for k in distinct if k not in found]
        tokens = 0
        routes: list[str] = []
        if missing:
            computed, late_hits, tokens, more_errors = self._compute(missing, distinct, model, dimensions,
                                                                     deadline, landed, routes)
            found.update(late_hits)
            found.update(computed)
            errors += [e for e in more_errors if e not in errors]
            missing = [k for k in missing if k not in late_hits]
        return Result([found[k] for k in keys], len(distinct) - len(missing), len(missing), tokens, errors,
                      list(dict.fromkeys(routes)))

    # -- the cache alone (the corpus command's Batch API path: it pays elsewhere, then stores here) ----------

    def keys(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None) -> list[str]:
        """The cache keys of `items`, exactly as `embed` makes them."""
        make_key = key_function(model.id, dimensions, self.provider.key_options(model))
        return [make_key(item) for item in items]

    def cached(self, keys: list[str], model: ModelSpec, dimensions: int | None) -> tuple[dict[str, bytes], list[str]]:
        """Which of `keys` every tier together holds (valid vectors only), and the tiers that could not be asked (a
        caller about to pay for what is not found must not take their silence for a miss)."""
        return self._lookup(list(dict.fromkeys(keys)), model.id, dimensions or model.dimensions,
                            Deadline(self.timeout_s))

    def validated(self, vectors: list[bytes], count: int, model: ModelSpec, dimensions: int | None) -> list[bytes]:
        """Vectors paid for elsewhere, checked as a provider's answer is (count, length, finiteness, the dimensions
        asked): ProviderError if anything is wrong."""
        return self._validated(vectors, count, model, dimensions)

    def store(self, keys: list[str], vectors: list[bytes], model: ModelSpec, dimensions: int | None, *,
              checked: bool = False) -> list[str]:
        """Vectors paid for elsewhere, validated (`validated`; `checked`: the caller just did), then written to
        every tier. A malformed set raises ProviderError and stores nothing. Returns the tiers that failed."""
        if not checked:
            vectors = self._validated(vectors, len(keys), model, dimensions)
        errors: list[str] = []
        self._put(self.tiers, [Entry(k, model.id, len(v) // 4, v) for k, v in zip(keys, vectors)], errors,
                  Deadline(self.timeout_s))
        return errors

    # -- cache tiers -------------------------------------------------------------------------

    def _lookup(self, keys: list[str], model: str, expected: int | None,
                deadline: Deadline) -> tuple[dict[str, bytes], list[str]]:
        found: dict[str, bytes] = {}
        errors: list[str] = []
        remaining = keys
        for depth, tier in enumerate(self.tiers):
            if not remaining:
                break
            try:
                got = tier.get_many(remaining, deadline)
            except Exception as exc:  # the cache is a speed layer: any failure is a miss
                log.warning("cache %s get failed: %s", tier.name, type(exc).__name__)
                errors.append(tier.name)
                continue
            if expected is None and got and len({len(v) for v in got.values()}) == 1:
                # A model named only in configuration, not yet seen by this process: its size is what was
                # stored for it (the key names the model, so one size is expected). Learn it, or pay again.
                expected = len(next(iter(got.values()))) // 4
                self.registry.learn_dimensions(model, expected)
            if tier.trusted:
                good = dict(got)
            else:
                good = {k: v for k, v in got.items() if expected is not None and is_valid(v, expected)}
            if len(good) != len(got):
                log.warning("cache %s: ignored %d invalid vector(s)", tier.name, len(got) - len(good))
            if good and depth > 0:
                # Warm the faster tiers in front with what the slower one had.
                self._put(self.tiers[:depth], [Entry(k, model, len(v) // 4, v) for k, v in good.items()], errors,
                          deadline)
            found.update(good)
            remaining = [k for k in remaining if k not in good]
        return found, errors

    def _put(self, tiers: Sequence[Cache], entries: list[Entry], errors: list[str], deadline: Deadline) -> None:
        for tier in tiers:
            try:
                tier.put_many(entries, deadline)
            except Exception as exc:
                log.warning("cache %s put failed: %s", tier.name, type(exc).__name__)
                if tier.name not in errors:
                    errors.append(tier.name)

    # -- provider --------------------------------------------------------------------------------

    def _compute(self, keys: list[str], distinct: dict[str, Item], model: ModelSpec, dimensions: int | None,
                 deadline: Deadline, landed: int,
                 routes: list[str]) -> tuple[dict[str, bytes], dict[str, bytes], int, list[str]]:
        """Returns (computed or waited for, found late in the tiers, tokens billed, tiers that failed)."""
        # Single flight: claim the keys nobody in this process is computing; wait for the rest.
        mine: dict[str, Future[bytes]] = {}
        theirs: dict[str, Future[bytes]] = {}
        with self._inflight_lock:
            for k in keys:
                fut = self._inflight.get(k)
                if fut is None:
                    mine[k] = self._inflight[k] = Future()
                else:
                    theirs[k] = fut
            look_again = self._landed != landed
        results: dict[str, bytes] = {}
        late: dict[str, bytes] = {}
        errors: list[str] = []
        tokens = 0
        failure: BaseException | None = None
        try:
            if mine and look_again:
                # A flight landed between our lookup and our claim: what it cached is not to be paid twice.
                late, errors = self._lookup(list(mine), model.id, dimensions or model.dimensions, deadline)
                for k, vector in late.items():
                    mine.pop(k).set_result(vector)
            if mine:
                tokens = self._call_provider(list(mine), distinct, model, dimensions, deadline, mine, results, errors,
                                             routes)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            with self._inflight_lock:
                for k in late:
                    self._inflight.pop(k, None)
                for k, fut in mine.items():
                    self._inflight.pop(k, None)
                    if not fut.done():  # whoever waits on this input gets the same error we do
                        fut.set_exception(failure or ProviderError(502, "The embedding provider failed",
                                                                   retryable=False, code="provider_error"))
                self._landed += 1
        for k, fut in theirs.items():
            try:
                results[k] = fut.result(timeout=deadline.remaining())
            except FutureTimeout:
                raise ProviderError(504, "Timed out waiting for the embedding provider", retryable=False,
                                    code="provider_timeout") from None
        return results, late, tokens, errors

    def _call_provider(self, keys: list[str], distinct: dict[str, Item], model: ModelSpec, dimensions: int | None,
                       deadline: Deadline, futures: dict[str, Future[bytes]], results: dict[str, bytes],
                       errors: list[str], routes: list[str]) -> int:
        items = [distinct[k] for k in keys]
        batches = self.provider.plan(items, model)

        def run(batch: list[int]) -> int:
            if deadline.expired():  # no work starts that would end past the deadline
                raise ProviderError(504, f"The request ran out of its {deadline.seconds:g} s deadline before all "
                                    "inputs were embedded (those done are cached: retry to finish)",
                                    retryable=False, code="provider_timeout")
            out = self.provider.embed([items[i] for i in batch], model, dimensions, deadline)
            vectors = self._validated(out.vectors, len(batch), model, dimensions)
            if out.route:
                routes.extend(out.route.split(","))
            entries = [Entry(keys[i], model.id, len(v) // 4, v) for i, v in zip(batch, vectors)]
            # Cache each batch as soon as it is paid for: a later failure must not lose it.
            self._put(self.tiers, entries, errors, deadline)
            for e in entries:
                results[e.key] = e.vector
                futures[e.key].set_result(e.vector)
            return out.tokens

        if len(batches) == 1 or self.provider.concurrency <= 1:
            return sum(run(b) for b in batches)
        tokens = 0
        first_error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=min(self.provider.concurrency, len(batches))) as pool:
            for fut in [pool.submit(run, b) for b in batches]:
                try:
                    tokens += fut.result()
                except BaseException as exc:  # keep the other batches' results, report the first error
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return tokens

    def _validated(self, vectors: list[bytes], count: int, model: ModelSpec, dimensions: int | None) -> list[bytes]:
        """A malformed answer is an error, never cached."""
        if len(vectors) != count:
            raise ProviderError(502, f"The embedding provider returned {len(vectors)} vectors for {count} inputs",
                                retryable=False, code="provider_malformed")
        expected = dimensions or model.dimensions
        if expected is None and vectors:
            # A model named only in configuration: learn its size from its first answer.
            expected = len(vectors[0]) // 4
            self.registry.learn_dimensions(model.id, expected)
        for v in vectors:
            if not is_valid(v, expected or 0):
                raise ProviderError(502, "The embedding provider returned a vector of the wrong length or with "
                                    "non-finite values", retryable=False, code="provider_malformed")
        return vectors
