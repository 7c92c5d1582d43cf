"""Request handling: auth, parsing, limits, and turning results and errors into answers.

Everything here is about one HTTP request and nothing about how vectors are made or
stored: that is the service's job (`lib.service`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from dataclasses import dataclass, field

from .app import App
from .config import ConfigError, Settings
from .errors import APIError, ProviderError, invalid
from .models import ModelSpec
from .providers.base import Item

class Streamed:
    """An answer made piece by piece as it is sent, never held whole.

    The Content-Length goes before the body (a bridge may not pass chunked answers on), so the length is
    either known in advance (base64: arithmetic) or learnt by one formatting pass that keeps only lengths
    (large float answers). Formatting is deterministic: both passes give the same bytes."""

    def __init__(self, head: bytes, groups: Callable[[], Iterator[list[bytes]]], tail: bytes,
                 length: int | None = None) -> None:
        self.head, self.tail, self._groups = head, tail, groups
        if length is None:
            length = len(head) + len(tail) + sum(sum(map(len, g)) for g in groups())
        self.length = length

    def __iter__(self) -> Iterator[list[bytes]]:
        """The answer's parts, a group (a list of buffers) at a time; the head rides with the first group and
        the tail with the last, so a small answer is one write."""
        groups = self._groups()
        held = [self.head, *next(groups, [])]
        for group in groups:
            yield held
            held = group
        yield held + [self.tail]


@dataclass
class Response:
    status: int
    # A large answer stays in parts: sent without joining them (`lib.handler`); a very large float answer is
    # made as it is sent (`Streamed`).
    body: bytes | list[bytes] | Streamed
    headers: dict[str, str] = field(default_factory=dict)
    inputs: int = 0  # for the access log
    hits: int = 0
    misses: int = 0
    route: str = ""  # for the access log
    content_type: str = "application/json"


def error_response(err: APIError) -> Response:
    return Response(err.status, err.body(), dict(err.headers))


def config_error(exc: ConfigError) -> APIError:
    return APIError(500, f"The server is misconfigured: {exc}", type="server_error", code="misconfigured")


# -- access ------------------------------------------------------------------------------------


def authorize(headers: Mapping[str, str], settings: Settings) -> None:
    """`Authorization: Bearer <key>` against EMBEDDINGS_API_KEYS, in constant time.

    No keys configured: open (for the local dev server), except on Vercel, where the
    function refuses everything rather than become an open, billable endpoint.
    """
    if not settings.api_keys:
        if settings.on_vercel:
            raise APIError(500, "EMBEDDINGS_API_KEYS is not set: this deployment refuses every request until it is "
                                "(an open endpoint would spend the provider budget for anyone)",
                           type="server_error", code="auth_not_configured")
        return
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    # Compare digests so the time taken depends neither on the key's length nor on how much of it matches.
    offered = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    ok = False
    for digest in _digests(settings.api_keys):
        ok |= hmac.compare_digest(offered, digest)
    if scheme.lower() != "bearer" or not ok:
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key")


@lru_cache(maxsize=4)
def _digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    """The configured keys' digests, computed once per configuration rather than on every request."""
    return tuple(hashlib.sha256(key.encode()).digest() for key in keys)


# -- embeddings ------------------------------------------------------------------------------

_INPUT_SHAPE = ("'input' must be a non-empty string, an array of non-empty strings, an array of token ids "
                "(integers), or an array of arrays of token ids")


