"""`python -m lib embed FILE --batch-api`: backfills through OpenAI's Batch API, at half the price, cache-aware.

One pipeline with the synchronous command: the same census of the input (`lib.corpus`), the same cache keys, the
same validation of every vector and the same cache writes (`EmbeddingService.keys`, `.cached`, `.store`). What this
module adds is the Batch API client and its state:

1. **Submit**: the distinct texts the cache lacks (and no batch in flight already holds) are uploaded as batch input
   files (`purpose=batch`; lines of `{"custom_id", "method": "POST", "url": "/v1/embeddings", "body"}`; at most
   50,000 requests, 50,000 inputs and 200 MB a file; at most 2048 inputs and about 300,000 tokens a line), and a
   batch is created for each (`completion_window: "24h"`). The state file beside the output records, before each
   step, what was uploaded and created, and which cache keys each line holds: never a text, never a secret.
2. **Collect** (the same command again, or `--wait`): each finished batch's output and error files are read; lines
   are matched by `custom_id` (output order is not guaranteed), every answer is validated as the service validates a
   provider's (strictly parsed, count, length, finiteness, dimensions) and stored under the same keys. A batch that
   expired, failed or was cancelled still gives the lines it completed (they are billed); failed lines are counted
   by reason; what is still missing is submitted again on the next run (or, with `--sync-rest`, paid through the
   ordinary endpoint now).
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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from .corpus import CorpusError
from .errors import EmbeddingError
from .providers.base import chunk_by_limits

MAX_LINES = 50_000
MAX_INPUTS = 50_000  # per file (the Batch API's limit for an embeddings batch)
MAX_FILE_BYTES = 200 * 1024 * 1024
# Inputs per request line: 2048 at most (the endpoint's limit); EMBEDDINGS_BATCH_LINE_INPUTS makes lines smaller.
LINE_INPUTS = min(2048, int(os.environ.get("EMBEDDINGS_BATCH_LINE_INPUTS") or 2048))
LINE_TOKENS = 300_000
TERMINAL = ("completed", "expired", "failed", "cancelled")
STORE_ROWS = 16_384  # validated vectors written to the cache in one go
POLL_S = float(os.environ.get("EMBEDDINGS_BATCH_POLL_S") or 30)


class BatchClient:
    """OpenAI's Files and Batches APIs at one base URL, over httpx, with tenacity's retries for 429 and 5xx."""

    def __init__(self, base_url: str, api_key: str) -> None:
        import httpx

        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"},
                                    timeout=httpx.Timeout(120.0, connect=10.0))

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

        def again(exc: BaseException) -> bool:
            return isinstance(exc, httpx.TransportError) or (isinstance(exc, EmbeddingError) and
                                                             (exc.status == 429 or exc.status >= 500))

        try:
            for attempt in Retrying(stop=stop_after_attempt(5), wait=wait_random_exponential(multiplier=0.5, max=20),
                                    retry=retry_if_exception(again), reraise=True):
                with attempt:
                    r = self._client.request(method, path, **kwargs)
                    if r.status_code >= 400:
                        try:
                            message = str(r.json()["error"]["message"])[:300]
                        except (ValueError, KeyError, TypeError):
                            message = f"HTTP {r.status_code}"
                        raise EmbeddingError(r.status_code, f"the Batch API answered {r.status_code}: {message}",
                                             code="batch_api_error")
                    return r
        except httpx.TransportError as exc:
            raise EmbeddingError(502, f"could not reach the Batch API ({type(exc).__name__})",
                                 code="batch_api_unreachable") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def upload(self, content: bytes, filename: str) -> str:
        r = self._call("POST", "/files", data={"purpose": "batch"},
                       files={"file": (filename, content, "application/jsonl")})
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

    def lines(self, file_id: str) -> Iterator[str]:
        """A file's lines as they arrive: an output file of 50,000 vectors is never held whole."""
        import httpx

        try:
            with self._client.stream("GET", f"/files/{file_id}/content") as r:
                if r.status_code >= 400:
                    r.read()
                    raise EmbeddingError(r.status_code, f"the Batch API answered {r.status_code} for file {file_id}",
                                         code="batch_api_error")
                yield from (line for line in r.iter_lines() if line.strip())
        except httpx.TransportError as exc:
            raise EmbeddingError(502, f"could not read file {file_id} from the Batch API ({type(exc).__name__}); "
                                 "run the same command again", code="batch_api_unreachable") from None


