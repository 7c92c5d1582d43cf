"""`python -m lib <command>`: embed a whole corpus, see what the cache holds, prune it, export an ONNX model.

    python -m lib embed chunks.jsonl --out vectors.npy        # in-process, the endpoint's environment
    python -m lib embed - --url https://x.vercel.app/v1 --api-key KEY < lines.txt
    python -m lib stats
    python -m lib prune --unused-days 90 --max-rows 900000 --dry-run

`embed` is a third door onto the same service: in-process it is the `Embedder` (same keys, same cache as
the endpoint); with `--url` it is a client of a deployed endpoint. Nothing here embeds by itself.
Exit codes: 0 done, 75 batches submitted or still running (--batch-api: run it again later), 1 the provider or
the endpoint failed (or refused the key), 2 bad input or usage (a
model that is not served, `--dimensions` it does not take), 130 interrupted (Ctrl-C). After 130 or a passing
failure, the same command again pays only for what was not done; after a failure that would only happen again,
the last line says what to change instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TextIO

from .corpus import Census, CorpusError, open_output, open_source, validate
from .errors import EmbeddingError

EXAMPLES = {
    "embed": """examples:
  python -m lib embed chunks.txt                                # fill the cache only (a backfill)
  python -m lib embed chunks.jsonl --field body --id-field id --out vectors.jsonl
  python -m lib embed docs.csv --column text --out vectors.npy  # float32, shape (n, d), input order
  cat lines.txt | python -m lib embed - --out vectors.npy
  python -m lib embed chunks.jsonl --url https://your-app.vercel.app/v1 --api-key "$EMBEDDINGS_KEY" --out v.npy
Re-running the same command pays only for the texts that are not cached yet.""",
    "stats": """examples:
  python -m lib stats                       # the cache configured by EMBEDDINGS_CACHE (sqlite or supabase)
  EMBEDDINGS_SQLITE_PATH=other.sqlite3 python -m lib stats""",
    "export-onnx": """examples:
  python -m lib export-onnx                                     # the packaged all-MiniLM-L6-v2, fp32, to .cache/onnx/
  python -m lib export-onnx --out models/minilm-int8 --int8     # its int8 variant, under its own model id
  python -m lib export-onnx --from ./my-st-model --model-id my-org/my-model --out models/my-model
