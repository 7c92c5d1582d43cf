"""`python -m lib embed FILE --batch-api`: backfills through OpenAI's Batch API, at half the price, cache-aware.

One pipeline with the synchronous command: the same census of the input (`lib.corpus`), the same cache keys, the
same validation of every vector and the same cache writes (`EmbeddingService.keys`, `.cached`, `.validated`,
`.store`). What this module adds is the Batch API client and its state:

1. **Collect** (first, on every run): each finished batch's output and error files are read as they stream in;
   lines are matched by `custom_id` (output order is not guaranteed), every answer is read by the OpenAI
   provider's own strict parser and validated as the service validates a provider's (count, length, finiteness,
   dimensions) and stored under the same keys. A batch that expired, failed or was cancelled still gives the lines
   it completed (they are billed); failed lines are counted by reason. A batch is marked collected only once its
   vectors are stored: a cache that fails stops the run, and the next one reads the same results again.
2. **Submit**: the census itself finds the distinct texts the cache lacks as it reads (`Lacking`, fed each first
   occurrence), and those no batch in flight holds are written as batch input files to a spool on disk (`Spool`;
   `purpose=batch` lines of `{"custom_id", "method": "POST", "url": "/v1/embeddings", "body"}`; at most 50,000
   requests, 50,000 inputs and 200 MB a file; at most 2048 inputs and about 300,000 tokens a line). One pass over
   the input, memory flat however long it is, and nothing sent until every line has passed. Then each file is
   uploaded (streamed from disk) and its batch created (`completion_window: "24h"`). The state file beside the
   output records, before each step, what was uploaded and created and which cache keys each line holds: never a
   text, never a secret.
3. **Write**: once every text is cached, the output is written exactly as the synchronous command writes it (a pass
   that is all cache hits). A run after that pays nothing and submits nothing.

A run that died between upload and create, or lost its state file, is recovered from the Batches API itself: every
batch carries the job's id in its metadata, so the batches a dead run created are found (and their input files
read back for their keys) before anything is submitted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .corpus import CorpusError
from .errors import EmbeddingError, parse_retry_after
from .providers.base import chunk_by_limits

MAX_LINES = 50_000
MAX_INPUTS = 50_000  # per file (the Batch API's limit for an embeddings batch)
# Inputs per file: EMBEDDINGS_BATCH_FILE_INPUTS makes files smaller (batches that end sooner, and stay under an
# organisation's limit on tokens enqueued at once).
FILE_INPUTS = min(MAX_INPUTS, int(os.environ.get("EMBEDDINGS_BATCH_FILE_INPUTS") or MAX_INPUTS))
MAX_FILE_BYTES = 200 * 1024 * 1024
# Inputs per request line: 2048 at most (the endpoint's limit); EMBEDDINGS_BATCH_LINE_INPUTS makes lines smaller.
LINE_INPUTS = min(2048, int(os.environ.get("EMBEDDINGS_BATCH_LINE_INPUTS") or 2048))
LINE_TOKENS = 300_000
TERMINAL = ("completed", "expired", "failed", "cancelled")
STORE_ROWS = 16_384  # validated vectors written to the cache in one go
LOOKUP = 4096  # first occurrences looked up in the cache at a time
POLL_S = float(os.environ.get("EMBEDDINGS_BATCH_POLL_S") or 30)


class BatchClient:
    """OpenAI's Files and Batches APIs at one base URL, over httpx; 429 and 5xx are tried again (`lib.retry`),
    after the `retry-after` an answer asks for."""

    def __init__(self, base_url: str, api_key: str) -> None:
        import httpx

        from .providers.http import client_for

        self._client = client_for(base_url, base_url=base_url.rstrip("/"),
                                  headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=httpx.Timeout(120.0, connect=10.0))

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        from .retry import call_again_while

        def again(exc: BaseException) -> bool:
            return isinstance(exc, httpx.TransportError) or (isinstance(exc, EmbeddingError) and
                                                             (exc.status == 429 or exc.status >= 500))

        try:
            return call_again_while(lambda: self._once(method, path, kwargs), again, attempts=5, longest_wait=20)
        except httpx.TransportError as exc:
            raise EmbeddingError(502, f"could not reach the Batch API ({type(exc).__name__})",
                                 code="batch_api_unreachable") from None

    def _once(self, method: str, path: str, kwargs: dict[str, Any]) -> Any:
        r = self._client.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                message = str(r.json()["error"]["message"])[:300]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {r.status_code}"
            raise EmbeddingError(r.status_code, f"the Batch API answered {r.status_code}: {message}",
                                 code="batch_api_error", retry_after=parse_retry_after(r.headers.get("retry-after")))
        return r

    def upload(self, path: Path, filename: str) -> str:
        """A batch input file, streamed from disk (up to 200 MB; httpx rewinds it for a retry)."""
        with open(path, "rb") as f:
            r = self._call("POST", "/files", data={"purpose": "batch"}, files={"file": (filename, f, "application/jsonl")})
        return str(r.json()["id"])

    def create(self, file_id: str, metadata: dict[str, str]) -> dict[str, Any]:
        return self._call("POST", "/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings",
                                                    "completion_window": "24h", "metadata": metadata}).json()

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/batches/{batch_id}").json()

    def batches(self, limit: int = 100, pages: int = 20) -> Iterator[dict[str, Any]]:
        """Recent batches, newest first (a bounded number of pages)."""
        after = None
        for _ in range(pages):
            params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
            page = self._call("GET", "/batches", params=params).json()
            yield from page.get("data", [])
            if not page.get("has_more") or not page.get("data"):
                return
            after = page["data"][-1]["id"]

    def lines(self, file_id: str) -> Iterator[bytes]:
        """A file's lines as they arrive, as bytes (JSON parses them as they are): an output file of 50,000 vectors
        is never held whole."""
        import httpx

        try:
            with self._client.stream("GET", f"/files/{file_id}/content") as r:
                if r.status_code >= 400:
                    r.read()
                    raise EmbeddingError(r.status_code, f"the Batch API answered {r.status_code} for file {file_id}",
                                         code="batch_api_error")
                held = bytearray()  # a line (2,048 vectors: megabytes) arrives in many chunks
                for chunk in r.iter_bytes():
                    start = len(held)
                    held += chunk
                    end = held.rfind(b"\n", start)  # only the new chunk can end a line
                    if end >= 0:
                        yield from (line for line in bytes(held[:end]).split(b"\n") if line.strip())
                        del held[:end + 1]
                if held.strip():
                    yield bytes(held)
        except httpx.TransportError as exc:
            raise EmbeddingError(502, f"could not read file {file_id} from the Batch API ({type(exc).__name__}); "
                                 "run the same command again", code="batch_api_unreachable") from None


@dataclass
class State:
    """What this job submitted, written beside the output before each step (atomically). The keys that an input
    file's lines hold are written once, to a file of their own beside it (`<state>.keys/`), and removed when its
    batch is collected: the state itself stays small, so saving it after every step costs as little for the
    hundredth file as for the first (it used to list every key in flight, and grew with each file it saved)."""

    path: Path
    job: str
    model: str
    dimensions: int | None
    batches: list[dict[str, Any]] = field(default_factory=list)  # batch_id, input_file_id, status, keys, collected
    uploaded: list[dict[str, Any]] = field(default_factory=list)  # input files uploaded whose batch is not yet made

    @classmethod
    def load(cls, path: Path, job: str, model: str, dimensions: int | None) -> State | None:
        if not path.is_file():
            return None
        data = orjson.loads(path.read_bytes())
        if data.get("job") != job:
            raise CorpusError(f"{path}: the state of another job (another input, model or dimensions); move it "
                              "away, or run the command it was written for")
        return cls(path, job, model, dimensions, data.get("batches", []), data.get("uploaded", []))

    def save(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_bytes(orjson.dumps({"version": 2, "job": self.job, "model": self.model,
                                          "dimensions": self.dimensions, "batches": self.batches,
                                          "uploaded": self.uploaded}))
        os.replace(partial, self.path)

    @property
    def keys_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".keys")

    def record(self, file_id: str, lines: dict[str, list[str]]) -> dict[str, Any]:
        """Write which keys each line of an uploaded file holds; the entry that refers to them."""
        self.keys_dir.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", file_id) + ".json"
        partial = self.keys_dir / (name + ".partial")
        partial.write_bytes(orjson.dumps(lines))
        os.replace(partial, self.keys_dir / name)
        return {"input_file_id": file_id, "keys": name}

    def lines(self, entry: dict[str, Any]) -> dict[str, list[str]]:
        """custom_id -> the keys of that line's inputs, in order."""
        if "lines" in entry:  # a state written before the keys had files of their own
            return entry["lines"]  # type: ignore[no-any-return]
        return orjson.loads((self.keys_dir / entry["keys"]).read_bytes())  # type: ignore[no-any-return]

    def collected(self, entry: dict[str, Any]) -> None:
        """Mark a batch collected (saved first), then let its keys go."""
        entry["collected"] = True
        name = entry.pop("keys", None)
        entry.pop("lines", None)
        self.save()
        if name:
            (self.keys_dir / name).unlink(missing_ok=True)

    @property
    def running(self) -> list[dict[str, Any]]:
        """The batches not yet collected."""
        return [b for b in self.batches if not b.get("collected")]

    def progress(self) -> str:
        """The batches still running, as the Batches API last reported them: "2 batch(es) running (in_progress:
        1; validating: 1; 1200 of 4000 requests done)"."""
        from collections import Counter

        running = self.running
        statuses = Counter(b.get("status", "?") for b in running)
        done = sum(b.get("requests", [0, 0])[0] for b in running)
        total = sum(b.get("requests", [0, 0])[1] for b in running)
        said = "; ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        return f"{len(running)} batch(es) running ({said}" + (f"; {done} of {total} requests done)" if total else ")")

    @property
    def paced(self) -> bool:
        """A batch of this job failed at OpenAI's enqueued-token limit: more batches at once would fail the same way,
        so new ones go out one at a time, when none is running."""
        return any(b.get("over_limit") for b in self.batches)

    def in_flight(self) -> set[str]:
        """Keys held by batches not yet collected (and files uploaded, not yet made batches)."""
        keys: set[str] = set()
        for entry in [*self.batches, *self.uploaded]:
            if not entry.get("collected"):
                for ks in self.lines(entry).values():
                    keys.update(ks)
        return keys


