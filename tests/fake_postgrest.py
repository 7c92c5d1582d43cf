"""A small loopback stand-in for PostgREST, for the RPC calls the cache backend makes.

What it does, as PostgREST does:
- `POST /rest/v1/rpc/<fn>` with a JSON object of named arguments; `GET` with query arguments;
- requires `apikey` (as Supabase's gateway does) and takes the role from the bearer token:
  a JWT's `role` claim (HS256, verified with `JWT_SECRET`), or service_role for `sb_secret_...`
  keys and anon for `sb_publishable_...` keys;
- runs the call in a transaction as `authenticator` after `SET LOCAL ROLE <role>`;
- answers a set-returning function with a JSON array of row objects, any other with its value;
- with `Accept: application/octet-stream`, answers a function returning bytea (or PostgREST's
  media-type domain `"application/octet-stream"` over it) with the raw bytes, and any other with 406;
- maps errors to PostgREST's JSON (`code`, `message`, `details`, `hint`) and statuses
  (42501 -> 401 for anon, 403 otherwise; unknown function -> 404 PGRST202; bad JWT -> 401 PGRST301);
- caps a set-returning function's rows at `db_max_rows` (1,000, Supabase's default), silently, as PostgREST
  does for RPCs that are not mutations;
- as Supabase's API gateway does: requires `apikey`, refuses an `Authorization: Bearer` that is not a JWT
  unless it equals `apikey` exactly, and takes the role from the bearer JWT, else from `apikey`;
- with `binary=False`, refuses `Accept: application/octet-stream` with 406 PGRST107 (a PostgREST without
  the media-type handler), so the JSON path can be tested alone.

What it does not cover: tables and views (`/rest/v1/<table>`), filters, `Prefer` headers, counts,
schemas other than `public`, overloaded functions, JWT expiry, and anything not used by the backend.
It counts requests per function, so tests can assert round trips.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
from psycopg.types.json import Jsonb

from tests.loopback import QuietHandler, serve

JWT_SECRET = b"test-only-jwt-secret-not-used-anywhere-real"
ROLES = ("anon", "authenticated", "service_role")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(role: str, secret: bytes = JWT_SECRET) -> str:
    """A Supabase-style legacy API key: an HS256 JWT whose `role` claim picks the database role."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps({"role": role, "iss": "supabase-test"}).encode())
    sig = _b64url(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    return f"{header}.{payload}.{sig}"


def role_of(token: str) -> str | None:
    if token.startswith("sb_secret_"):
        return "service_role"
    if token.startswith("sb_publishable_"):
        return "anon"
    try:
        header, payload, sig = token.split(".")
        expected = _b64url(hmac.new(JWT_SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(sig, expected):
            return None
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    role = claims.get("role")
    return role if role in ROLES else None


class FakePostgREST:
    def __init__(self, dsn: str, pool_size: int = 8, *, db_max_rows: int = 1000, binary: bool = True) -> None:
        self.dsn = dsn
        self.db_max_rows = db_max_rows
        self.binary = binary
        self.calls: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []  # what each request carried (to check how keys are sent)
        self._pool: queue.Queue[psycopg.Connection] = queue.Queue()
        self._pool_size = pool_size
        self._meta: dict[str, tuple[bool, list[str], list[str], bool]] = {}
        self._lock = threading.Lock()
        rest = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    args = json.loads(raw or b"{}")
                except ValueError:
                    return self.reply(400, {"code": "PGRST102", "message": "Invalid JSON", "details": None,
                                            "hint": None})
                self.call(args)

            def do_GET(self) -> None:
                self.call(dict(parse_qsl(urlsplit(self.path).query)))

            def call(self, args: dict[str, Any]) -> None:
                status, body = rest.handle(urlsplit(self.path).path, {k.lower(): v for k, v in self.headers.items()},
                                           args)
                self.reply(status, body)

            def reply(self, status: int, body: Any) -> None:
                if isinstance(body, memoryview):
                    self.send(status, bytes(body), "application/octet-stream")
                else:
                    data = body if isinstance(body, bytes) else json.dumps(body).encode()
                    self.send(status, data, "application/json; charset=utf-8")

        self.server = serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        while not self._pool.empty():
            self._pool.get().close()

    # -- connections -------------------------------------------------------------------------

    def _conn(self) -> psycopg.Connection:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return psycopg.connect(self.dsn, connect_timeout=2)

    def _release(self, conn: psycopg.Connection) -> None:
        if conn.closed or conn.broken or self._pool.qsize() >= self._pool_size:
            conn.close()
        else:
            self._pool.put(conn)

    def _signature(self, conn: psycopg.Connection, fn: str) -> tuple[bool, list[str], list[str], bool] | None:
        with self._lock:
            if fn in self._meta:
                return self._meta[fn]
        row = conn.execute(
            """select p.proretset, coalesce(p.proargnames, '{}'),
                      array(select format_type(t, null) from unnest(p.proargtypes::oid[]) t),
                      coalesce(nullif(t.typbasetype, 0), t.oid) = 'bytea'::regtype
                 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                 join pg_type t on t.oid = p.prorettype
                where n.nspname = 'public' and p.proname = %s""", (fn,)).fetchone()
        conn.rollback()
        if row is None:
            return None
        with self._lock:
            self._meta[fn] = (row[0], list(row[1]), list(row[2]), row[3])
        return self._meta[fn]

    # -- one call ----------------------------------------------------------------------------

    def handle(self, path: str, headers: dict[str, str], args: dict[str, Any]) -> tuple[int, Any]:
        if not path.startswith("/rest/v1/rpc/"):
            return 404, {"code": "PGRST125", "message": "Invalid path specified in request URL", "details": None,
                         "hint": "this test server only implements /rest/v1/rpc/<fn>"}
        fn = path.removeprefix("/rest/v1/rpc/")
        with self._lock:
            self.calls[fn] += 1
            self.headers.append(dict(headers))
        if "apikey" not in headers:
            return 401, {"message": "No API key found in request", "hint": "No `apikey` request header or url "
                         "param was found."}
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else headers["apikey"]
        if token.startswith("sb_") and token != headers["apikey"]:
            return 401, {"message": "Invalid authorization header: a bearer token that is not a JWT must equal "
                         "the apikey", "hint": None}
        role = role_of(token)
        if role is None:
            return 401, {"code": "PGRST301", "message": "Invalid JWT", "details": None, "hint": None}
        try:
            conn = self._conn()
        except psycopg.OperationalError:
            return 503, {"code": "PGRST000", "message": "Could not connect with the database", "details": None,
                         "hint": None}
        try:
            sig = self._signature(conn, fn)
            if sig is None:
                return 404, {"code": "PGRST202", "message": f"Could not find the function public.{fn}",
                             "details": None, "hint": None}
            retset, names, types, returns_bytea = sig
            binary = "application/octet-stream" in headers.get("accept", "")
            if binary and (retset or not returns_bytea or not self.binary):
                return 406, {"code": "PGRST107", "message": "None of these media types are available: "
                             "application/octet-stream", "details": None, "hint": None}
            parts, values = [], []
            for name, typ in zip(names, types):
                if name in args:
                    value = args[name]
                    values.append(Jsonb(value) if typ in ("jsonb", "json") else value)
                    parts.append(f"{name} => %s::{typ}")
            call = f"public.{fn}({', '.join(parts)})"
            if binary:
                sql = f"select {call}::bytea"
            elif retset:
                sql = f"select coalesce(json_agg(r), '[]'::json)::text from (select * from {call} limit {self.db_max_rows}) r"
            else:
                sql = f"select to_json({call})::text"
            with conn.transaction():
                conn.execute(f"set local role {role}")
                (result,) = conn.execute(sql, values, binary=binary).fetchone()
            if binary:
                return 200, memoryview(result or b"")
            return 200, result.encode()
        except psycopg.errors.InsufficientPrivilege as exc:
            return (401 if role == "anon" else 403), _error(exc)
        except psycopg.OperationalError as exc:
            conn.close()
            return 503, _error(exc)
        except psycopg.Error as exc:
            return 400, _error(exc)
        finally:
            self._release(conn)


def _error(exc: psycopg.Error) -> dict[str, Any]:
    diag = exc.diag
    return {"code": diag.sqlstate or "PGRST000", "message": diag.message_primary or str(exc),
            "details": diag.message_detail, "hint": diag.message_hint}


if __name__ == "__main__":  # `python -m tests.fake_postgrest DSN`: serve until killed (benchmarks)
    import sys
    import time

    server = FakePostgREST(sys.argv[1], pool_size=16)
    print(server.url, flush=True)
    while True:
        time.sleep(3600)