Then: EMBEDDINGS_PROVIDER=onnx EMBEDDINGS_ONNX_MODEL_DIR=<the directory> (development requirements for the export
only; serving needs onnxruntime and tokenizers).""",
    "prune": """examples:
  python -m lib prune --unused-days 90 --dry-run   # how many rows would go, deleting nothing
  python -m lib prune --unused-days 90 --max-rows 900000
  python -m lib prune --max-rows 0                 # empty the cache""",
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m lib", description="Embed a corpus through the cached embedding "
                                  "service, and look after the cache.")
    sub = top.add_subparsers(dest="command", required=True, metavar="{embed,stats,prune,export-onnx}")
    fmt = argparse.RawDescriptionHelpFormatter

    embed = sub.add_parser("embed", help="embed every text of a file", epilog=EXAMPLES["embed"], formatter_class=fmt,
                           description="Embed every text of INPUT: .txt (one text per line), .jsonl, .csv with a "
                                       "header row, or - for standard input (one text per line).")
    embed.add_argument("input", metavar="INPUT")
    embed.add_argument("--out", metavar="FILE", help=".npy (float32, shape (n, d)) or .jsonl; without it the "
                                                     "command only fills the cache")
    embed.add_argument("--field", "--column", dest="field", default=None,
                       help=".jsonl field / .csv column holding the text (default: text)")
    embed.add_argument("--id-field", "--id-column", dest="id_field", default=None,
                       help=".jsonl field / .csv column to carry to .jsonl output as \"id\"")
    embed.add_argument("--model", default=None, help="model id (default: the configured one)")
    embed.add_argument("--dimensions", type=int, default=None, help="shorter vectors (text-embedding-3 only)")
    embed.add_argument("--batch-size", type=_positive, default=256, help="texts per request (default: 256)")
    embed.add_argument("--concurrency", type=_positive, default=4, help="provider calls (or, with --url, requests) in flight (default: 4)")
    embed.add_argument("--url", default=None, help="a deployed endpoint's base URL, ending in /v1 (as the openai "
                                                   "SDK's base_url); default: embed in this process")
    embed.add_argument("--api-key", default=None, help="the endpoint's key (with --url)")
    embed.add_argument("--batch-api", action="store_true",
                       help="pay half through OpenAI's Batch API: submit the texts the cache lacks and exit; the same "
                            "command again collects (results within 24 h), then writes --out")
    embed.add_argument("--wait", action="store_true", help="with --batch-api: poll until the batches are done")
    embed.add_argument("--sync-rest", action="store_true",
                       help="with --batch-api: pay what the batches did not deliver through the ordinary endpoint now")

    sub.add_parser("stats", help="what the persistent cache holds, per model and size", epilog=EXAMPLES["stats"],
                   formatter_class=fmt, description="One line per model and dimensions: rows, bytes, oldest and "
                                                    "newest entry, rows unused for 30 and 90 days.")

    prune = sub.add_parser("prune", help="delete rows unused for a while, or beyond a row budget",
                           epilog=EXAMPLES["prune"], formatter_class=fmt,
                           description="Delete rows not used for N days, then the least recently used beyond M "
                                       "rows (Supabase's embedding_cache_prune; the same rule on SQLite).")
    prune.add_argument("--unused-days", type=float, default=None, metavar="N")
    prune.add_argument("--max-rows", type=int, default=None, metavar="M")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")

    onnx = sub.add_parser("export-onnx", help="write a sentence-transformers model as an ONNX model directory",
                          epilog=EXAMPLES["export-onnx"], formatter_class=fmt,
                          description="Export a sentence-transformers model (default: the packaged all-MiniLM-L6-v2) "
                                      "to a complete ONNX model directory for EMBEDDINGS_PROVIDER=onnx, and check it "
                                      "against sentence-transformers before reporting success.")
    onnx.add_argument("--out", metavar="DIR", default=None,
                      help="the directory to write (default: .cache/onnx/all-MiniLM-L6-v2, -int8 with --int8)")
    onnx.add_argument("--from", dest="source", metavar="MODEL", default=None,
                      help="a sentence-transformers directory (default: the packaged all-MiniLM-L6-v2)")
    onnx.add_argument("--model-id", default=None, help="the model id it is served under (needed with --from)")
    onnx.add_argument("--int8", action="store_true", help="a per-channel int8 variant, under its own model id")
    return top


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    # This process never runs httpx's own command-line client, which httpx imports whenever rich, click and
    # pygments happen to be installed (30-40 ms on the first provider call).
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    args = parser().parse_args(argv)
    try:
        if args.command == "embed":
            return embed(args)
        if args.command == "stats":
            return stats()
        if args.command == "export-onnx":
            from .export_onnx import main as export_onnx

            return export_onnx(args.out, args.source, args.model_id, args.int8)
        return prune(args)
    except CorpusError as exc:
        return _fail(2, str(exc))
    except EmbeddingError as exc:
        return _fail(1, _describe(exc))


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _describe(exc: EmbeddingError) -> str:
    if exc.status == 401:
        return f"the endpoint refused the API key (401): {exc}"
    return f"{exc} ({exc.status}{', ' + exc.code if exc.code else ''})"


# -- embed ---------------------------------------------------------------------------------------------------


def _embedder(args: argparse.Namespace) -> tuple[Any, int, bool]:
    """The door to use, the per-text character limit to validate against, and whether a text paid for once is
    sure to be found again in this run (a persistent cache in this process): only then may the command pay in one
    pass and write in another."""
    if args.url:
        from .config import Settings
        from .remote import RemoteEmbedder

        # The endpoint's limit is its own; validate against the default unless told otherwise.
        limit = int(os.environ.get("EMBEDDINGS_MAX_INPUT_CHARS") or Settings.max_input_chars)
        return RemoteEmbedder(args.url, args.api_key), limit, False  # the endpoint's cache is not ours to know
    from .config import ConfigError
    from .embedder import Embedder

    try:
        # --concurrency bounds the provider calls; the batches' lookups and cache writes run beside them.
        embedder = Embedder.from_env(max_provider_calls=args.concurrency)
    except ConfigError as exc:
        raise CorpusError(f"configuration: {exc}") from None
    return embedder, embedder.settings.max_input_chars, embedder.settings.cache in ("sqlite", "supabase")


