"""Retry policies, built on tenacity: one for every provider, one for the other HTTP services a command talks to.

Retry what can succeed (429 rate limits, 5xx, timeouts, connection errors, a model
that is loading), never what cannot (a bad request, a rejected key, an exhausted
quota: `ProviderError.retryable` is False). Waits are exponential with jitter, or
what the provider asked for (`retry-after`, Hugging Face's `estimated_time`), and no
wait is started that would end past the request's deadline: then the last error
goes out, marked as a timeout if the deadline is what stopped us.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .deadline import Deadline
from .errors import EmbeddingError, ProviderError

if TYPE_CHECKING:
    from tenacity import RetryCallState

T = TypeVar("T")
log = logging.getLogger("embeddings")


def _wait(state: RetryCallState) -> float:
    from tenacity import wait_random_exponential

    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, ProviderError) and exc.retry_after is not None:
        return max(0.0, exc.retry_after)
    return wait_random_exponential(multiplier=0.25, max=8.0)(state)


def call_with_retries(fn: Callable[[], T], deadline: Deadline, *, attempts: int = 4, what: str = "provider") -> T:
    """Run `fn` until it succeeds, a non-retryable error, `attempts` tries, or the deadline.

    tenacity is imported here, on the first provider call: a process that only reads its cache never loads it."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt

    def stop(state: RetryCallState) -> bool:
        if stop_after_attempt(attempts)(state):
            return True
        # Stop now rather than start a wait that would cross the deadline (tenacity has already
        # drawn the wait it is about to take, jitter included, into `upcoming_sleep`).
        return state.upcoming_sleep >= deadline.remaining()

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s attempt %d failed (%s); retrying", what, state.attempt_number, exc)

    retrying = Retrying(
        stop=stop,
        wait=_wait,
        retry=retry_if_exception(lambda e: isinstance(e, ProviderError) and e.retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except ProviderError as exc:
        tries = retrying.statistics.get("attempt_number", 1)
        if exc.retryable and exc.retry_after is None and tries < attempts:
            # The deadline, not the attempt budget, ended it: say so, and what was tried. (An error that
            # says when to come back, a 429 or a loading model, goes out as it is, with its retry-after.)
            raise ProviderError(
                504,
                f"The embedding provider did not succeed within the {deadline.seconds:g} s deadline "
                f"({tries} attempt(s); last error: {exc.message})",
                retryable=False,
                code="provider_timeout",
            ) from exc
        raise


def call_again_while(fn: Callable[[], T], again: Callable[[BaseException], bool], *, attempts: int,
                     longest_wait: float) -> T:
    """Run `fn` (a call to a deployed endpoint, or to OpenAI's Files and Batches APIs) while `again` says its error
    may pass, `attempts` tries at most: waiting what the answer asked for (an `EmbeddingError`'s `retry_after`),
    else exponential backoff with jitter up to `longest_wait` seconds. The last error goes out as it is."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    backoff = wait_random_exponential(multiplier=0.5, max=longest_wait)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, EmbeddingError) and exc.retry_after is not None:
            return exc.retry_after
        return backoff(state)

    return Retrying(stop=stop_after_attempt(attempts), wait=wait, retry=retry_if_exception(again), reraise=True)(fn)