@dataclass
class Tally:
    """What collecting found, for the summary."""

    stored: int = 0  # vectors cached from batch output
    tokens: int = 0  # billed at the batch rate
    failed: dict[str, int] = field(default_factory=dict)  # reason -> lines
    rejected: int = 0  # lines whose answer did not pass validation (not cached)
    stray: int = 0  # output lines for a custom_id this job never sent
    over_limit: str = ""  # OpenAI's message, when a batch failed at the organisation's enqueued-token limit
    over_limit_alone: bool = False  # ... and no other batch of this job was running beside it

    def reason(self, text: str) -> None:
        self.failed[text] = self.failed.get(text, 0) + 1


def job_id(source: Path, model: str, dimensions: int | None) -> str:
    """The job's identity: the input (path and size), the model and the dimensions."""
    stat = source.stat()
    raw = json.dumps([str(source.resolve()), stat.st_size, model, dimensions])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class BatchRun:
    def __init__(self, embedder: Any, client: BatchClient, state: State, spec: Any, dims: int | None) -> None:
        self.service = embedder.service
        self.client = client
        self.state = state
        self.spec = spec
        self.dims = dims

    # -- recovery -------------------------------------------------------------------------------------------

    def adopt(self) -> int:
        """Batches this job created that the state does not know (a lost state file, a crash after create):
        found by their metadata, their keys read back from their input files. Returns how many were adopted."""
        known = {b["batch_id"] for b in self.state.batches}
        adopted = 0
        for batch in self.client.batches():
            meta = batch.get("metadata") or {}
            if meta.get("embeddings_cache_job") != self.state.job or batch["id"] in known:
                continue
            entry = self.state.record(batch["input_file_id"], self._keys_of(batch["input_file_id"]))
            self.state.uploaded = [u for u in self.state.uploaded if u["input_file_id"] != batch["input_file_id"]]
            self.state.batches.append({"batch_id": batch["id"], "status": batch["status"], **entry,
                                       "collected": False})
            adopted += 1
        if adopted:
            self.state.save()
        return adopted

    def _keys_of(self, file_id: str) -> dict[str, list[str]]:
        lines: dict[str, list[str]] = {}
        for raw in self.client.lines(file_id):
            line = json.loads(raw)
            lines[line["custom_id"]] = self.service.keys(line["body"]["input"], self.spec, self.dims)
        return lines

    def create_uploaded(self) -> None:
        """Files uploaded by a run that stopped before creating their batch: their batch now (none was billed)."""
        for entry in list(self.state.uploaded):
            alone = not self.state.running
            batch = self.client.create(entry["input_file_id"], self._metadata())
            self.state.batches.append({"batch_id": batch["id"], "status": batch["status"], **entry,
                                       "collected": False, "alone": alone})
            self.state.uploaded.remove(entry)
            self.state.save()

    def _metadata(self) -> dict[str, str]:
        return {"embeddings_cache_job": self.state.job, "embeddings_cache_state": self.state.path.name[:200]}

    # -- collect ---------------------------------------------------------------------------------------------

    def collect(self, tally: Tally) -> None:
        """Read every finished batch not yet collected into the cache, adding what was found to `tally`. A batch
        is marked collected only once all its vectors are stored: a cache that fails stops the run, and the next
        run reads the same output file again (nothing paid is lost)."""
        for entry in self.state.batches:
            if entry.get("collected"):
                continue
            batch = self.client.retrieve(entry["batch_id"])
            entry["status"] = batch["status"]
            counts = batch.get("request_counts") or {}
            entry["requests"] = [counts.get("completed", 0) + counts.get("failed", 0), counts.get("total", 0)]
            if batch["status"] not in TERMINAL:
                continue
            self._collect_one(self.state.lines(entry), batch, tally)
            errors: dict[str, str] = {}  # code -> its first message
            for e in (batch.get("errors") or {}).get("data") or []:
                if e.get("code"):
                    errors.setdefault(str(e["code"]), str(e.get("message") or "")[:300])
            if batch["status"] != "completed":
                tally.reason(f"batch {batch['status']}" + (f" ({', '.join(errors)})" if errors else ""))
            if "token_limit_exceeded" in errors:  # failed validation: nothing answered, nothing billed
                entry["over_limit"] = True  # from now on this job sends one batch at a time (`State.paced`)
                tally.over_limit = errors["token_limit_exceeded"]
                tally.over_limit_alone = tally.over_limit_alone or bool(entry.get("alone"))
            self.state.collected(entry)

    def _collect_one(self, lines: dict[str, list[str]], batch: dict[str, Any], tally: Tally) -> None:
        from .errors import ProviderError
        from .providers.openai import parse_body

        if batch.get("error_file_id"):
            for raw in self.client.lines(batch["error_file_id"]):
                tally.reason(_failure(orjson.loads(raw)))
        held_keys: list[str] = []
        held: list[bytes] = []
        for raw in self.client.lines(batch["output_file_id"]) if batch.get("output_file_id") else ():
            line = orjson.loads(raw)
            keys = lines.get(line.get("custom_id"))
            if keys is None:
                tally.stray += 1
                continue
            response = line.get("response") or {}
            if response.get("status_code") != 200 or line.get("error"):
                tally.reason(_failure(line))
                continue
            try:
                body = response.get("body")
                if not isinstance(body, dict):
                    raise ProviderError(502, "an output line without a response body")
                parsed = parse_body(body, len(keys))  # the provider's own strict reading
                vectors = self.service.validated(parsed.vectors, len(keys), self.spec, self.dims)
            except ProviderError:
                tally.rejected += 1
                continue
            held_keys += keys
            held += vectors
            tally.tokens += parsed.tokens
            if len(held) >= STORE_ROWS:
                tally.stored += self._store(held_keys, held)
                held_keys, held = [], []
        tally.stored += self._store(held_keys, held)

    def _store(self, keys: list[str], vectors: list[bytes]) -> int:
        """Validated vectors into every cache tier, many lines at a time (one SQLite transaction for thousands of
        rows, not one per output line). A tier that fails stops the run: these vectors are paid for."""
        if not keys:
            return 0
        failed = self.service.store(keys, vectors, self.spec, self.dims, checked=True)  # validated as read
        if failed:
            raise EmbeddingError(503, f"could not write collected vectors to the cache ({', '.join(failed)}); "
                                 "nothing is lost: the batch stays uncollected, and the same command again reads "
                                 "its results again", code="cache_write_failed")
        return len(keys)

    # -- submit ---------------------------------------------------------------------------------------------

    def send(self, spool: Spool, most: int | None = None) -> tuple[int, int]:
        """Upload the spool's files (the first `most` of them) and create a batch for each. Returns (texts, batches)
        sent: what is left out stays lacking, for a later round."""
        parts = spool.close()[:most]
        for part in parts:
            seq = len(self.state.batches) + len(self.state.uploaded)
            file_id = self.client.upload(part.path, f"{self.state.path.stem}-{seq}.jsonl")
            # Recorded before the batch is made: a run that dies here leaves a file nobody pays for, and the next
            # run makes its batch instead of uploading the texts again.
            self.state.uploaded.append(self.state.record(file_id, part.holds))
            self.state.save()
            self.create_uploaded()
        return sum(p.inputs for p in parts), len(parts)