def embed(args: argparse.Namespace) -> int:
    if args.api_key and not args.url:
        return _fail(2, "--api-key is for --url (in-process runs use the environment's keys)")
    if args.batch_api and args.url:
        return _fail(2, "--batch-api pays OpenAI directly, in this process: it does not combine with --url")
    if (args.wait or args.sync_rest) and not args.batch_api:
        return _fail(2, "--wait and --sync-rest are for --batch-api")
    if args.batch_api and args.input == "-":
        return _fail(2, "--batch-api reads a file, not standard input: the run that collects must find the same input")
    embedder, max_chars, persistent = _embedder(args)
    if args.batch_api and not persistent:
        return _fail(2, "--batch-api needs a persistent cache (EMBEDDINGS_CACHE=sqlite or supabase): collected vectors "
                        "are kept there until the output is written")
    src = open_source(args.input, field=args.field, id_field=args.id_field)
    try:
        started = time.monotonic()
        if args.batch_api:
            try:
                return batch_api(args, embedder, src, max_chars, started)
            except KeyboardInterrupt:  # collecting, submitting or waiting: each step was recorded before it was taken
                print("interrupted: what was submitted and collected is recorded in the state file beside the "
                      "output; run the same command again to go on (nothing is paid twice)", file=sys.stderr)
                return 130
        census = validate(src, max_chars)  # every line checked before the first request
        out = open_output(args.out, census.texts) if args.out else None
        one_pass = census.distinct == census.texts or not persistent
        progress = Progress(census.texts if one_pass else census.distinct, sys.stderr)
        passes = [progress]
        if one_pass:  # pay and write together (no duplicates, or no cache sure to hand paid texts back)
            outcome = _run(embedder, src, args, out, progress, census)
        else:
            # Pay first, in full batches of first occurrences (duplicates spread through a file would leave
            # every batch partly cached, and cost more upstream calls than the distinct texts need); then, for
            # an output, write it in a second pass that is all cache hits. A re-run whose first batch is all cached
            # goes straight to the writing pass (which pays for any rest itself, once).
            outcome = _run(embedder, src, args, None, progress, census, only=True,
                           warm_probe=1 if out is not None else 0)
            if out is not None and (outcome is None or isinstance(outcome, _Warm)):
                progress.close()
                writing = Progress(census.texts, sys.stderr, "writing")
                passes.append(writing)
                outcome = _run(embedder, src, args, out, writing, census, expect_hits=True)
            elif out is not None:
                out.abandon()
    finally:
        src.close()
    elapsed = time.monotonic() - started
    p = passes[-1]
    misses, tokens = sum(x.misses for x in passes), sum(x.tokens for x in passes)
    # Every distinct text was either paid for in this run (a miss, counted once) or found in the cache.
    hits = max(0, census.distinct - misses) if outcome is None else sum(x.hits for x in passes)
    summary = (f"{census.texts} texts ({census.distinct} distinct): {hits} hits, {misses} misses, "
               f"{tokens} tokens billed, {elapsed:.1f} s")
    p.close()
    if outcome is None:
        print(f"done: {summary}" + (f"; vectors in {args.out}" if args.out else "; the cache is filled"),
              file=sys.stderr)
        return 0
    # One meaning for "done" in every mode: distinct texts embedded (and so cached, locally), whatever the pass.
    done = min(census.distinct, max(x.firsts for x in passes))
    left = census.distinct - done
    again = f"the same command again pays only for the {left} distinct texts not done"
    if isinstance(outcome, KeyboardInterrupt):
        print(f"interrupted with {done} of {census.distinct} distinct texts done: {summary}; run {again}",
              file=sys.stderr)
        return 130
    print(f"stopped with {done} of {census.distinct} distinct texts done: {summary}", file=sys.stderr)
    fix = _fix(outcome, args)
    if fix is None:  # something a later attempt can get past (a timeout, an outage, a rate limit)
        print(f"error: {_describe(outcome)}; run {again}", file=sys.stderr)
        return 1
    print(f"error: {_describe(outcome)}", file=sys.stderr)
    print(f"running it again unchanged cannot help: {fix}" + (f"; then {again}" if done else ""), file=sys.stderr)
    return 2 if outcome.status == 400 else 1