def parse(body: bytes, app: App) -> tuple[list[Item], ModelSpec, int | None, str]:
    """Validate a request body. Returns (inputs, model, dimensions or None for native, encoding format)."""
    from pydantic import ValidationError

    from .schemas import EmbeddingRequest, LenientEmbeddingRequest

    s = app.settings
    schema = LenientEmbeddingRequest if s.extra_fields == "ignore" else EmbeddingRequest
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("The request body is not valid UTF-8") from None
    try:
        req = schema.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first.get("loc") or ()
        if first.get("type", "").startswith("json") or not loc:
            raise invalid("We could not parse the JSON body of your request: "
                          f"{first.get('msg', 'invalid JSON')}. Send a JSON object like "
                          "{\"input\": \"text\", \"model\": \"...\"}") from None
        name = str(loc[0])
        if first.get("type") == "missing":
            raise invalid(f"'{name}' is required: send a JSON object like {{\"input\": \"text\"}}",
                          param=name, code="missing_required_parameter") from None
        if first.get("type") == "extra_forbidden":
            raise invalid(f"Unrecognized request argument supplied: {name[:100]} (the fields are input, model, "
                          "dimensions, encoding_format and user)", param=name[:100],
                          code="unknown_parameter") from None
        if name == "input":
            raise invalid(_input_problem(json.loads(text).get("input")), param="input") from None
        if name == "encoding_format":
            raise invalid("'encoding_format' must be 'float' or 'base64'", param="encoding_format") from None
        if name == "dimensions":
            raise invalid(_DIMENSIONS_SHAPE, param="dimensions") from None
        raise invalid(f"'{name}' is invalid: {first.get('msg')}", param=name) from None

    items, model, dimensions = check(req.input, req.model, req.dimensions, app, max_inputs=s.max_inputs)
    return items, model, dimensions, req.encoding_format or "float"


def check(raw: str | list, model_name: str | None, dimensions: int | float | None, app: App, *,
          max_inputs: int | None, texts_only: bool = False) -> tuple[list[Item], ModelSpec, int | None]:
    """The input rules every door shares (the endpoint after JSON parsing, the in-process `Embedder`):
    inputs, limits, model and dimensions, with the same messages. `max_inputs=None` lifts the count
    limit (the Embedder splits long lists into requests itself); `texts_only` refuses token ids."""
    s = app.settings
    if texts_only and not isinstance(raw, str) and any(not isinstance(t, str) for t in raw):
        raise invalid(_input_problem(raw), param="input")
    if isinstance(raw, str):
        items: list[Item] = [raw]
    elif raw and not isinstance(raw[0], (str, list)):
        items = [raw]  # one input given as token ids
    else:
        items = list(raw)
    if not items:
        raise invalid("'input' must not be empty", param="input")
    if max_inputs is not None and len(items) > max_inputs:
        raise invalid(f"'input' has {len(items)} items; at most {max_inputs} are allowed per request",
                      param="input")

    if model_name is None:
        model = app.registry.get(app.default_model)
    else:
        model = app.registry.get(model_name)  # "" too: a named model is served as named, or refused
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid(f"'input[{i}]' is an empty string; every input must contain text", param="input")
            if len(item) > s.max_input_chars:
                raise invalid(f"'input[{i}]' has {len(item)} characters; this server accepts at most "
                              f"{s.max_input_chars} characters per input (EMBEDDINGS_MAX_INPUT_CHARS, a bound on "
                              "the request's size, not the model's token limit)", param="input",
                              code="input_too_long")
        elif not isinstance(item, list):
            raise invalid(_INPUT_SHAPE, param="input")
        else:
            if not model.accepts_tokens:
                raise invalid(f"Token-id inputs are only accepted by OpenAI models, not by '{model.id}'. "
                              "LangChain's OpenAIEmbeddings sends token ids unless told not to: pass "
                              "check_embedding_ctx_length=False", param="input")
            if not item:
                raise invalid(f"'input[{i}]' is an empty token list", param="input")
            tokens = _integral(item)
            if tokens is None:
                raise invalid(_INPUT_SHAPE, param="input")
            items[i] = tokens
            if len(tokens) > model.max_input_tokens:
                raise invalid(f"'input[{i}]' has {len(tokens)} tokens; '{model.id}' accepts at most "
                              f"{model.max_input_tokens}", param="input", code="input_too_long")

    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, (int, float)):
            raise invalid(_DIMENSIONS_SHAPE, param="dimensions")
        if isinstance(dimensions, float):
            if not dimensions.is_integer():
                raise invalid(_DIMENSIONS_SHAPE, param="dimensions")
            dimensions = int(dimensions)
        if dimensions < 1:
            raise invalid(_DIMENSIONS_SHAPE, param="dimensions")
        if not model.flexible_dimensions:
            raise invalid(f"The model '{model.id}' does not support 'dimensions'", param="dimensions")
        if not 1 <= dimensions <= (model.dimensions or 0):
            raise invalid(f"'dimensions' must be between 1 and {model.dimensions} for '{model.id}'",
                          param="dimensions")
        if dimensions == model.dimensions:
            dimensions = None  # the native size: same vector, same cache entry
    return items, model, dimensions


