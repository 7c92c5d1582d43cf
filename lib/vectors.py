"""Vectors as the cache stores them: raw little-endian float32 bytes.

Both answer formats come from these bytes. base64 is a plain re-encoding (no float
is ever parsed); the float answer writes each float32 in the shortest decimal that
reads back to the same float32 (what OpenAI and numpy print), not 17-digit float64 noise.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
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
    if len(blob) != 4 * dimensions or dimensions <= 0:
        return False
    # Any NaN or infinity makes the (float64, so overflow-free) sum non-finite.
    return math.isfinite(sum(to_floats(blob)))


def to_base64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def from_base64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def shortest_json_arrays(blobs: Sequence[bytes]) -> list[str]:
    """JSON arrays (`[0.1,-0.25,...]`) of each blob's float32 values, shortest round-trip form.

    Vectorised: for each precision p = 1..9 digits, round every value to p significant
    digits as a float64 and keep it where it reads back to the same float32. The
    float64 `repr` of such a value is that short decimal. Values no precision could
    certify (not seen in practice) keep their exact float64 value, which also reads
    back exactly. numpy is imported here, on first use, not at start.
    """
    if not blobs:
        return []
    import numpy as np

    dims = len(blobs[0]) // 4
    if all(len(b) == 4 * dims for b in blobs):
        x32 = np.frombuffer(b"".join(blobs), dtype="<f4")
        out = _shortest(np, x32).reshape(len(blobs), dims)
        return ["[" + ",".join(map(float.__repr__, row)) + "]" for row in out.tolist()]
    return [
        "[" + ",".join(map(float.__repr__, _shortest(np, np.frombuffer(b, dtype="<f4")).tolist())) + "]"
        for b in blobs
    ]


def _shortest(np, x32):  # type: ignore[no-untyped-def]
    x64 = x32.astype(np.float64)
    result = x64.copy()
    todo = np.flatnonzero(np.isfinite(x64) & (x64 != 0))
    if todo.size == 0:
        return result
    with np.errstate(all="ignore"):
        exp = np.floor(np.log10(np.abs(x64[todo]))).astype(np.int64)
        for p in range(1, 10):
            vals = x64[todo]
            k = (p - 1) - exp  # round to 10**-k
            # Only where 10**k and 10**-k are exact float64 powers is the rounding a true decimal.
            scale = np.power(10.0, k.astype(np.float64))
            cand = np.where(k >= 0, np.round(vals * scale) / scale, np.round(vals / np.power(10.0, -k)) * np.power(10.0, -k))
            ok = (cand.astype(np.float32) == x32[todo]) & (np.abs(k) <= 22)
            result[todo[ok]] = cand[ok]
            todo, exp = todo[~ok], exp[~ok]
            if todo.size == 0:
                break
    return result