def _fix(exc: EmbeddingError, args: argparse.Namespace) -> str | None:
    """What to change after an error that the same command would meet again; None for one worth retrying."""
    if exc.status == 400:
        option = {"model": "--model", "dimensions": "--dimensions"}.get(exc.param or "")
        if option:
            return f"change {option} as the message says"
        return "change the input or the options as the message says"
    if exc.status in (401, 403) and args.url:
        return "pass a key the endpoint accepts with --api-key (one of its EMBEDDINGS_API_KEYS)"
    if exc.code == "provider_auth":
        return "set a valid key for the provider (OPENAI_API_KEY, or HF_TOKEN for Hugging Face)"
    if exc.code == "provider_model_not_found":
        return "choose a model the provider serves (--model or EMBEDDINGS_MODEL)"
    if exc.code == "provider_insufficient_quota":
        return "add credit or raise the quota of the provider account"
    if exc.code in ("misconfigured", "auth_not_configured", "unsupported_model_output", "provider_unavailable"):
        return "fix the configuration the message names"
    return None


PENDING = 75  # EX_TEMPFAIL: batches were submitted or are still running; run the same command again later
MAX_ROUNDS = 3  # submissions one --wait run makes before it leaves the rest to a later run


def batch_api(args: argparse.Namespace, embedder: Any, src: Any, max_chars: int, started: float) -> int:
    """Collect what finished, submit what the cache lacks to OpenAI's Batch API, and write the output once every
    text is cached (`lib/batch.py`). Exit 0 when written, PENDING when batches are out, as for `embed` otherwise."""
    import tempfile
    from pathlib import Path

    from . import batch as bt

    try:
        spec, dims = embedder.resolve(args.model, args.dimensions)
    except EmbeddingError as exc:  # a model not served, dimensions it does not take: nothing was sent
        return _fail(2, f"{exc}; running it again unchanged cannot help: {_fix(exc, args)}")
    provider, settings, secret = embedder.route_of(spec.id)
    if provider != "openai":
        return _fail(2, f"--batch-api is OpenAI's: {spec.id!r} is served by {provider} here (OpenAI models through "
                        "an openai route only)")
    target = Path(args.out or args.input)
    state_path = target.with_name(target.name + ".batch.json")
    job = bt.job_id(src.path, spec.id, dims)
    state = bt.State.load(state_path, job, spec.id, dims) or bt.State(state_path, job, spec.id, dims)
    run = bt.BatchRun(embedder, bt.BatchClient(settings["base_url"], secret), state, spec, dims)
    if run.adopt():
        bt.say(f"found batches of this job that {state_path.name} did not list (a run that stopped early): "
               "collecting them instead of paying again")
    run.create_uploaded()
    tally = bt.Tally()
    census: Census | None = None
    rounds = 0
    while True:
        run.collect(tally)
        pending = len(state.running)
        if tally.over_limit_alone:  # more waiting cannot make room for a file that does not fit on its own
            _batch_report(tally)
            return _fail(1, f"a batch failed at OpenAI's enqueued-token limit with no other batch of this job running "
                            f"({tally.over_limit}); each batch file holds up to {bt.FILE_INPUTS} inputs: set "
                            "EMBEDDINGS_BATCH_FILE_INPUTS lower (or let the organisation's other batches finish), then "
                            "run the same command again; nothing was billed for it")
        if args.sync_rest and not pending:
            break  # the writing pass pays what is still missing, through the ordinary endpoint
        if args.sync_rest and not args.wait:  # pay now what no batch holds; the batches still running stay theirs
            census = census or validate(src, max_chars)  # every line checked before anything is paid
            payer = _Payer(embedder, spec.id, args)
            bt.Lacking(embedder.service, spec, dims, state.in_flight(), payer.add).read(src, census)
            payer.flush()
            _batch_report(tally)
            print(f"paid {payer.paid} texts through the endpoint now; pending: {pending} batch(es) running; run the "
                  "same command again to collect them and write the output", file=sys.stderr)
            return PENDING
        count = made = 0
        with tempfile.TemporaryDirectory(prefix="embed-batch-") as scratch:
            spool = bt.Spool(scratch, job, spec.id, dims, len(state.batches) + len(state.uploaded))
            # Else counted only: --sync-rest pays them later; a --wait run stops submitting after MAX_ROUNDS; and a
            # job that met the enqueued-token limit sends one file at a time, when none of its batches is running.
            held = state.paced and pending > 0
            submitting = not args.sync_rest and not (args.wait and rounds >= MAX_ROUNDS) and not held
            lacking = bt.Lacking(embedder.service, spec, dims, state.in_flight(), spool.add if submitting else None)
            if census is None:  # the census itself finds what the cache lacks, as it reads: one pass over the input
                census = validate(src, max_chars, lacking.add)
                lacking.flush()
            else:
                lacking.read(src, census)
            if spool.texts:
                count, made = run.send(spool, most=1 if state.paced else None)
        if count:
            rounds += 0 if state.paced else 1  # pacing is progress, not batches ending early
            bt.say(f"submitted {count} texts (the distinct texts the cache lacked) in {made} batch file(s); "
                   f"state in {state_path}" + (f"; one file at a time (OpenAI's enqueued-token limit): "
                                               f"{lacking.count - count} texts wait" if state.paced else ""))
        if lacking.count == 0:
            break
        pending = len(state.running)
        waits = f" ({lacking.free} held back while batches run: OpenAI's enqueued-token limit was reached)" \
            if held and lacking.free else ""
        if not args.wait or (rounds >= MAX_ROUNDS and not pending):
            _batch_report(tally)
            if rounds >= MAX_ROUNDS and not pending:
                print(f"pending: batches keep ending without all their results ({lacking.count} distinct texts to "
                      f"come after {rounds} submissions); run the same command later, or add --sync-rest to pay the "
                      "rest now", file=sys.stderr)
            else:
                print(f"pending: {state.progress()}, {lacking.count} distinct texts to come{waits}; run the same "
                      "command again (or add --wait) to collect: results come within 24 h", file=sys.stderr)
            return PENDING
        bt.say(f"waiting: {state.progress()}, {lacking.count} distinct texts to come{waits}, {tally.stored} collected")
        bt.poll_wait()
    census = census or validate(src, max_chars)
    _batch_report(tally)
    # Every text is cached now (or --sync-rest pays what is not): the synchronous command writes the output, all hits.
    out = open_output(args.out, census.texts) if args.out else None
    writing = Progress(census.texts, sys.stderr, "writing")
    outcome = _run(embedder, src, args, out, writing, census, expect_hits=True)
    writing.close()
    elapsed = time.monotonic() - started
    summary = (f"{census.texts} texts ({census.distinct} distinct): {census.distinct - writing.misses} hits, "
               f"{writing.misses} misses, {writing.tokens + tally.tokens} tokens billed, of which {tally.tokens} at "
               f"the Batch API's rate (half price), {elapsed:.1f} s")
    if outcome is None:
        print(f"done: {summary}" + (f"; vectors in {args.out}" if args.out else "; the cache is filled"),
              file=sys.stderr)
        return 0
    print(f"stopped: {summary}", file=sys.stderr)
    print(f"error: {_describe(outcome) if isinstance(outcome, EmbeddingError) else 'interrupted'}", file=sys.stderr)
    return 130 if isinstance(outcome, KeyboardInterrupt) else 1