_DIMENSIONS_SHAPE = "'dimensions' must be a positive integer"


def _input_problem(raw: object) -> str:
    """Which input is wrong, and how. The error path only: the endpoint parses the body once more for it."""
    if isinstance(raw, list):
        kinds = ("a string" if isinstance(item, str) else "a list" if isinstance(item, list) else "a number"
                 if type(item) in (int, float) else None for item in raw)
        first = None
        for i, (item, kind) in enumerate(zip(raw, kinds)):
            if kind is None:
                return f"'input[{i}]' is {_json_name(item)}; {_INPUT_SHAPE}"
            if first is None:
                first = kind
            elif kind != first:
                return f"'input[{i}]' is {kind} but 'input[0]' is {first}: every input must be of one kind; " \
                       + _INPUT_SHAPE
            if kind == "a list":
                for j, token in enumerate(item):
                    if type(token) not in (int, float):
                        return f"'input[{i}][{j}]' is {_json_name(token)}; token ids are integers"
    elif raw is None or not isinstance(raw, (str, int, float)):
        return f"'input' is {_json_name(raw)}; {_INPUT_SHAPE}"
    return _INPUT_SHAPE


def _json_name(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", dict: "an object", str: "a string", list: "a list",
             int: "a number", float: "a number"}
    return names.get(type(value)) or f"a {type(value).__name__}"  # Python callers can pass anything


def _integral(values: list) -> list[int] | None:
    """Token ids as ints: `1212.0` is the integer 1212 (JSON Schema's reading); `1212.5` is None (refused)."""
    if all(type(v) is int for v in values):
        return values
    out = []
    for v in values:
        if type(v) is float:
            if not v.is_integer():
                return None
            v = int(v)
        elif type(v) is not int:
            return None  # not a number at all (only reachable from Python callers; JSON is typed first)
        out.append(v)
    return out


def embeddings(body: bytes, app: App) -> Response:
    items, model, dimensions, fmt = parse(body, app)
    try:
        result = app.service.embed(items, model, dimensions)
    except ProviderError as exc:
        raise exc.to_api_error() from None
    head = b'{"object":"list","data":['
    tail = (f'],"model":{json.dumps(model.id)},"usage":{{"prompt_tokens":{result.tokens},'
            f'"total_tokens":{result.tokens}}}}}'.encode())
    vectors = result.vectors
    body: list[bytes] | Streamed
    spans = range(0, len(vectors), GROUP)
    if fmt == "base64":
        body = _base64_answer(head, vectors, tail)
    elif sum(map(len, vectors)) <= STREAM_FLOAT_ABOVE:
        # Float text goes out in parts of GROUP items, each joined once: never thousands of small buffers (the
        # socket takes a few large ones in one sendmsg), never one join of the whole answer.
        body = [head, *(_float_items(vectors, i, min(i + GROUP, len(vectors))) for i in spans), tail]
    else:
        # Float text is about three times its vectors: a large answer is made group by group as it is sent.
        body = Streamed(head, lambda: ([_float_items(vectors, i, min(i + GROUP, len(vectors)))] for i in spans),
                        tail)
    headers = {"x-cache-hits": str(result.hits), "x-cache-misses": str(result.misses)}
    if result.cache_errors:
        headers["x-cache-error"] = ",".join(result.cache_errors)
    route = ",".join(result.routes)
    if route:  # which route(s) of the model served its misses (the cache key never depends on it)
        headers["x-embeddings-route"] = route
    return Response(200, body, headers, len(items), result.hits, result.misses, route=route)


# A float answer of more vectors than this (in bytes; 4 MiB is about 680 vectors of 1536 floats) is formatted
# twice, once for its length and once as it is sent, rather than held whole as text.
STREAM_FLOAT_ABOVE = 4 << 20
GROUP = 64  # items of a float answer joined into one part
SEND_CHUNK = 64 << 10  # bytes of a base64 answer encoded per write: well under glibc's 128 KB trim threshold


def _item_heads(start: int, end: int) -> list[bytes]:
    """What comes before each item's embedding (a comma before every item but the first)."""
    return [b'%s{"object":"embedding","index":%d,"embedding":' % (b"," if i else b"", i) for i in range(start, end)]


