"""Vectors as the cache stores them: raw little-endian float32 bytes.

Both answer formats come from these bytes. base64 is a plain re-encoding (no float
is ever parsed); the float answer writes each float32 in the shortest decimal that
reads back to the same float32 (what OpenAI and numpy print), not 17-digit float64 noise,
with orjson over numpy views of the bytes (`float_json`: about 35 ns a value, in C).
"""

from __future__ import annotations

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
    from pybase64 import b64decode  # SIMD; validate=True refuses what the stdlib's validate=True refuses

    return b64decode(text, validate=True)


def float_json(blobs: Sequence[bytes]) -> list[bytes]:
    """Each blob as a JSON array of its float32 values, in the shortest decimal that reads back to the same
    float32 (what numpy prints; OpenAI's digits), written by orjson in C from numpy views of the bytes.

    numpy and orjson are imported here, on the first float answer: a base64 answer never loads them."""
    import orjson

    dumps, option = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    # orjson returns its working buffer as it is (at least 32 KB, even for a short array): an exact-size copy,
    # made at once, keeps what is held at the text's own size (8-dim vectors to .jsonl: 0.2 GB of RSS, not 0.7).
    return [memoryview(dumps(a, option=option)).tobytes() for a in float32_arrays(blobs)]


def float32_arrays(blobs: Sequence[bytes]) -> list:
    """numpy float32 views of the blobs (no copy of the data)."""
    import numpy as np

    dtype = np.dtype("<f4")
    return [np.frombuffer(b, dtype=dtype) for b in blobs]