class _Payer:
    """--sync-rest without --wait: the texts no batch holds, paid through the ordinary door now, a batch at a time."""

    def __init__(self, embedder: Any, model: str, args: argparse.Namespace) -> None:
        self.embedder, self.model, self.args = embedder, model, args
        self.paid = 0
        self._held: list[str] = []

    def add(self, texts: list[str], keys: list[str]) -> None:
        self._held += texts
        while len(self._held) >= self.args.batch_size:
            self._pay(self.args.batch_size)

    def flush(self) -> None:
        self._pay(len(self._held))

    def _pay(self, count: int) -> None:
        texts = self._held[:count]
        del self._held[:count]
        if texts:
            self.embedder.embed(texts, model=self.model, dimensions=self.args.dimensions)
            self.paid += len(texts)


def _batch_report(tally: Any) -> None:
    """What collecting found, in one line (only when there is something to say)."""
    parts = []
    if tally.stored:
        parts.append(f"collected {tally.stored} vectors ({tally.tokens} tokens at the batch rate)")
    if tally.failed:
        parts.append("lines not answered: " + ", ".join(f"{n} {reason}" for reason, n in sorted(tally.failed.items())))
    if tally.rejected:
        parts.append(f"{tally.rejected} answered lines refused (malformed or wrong length; not cached, paid again)")
    if tally.stray:
        parts.append(f"{tally.stray} output lines for a custom_id this job never sent (ignored)")
    if parts:
        print("batch: " + "; ".join(parts), file=sys.stderr)


