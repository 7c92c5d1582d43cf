"""A request's time budget, shared by every wait inside one request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.expires - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0


def collect(chunks: Iterable[bytes], gave_up: threading.Event) -> bytearray:
    """A streamed body, read chunk by chunk until it ends or the caller of `run_within` gives up (then the
    worker stops here, leaving its `with` block, which closes the connection). Gathered in one growing buffer
    (grown in place, as a rule), not joined from a list of chunks: a join holds the body twice at its end."""
    body = bytearray()
    for chunk in chunks:
        if gave_up.is_set():
            raise TimeoutError("the caller gave up waiting for this body")
        body += chunk
    return body


def run_within(work: Callable[[threading.Event], T], seconds: float) -> T:
    """`work(gave_up)` in a worker thread, waited on for at most `seconds`.

    Client timeouts bound each socket read, not a whole call: a peer that sends one byte
    every half second keeps a read-timeout client waiting for ever. Here the caller gets
    its answer or a `TimeoutError` on time, whatever the peer does; `gave_up` is set on
    time-out so the worker stops at its next step (and closes its connection) by itself.
    """
    result: Future[T] = Future()
    gave_up = threading.Event()

    def run() -> None:
        try:
            result.set_result(work(gave_up))
        except BaseException as exc:  # handed to the waiting thread
            result.set_exception(exc)

    threading.Thread(target=run, name="bounded-call", daemon=True).start()
    try:
        return result.result(timeout=seconds)
    except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError since 3.11
        gave_up.set()
        raise
