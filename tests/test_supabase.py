"""The Supabase cache: the migration on a real PostgreSQL 15, the backend through the real clients."""

from __future__ import annotations

import base64
import logging
import threading

import numpy as np
import psycopg
import pytest

from lib.cache.base import Entry
from lib.cache.supabase import SupabaseCache
from lib.keys import cache_key
from tests.conftest import SERVICE_KEY, supabase_env
from tests.fake_postgrest import make_jwt


def rows(pg) -> int:
    return int(pg.psql("-At", "-c", "select count(*) from public.embedding_cache").strip())


def entry(i: int, dims: int = 8) -> Entry:
    key = cache_key("text-embedding-3-small", None, f"text {i}")
    return Entry(key, "text-embedding-3-small", dims, np.full(dims, i, dtype="<f4").tobytes())


# -- the migration ---------------------------------------------------------------------------


def test_migration_twice_is_harmless(pg, rest):
    SupabaseCache(rest.url, SERVICE_KEY).put_many([entry(1)])
    pg.migrate()
    pg.migrate()
    assert rows(pg) == 1
    out = pg.psql("-At", "-c", "select relrowsecurity from pg_class where oid = 'public.embedding_cache'::regclass")
    assert out.strip() == "t"


def test_functions_have_a_fixed_search_path(pg):
    out = pg.psql("-At", "-c", "select proname, proconfig from pg_proc where proname like 'embedding_cache_%' "
                               "order by proname")
    lines = out.strip().splitlines()
    assert len(lines) >= 4 and all("search_path=" in line for line in lines)


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_anon_and_authenticated_are_denied_table_and_functions(pg, rest, role):
    SupabaseCache(rest.url, SERVICE_KEY).put_many([entry(1)])
    statements = [
        "select count(*) from public.embedding_cache",
        "insert into public.embedding_cache (key, model, dimensions, vector) values (repeat('a', 64), 'm', 1, "
        "'\\x00000000')",
        "delete from public.embedding_cache",
        "select * from public.embedding_cache_get(array[repeat('a', 64)])",
        "select public.embedding_cache_get_packed(array[repeat('a', 64)])",
        "select public.embedding_cache_put('[]'::jsonb)",
        "select public.embedding_cache_prune(now(), 0)",
    ]
    with psycopg.connect(pg.dsn_as("authenticator")) as conn:
        for sql in statements:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute(f"set local role {role}")
                    conn.execute(sql)
    assert rows(pg) == 1


