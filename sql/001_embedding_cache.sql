-- 001: the embedding cache table, its access rules, and the functions the backend calls.
-- Runs unchanged in Supabase's SQL editor, with `psql -f`, or as a Supabase CLI migration.
-- Idempotent: running it twice is harmless.
--
-- The rule for every migration in sql/ (tests/test_supabase.py checks it from the catalogue, after
-- applying every file twice): everything named embedding_cache* belongs to the service role alone.
-- Revoke all from public, anon and authenticated on each table and function you create, grant to
-- service_role, set a fixed search_path = '' on functions, and keep each file idempotent.
-- Prefer `create or replace`: under Supabase's default privileges a function that is dropped and
-- created again comes back executable by PUBLIC, anon and authenticated.

create table if not exists public.embedding_cache (
    -- hex SHA-256 of the cache key contract (see README, "The cache key")
    key          text primary key check (key ~ '^[0-9a-f]{64}$'),
    model        text not null,
    dimensions   integer not null check (dimensions > 0),
    -- little-endian float32 values, 4 bytes each
    vector       bytea not null,
    created_at   timestamptz not null default now(),
    -- refreshed at most once a day by reads; what embedding_cache_prune goes by
    last_used_at timestamptz not null default now(),
    constraint embedding_cache_vector_length check (octet_length(vector) = 4 * dimensions)
);
-- No raw text is stored: a cache of private documents must not become a copy of them.

create index if not exists embedding_cache_last_used_at_idx on public.embedding_cache (last_used_at);

-- Access: only the service role. RLS on with no policy denies anon and authenticated every row,
-- and the revokes deny them the table itself (so a later, careless policy cannot open it).
alter table public.embedding_cache enable row level security;
revoke all on table public.embedding_cache from public, anon, authenticated;
grant select, insert, update, delete on table public.embedding_cache to service_role;

-- Get many keys in one round trip. Vectors come back as base64 text (bytea's JSON form is hex,
-- twice the size); Postgres' base64 wraps every 76 characters, so the newlines are removed
-- (with replace(): translate() is character-by-character and made this call twice as slow).
create or replace function public.embedding_cache_get(keys text[])
returns table (key text, vector text)
language sql
volatile
security invoker
set search_path = ''
as $$
    update public.embedding_cache c
       set last_used_at = now()
     where c.key = any(keys)
       and c.last_used_at < now() - interval '1 day';
    select c.key, replace(encode(c.vector, 'base64'), E'\n', '')
      from public.embedding_cache c
     where c.key = any(keys);
$$;

-- The same, packed for speed: one bytea of (32-byte key, 4-byte big-endian length, vector) per row
-- found, returned as raw bytes when PostgREST is asked for `Accept: application/octet-stream` (the
-- return type is PostgREST's media-type domain for it). No base64, no JSON: reading 256 cached
-- 1536-dim vectors costs the database a few milliseconds instead of about thirty.
do $$ begin
    create domain public."application/octet-stream" as bytea;
exception when duplicate_object then null;
end $$;

create or replace function public.embedding_cache_get_packed(keys text[])
returns public."application/octet-stream"
language sql
volatile
security invoker
set search_path = ''
as $$
    update public.embedding_cache c
       set last_used_at = now()
     where c.key = any(keys)
       and c.last_used_at < now() - interval '1 day';
    select coalesce(string_agg(decode(c.key, 'hex') || int4send(octet_length(c.vector)) || c.vector, ''::bytea),
                    ''::bytea)::public."application/octet-stream"
      from public.embedding_cache c
     where c.key = any(keys);
$$;

-- Put many rows in one round trip: [{key, model, dimensions, vector (base64)}, ...].
-- Existing keys are left alone (first writer wins), except a row whose vector has a different
-- length than the new one (written by a bug or an older version): it is replaced.
-- Rows are taken in key order so that concurrent writers of the same keys cannot deadlock.
-- Returns how many rows were new (or replaced).
create or replace function public.embedding_cache_put(entries jsonb)
returns integer
language sql
volatile
security invoker
set search_path = ''
as $$
    with rows as (
        select distinct on (e->>'key')
               e->>'key' as key,
               e->>'model' as model,
               (e->>'dimensions')::integer as dimensions,
               decode(e->>'vector', 'base64') as vector
          from jsonb_array_elements(entries) as e
         order by e->>'key'
    ), written as (
        insert into public.embedding_cache as c (key, model, dimensions, vector)
        select key, model, dimensions, vector
          from rows
         where octet_length(vector) = 4 * dimensions
         order by key
        on conflict (key) do update
           set model = excluded.model,
               dimensions = excluded.dimensions,
               vector = excluded.vector,
               created_at = now(),
               last_used_at = now()
         where octet_length(c.vector) <> octet_length(excluded.vector)
        returning 1
    )
    select count(*)::integer from written;
$$;

-- Cost control: delete rows not used since `unused_since`, then the least recently used rows
-- beyond `max_rows`. Either argument may be null. Returns how many rows were deleted.
-- Schedule it with pg_cron, e.g. nightly: see the README.
create or replace function public.embedding_cache_prune(unused_since timestamptz default null,
                                                        max_rows bigint default null)
returns bigint
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    deleted bigint := 0;
    n bigint;
begin
    if unused_since is not null then
        delete from public.embedding_cache where last_used_at < unused_since;
        get diagnostics n = row_count;
        deleted := deleted + n;
    end if;
    if max_rows is not null then
        delete from public.embedding_cache
         where key in (select key from public.embedding_cache
                        order by last_used_at desc, key
                       offset greatest(max_rows, 0));
        get diagnostics n = row_count;
        deleted := deleted + n;
    end if;
    return deleted;
end;
$$;

revoke all on function public.embedding_cache_get(text[]) from public, anon, authenticated;
revoke all on function public.embedding_cache_get_packed(text[]) from public, anon, authenticated;
revoke all on function public.embedding_cache_put(jsonb) from public, anon, authenticated;
revoke all on function public.embedding_cache_prune(timestamptz, bigint) from public, anon, authenticated;
grant execute on function public.embedding_cache_get(text[]) to service_role;
grant execute on function public.embedding_cache_get_packed(text[]) to service_role;
grant execute on function public.embedding_cache_put(jsonb) to service_role;
grant execute on function public.embedding_cache_prune(timestamptz, bigint) to service_role;
