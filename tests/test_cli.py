"""`python -m lib embed | stats | prune`, run for real in a subprocess (issue 12)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, SENTINEL, SERVICE_KEY, openai_env
from tests.upstreams import Scripted

MODEL = "text-embedding-3-small"
KEY = "sk-test-SENTINEL-not-a-real-key"


def cli_env(fake_openai, tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "SUPABASE_", "HF_"))}
    env.update({"PYTHONPATH": str(ROOT), "EMBEDDINGS_PROVIDER": "openai", "OPENAI_API_KEY": KEY,
                "OPENAI_BASE_URL": fake_openai.url, "EMBEDDINGS_CACHE": "sqlite",
                "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "cache.sqlite3"), **extra})
    return env


def run(args: list[str], env: dict[str, str], cwd, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lib", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert SENTINEL not in out + err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", err), f"control characters off a terminal: {err!r}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def expected(fake_openai, texts: list[str]) -> np.ndarray:
    return np.stack([fake_openai.expected(MODEL, t) for t in texts])


def cached_rows(tmp_path) -> int:
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
        return db.execute("select count(*) from embedding_cache").fetchone()[0]


# -- formats ----------------------------------------------------------------------------------------------------


def test_txt_to_npy_is_byte_identical_to_the_endpoint(fake_openai, tmp_path, serve, monkeypatch):
    texts = ["first line", "second line", "first line", "third, with a comma"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    r = run(["embed", "in.txt", "--out", "out.npy"], cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "out.npy")
    assert arr.dtype == np.float32 and arr.shape == (4, 1536)
    openai_env(monkeypatch, fake_openai.url, tmp_path)  # the endpoint on the same cache file
    answer = serve().embed({"input": texts, "encoding_format": "base64"})
    assert answer.headers["x-cache-misses"] == "0"
    assert arr.tobytes() == b"".join(base64.b64decode(d["embedding"]) for d in answer.json()["data"])
    assert "4 texts (3 distinct): 0 hits, 3 misses" in r.stderr.splitlines()[-1]


def test_jsonl_with_fields_to_jsonl_with_ids(fake_openai, tmp_path):
    rows = [{"doc": f"d{i}", "body": f"chunk {i % 3}"} for i in range(7)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run(["embed", "in.jsonl", "--field", "body", "--id-field", "doc", "--out", "out.jsonl"],
            cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [row["doc"] for row in rows]
    got = np.asarray([line["embedding"] for line in lines], dtype=np.float32)
    assert np.array_equal(got, expected(fake_openai, [row["body"] for row in rows]))  # exact float32 round trip
    assert len(fake_openai.sent_inputs()) == 3


def test_csv_and_standard_input(fake_openai, tmp_path):
    (tmp_path / "in.csv").write_text('id,text\n1,"hello, world"\n2,"a ""quoted"" text"\n')
    r = run(["embed", "in.csv", "--out", "csv.npy"], cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "csv.npy"), expected(fake_openai, ["hello, world", 'a "quoted" text']))
    r = run(["embed", "-", "--out", "stdin.npy"], cli_env(fake_openai, tmp_path), tmp_path,
            stdin="hello, world\nfrom a pipe\n".encode())
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "stdin.npy"), expected(fake_openai, ["hello, world", "from a pipe"]))
    assert "1 hits, 1 misses" in r.stderr  # the csv run had cached the first


def test_without_out_it_only_fills_the_cache(fake_openai, tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"backfill {i}\n" for i in range(50)))
    r = run(["embed", "in.txt", "--batch-size", "8"], cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 0 and cached_rows(tmp_path) == 50 and "the cache is filled" in r.stderr
    again = run(["embed", "in.txt"], cli_env(fake_openai, tmp_path), tmp_path)
    assert "50 hits, 0 misses, 0 tokens billed" in again.stderr and fake_openai.calls == 7


def test_spread_duplicates_are_paid_in_full_batches_of_first_occurrences(fake_openai, tmp_path):
    import random

    distinct = [f"spread {i}" for i in range(30)]
    texts = distinct + [random.Random(3).choice(distinct) for _ in range(30)]
    random.Random(4).shuffle(texts)  # duplicates everywhere: every batch of 10 inputs would be partly cached
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    r = run(["embed", "in.txt", "--out", "out.npy", "--batch-size", "10", "--concurrency", "1"],
            cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    assert fake_openai.calls == 3 and sorted(fake_openai.sent_inputs()) == sorted(distinct)  # 30 distinct / 10
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(fake_openai, texts))  # all 60, in order
    assert "60 texts (30 distinct): 0 hits, 30 misses" in r.stderr


def test_a_rerun_with_duplicates_skips_the_pay_pass_and_pays_nothing(fake_openai, tmp_path):
    texts = [f"again {i % 25}" for i in range(100)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    env = cli_env(fake_openai, tmp_path)
    assert run(["embed", "in.txt", "--batch-size", "10"], env, tmp_path).returncode == 0
    calls = fake_openai.calls
    r = run(["embed", "in.txt", "--out", "out.npy", "--batch-size", "10"], env, tmp_path)
    assert r.returncode == 0 and fake_openai.calls == calls
    assert "100 texts (25 distinct): 25 hits, 0 misses, 0 tokens billed" in r.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(fake_openai, texts))


def test_without_a_persistent_cache_duplicates_are_never_paid_twice_by_a_second_pass(fake_openai, tmp_path):
    texts = [f"memory only {i % 5}" for i in range(10)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    r = run(["embed", "in.txt", "--out", "out.npy"], cli_env(fake_openai, tmp_path, EMBEDDINGS_CACHE="memory"),
            tmp_path)
    assert r.returncode == 0 and sorted(fake_openai.sent_inputs()) == sorted(set(texts))
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(fake_openai, texts))


# -- bad input: one line, exit 2, nothing sent ---------------------------------------------------------------

BAD = [
    ("missing.txt", None, [], "missing.txt: no such file"),
    ("in.pdf", b"x\n", [], "unknown input format '.pdf'"),
    ("in.jsonl", b'{"text": "a"}\n{"body": "b"}\n', [], "in.jsonl:2: no field 'text'"),
    ("in.jsonl", b'{"text": "a"}\nnot json\n', [], "in.jsonl:2: not JSON"),
    ("in.csv", b"id,body\n1,x\n", [], "in.csv:1: no column 'text'"),
    ("in.txt", b"a\n   \nb\n", [], "in.txt:2: empty text"),
    ("in.txt", b"a\nb\n\xff\xfe bad\n", [], "in.txt:3: not valid UTF-8"),
    ("in.csv", b"text\nok\n\xc3\x28\n", [], "in.csv:3: not valid UTF-8"),
    ("in.txt", b"a\n", ["--out", "x.parquet"], "unknown output format '.parquet'"),
]


@pytest.mark.parametrize("name,content,extra,message", BAD, ids=[m.split(":")[0] + str(i) for i, (*_, m) in
                                                                  enumerate(BAD)])
def test_bad_input_is_one_line_exit_2_and_costs_nothing(fake_openai, tmp_path, name, content, extra, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    r = run(["embed", name, *extra], cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert fake_openai.calls == 0


# -- interruption, failure, resume ---------------------------------------------------------------------------


def test_sigint_mid_run_then_resume_pays_only_for_the_rest(fake_openai, tmp_path):
    texts = [f"resumable {i}" for i in range(300)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    fake_openai.script = [Scripted(200, delay=0.4)] * 100
    env = cli_env(fake_openai, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "lib", "embed", "in.txt", "--out", "out.npy", "--batch-size",
                             "10", "--concurrency", "2"], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while fake_openai.calls < 22 and time.monotonic() < deadline:  # well past the first progress line (3 s)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == 130, err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", err) and "progress: " in err
    assert re.search(r"interrupted with \d+ of 300 distinct texts done", err) and "run the same command again" in err
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.npy.partial").exists()
    done_first = cached_rows(tmp_path)
    assert 0 < done_first < 300
    fake_openai.script = []
    again = run(["embed", "in.txt", "--out", "out.npy", "--batch-size", "10"], env, tmp_path)
    assert again.returncode == 0
    assert f"{done_first} hits, {300 - done_first} misses" in again.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(fake_openai, texts))  # complete, in order


def test_a_resume_that_starts_all_cached_pays_the_rest_at_full_concurrency(fake_openai, tmp_path):
    """A re-run whose first batch is cached goes straight to writing, where one lookup thread per core is
    enough while everything hits; from its first miss on, the rest is paid --concurrency calls at a time."""
    texts = [f"half done {i % 200}" for i in range(400)]  # duplicates: a pay pass, then a writing pass
    (tmp_path / "head.txt").write_text("\n".join(texts[:10]) + "\n")
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    env = cli_env(fake_openai, tmp_path)
    assert run(["embed", "head.txt", "--batch-size", "10"], env, tmp_path).returncode == 0
    fake_openai.requests.clear()
    fake_openai.script = [Scripted(200, latency=0.3)] * 40
    r = run(["embed", "in.txt", "--out", "out.npy", "--batch-size", "10", "--concurrency", "4"], env, tmp_path)
    assert r.returncode == 0 and "400 texts (200 distinct): 10 hits, 190 misses" in r.stderr, r.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(fake_openai, texts))
    arrivals = [q["at"] for q in fake_openai.requests]
    in_flight = max(sum(a <= t < a + 0.3 for a in arrivals) for t in arrivals)  # each call lasts 0.3 s at least
    assert len(arrivals) == 19 and in_flight == 4


def test_a_provider_failure_stops_keeps_what_was_paid_and_exits_1(fake_openai, tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"fails later {i}\n" for i in range(40)))
    fake_openai.script = [Scripted(200), Scripted(401, {"error": {"message": "bad key", "code": "invalid_api_key"}})]
    r = run(["embed", "in.txt", "--out", "out.npy", "--batch-size", "10", "--concurrency", "1"],
            cli_env(fake_openai, tmp_path), tmp_path)
    # The second call fails; the batches already under way (a lookup may overlap the one call in flight) finish.
    done = re.search(r"stopped with (\d+) of 40 distinct texts done", r.stderr)
    assert r.returncode == 1 and done and "provider_auth" in r.stderr, r.stderr
    # A refused key is met again by the same command: the advice is what to change, not to re-run as is.
    assert "cannot help: set a valid key for the provider (OPENAI_API_KEY" in r.stderr, r.stderr
    done = int(done.group(1))
    assert 10 <= done < 40 and cached_rows(tmp_path) == done and not (tmp_path / "out.npy").exists()
    again = run(["embed", "in.txt", "--out", "out.npy", "--batch-size", "10", "--concurrency", "1"],
                cli_env(fake_openai, tmp_path), tmp_path)
    assert again.returncode == 0 and f"{done} hits, {40 - done} misses" in again.stderr, again.stderr


# -- through a deployed endpoint ---------------------------------------------------------------------------------


def test_url_mode_against_the_dev_server_with_its_key(fake_openai, tmp_path, serve, monkeypatch):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_API_KEYS="cli-SENTINEL-key")
    server = serve()
    texts = ["remote one", "remote two", "remote one"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    env = cli_env(fake_openai, tmp_path)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "EMBEDDINGS_PROVIDER"):
        env.pop(name)  # the user holds the endpoint's key only
    ok = run(["embed", "in.txt", "--url", server.url + "/v1", "--api-key", "cli-SENTINEL-key", "--out", "r.npy"],
             env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert np.array_equal(np.load(tmp_path / "r.npy"), expected(fake_openai, texts))
    wrong = run(["embed", "in.txt", "--url", server.url + "/v1", "--api-key", "wrong"], env, tmp_path)
    assert wrong.returncode == 1 and "refused the API key (401)" in wrong.stderr


def test_url_mode_honours_429_and_retry_after(fake_openai, tmp_path):
    fake_openai.script = [Scripted(429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}},
                                   {"retry-after": "1"})]
    (tmp_path / "in.txt").write_text("patient\n")
    r = run(["embed", "in.txt", "--url", fake_openai.url, "--api-key", "k", "--model", MODEL, "--out", "p.npy"],
            cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    assert fake_openai.calls == 2 and fake_openai.requests[1]["at"] - fake_openai.requests[0]["at"] >= 0.95


# -- stats and prune -----------------------------------------------------------------------------------------


def test_stats_and_prune_on_sqlite(fake_openai, tmp_path):
    env = cli_env(fake_openai, tmp_path)
    (tmp_path / "in.txt").write_text("".join(f"kept {i}\n" for i in range(6)))
    assert run(["embed", "in.txt"], env, tmp_path).returncode == 0
    assert run(["embed", "in.txt", "--dimensions", "256"], env, tmp_path).returncode == 0
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:  # two rows unused for 100 days
        db.execute("update embedding_cache set last_used_at = last_used_at - 100 * 86400, "
                   "created_at = created_at - 100 * 86400 where key in (select key from embedding_cache limit 2)")
    lines = run(["stats"], env, tmp_path).stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{MODEL} 6 rows") for line in lines)
    assert "1536 dims, 36864 bytes" in lines[1] and "256 dims, 6144 bytes" in lines[0]
    assert sum(int(re.search(r"unused 90 days: (\d+)", line).group(1)) for line in lines) == 2
    dry = run(["prune", "--unused-days", "90", "--dry-run"], env, tmp_path)
    assert "would delete 2 rows" in dry.stdout and cached_rows(tmp_path) == 12
    assert "deleted 2 rows" in run(["prune", "--unused-days", "90"], env, tmp_path).stdout
    assert "would delete 6 rows" in run(["prune", "--max-rows", "4", "--dry-run"], env, tmp_path).stdout
    assert "deleted 10 rows" in run(["prune", "--max-rows", "0"], env, tmp_path).stdout
    assert cached_rows(tmp_path) == 0
    assert run(["prune"], env, tmp_path).returncode == 2


def test_stats_and_prune_on_supabase(fake_openai, tmp_path, rest, pg):
    env = cli_env(fake_openai, tmp_path, SUPABASE_URL=rest.url, SUPABASE_SECRET_KEY=SERVICE_KEY,
                  EMBEDDINGS_CACHE="supabase")
    (tmp_path / "in.txt").write_text("".join(f"in postgres {i}\n" for i in range(5)))
    assert run(["embed", "in.txt"], env, tmp_path).returncode == 0
    pg.psql("-c", "update public.embedding_cache set last_used_at = now() - interval '40 days' "
                  "where key in (select key from public.embedding_cache order by key limit 3)")
    (line,) = run(["stats"], env, tmp_path).stdout.splitlines()
    assert line.startswith(f"{MODEL} 5 rows, 1536 dims, 30720 bytes") and "unused 30 days: 3" in line
    assert "would delete 3 rows" in run(["prune", "--unused-days", "30", "--dry-run"], env, tmp_path).stdout
    assert "would delete 4 rows" in run(["prune", "--max-rows", "1", "--dry-run"], env, tmp_path).stdout
    assert "deleted 3 rows" in run(["prune", "--unused-days", "30"], env, tmp_path).stdout
    assert pg.psql("-At", "-c", "select count(*) from public.embedding_cache").strip() == "2"


def test_help_for_each_command_has_examples(tmp_path, fake_openai):
    for command in ("embed", "stats", "prune"):
        r = run([command, "--help"], cli_env(fake_openai, tmp_path), tmp_path)
        assert r.returncode == 0 and "examples:" in r.stdout and "python -m lib" in r.stdout


def test_the_census_counts_the_same_in_memory_and_past_its_spill_to_disk(tmp_path, monkeypatch):
    """Distinct texts are counted in a set up to a bound, then on disk: the first occurrences found are the same."""
    from lib import corpus

    lines = [f"census text {i % 37}" for i in range(300)] + [f"late text {i % 11}" for i in range(50)]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    whole = corpus.validate(corpus.open_source(str(tmp_path / "in.txt")), 1000)
    monkeypatch.setattr(corpus, "SEEN_IN_MEMORY", 10)
    spilled = corpus.validate(corpus.open_source(str(tmp_path / "in.txt")), 1000)
    firsts = [i for i, line in enumerate(lines) if line not in lines[:i]]
    for census in (whole, spilled):
        assert (census.texts, census.distinct) == (350, 48)
        assert [i for i in range(350) if census.is_first(i)] == firsts


# -- advice after an error that a re-run would meet again (issue 23) -----------------------------------------


@pytest.mark.parametrize("options, says", [
    (["--model", "no-such-model"], "change --model"),
    (["--model", "text-embedding-ada-002", "--dimensions", "8"], "change --dimensions"),
])
def test_a_bad_option_says_what_to_change_not_to_run_again(fake_openai, tmp_path, options, says):
    (tmp_path / "in.txt").write_text("one\ntwo\nthree\n")
    r = run(["embed", "in.txt", "--out", "out.npy", *options], cli_env(fake_openai, tmp_path), tmp_path)
    assert r.returncode == 2, r.stderr
    assert "stopped with 0 of 3 distinct texts done" in r.stderr
    assert f"running it again unchanged cannot help: {says}" in r.stderr, r.stderr
    assert "run the same command again" not in r.stderr and fake_openai.calls == 0


def test_url_mode_counts_distinct_texts_and_a_refused_key_names_the_option(fake_openai, tmp_path, serve,
                                                                          monkeypatch):
    openai_env(monkeypatch, fake_openai.url, tmp_path, EMBEDDINGS_API_KEYS="cli-SENTINEL-key")
    server = serve()
    (tmp_path / "in.txt").write_text("a\nb\na\nc\na\n")  # 5 texts, 3 distinct
    env = cli_env(fake_openai, tmp_path)
    r = run(["embed", "in.txt", "--url", server.url + "/v1", "--api-key", "wrong"], env, tmp_path)
    assert r.returncode == 1 and "stopped with 0 of 3 distinct texts done" in r.stderr, r.stderr
    assert "cannot help: pass a key the endpoint accepts with --api-key" in r.stderr
    assert "run the same command again" not in r.stderr


def test_a_passing_failure_still_says_to_run_again(fake_openai, tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"outage {i}\n" for i in range(20)))
    fake_openai.script = [Scripted(200)] + [Scripted(500)] * 10
    r = run(["embed", "in.txt", "--batch-size", "10", "--concurrency", "1"],
            cli_env(fake_openai, tmp_path, EMBEDDINGS_TIMEOUT_S="3"), tmp_path)
    assert r.returncode == 1 and "stopped with 10 of 20 distinct texts done" in r.stderr, r.stderr
    assert "run the same command again pays only for the 10 distinct texts not done" in r.stderr


def test_a_slow_small_run_shows_a_rate_that_is_not_zero(fake_openai, tmp_path):
    (tmp_path / "in.txt").write_text("slow one\nslow two\n")
    fake_openai.script = [Scripted(200, delay=3.5), Scripted(200)]
    r = run(["embed", "in.txt", "--batch-size", "1", "--concurrency", "1"], cli_env(fake_openai, tmp_path),
            tmp_path)
    assert r.returncode == 0, r.stderr
    rate = re.search(r"progress: 1/2 texts \(50%\), ([\d.,]+) texts/s", r.stderr)
    assert rate and 0.1 < float(rate.group(1)) < 1, r.stderr
