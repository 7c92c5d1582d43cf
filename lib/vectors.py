"""Vectors as the cache stores them: raw little-endian float32 bytes.

Both answer formats come from these bytes. base64 is a plain re-encoding (no float
is ever parsed); the float answer writes each float32 in the shortest decimal that
reads back to the same float32 (what OpenAI and numpy print), not 17-digit float64 noise.
"""

from __future__ import annotations

import base64
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

_LITTLE = sys.byteorder == "little"


def from_floats(values: Iterable[float]) -> bytes:
    """Pack floats as little-endian float32 (rounding float64 to the nearest float32)."""
    arr = array("f", values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def to_floats(blob: bytes) -> list[float]:
    """The float32 values as Python floats (exact: every float32 is a float64)."""
    arr = array("f")
    arr.frombytes(blob)
    if not _LITTLE:
        arr.byteswap()
    return arr.tolist()


def is_valid(blob: bytes, dimensions: int) -> bool:
    """Whole and finite: the only vectors allowed into the cache or out of it."""
    if dimensions <= 0 or len(blob) != 4 * dimensions:
        return False
    return all_finite(blob)


def all_finite(blob: bytes) -> bool:
    """No NaN or infinity among the little-endian float32 values, checked on the bytes.

    A float32 is non-finite exactly when its 8 exponent bits are all set: the top byte
    is 0x7F or 0xFF and the next one has its high bit set. The top bytes are one strided
    slice and two byte searches in C (this runs on every persistent-cache hit); only a
    vector holding such a byte, which no real embedding does, is looked at value by value.
    """
    top = blob[3::4]
    if 0x7F not in top and 0xFF not in top:
        return True
    mid = blob[2::4]
    return not any(t & 0x7F == 0x7F and m & 0x80 for t, m in zip(top, mid))


def from_base64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def shortest_json_arrays(blobs: Sequence[bytes]) -> list[bytes]:
    """JSON arrays (`[0.1,-0.25,...]`, ASCII bytes) of each blob's float32 values, in the shortest decimal
    form that reads back to the same float32 (as numpy and OpenAI print them).

    Formatting floats is the one costly step of a float answer (about 3 us a value in
    pure Python), so the text is memoised per distinct vector: a warm instance
    answers repeated float requests without formatting anything.
    """
    out = []
    for blob in blobs:
        text = _text_memo.get(blob)
        if text is None:
            text = ("[" + ",".join(shortest_float32(to_floats(blob))) + "]").encode("ascii")
            _text_memo.put(blob, text)
        out.append(text)
    return out


_FORMATS = {p: "%." + str(p) + "g" for p in range(1, 10)}


def shortest_float32(values: list[float]) -> list[str]:
    """Each float32 value (given as its exact float) as the fewest significant digits that read
    back to it. Nine always suffice; most values need eight, some fewer: try 8, then 9 for
    those that fail, then 7, 6, ... for those that pass, each round in bulk."""
    out: list[str] = [""] * len(values)

    def attempt(p: int, idx: list[int]) -> tuple[list[tuple[int, str]], list[int]]:
        fmt = _FORMATS[p]
        strs = [fmt % values[i] for i in idx]
        back = array("f", map(float, strs)).tolist()
        ok, bad = [], []
        for j, i in enumerate(idx):
            if back[j] == values[i]:
                ok.append((i, strs[j]))
            else:
                bad.append(i)
        return ok, bad

    # Only finite vectors are ever cached or answered (`is_valid`), so every value formats.
    passed, failed = attempt(8, list(range(len(values))))
    for i in failed:
        out[i] = _FORMATS[9] % values[i]
    p = 8
    while passed and p > 1:
        shorter, longer = attempt(p - 1, [i for i, _ in passed])
        keep = dict(passed)
        for i in longer:
            out[i] = keep[i]
        passed, p = shorter, p - 1
    for i, text in passed:
        out[i] = text
    return out


class _TextMemo:
    """A small LRU from vector bytes to their rendered JSON text, bounded in bytes, safe under threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, blob: bytes) -> bytes | None:
        with self._lock:
            text = self._items.get(blob)
            if text is not None:
                self._items.move_to_end(blob)
            return text

    def put(self, blob: bytes, text: bytes) -> None:
        size = len(blob) + len(text)
        with self._lock:
            if blob in self._items or size > self.max_bytes:
                return
            self._items[blob] = text
            self.bytes += size
            while self.bytes > self.max_bytes:
                old, old_text = self._items.popitem(last=False)
                self.bytes -= len(old) + len(old_text)


_text_memo = _TextMemo(32 * 1024 * 1024)