def _base64_answer(head: bytes, vectors: list[bytes], tail: bytes) -> Streamed:
    """A base64 answer, encoded and sent SEND_CHUNK bytes at a time (its length is arithmetic: 4 characters per
    3 bytes, padded). Small chunks are the point: a whole 256-vector answer is 2 MB of fresh memory per
    request, which the allocator hands back to the system after each answer and takes again, page by page, for
    the next (600 page faults: 1.2 ms, three times the encoding itself). A chunk's memory is reused by the
    next, and stays in the CPU's cache."""
    heads = _item_heads(0, len(vectors))
    length = len(head) + len(tail) + sum(map(len, heads)) + sum(4 * ((len(v) + 2) // 3) + 3 for v in vectors)
    per = max(1, SEND_CHUNK // (4 * ((len(vectors[0]) + 2) // 3) + 64)) if vectors else 1

    def groups() -> Iterator[list[bytes]]:
        from pybase64 import b64encode  # SIMD: 4x the stdlib's speed, the same bytes

        for start in range(0, len(vectors), per):
            parts: list[bytes] = []
            for i in range(start, min(start + per, len(vectors))):
                parts += (heads[i], b'"', b64encode(vectors[i]), b'"}')
            yield parts

    return Streamed(head, groups, tail, length)


def _float_items(vectors: list[bytes], start: int, end: int) -> bytes:
    """The answer's items for vectors[start:end], as shortest float32 decimals (one part)."""
    from .vectors import float_json  # numpy and orjson: float answers only

    parts: list[bytes] = []
    for head, text in zip(_item_heads(start, end), float_json(vectors[start:end])):
        parts += (head, text, b"}")
    return b"".join(parts)


def health(app: App) -> Response:
    """Which provider, model and cache are configured, and whether the cache answers. No secret, ever."""
    cache_ok = True
    for tier in app.tiers:
        try:
            cache_ok = cache_ok and bool(tier.ping())
        except Exception:
            cache_ok = False
    body = {
        "status": "ok" if cache_ok else "degraded",
        "provider": app.settings.provider,
        "model": app.default_model,
        "models": app.registry.ids,
        # What a client needs to offer `dimensions` (the page at / does): native size, and whether it may shrink.
        "model_details": [{"id": m.id, "dimensions": m.dimensions, "flexible_dimensions": m.flexible_dimensions}
                          for m in map(app.registry.get, app.registry.ids)],
        "cache": app.settings.cache,
        "cache_ok": cache_ok,
        "auth": "required" if app.settings.api_keys else "open",
        "routes": _route_states(app),
    }
    return Response(200, json.dumps(body).encode())


def _route_states(app: App) -> dict[str, list[dict[str, object]]]:
    """Each model's routes and whether each is up (names and counts only: never a URL or a key)."""
    states = getattr(app.provider, "states", None)
    if callable(states):
        return states()
    return {m: [{"name": app.settings.provider, "provider": app.settings.provider, "state": "up"}]
            for m in app.registry.ids}


# -- models ------------------------------------------------------------------------------------


def models(app: App, path: str) -> Response:
    """`GET /v1/models` and `/v1/models/{id}` in OpenAI's shape: exactly the models this deployment serves.

    The id comes from an `id` query parameter (what vercel.json's rewrite passes) or from the path after
    `/models/` (the dev server, or a platform that keeps the original URL); ids hold slashes, and may arrive
    percent-encoded."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(path)
    wanted = parse_qs(parts.query).get("id", [None])[0]
    if wanted is None and "/models/" in parts.path:
        wanted = unquote(parts.path.split("/models/", 1)[1])
    owners = {m: app.registry.get(m).provider for m in app.registry.ids}
    card = lambda m: {"id": m, "object": "model", "created": 0, "owned_by": owners[m]}  # noqa: E731
    if not wanted:
        return Response(200, json.dumps({"object": "list", "data": [card(m) for m in app.registry.ids]}).encode())
    if wanted not in owners:
        raise APIError(404, f"The model '{wanted[:200]}' does not exist here. Models: {', '.join(app.registry.ids)}.",
                       param="model", code="model_not_found")
    return Response(200, json.dumps(card(wanted)).encode())