def test_a_careless_public_policy_still_does_not_open_the_table(pg, rest):
    """The mistake seen in the wild: a policy named 'service role only' without a TO clause."""
    SupabaseCache(rest.url, SERVICE_KEY).put_many([entry(1)])
    pg.psql("-c", 'create policy "service role only" on public.embedding_cache using (true) with check (true)')
    try:
        with psycopg.connect(pg.dsn_as("authenticator")) as conn:
            for role in ("anon", "authenticated"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    with conn.transaction():
                        conn.execute(f"set local role {role}")
                        conn.execute("select vector from public.embedding_cache")
    finally:
        pg.psql("-c", 'drop policy "service role only" on public.embedding_cache')


def test_through_postgrest_only_the_service_role_gets_in(pg, rest):
    from supabase import create_client

    SupabaseCache(rest.url, SERVICE_KEY).put_many([entry(1)])
    key = entry(1).key
    service = create_client(rest.url, SERVICE_KEY)
    got = service.rpc("embedding_cache_get", {"keys": [key]}).execute().data
    assert got[0]["key"] == key and base64.b64decode(got[0]["vector"]) == entry(1).vector
    # the legacy JWT service key works the same
    legacy = create_client(rest.url, make_jwt("service_role"))
    assert legacy.rpc("embedding_cache_get", {"keys": [key]}).execute().data == got
    from postgrest.exceptions import APIError

    for role in ("anon", "authenticated"):
        client = create_client(rest.url, make_jwt(role))
        with pytest.raises(APIError) as info:
            client.rpc("embedding_cache_get", {"keys": [key]}).execute()
        assert info.value.code == "42501"
        with pytest.raises(APIError):
            client.rpc("embedding_cache_put", {"entries": []}).execute()


def test_base64_from_postgres_has_no_line_breaks(rest):
    big = Entry(cache_key("m", None, "big"), "m", 1536, np.arange(1536, dtype="<f4").tobytes())
    cache = SupabaseCache(rest.url, SERVICE_KEY)
    assert cache.put_many([big]) == 1
    assert cache.get_many([big.key])[big.key] == big.vector


def test_packed_and_json_reads_agree(rest):
    cache = SupabaseCache(rest.url, SERVICE_KEY)
    entries = [entry(i, dims=1536) for i in range(5)]
    cache.put_many(entries)
    keys = [e.key for e in entries] + ["0" * 64]
    packed = cache.get_many(keys)
    assert rest.calls["embedding_cache_get_packed"] == 1 and cache._packed
    cache._packed = False
    assert cache.get_many(keys) == packed == {e.key: e.vector for e in entries}
    assert SupabaseCache(rest.url, SERVICE_KEY).get_many(["f" * 64]) == {}


def test_falls_back_to_json_when_binary_reads_are_unavailable(pg, rest):
    """An older migration (or a PostgREST without binary output): the JSON function still serves."""
    cache = SupabaseCache(rest.url, SERVICE_KEY)
    cache.put_many([entry(1)])
    pg.psql("-c", "drop function public.embedding_cache_get_packed(text[])")
    try:
        assert cache.get_many([entry(1).key]) == {entry(1).key: entry(1).vector}
        assert cache.get_many([entry(1).key]) == {entry(1).key: entry(1).vector}
        assert rest.calls["embedding_cache_get_packed"] == 1 and rest.calls["embedding_cache_get"] == 2
    finally:
        pg.migrate()


def test_put_counts_new_rows_and_never_overwrites_a_good_row(pg, rest):
    cache = SupabaseCache(rest.url, SERVICE_KEY)
    assert cache.put_many([entry(1), entry(2)]) == 2
    assert cache.put_many([entry(1), entry(2), entry(3)]) == 1
    changed = Entry(entry(1).key, "text-embedding-3-small", 8, np.zeros(8, dtype="<f4").tobytes())
    assert cache.put_many([changed]) == 0
    assert cache.get_many([entry(1).key])[entry(1).key] == entry(1).vector


def test_eight_threads_putting_the_same_keys(pg, rest):
    batch = [entry(i) for i in range(50)]
    cache = SupabaseCache(rest.url, SERVICE_KEY)
    counts, errors = [], []

    def put() -> None:
        try:
            counts.append(cache.put_many(list(reversed(batch)) if len(counts) % 2 else batch))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(counts) == 50 and rows(pg) == 50


def test_prune_by_age_and_by_row_budget(pg, rest):
    cache = SupabaseCache(rest.url, SERVICE_KEY)
    cache.put_many([entry(i) for i in range(10)])
    pg.psql("-c", "update public.embedding_cache set last_used_at = now() - interval '40 days' "
                  f"where key in ('{entry(0).key}', '{entry(1).key}')")
    assert pg.psql("-At", "-c", "select public.embedding_cache_prune(now() - interval '30 days')").strip() == "2"
    assert pg.psql("-At", "-c", "select public.embedding_cache_prune(null, 5)").strip() == "3"
    assert rows(pg) == 5


# -- the backend in the service ------------------------------------------------------------------


@pytest.fixture
def server(monkeypatch, fake_openai, rest, serve):
    supabase_env(monkeypatch, fake_openai.url, rest.url)
    return serve()


def vec(item: dict) -> bytes:
    return base64.b64decode(item["embedding"])


def test_partial_hits_are_one_get_and_one_put(server, rest, fake_openai):
    server.embed({"input": ["a", "b"], "encoding_format": "base64"})
    from lib import app

    app.reset()  # a cold instance: empty memory tier, same Supabase
    rest.calls.clear()
    r = server.embed({"input": ["a", "x", "b", "y", "x"], "encoding_format": "base64"})
    assert r.status_code == 200
    assert r.headers["x-cache-hits"] == "2" and r.headers["x-cache-misses"] == "2"
    assert rest.calls == {"embedding_cache_get_packed": 1, "embedding_cache_put": 1}
    assert fake_openai.requests[-1]["body"]["input"] == ["x", "y"]
    for text, d in zip(["a", "x", "b", "y", "x"], r.json()["data"]):
        assert vec(d) == fake_openai.expected("text-embedding-3-small", text).tobytes()


def test_a_warm_instance_answers_repeats_without_a_round_trip(server, rest):
    server.embed({"input": ["warm"]})
    rest.calls.clear()
    r = server.embed({"input": ["warm"]})
    assert r.headers["x-cache-hits"] == "1" and sum(rest.calls.values()) == 0


def test_a_row_of_the_wrong_length_is_skipped_and_replaced(server, rest, pg, fake_openai):
    key = cache_key("text-embedding-3-small", None, "victim")
    pg.psql("-c", f"insert into public.embedding_cache (key, model, dimensions, vector) "
                  f"values ('{key}', 'text-embedding-3-small', 2, '\\x0000803f0000803f')")
    r = server.embed({"input": "victim", "encoding_format": "base64"})
    assert r.headers["x-cache-misses"] == "1" and fake_openai.calls == 1
    assert vec(r.json()["data"][0]) == fake_openai.expected("text-embedding-3-small", "victim").tobytes()
    assert pg.psql("-At", "-c", f"select dimensions from public.embedding_cache where key = '{key}'").strip() == "1536"


def test_database_down_then_back(server, rest, pg, fake_openai, caplog, monkeypatch):
    from lib import app

    server.embed({"input": "before"})
    pg.stop()
    try:
        app.reset()
        r = server.embed({"input": ["before", "during"], "encoding_format": "base64"})
        assert r.status_code == 200, r.text
        assert r.headers.get("x-cache-error") == "supabase"
        assert vec(r.json()["data"][1]) == fake_openai.expected("text-embedding-3-small", "during").tobytes()
        health = server.client.get("/api/health").json()
        assert health["cache_ok"] is False and health["status"] == "degraded"
    finally:
        pg.start()
    app.reset()
    r = server.embed({"input": ["after"]})
    assert r.status_code == 200 and "x-cache-error" not in r.headers
    assert rows(pg) >= 2  # "before" and "after" are stored; caching resumed
    app.reset()
    again = server.embed({"input": ["after"]})
    assert again.headers["x-cache-hits"] == "1"


def test_no_key_in_any_log_line(server, rest, pg, caplog):
    caplog.set_level(logging.DEBUG)
    server.embed({"input": ["logged"]})
    pg.stop()
    try:
        from lib import app

        app.reset()
        server.embed({"input": ["logged", "again"]})
    finally:
        pg.start()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "cache supabase" in text
    for secret in (SERVICE_KEY, "sk-test-SENTINEL-not-a-real-key"):
        assert secret not in text


def test_supabase_is_the_default_when_the_url_is_set(monkeypatch, fake_openai, rest):
    from lib import config

    supabase_env(monkeypatch, fake_openai.url, rest.url)
    monkeypatch.delenv("EMBEDDINGS_CACHE", raising=False)
    assert config.load().cache == "supabase"
    monkeypatch.delenv("SUPABASE_SECRET_KEY")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", make_jwt("service_role"))
    assert config.load().supabase_key.startswith("eyJ")


# -- issue 10: row cap, key kinds, storage, privileges after every migration --------------------------------


@pytest.fixture
def json_only_rest(pg):
    """A PostgREST that cannot answer in binary (no media-type handler), with Supabase's db-max-rows of 1,000."""
    from tests.fake_postgrest import FakePostgREST

    pg.psql("-c", "truncate public.embedding_cache")
    server = FakePostgREST(pg.dsn_as("authenticator"), binary=False, db_max_rows=1000)
    yield server
    server.close()


def test_the_stand_in_caps_set_returning_rpcs_like_postgrest(json_only_rest):
    import httpx

    cache = SupabaseCache(json_only_rest.url, SERVICE_KEY)
    entries = [entry(i) for i in range(1200)]
    cache.put_many(entries)
    raw = httpx.post(f"{json_only_rest.url}/rest/v1/rpc/embedding_cache_get", json={"keys": [e.key for e in entries]},
                     headers={"apikey": SERVICE_KEY})
    assert len(raw.json()) == 1000  # what an unchunked read would silently get


def test_a_2048_key_read_over_json_returns_every_row_and_pays_nothing(monkeypatch, fake_openai, json_only_rest,
                                                                      serve):
    supabase_env(monkeypatch, fake_openai.url, json_only_rest.url, EMBEDDINGS_MEMORY_CACHE_MB="0")
    server = serve()
    texts = [f"chunk {i}" for i in range(2048)]
    first = server.embed({"input": texts, "encoding_format": "base64"})
    assert first.status_code == 200 and first.headers["x-cache-misses"] == "2048"
    calls = fake_openai.calls
    json_only_rest.calls.clear()
    again = server.embed({"input": texts, "encoding_format": "base64"})
    assert again.headers["x-cache-hits"] == "2048" and again.headers["x-cache-misses"] == "0"
    assert fake_openai.calls == calls  # no input paid for twice
    assert json_only_rest.calls["embedding_cache_get"] == 3  # 1000 + 1000 + 48
    assert [vec(d) for d in again.json()["data"]] == [vec(d) for d in first.json()["data"]]


def test_each_kind_of_key_is_sent_as_supabase_wants_it(rest):
    SupabaseCache(rest.url, SERVICE_KEY).get_many([entry(1).key])
    sent = rest.headers[-1]
    assert sent["apikey"] == SERVICE_KEY and "authorization" not in sent  # sb_secret_...: apikey alone
    legacy = make_jwt("service_role")
    SupabaseCache(rest.url, legacy).get_many([entry(1).key])
    sent = rest.headers[-1]
    assert sent["apikey"] == legacy and sent["authorization"] == f"Bearer {legacy}"  # a JWT: both
    # The gateway's rule the first form avoids: a non-JWT bearer that differs from apikey is refused.
    import httpx

    refused = httpx.post(f"{rest.url}/rest/v1/rpc/embedding_cache_get", json={"keys": []},
                         headers={"apikey": SERVICE_KEY, "Authorization": "Bearer sb_secret_other"})
    assert refused.status_code == 401


def test_vectors_are_stored_without_compression_attempts(pg):
    out = pg.psql("-At", "-c", "select attstorage from pg_attribute "
                               "where attrelid = 'public.embedding_cache'::regclass and attname = 'vector'")
    assert out.strip() == "e"  # external: out of line, never pglz


EXPOSED = """
select 'function ' || p.oid::regprocedure || ' to ' || r.rolname
  from pg_proc p, (values ('anon'), ('authenticated')) r(rolname)
 where p.proname like 'embedding\\_cache%' and has_function_privilege(r.rolname, p.oid, 'execute')
union all
select 'relation ' || c.oid::regclass || ' to ' || r.rolname
  from pg_class c, (values ('anon'), ('authenticated')) r(rolname)
 where c.relname like 'embedding\\_cache%' and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
   and has_table_privilege(r.rolname, c.oid, 'select, insert, update, delete, truncate, references, trigger')
"""


def exposed(pg) -> list[str]:
    """Everything named embedding_cache* that anon or authenticated may use, found from the catalogue."""
    return [line for line in pg.psql("-At", "-c", EXPOSED).splitlines() if line]


def test_after_every_migration_twice_anon_and_authenticated_can_use_nothing(pg):
    pg.migrate()
    pg.migrate()
    count = pg.psql("-At", "-c", "select count(*) from pg_proc where proname like 'embedding\\_cache%'")
    assert int(count) >= 4
    assert exposed(pg) == []


def test_the_privilege_check_catches_a_function_dropped_and_created_again(pg):
    """Under Supabase's default privileges a re-created function is open again: the check above must see it."""
    pg.psql("-c", "create function public.embedding_cache_probe() returns int language sql as 'select 1'")
    try:
        assert any("embedding_cache_probe" in line for line in exposed(pg))
    finally:
        pg.psql("-c", "drop function public.embedding_cache_probe()")
