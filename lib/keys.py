"""The cache key: a contract, not an implementation detail.

    key = SHA-256( UTF-8( JSON array ) ), hex, where the array is
    ["embcache", 1, model, dimensions, kind, input, options]

- `"embcache", 1`: the scheme and its version. Any change below bumps the version,
  so old entries are never misread as new ones.
- `model`: the model id (the vector space), never the provider or route that served it.
- `dimensions`: the requested size, or null for the model's native size (asking for
  the native size explicitly is the same vector, so it is normalised to null).
- `kind`: "text" or "tokens"; `input`: the exact string (no trimming, no Unicode
  normalisation) or the list of token ids.
- `options`: provider options that change the vector (e.g. Hugging Face's
  `normalize`, `truncate`, `prompt_name`), as a JSON object with sorted keys; {} if none.

The JSON is written with `ensure_ascii=True`, `separators=(",", ":")` and
`sort_keys=True`, which is unambiguous (every string is quoted and escaped) and
stable across processes, Python versions and platforms.
Deliberately *not* in the key: `user` and `encoding_format` (a float caller and a
base64 caller share entries: the cache stores the raw float32 bytes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence

SCHEME = "embcache"
VERSION = 1

_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), sort_keys=True, allow_nan=False).encode
_quote = json.encoder.encode_basestring_ascii  # the C function `_encode` itself uses for strings


def cache_key(
    model: str,
    dimensions: int | None,
    item: str | Sequence[int],
    options: Mapping[str, object] | None = None,
) -> str:
    return key_function(model, dimensions, options)(item)


def key_function(
    model: str, dimensions: int | None, options: Mapping[str, object] | None = None
) -> Callable[[str | Sequence[int]], str]:
    """The key of each input of one request. Byte for byte the documented JSON, with the parts shared
    by every input encoded once (a request may carry 2048 inputs, and this runs on every cache hit)."""
    head = f'["{SCHEME}",{VERSION},{_encode(model)},{_encode(dimensions)},'
    tail = "," + _encode(dict(options or {})) + "]"
    sha256 = hashlib.sha256

    def key(item: str | Sequence[int]) -> str:
        if isinstance(item, str):
            payload = head + '"text",' + _quote(item) + tail
        else:
            payload = head + '"tokens",[' + ",".join(map(str, map(int, item))) + "]" + tail
        return sha256(payload.encode("ascii")).hexdigest()

    return key