@dataclass
class State:
    """What this job submitted, written beside the output before each step (atomically)."""

    path: Path
    job: str
    model: str
    dimensions: int | None
    batches: list[dict[str, Any]] = field(default_factory=list)  # batch_id, input_file_id, status, lines, collected
    uploaded: list[dict[str, Any]] = field(default_factory=list)  # input files uploaded whose batch is not yet made

    @classmethod
    def load(cls, path: Path, job: str, model: str, dimensions: int | None) -> State | None:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("job") != job:
            raise CorpusError(f"{path}: the state of another job (another input, model or dimensions); move it "
                              "away, or run the command it was written for")
        return cls(path, job, model, dimensions, data.get("batches", []), data.get("uploaded", []))

    def save(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"version": 1, "job": self.job, "model": self.model,
                                       "dimensions": self.dimensions, "batches": self.batches,
                                       "uploaded": self.uploaded}))
        os.replace(partial, self.path)

    def in_flight(self) -> set[str]:
        """Keys held by batches not yet collected (and files uploaded, not yet made batches)."""
        keys: set[str] = set()
        for entry in [*self.batches, *self.uploaded]:
            if not entry.get("collected"):
                for ks in entry["lines"].values():
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
            lines = self._keys_of(batch["input_file_id"])
            self.state.uploaded = [u for u in self.state.uploaded if u["input_file_id"] != batch["input_file_id"]]
            self.state.batches.append({"batch_id": batch["id"], "input_file_id": batch["input_file_id"],
                                       "status": batch["status"], "lines": lines, "collected": False})
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
            batch = self.client.create(entry["input_file_id"], self._metadata())
            self.state.batches.append({"batch_id": batch["id"], "input_file_id": entry["input_file_id"],
                                       "status": batch["status"], "lines": entry["lines"], "collected": False})
            self.state.uploaded.remove(entry)
            self.state.save()

    def _metadata(self) -> dict[str, str]:
        return {"embeddings_cache_job": self.state.job, "embeddings_cache_state": self.state.path.name[:200]}

    # -- collect ---------------------------------------------------------------------------------------------

    def collect(self, tally: Tally) -> None:
        """Read every finished batch not yet collected into the cache, adding what was found to `tally`."""
        from .errors import ProviderError
        from .providers.http import Answer
        from .providers.openai import _parse

        held_keys: list[str] = []
        held: list[bytes] = []
        for entry in self.state.batches:
            if entry.get("collected"):
                continue
            batch = self.client.retrieve(entry["batch_id"])
            entry["status"] = batch["status"]
            if batch["status"] not in TERMINAL:
                continue
            if batch.get("error_file_id"):
                for raw in self.client.lines(batch["error_file_id"]):
                    tally.reason(_failure(json.loads(raw)))
            if batch.get("output_file_id"):
                for raw in self.client.lines(batch["output_file_id"]):
                    line = json.loads(raw)
                    keys = entry["lines"].get(line.get("custom_id"))
                    if keys is None:
                        tally.stray += 1
                        continue
                    response = line.get("response") or {}
                    if response.get("status_code") != 200 or line.get("error"):
                        tally.reason(_failure(line))
                        continue
                    try:
                        body = json.dumps(response.get("body")).encode()
                        parsed = _parse(Answer(200, {}, body), len(keys))  # the provider's own strict reading
                        vectors = self.service.validated(parsed.vectors, len(keys), self.spec, self.dims)
                    except ProviderError:
                        tally.rejected += 1
                        continue
                    held_keys += keys
                    held += vectors
                    if len(held) >= STORE_ROWS:
                        self._store(held_keys, held, tally)
                        held_keys, held = [], []
                    tally.tokens += parsed.tokens
            self._store(held_keys, held, tally)
            held_keys, held = [], []
            if batch["status"] != "completed":
                tally.reason(f"batch {batch['status']}")
            entry["collected"] = True
            self.state.save()

    def _store(self, keys: list[str], vectors: list[bytes], tally: Tally) -> None:
        """Validated vectors into every cache tier, many lines at a time: one SQLite transaction for thousands of
        rows, not one per output line."""
        if keys:
            self.service.store(keys, vectors, self.spec, self.dims, checked=True)  # each line validated as read
            tally.stored += len(keys)

    # -- submit ---------------------------------------------------------------------------------------------

    def submit(self, pairs: Iterator[tuple[str, str]]) -> tuple[int, int]:
        """Upload and create batches for (text, key) pairs (distinct, missing, not in flight), a file at a time: at
        most MAX_INPUTS texts are held, however long the corpus. Returns (texts, batches)."""
        submitted = made = lines = 0
        pairs = iter(pairs)
        while group := list(islice(pairs, MAX_INPUTS)):
            texts = [t for t, _ in group]
            content: list[bytes] = []
            holds: dict[str, list[str]] = {}
            size = 0
            for chunk in chunk_by_limits(texts, LINE_INPUTS, LINE_TOKENS):
                body: dict[str, Any] = {"model": self.spec.id, "input": [texts[i] for i in chunk],
                                        "encoding_format": "base64"}
                if self.dims is not None:
                    body["dimensions"] = self.dims
                lines += 1  # custom ids are unique within a file (the state keeps each batch's own)
                custom_id = f"{self.state.job[:8]}-{lines}"
                row = json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body},
                                 separators=(",", ":")).encode() + b"\n"
                if content and size + len(row) > MAX_FILE_BYTES:  # the file is full: send it, start another
                    self._send(content, holds)
                    made, content, holds, size = made + 1, [], {}, 0
                content.append(row)
                holds[custom_id] = [group[i][1] for i in chunk]
                size += len(row)
            self._send(content, holds)
            made += 1
            submitted += len(group)
        return submitted, made

    def _send(self, content: list[bytes], holds: dict[str, list[str]]) -> None:
        seq = len(self.state.batches) + len(self.state.uploaded)
        file_id = self.client.upload(b"".join(content), f"{self.state.path.stem}-{seq}.jsonl")
        # Recorded before the batch is made: a run that dies here leaves a file nobody pays for, and the next run
        # makes its batch instead of uploading the texts again.
        self.state.uploaded.append({"input_file_id": file_id, "lines": holds})
        self.state.save()
        self.create_uploaded()