def _failure(line: dict[str, Any]) -> str:
    error = line.get("error") or {}
    response = line.get("response") or {}
    body = response.get("body") or {}
    detail = (body.get("error") or {}) if isinstance(body, dict) else {}
    code = error.get("code") or detail.get("code") or detail.get("type") or f"HTTP {response.get('status_code')}"
    return str(code)[:80]


class Lacking:
    """First occurrences in (pushed by the census as it reads, or by a later re-read), the distinct texts the cache
    lacks out: looked up LOOKUP at a time, all counted, and those no batch in flight holds handed to `sink` with
    their keys. Memory holds one lookup's texts, however long the corpus."""

    def __init__(self, service: Any, spec: Any, dims: int | None, in_flight: set[str],
                 sink: Callable[[list[str], list[str]], None] | None) -> None:
        self.service, self.spec, self.dims = service, spec, dims
        self.in_flight = in_flight
        self.sink = sink
        self.count = 0  # distinct texts the cache lacks, in flight or not (known once `flush` has run)
        self.free = 0  # of those, the texts no batch in flight holds
        self._held: list[str] = []

    def add(self, text: str) -> None:
        self._held.append(text)
        if len(self._held) >= LOOKUP:
            self.flush()

    def flush(self) -> None:
        held, self._held = self._held, []
        if not held:
            return
        keys = self.service.keys(held, self.spec, self.dims)
        found, failed = self.service.cached(keys, self.spec, self.dims)
        if failed:  # what it holds is unknown: submitting now could pay again for texts it has
            raise EmbeddingError(503, f"could not look up the cache ({', '.join(failed)}), so what it lacks is "
                                 "unknown; nothing was submitted: run the same command again once it answers",
                                 code="cache_unavailable")
        lacking = [i for i, key in enumerate(keys) if key not in found]
        self.count += len(lacking)
        send = [i for i in lacking if keys[i] not in self.in_flight]
        self.free += len(send)
        if self.sink is not None:
            self.sink([held[i] for i in send], [keys[i] for i in send])

    def read(self, src: Any, census: Any) -> None:
        """Every first occurrence of an input already counted (a later round of the same run)."""
        from .corpus import batches

        for batch in batches(src, LOOKUP, census):
            for _, text in batch:
                self.add(text)
        self.flush()


