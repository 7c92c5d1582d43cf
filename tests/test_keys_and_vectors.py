"""Properties of the cache key contract and of the float32 encodings."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.keys import cache_key
from lib.vectors import float_json, from_base64, from_floats, is_valid, to_floats
from tests.conftest import ROOT

# The contract, pinned: changing any of these breaks every deployed cache, so it needs a new key version.
PINNED = [
    (("text-embedding-3-small", None, "hello", None),
     "6385091b2d65e69aafd062897eed6bed89e2e1dd2a622a24db943ef54b1743ed"),
    (("text-embedding-3-small", 256, [1, 2, 3], None),
     "461cf5c27ce9d9de39818c1cdd3af736fc9de78d26794b26045f1cca4275ef07"),
    (("BAAI/bge-m3", None, "héllo \u2603", {"normalize": True}),
     "46e64eae1ffbda4b1ae610f5398d8e141ad9c5d6340cc52cfb8687c8d4c7aa45"),
]


def test_pinned_keys():
    for args, key in PINNED:
        assert cache_key(*args) == key


def test_key_is_the_documented_formula():
    payload = json.dumps(["embcache", 1, "m", 8, "text", "x", {"a": 1}], ensure_ascii=True, separators=(",", ":"),
                         sort_keys=True)
    assert cache_key("m", 8, "x", {"a": 1}) == hashlib.sha256(payload.encode()).hexdigest()


def test_key_is_stable_across_processes():
    code = ("import sys, json; sys.path.insert(0, %r); from lib.keys import cache_key; "
            "print(json.dumps([cache_key(*a) for a in json.loads(sys.argv[1])]))" % str(ROOT))
    args = [list(a) for a, _ in PINNED]
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [k for _, k in PINNED]


items = st.one_of(st.text(min_size=1), st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=5))
requests = st.tuples(st.sampled_from(["text-embedding-3-small", "text-embedding-3-large", "a", "a\x00b"]),
                     st.one_of(st.none(), st.integers(1, 3072)), items,
                     st.dictionaries(st.sampled_from(["normalize", "truncate", "prompt_name"]),
                                     st.one_of(st.booleans(), st.text(max_size=3)), max_size=2))


@settings(max_examples=500, deadline=None)
@given(requests, requests)
def test_distinct_requests_never_share_a_key(a, b):
    assert (cache_key(*a) == cache_key(*b)) == (a == b)


@given(st.text(min_size=1))
def test_text_and_token_lookalikes_differ(text):
    assert cache_key("m", None, text) != cache_key("m", None, [ord(c) for c in text])
    assert cache_key("m", None, text) != cache_key("m", None, text + " ")


f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(f32, min_size=1, max_size=64))
def test_float32_round_trips_exactly(values):
    blob = from_floats(values)
    assert to_floats(blob) == [float(np.float32(v)) for v in values]
    assert from_base64(base64.b64encode(blob).decode()) == blob
    (text,) = float_json([blob])
    texts = text.decode("ascii").strip("[]").split(",")
    assert np.array([float(t) for t in texts], dtype="<f4").tobytes() == blob  # reads back exactly
    # and as short as numpy's shortest float32 form: the same significant digits, never float64 noise
    for t, x in zip(texts, np.frombuffer(blob, dtype="<f4"), strict=True):
        assert _sig(t) == _sig(str(x))
    assert json.loads(text) == [float(t) for t in texts]


def _sig(number: str) -> int:
    mantissa = number.lstrip("-").lower().split("e")[0].replace(".", "")
    return len(mantissa.lstrip("0").rstrip("0")) or 1


def test_validity_rejects_wrong_length_and_non_finite():
    good = np.ones(4, dtype="<f4").tobytes()
    assert is_valid(good, 4)
    assert not is_valid(good, 3) and not is_valid(good[:-1], 4) and not is_valid(b"", 0)
    for bad in (np.nan, np.inf, -np.inf):
        assert not is_valid(np.array([1, bad, 1, 1], dtype="<f4").tobytes(), 4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32), min_size=1, max_size=40))
def test_finite_check_agrees_with_numpy(values):
    blob = np.array(values, dtype="<f4").tobytes()
    assert is_valid(blob, len(values)) == bool(np.isfinite(np.frombuffer(blob, dtype="<f4")).all())
