"""Backfills through OpenAI's Batch API (issue 22): `python -m lib embed FILE --batch-api`, run for real in a
subprocess against a loopback server speaking the Files and Batches APIs (`tests/fake_batches.py`)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SENTINEL
from tests.fake_batches import FakeBatches

MODEL = "text-embedding-3-small"
KEY = "sk-test-SENTINEL-not-a-real-key"


@pytest.fixture
def batches():
    fake = FakeBatches()
    yield fake
    fake.close()


def env_for(fake: FakeBatches, tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "SUPABASE_", "HF_"))}
    env.update({"PYTHONPATH": str(ROOT), "EMBEDDINGS_PROVIDER": "openai", "OPENAI_API_KEY": KEY,
                "OPENAI_BASE_URL": fake.url, "EMBEDDINGS_CACHE": "sqlite",
                "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "cache.sqlite3"), "EMBEDDINGS_BATCH_POLL_S": "0.02",
                "EMBEDDINGS_BATCH_LINE_INPUTS": "4", **extra})
    return env


def embed(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "lib", "embed", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert SENTINEL not in run.stdout + run.stderr
    return run


def corpus(tmp_path, distinct: int = 20, lines: int = 30) -> list[str]:
    texts = [f"backfill text {i % distinct}" for i in range(lines)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    return texts


def expected(fake: FakeBatches, texts: list[str]) -> np.ndarray:
    from tests.upstreams import vector_for

    return np.stack([vector_for(MODEL, t, 1536) for t in texts])


def cached(tmp_path) -> int:
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
        return db.execute("select count(*) from embedding_cache").fetchone()[0]


def test_submit_then_collect_then_a_rerun_pays_nothing(batches, tmp_path):
    texts = corpus(tmp_path)
    env = env_for(batches, tmp_path)
    # Five texts are cached already (an earlier synchronous run): the batch must not hold them.
    (tmp_path / "head.txt").write_text("\n".join(texts[:5]) + "\n")
    assert embed(["head.txt"], env, tmp_path).returncode == 0
    assert batches.sync_inputs == texts[:5]

    first = embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path)
    assert first.returncode == 75, first.stderr
    assert "submitted 15 texts (the distinct texts the cache lacked)" in first.stderr
    assert sorted(batches.submitted_inputs()) == sorted(set(texts) - set(texts[:5]))  # exactly those, once each
    state = json.loads((tmp_path / "out.npy.batch.json").read_text())
    assert state["model"] == MODEL and len(state["batches"]) == 1 and not (tmp_path / "out.npy").exists()
    keys_dir = tmp_path / "out.npy.batch.json.keys"  # which keys each line holds: a file per input file
    dumped = json.dumps(state) + "".join(f.read_text() for f in keys_dir.iterdir())
    assert "backfill text" not in dumped and KEY not in dumped  # keys and ids only: no text, no secret
    assert len(list(keys_dir.iterdir())) == 1 and len(dumped) < 10_000
    upload = [p for m, p in batches.requests if m == "POST" and p != "/v1/embeddings"]
    assert upload == ["/v1/files", "/v1/batches"]

    pending = embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path)
    assert pending.returncode == 75, pending.stderr
    assert "pending: 1 batch(es) running (in_progress: 1; 0 of 4 requests done), 15 distinct texts to come" \
        in pending.stderr, pending.stderr
    assert len(batches.batches) == 1  # nothing submitted twice while the batch runs

    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "waiting: 1 batch(es) running (finalizing: 1; 4 of 4 requests done), 15 distinct texts to come, " \
           "0 collected" in done.stderr, done.stderr
    tokens = sum(len(t.split()) for t in set(texts) - set(texts[:5]))
    assert re.search(rf"30 texts \(20 distinct\): 20 hits, 0 misses, {tokens} tokens billed, of which {tokens} at "
                     r"the Batch API's rate", done.stderr), done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))
    assert cached(tmp_path) == 20
    assert list(keys_dir.iterdir()) == []  # a collected batch's keys are let go

    again = embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path)
    assert again.returncode == 0 and "0 misses, 0 tokens billed" in again.stderr
    assert len(batches.batches) == 1 and len(batches.submitted_inputs()) == 15  # nothing more submitted or paid


def test_partial_outcomes_lose_nothing_and_the_rest_is_submitted_again(batches, tmp_path):
    texts = corpus(tmp_path, distinct=16, lines=16)  # 4 lines of 4 inputs
    env = env_for(batches, tmp_path)
    assert embed(["in.txt", "--batch-api", "--out", "out.jsonl"], env, tmp_path).returncode == 75
    # The batch expires after 3 of its 4 lines: one goes to the error file, one has a vector of the wrong length,
    # one is answered well; and an output line names a custom_id nobody sent.
    batches.end_as, batches.complete_lines, batches.instant = "expired", 3, True
    batches.error_lines, batches.wrong_length_lines, batches.stray_custom_id = 1, 1, True
    second = embed(["in.txt", "--batch-api", "--out", "out.jsonl"], env, tmp_path)
    assert second.returncode == 75, second.stderr
    assert "collected 4 vectors" in second.stderr and "1 server_error" in second.stderr
    assert "1 batch expired" in second.stderr and "1 answered lines refused" in second.stderr
    assert "1 output lines for a custom_id this job never sent" in second.stderr
    assert cached(tmp_path) == 4  # the one good line, kept; nothing of the refused one
    first, resubmitted = [[t for line in batches.files[b["input_file_id"]]["lines"] for t in line["body"]["input"]]
                          for b in batches.batches.values()]
    delivered = set(first[8:12])  # the third line (after the error and the wrong-length lines)
    assert sorted(resubmitted) == sorted(set(first) - delivered)  # the rest, each once: nothing paid twice
    batches.end_as, batches.complete_lines = "completed", None
    batches.error_lines = batches.wrong_length_lines = 0
    batches.stray_custom_id = False
    done = embed(["in.txt", "--batch-api", "--out", "out.jsonl", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(16))
    assert np.allclose(np.array([r["embedding"] for r in rows], dtype=np.float32), expected(batches, texts))


def test_a_run_that_stops_between_upload_and_create_uploads_nothing_twice(batches, tmp_path):
    corpus(tmp_path)
    env = env_for(batches, tmp_path)
    batches.fail_create_after_upload = True
    stopped = embed(["in.txt", "--batch-api"], env, tmp_path)
    assert stopped.returncode == 1 and "the Batch API answered 400" in stopped.stderr, stopped.stderr
    assert len(batches.files) == 1 and not batches.batches
    state = json.loads((tmp_path / "in.txt.batch.json").read_text())
    assert len(state["uploaded"]) == 1  # recorded before the create that failed
    again = embed(["in.txt", "--batch-api"], env, tmp_path)
    assert again.returncode == 75 and len(batches.files) == 1 and len(batches.batches) == 1, again.stderr
    assert "submitted" not in again.stderr  # the uploaded file became the batch: no second upload


def test_a_lost_state_file_is_recovered_from_the_batches_api(batches, tmp_path):
    texts = corpus(tmp_path)
    env = env_for(batches, tmp_path)
    assert embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path).returncode == 75
    (tmp_path / "out.npy.batch.json").unlink()
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0 and "found batches of this job" in done.stderr, done.stderr
    assert len(batches.batches) == 1 and len(batches.submitted_inputs()) == 20  # found, not paid again
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))


def test_sync_rest_pays_what_the_batches_did_not_deliver(batches, tmp_path):
    texts = corpus(tmp_path, distinct=8, lines=8)
    env = env_for(batches, tmp_path)
    assert embed(["in.txt", "--batch-api"], env, tmp_path).returncode == 75
    batches.end_as, batches.complete_lines = "cancelled", 1
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--sync-rest", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(batches.sync_inputs) == sorted(texts[4:])  # the second line's texts, paid now, once
    assert "4 misses" in done.stderr and np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))


@pytest.mark.parametrize("extra, args, says", [
    ({"EMBEDDINGS_PROVIDER": "huggingface", "HF_TOKEN": "hf_x"}, [], "--batch-api is OpenAI's"),
    ({}, ["--url", "http://127.0.0.1:9/v1"], "does not combine with --url"),
    ({"EMBEDDINGS_CACHE": "memory"}, [], "needs a persistent cache"),
    ({}, ["--wait-typo"], "unrecognized arguments"),
])
def test_what_the_batch_path_refuses_says_why(batches, tmp_path, extra, args, says):
    corpus(tmp_path)
    env = env_for(batches, tmp_path, **extra)
    run = embed(["in.txt", "--batch-api", *args], env, tmp_path)
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert not batches.requests


def test_a_bad_line_stops_the_census_before_anything_is_uploaded(batches, tmp_path):
    """The census that finds what the cache lacks writes the batch files as it reads, but sends nothing until every
    line has passed: a bad last line leaves no upload, no batch, no state and no spool behind."""
    (tmp_path / "in.txt").write_text("".join(f"text {i}\n" for i in range(50)) + "   \n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = embed(["in.txt", "--batch-api"], env_for(batches, tmp_path, TMPDIR=str(scratch)), tmp_path)
    assert run.returncode == 2 and "in.txt:51: empty text" in run.stderr, run.stderr
    assert [r for r in batches.requests if r[0] == "POST"] == [] and not batches.files
    assert not (tmp_path / "in.txt.batch.json").exists() and list(scratch.iterdir()) == []


def test_files_split_at_their_limits_and_each_lacking_text_is_sent_once(batches, tmp_path):
    """6,000 distinct texts in 9,000 lines (looked up 4,096 at a time), every third of them cached already: the rest
    go out once each, in files of at most EMBEDDINGS_BATCH_FILE_INPUTS inputs, and come back in input order."""
    texts = [f"corpus text {i % 6000}" for i in range(9000)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    env = env_for(batches, tmp_path, EMBEDDINGS_BATCH_LINE_INPUTS="50", EMBEDDINGS_BATCH_FILE_INPUTS="1000")
    cached_first = [f"corpus text {i}" for i in range(0, 6000, 3)]
    (tmp_path / "some.txt").write_text("\n".join(cached_first) + "\n")
    assert embed(["some.txt"], env, tmp_path).returncode == 0

    first = embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path)
    assert first.returncode == 75, first.stderr
    lacking = set(texts) - set(cached_first)
    sent = batches.submitted_inputs()
    assert len(sent) == len(lacking) == 4000 and set(sent) == lacking
    inputs = [sum(len(line["body"]["input"]) for line in f["lines"]) for f in batches.files.values()]
    assert inputs == [1000, 1000, 1000, 1000] and len(batches.batches) == 4
    # The state stays small however many files go out (saved after every step, it must not grow with the keys).
    assert (tmp_path / "out.npy.batch.json").stat().st_size < 2_000
    assert len(list((tmp_path / "out.npy.batch.json.keys").iterdir())) == 4
    assert all(len(line["body"]["input"]) <= 50 for f in batches.files.values() for line in f["lines"])
    ids = [line["custom_id"] for f in batches.files.values() for line in f["lines"]]
    assert len(ids) == len(set(ids))  # unique across the job's files, not only within each

    batches.instant = True
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0 and "collected 4000 vectors" in done.stderr, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))
    assert len(batches.submitted_inputs()) == 4000 and len(batches.sync_inputs) == 2000  # nothing paid twice


def test_a_file_full_in_bytes_starts_the_next(tmp_path, monkeypatch):
    """The 200 MB bound, scaled down: a line that would overflow its file opens the next one, and every file keeps
    whole lines and the keys of each."""
    from lib import batch as bt

    monkeypatch.setattr(bt, "MAX_FILE_BYTES", 3000)
    monkeypatch.setattr(bt, "LINE_INPUTS", 10)
    spool = bt.Spool(str(tmp_path), "j" * 24, MODEL, None, 0)
    texts = [f"text number {i:03d} " + "x" * 50 for i in range(100)]
    spool.add(texts[:37], [f"k{i}" for i in range(37)])
    spool.add(texts[37:], [f"k{i}" for i in range(37, 100)])
    parts = spool.close()
    assert len(parts) > 1 and all(p.path.stat().st_size <= 3000 for p in parts)
    lines = [json.loads(x) for p in parts for x in p.path.read_bytes().splitlines()]
    assert [t for line in lines for t in line["body"]["input"]] == texts
    holds = {k: v for p in parts for k, v in p.holds.items()}
    assert [k for line in lines for k in holds[line["custom_id"]]] == [f"k{i}" for i in range(100)]


def test_a_cache_that_fails_while_collecting_loses_nothing_paid(batches, tmp_path):
    """The cache refuses the collected vectors (another writer holds SQLite's lock): the run stops and says so, the
    batch stays uncollected, and the next run reads the same results again, submitting and paying nothing more."""
    texts = corpus(tmp_path)
    env = env_for(batches, tmp_path)
    assert embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path).returncode == 75
    batches.instant = True
    holder = sqlite3.connect(tmp_path / "cache.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        stopped = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert stopped.returncode == 1 and "could not write collected vectors to the cache (sqlite)" in stopped.stderr, \
        stopped.stderr
    state = json.loads((tmp_path / "out.npy.batch.json").read_text())
    assert [b["collected"] for b in state["batches"]] == [False] and not (tmp_path / "out.npy").exists()
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))
    assert len(batches.batches) == 1 and len(batches.submitted_inputs()) == 20 and batches.sync_inputs == []


def test_sync_rest_without_wait_pays_now_only_what_no_running_batch_holds(batches, tmp_path):
    """Two batches: the first cancelled before answering anything, the second still running. --sync-rest pays the
    first one's texts through the ordinary endpoint now and leaves the second's to its batch."""
    texts = corpus(tmp_path, distinct=8, lines=8)
    env = env_for(batches, tmp_path, EMBEDDINGS_BATCH_FILE_INPUTS="4")
    assert embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path).returncode == 75
    first, _ = list(batches.batches)
    batches.steps_per_status = 1000  # the second stays in progress
    batches.end_as, batches.complete_lines = "cancelled", 0
    with batches.lock:
        batches.finish(batches.batches[first])
    batches.end_as, batches.complete_lines = "completed", None
    now = embed(["in.txt", "--batch-api", "--out", "out.npy", "--sync-rest"], env, tmp_path)
    assert now.returncode == 75, now.stderr
    assert "paid 4 texts through the endpoint now; pending: 1 batch(es) running" in now.stderr
    in_first = [t for line in batches.files[batches.batches[first]["input_file_id"]]["lines"]
                for t in line["body"]["input"]]
    assert sorted(batches.sync_inputs) == sorted(in_first)
    batches.instant = True
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))
    assert sorted(batches.sync_inputs) == sorted(in_first) and len(batches.submitted_inputs()) == 8


def test_a_cache_that_cannot_be_read_submits_nothing(batches, tmp_path):
    """What the cache holds is unknown when it cannot be read: submitting everything would pay again for what it
    has, so the run stops, says why, and sends nothing."""
    corpus(tmp_path)
    env = env_for(batches, tmp_path)
    (tmp_path / "cache.sqlite3").write_bytes(b"this is not an SQLite database, " * 256)
    run = embed(["in.txt", "--batch-api"], env, tmp_path)
    assert run.returncode == 1 and "could not look up the cache (sqlite)" in run.stderr, run.stderr
    assert [r for r in batches.requests if r[0] == "POST"] == [] and not batches.files


def test_a_state_written_by_the_previous_version_is_still_collected(batches, tmp_path):
    """Version 1 kept every line's keys inside the state file: such a state, left by a run before an upgrade, is
    collected as it is, and nothing is submitted again."""
    texts = corpus(tmp_path)
    env = env_for(batches, tmp_path)
    assert embed(["in.txt", "--batch-api", "--out", "out.npy"], env, tmp_path).returncode == 75
    path, keys_dir = tmp_path / "out.npy.batch.json", tmp_path / "out.npy.batch.json.keys"
    state = json.loads(path.read_text())
    for entry in state["batches"]:
        entry["lines"] = json.loads((keys_dir / entry.pop("keys")).read_text())
    state["version"] = 1
    path.write_text(json.dumps(state))
    for f in keys_dir.iterdir():
        f.unlink()
    batches.instant = True
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))
    assert len(batches.batches) == 1 and len(batches.submitted_inputs()) == 20


def test_the_enqueued_token_limit_paces_the_batches_and_bills_each_text_once(batches, tmp_path):
    """OpenAI fails a batch that would take the organisation past its enqueued-token limit (nothing answered,
    nothing billed). The job then sends one file at a time, when none of its batches runs, until all are in."""
    texts = corpus(tmp_path, distinct=12, lines=12)  # 3 words a text: 12 tokens a file of 4
    env = env_for(batches, tmp_path, EMBEDDINGS_BATCH_FILE_INPUTS="4")
    batches.enqueued_limit = 20  # one file fits, two do not
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lines not answered: 2 batch failed (token_limit_exceeded)" in done.stderr
    assert "12 distinct texts to come (8 held back while batches run: OpenAI's enqueued-token limit was reached)" \
        in done.stderr
    assert "one file at a time (OpenAI's enqueued-token limit): 4 texts wait" in done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))
    assert sorted(batches.billed_inputs()) == sorted(set(texts))  # each text billed once
    # The two that failed at the limit, then their texts one file at a time: none failed again.
    statuses = [b["status"] for b in batches.batches.values()]
    assert statuses == ["completed", "failed", "failed", "completed", "completed"], statuses
    assert batches.sync_inputs == []  # nothing paid at the full price


def test_a_file_over_the_enqueued_token_limit_on_its_own_says_what_to_change(batches, tmp_path):
    corpus(tmp_path, distinct=4, lines=4)
    env = env_for(batches, tmp_path)
    batches.enqueued_limit, batches.instant = 10, True  # the one file holds 12 tokens
    assert embed(["in.txt", "--batch-api"], env, tmp_path).returncode == 75
    again = embed(["in.txt", "--batch-api"], env, tmp_path)
    assert again.returncode == 1, again.stderr
    assert "with no other batch of this job running (Enqueued token limit reached for text-embedding-3-small" \
        in again.stderr and "set EMBEDDINGS_BATCH_FILE_INPUTS lower" in again.stderr, again.stderr
    assert len(batches.batches) == 1 and batches.billed_inputs() == []


def test_a_rate_limited_upload_is_sent_again_after_its_retry_after(batches, tmp_path):
    """The Files API answers 429 twice: the same file goes again, whole, and one batch is made of it."""
    texts = corpus(tmp_path)
    env = env_for(batches, tmp_path)
    batches.throttle_uploads = 2
    run = embed(["in.txt", "--batch-api"], env, tmp_path)
    assert run.returncode == 75, run.stderr
    assert [p for m, p in batches.requests if m == "POST"] == ["/v1/files"] * 3 + ["/v1/batches"]
    assert len(batches.files) == 1 and sorted(batches.submitted_inputs()) == sorted(set(texts))


def test_ctrl_c_while_waiting_loses_nothing_and_the_next_run_goes_on(batches, tmp_path):
    texts = corpus(tmp_path)
    env = env_for(batches, tmp_path)
    batches.steps_per_status = 10**6  # the batch stays validating while the run waits
    proc = subprocess.Popen([sys.executable, "-m", "lib", "embed", "in.txt", "--batch-api", "--out", "out.npy",
                             "--wait"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    while not any(line.startswith("waiting:") for line in lines):
        lines.append(proc.stderr.readline())
        assert lines[-1], "".join(lines)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=30) == 130, rest
    assert "interrupted: what was submitted and collected is recorded" in rest and "Traceback" not in rest, rest
    batches.instant = True
    done = embed(["in.txt", "--batch-api", "--out", "out.npy", "--wait"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected(batches, texts))
    assert len(batches.batches) == 1 and len(batches.submitted_inputs()) == 20