@dataclass
class Part:
    """One batch input file being written: its path and which keys each of its request lines holds."""

    path: Path
    handle: BinaryIO
    holds: dict[str, list[str]] = field(default_factory=dict)
    inputs: int = 0
    size: int = 0


class Spool:
    """Batch input files, written to a temporary directory as the lacking texts arrive (`add`): request lines of at
    most LINE_INPUTS inputs and LINE_TOKENS tokens, files of at most MAX_LINES lines, FILE_INPUTS inputs and
    MAX_FILE_BYTES. Memory holds one line's texts; the files are uploaded from disk, and removed with the spool.
    Nothing is sent while it is written: the census that feeds it can still stop at a bad line."""

    def __init__(self, directory: str, job: str, model: str, dims: int | None, first_seq: int) -> None:
        self.directory = Path(directory)
        self.model, self.dims = model, dims
        self.prefix = f"{job[:8]}-{first_seq}"  # custom ids: unique within the job, across its runs' files
        self.parts: list[Part] = []
        self.texts = 0
        self._texts: list[str] = []
        self._keys: list[str] = []

    def add(self, texts: list[str], keys: list[str]) -> None:
        self._texts += texts
        self._keys += keys
        self.texts += len(texts)
        while len(self._texts) >= LINE_INPUTS:
            self._write(LINE_INPUTS)

    def _write(self, count: int) -> None:
        texts, keys = self._texts[:count], self._keys[:count]
        del self._texts[:count], self._keys[:count]
        for chunk in chunk_by_limits(texts, LINE_INPUTS, LINE_TOKENS):
            body: dict[str, Any] = {"model": self.model, "input": [texts[i] for i in chunk],
                                    "encoding_format": "base64"}
            if self.dims is not None:
                body["dimensions"] = self.dims
            tail = json.dumps({"method": "POST", "url": "/v1/embeddings", "body": body}, separators=(",", ":")).encode()
            part = self.parts[-1] if self.parts else None
            if part is None or len(part.holds) >= MAX_LINES or part.inputs + len(chunk) > FILE_INPUTS or \
                    (part.holds and part.size + len(tail) + 64 > MAX_FILE_BYTES):  # full: the line opens the next
                part = self._part()
            custom_id = f"{self.prefix}-{len(self.parts)}-{len(part.holds) + 1}"
            row = b'{"custom_id":"' + custom_id.encode() + b'",' + tail[1:] + b"\n"
            part.handle.write(row)
            part.holds[custom_id] = [keys[i] for i in chunk]
            part.inputs += len(chunk)
            part.size += len(row)

    def _part(self) -> Part:
        path = self.directory / f"part-{len(self.parts)}.jsonl"
        self.parts.append(Part(path, open(path, "wb")))
        return self.parts[-1]

    def close(self) -> list[Part]:
        """The files, complete and closed."""
        if self._texts:
            self._write(len(self._texts))
        for part in self.parts:
            part.handle.close()
        return self.parts


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def poll_wait() -> None:
    time.sleep(POLL_S)
