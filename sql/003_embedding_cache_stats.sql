-- 003: what the cache holds, and what a prune would delete, for `python -m lib stats` and `prune --dry-run`.
-- Runs unchanged in Supabase's SQL editor, with `psql -f`, or as a Supabase CLI migration, after 002.
-- Idempotent: running it twice is harmless.
--
-- The rule for every migration in sql/ (tests/test_supabase.py checks it from the catalogue, after
-- applying every file twice): everything named embedding_cache* belongs to the service role alone.
-- Revoke all from public, anon and authenticated on each table and function you create, grant to
-- service_role, set a fixed search_path = '' on functions, and keep each file idempotent.
-- Prefer `create or replace`: under Supabase's default privileges a function that is dropped and
-- created again comes back executable by PUBLIC, anon and authenticated.

-- One row per model and size: rows, stored vector bytes, oldest and newest entry, and rows not used
-- for 30 and 90 days (last use is refreshed at most once a day by reads).
create or replace function public.embedding_cache_stats()
returns table (model text, dimensions integer, row_count bigint, vector_bytes bigint, oldest timestamptz,
               newest timestamptz, unused_30_days bigint, unused_90_days bigint)
language sql
stable
security invoker
set search_path = ''
as $$
    select c.model, c.dimensions, count(*), sum(octet_length(c.vector))::bigint, min(c.created_at),
           max(c.created_at),
           count(*) filter (where c.last_used_at < now() - interval '30 days'),
           count(*) filter (where c.last_used_at < now() - interval '90 days')
      from public.embedding_cache c
     group by c.model, c.dimensions
     order by c.model, c.dimensions;
$$;

-- How many rows embedding_cache_prune(unused_since, max_rows) would delete now, deleting nothing.
create or replace function public.embedding_cache_prune_preview(unused_since timestamptz default null,
                                                                max_rows bigint default null)
returns bigint
language sql
stable
security invoker
set search_path = ''
as $$
    with old as (
        select count(*) as n from public.embedding_cache c
         where unused_since is not null and c.last_used_at < unused_since
    ), total as (
        select count(*) as n from public.embedding_cache
    )
    select old.n + case when max_rows is null then 0 else greatest(total.n - old.n - greatest(max_rows, 0), 0) end
      from old, total;
$$;

revoke all on function public.embedding_cache_stats() from public, anon, authenticated;
revoke all on function public.embedding_cache_prune_preview(timestamptz, bigint) from public, anon, authenticated;
grant execute on function public.embedding_cache_stats() to service_role;
grant execute on function public.embedding_cache_prune_preview(timestamptz, bigint) to service_role;