class _Warm(Exception):
    """The pay pass found its first batches all cached: a re-run, better served by the writing pass alone."""


def _run(embedder: Any, src: Any, args: argparse.Namespace, out: Any, progress: Progress, census: Census,
         only: bool = False, warm_probe: int = 0, expect_hits: bool = False) -> BaseException | None:
    """Batches in input order, `concurrency` in flight. On Ctrl-C or a failure, no new batch starts; those in
    flight finish (and are cached); the partial output is removed. Returns None, or what stopped the run.

    `expect_hits` (a writing pass after the texts were paid for): while every text is a hit, one thread per core
    looks batches up, each with its next batch already read and queued; from the first miss on, all lanes. A
    lookup is mostly SQLite, which runs outside the GIL, so a second core nearly halves it; more threads than
    cores only take turns (a 20,000-text re-run: 0.34 s with 2 threads and 4 batches queued, 0.39 s with 6
    lanes, 0.46 s with one thread)."""
    from .corpus import batches

    stop: list[BaseException] = []

    def interrupted(signum: int, frame: object) -> None:
        if not stop:
            stop.append(KeyboardInterrupt())

    previous = signal.signal(signal.SIGINT, interrupted) if threading.current_thread() is threading.main_thread() \
        else None
    pending: deque[tuple[int, list[Any], Future[Any]]] = deque()
    stream = batches(src, args.batch_size, census if only else None)
    start = 0
    exhausted = False
    # `lanes` batches run at once: in this process a few more than --concurrency, so that their lookups and
    # cache writes overlap the provider calls (the provider's connection pool keeps those to --concurrency). Finished
    # batches wait for the oldest (the output is in input order), so a slow batch does not hold back the
    # next; at most twice `most` are held.
    most = args.concurrency + (0 if args.url else max(1, args.concurrency // 2))
    workers = min(most, os.cpu_count() or 1) if expect_hits else most
    lanes, held = (2 * workers if expect_hits else most), 2 * most
    with ExitStack() as pools:
        pool = pools.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed"))
        try:
            while True:
                # While probing for a re-run, only the probe's batches go (the rest might not be needed).
                while not stop and not exhausted and len(pending) < held and \
                        sum(not f.done() for _, _, f in pending) < lanes and \
                        (not warm_probe or progress.batches + len(pending) < warm_probe):
                    batch = next(stream, None)
                    if batch is None:
                        exhausted = True
                        break
                    texts = [t for _, t in batch]
                    pending.append((start, [i for i, _ in batch],
                                    pool.submit(embedder.embed, texts, model=args.model, dimensions=args.dimensions)))
                    start += len(texts)
                if not pending:
                    break
                if not pending[0][2].done() and not stop and not exhausted and len(pending) < held and \
                        not warm_probe:
                    wait([f for _, _, f in pending if not f.done()], return_when=FIRST_COMPLETED)
                    continue
                first, ids, future = pending.popleft()
                try:
                    result = future.result()
                except EmbeddingError as exc:
                    if not stop:
                        stop.append(exc)
                    continue
                if out is not None and not stop:
                    out.write(ids, first, result.vectors)
                # Distinct texts done: a pay pass holds first occurrences only; elsewhere, count them by index.
                firsts = len(ids) if only else sum(map(census.is_first, range(first, first + len(ids))))
                progress.update(len(ids), result, firsts)
                if result.misses and expect_hits:  # not all cached after all: every lane from here on
                    expect_hits, lanes = False, most
                    pool = pools.enter_context(ThreadPoolExecutor(max_workers=most, thread_name_prefix="embed"))
                if warm_probe and not stop:
                    if result.misses:
                        warm_probe = 0  # not a re-run: pay on
                    elif progress.batches >= warm_probe:
                        stop.append(_Warm())
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    if stop:
        if out is not None:
            out.abandon()
        return stop[0]
    if out is not None:
        out.finish()
    return None


class Progress:
    """A progress bar on a terminal (tqdm); elsewhere (CI, a pipe) a plain line every few seconds, with no
    control characters. Counts texts done, hits, misses and tokens billed so far."""

    EVERY_S = 3.0

    def __init__(self, total: int, stream: TextIO, label: str = "progress") -> None:
        self.total = total
        self.label = label
        self.stream = stream
        self.done = self.hits = self.misses = self.tokens = self.batches = 0
        self.firsts = 0  # distinct texts done (their first occurrence embedded)
        self.started = time.monotonic()
        self._last = self.started
        self._bar: Any = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="text", file=stream, dynamic_ncols=True, smoothing=0.1,
                             desc=None if label == "progress" else label)

    def update(self, count: int, result: Any, firsts: int) -> None:
        self.done += count
        self.firsts += firsts
        self.batches += 1
        self.hits += result.hits
        self.misses += result.misses
        self.tokens += result.tokens
        if self._bar is not None:
            self._bar.set_postfix(hits=self.hits, misses=self.misses, tokens=self.tokens, refresh=False)
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last >= self.EVERY_S:
            self._last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            # A small or slow run still shows a rate that means something ("0.4 texts/s", never "0 texts/s").
            shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
            print(f"{self.label}: {self.done}/{self.total} texts ({100 * self.done // self.total}%), {shown} texts/s, "
                  f"ETA {eta:.0f} s, {self.hits} hits, {self.misses} misses, {self.tokens} tokens billed",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- stats and prune ---------------------------------------------------------------------------------------


def _persistent_cache() -> Any:
    from . import config
    from .app import make_tiers

    try:
        settings = config.load()
    except config.ConfigError as exc:
        raise CorpusError(f"configuration: {exc}") from None
    for tier in make_tiers(settings):
        if hasattr(tier, "stats"):
            return tier
    raise CorpusError(f"EMBEDDINGS_CACHE={settings.cache} keeps nothing on disk: stats and prune need sqlite or "
                      "supabase")


def stats() -> int:
    cache = _persistent_cache()
    rows = _admin(cache.stats)
    if not rows:
        print(f"the {cache.name} cache is empty")
    for r in rows:
        day = lambda d: d.strftime("%Y-%m-%d %H:%M") if d else "-"  # noqa: E731
        print(f"{r.model} {r.rows} rows, {r.dimensions} dims, {r.vector_bytes} bytes, oldest {day(r.oldest)}, "
              f"newest {day(r.newest)}, unused 30 days: {r.unused_30_days}, unused 90 days: {r.unused_90_days}")
    return 0


def prune(args: argparse.Namespace) -> int:
    if args.unused_days is None and args.max_rows is None:
        return _fail(2, "say what to prune: --unused-days N, --max-rows M, or both")
    if (args.unused_days is not None and args.unused_days < 0) or (args.max_rows is not None and args.max_rows < 0):
        return _fail(2, "--unused-days and --max-rows must not be negative")
    cache = _persistent_cache()
    count = _admin(lambda: cache.prune(args.unused_days, args.max_rows, dry_run=args.dry_run))
    rule = " and ".join(filter(None, [f"unused for {args.unused_days:g} days" if args.unused_days is not None else "",
                                      f"beyond the {args.max_rows} most recently used" if args.max_rows is not None
                                      else ""]))
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{cache.name}: {verb} {count} rows ({rule})" + ("; nothing was deleted" if args.dry_run else ""))
    return 0


def _admin(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # a cache error, named without its payload or key
        raise EmbeddingError(502, f"the cache failed: {type(exc).__name__}: {str(exc)[:200]}",
                             code="cache_error") from None