def _failure(line: dict[str, Any]) -> str:
    error = line.get("error") or {}
    response = line.get("response") or {}
    body = response.get("body") or {}
    detail = (body.get("error") or {}) if isinstance(body, dict) else {}
    code = error.get("code") or detail.get("code") or detail.get("type") or f"HTTP {response.get('status_code')}"
    return str(code)[:80]


@dataclass
class Lacking:
    """How many distinct texts the cache lacks (in flight or not), known once `missing`'s stream is read."""

    count: int = 0


def missing(embedder: Any, src: Any, census: Any, spec: Any, dims: int | None, in_flight: set[str],
            lacking: Lacking) -> Iterator[tuple[str, str]]:
    """The distinct texts the cache lacks and no batch in flight holds, with their keys, as a stream: read in the
    census's order of first occurrences and looked up a few thousand at a time, so memory stays flat."""
    from .corpus import batches

    for batch in batches(src, 4096, census):
        chunk = [t for _, t in batch]
        chunk_keys = embedder.service.keys(chunk, spec, dims)
        found = embedder.service.cached(chunk_keys, spec, dims)
        for text, key in zip(chunk, chunk_keys):
            if key not in found:
                lacking.count += 1
                if key not in in_flight:
                    yield text, key


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def poll_wait() -> None:
    time.sleep(POLL_S)
