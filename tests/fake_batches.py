"""A loopback stand-in for OpenAI's Files and Batches APIs (embeddings batches), speaking their wire format.

`POST /v1/files` (multipart: purpose=batch, file), `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`
(listing, newest first, with `after` and `limit`), `GET /v1/files/{id}/content`. A batch moves through
validating -> in_progress -> finalizing -> completed one step per retrieval (or as a test scripts it), and on
completion answers every line as OpenAI's embeddings endpoint would (the same vectors as `FakeOpenAI`), in a
shuffled order. A test can end a batch `expired`, `failed` or `cancelled` after some lines, send lines to the
error file, give a line a vector of the wrong length, or add a `custom_id` it was never sent.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback import QuietHandler, serve
from tests.upstreams import FakeOpenAI

STEPS = ("validating", "in_progress", "finalizing", "completed")


class FakeBatches:
    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []  # batch ids, oldest first
        self.lock = threading.Lock()
        self.embedder = FakeOpenAI.__new__(FakeOpenAI)  # its answer() alone: no server of its own
        self.embedder.memo = None
        self.requests: list[tuple[str, str]] = []
        self.sync_inputs: list[str] = []  # texts paid through the ordinary endpoint
        # Scripting, per test:
        self.end_as: str = "completed"  # or "expired", "failed", "cancelled" (after `complete_lines` lines)
        self.complete_lines: int | None = None  # how many lines an expired/cancelled batch still answers
        self.error_lines: int = 0  # this many answered lines go to the error file instead (a 500 each)
        self.wrong_length_lines: int = 0  # this many lines get one vector of the wrong length
        self.stray_custom_id = False  # an output line for a custom_id nobody sent
        self.steps_per_status = 1  # retrievals before a batch moves on a status
        self.instant = False  # a batch ends at its first retrieval
        self.fail_create_after_upload = False  # the create call is refused once (a run stops between the two)
        self.enqueued_limit: int | None = None  # tokens the organisation may have enqueued at once (OpenAI's limit)
        self.throttle_uploads = 0  # this many uploads are answered 429 with a retry-after first
        self.seed = 7
        fake = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path))
                parts = urlsplit(self.path)
                segments = parts.path.strip("/").split("/")
                if segments[:2] == ["v1", "batches"] and len(segments) == 2:
                    return self.json(200, fake.listing(parse_qs(parts.query)))
                if segments[:2] == ["v1", "batches"] and len(segments) == 3:
                    batch = fake.retrieve(segments[2])
                    return self.json(200 if batch else 404, batch or {"error": {"message": "No such batch"}})
                if segments[:2] == ["v1", "files"] and len(segments) == 4 and segments[3] == "content":
                    file = fake.files.get(segments[2])
                    if file is None:
                        return self.json(404, {"error": {"message": "No such file"}})
                    return self.send(200, file["content"], content_type="application/jsonl")
                self.json(404, {"error": {"message": f"no route {parts.path}"}})

            def do_POST(self) -> None:
                fake.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/v1/files" and fake.throttle_uploads:
                    fake.throttle_uploads -= 1
                    return self.send(429, json.dumps({"error": {"message": "Rate limit reached for files",
                                                                "type": "requests"}}).encode(),
                                     headers={"retry-after": "0.05"})
                if self.path == "/v1/files":
                    return self.json(200, fake.upload(self.headers.get("content-type", ""), body))
                if self.path == "/v1/batches":
                    if fake.fail_create_after_upload:  # refused once, for good: the run stops after its upload
                        fake.fail_create_after_upload = False
                        return self.json(400, {"error": {"message": "metadata refused this once"}})
                    return self.json(200, fake.create(json.loads(body)))
                if self.path == "/v1/embeddings":  # the ordinary endpoint, for --sync-rest
                    request = json.loads(body)
                    fake.sync_inputs.extend(request["input"])
                    return self.json(200, fake.embedder.answer(self.path, request))
                self.json(404, {"error": {"message": "no route"}})

            def json(self, status: int, payload: Any) -> None:
                self.send(status, json.dumps(payload).encode())

        self.server = serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the API -----------------------------------------------------------------------------------------

    def upload(self, content_type: str, body: bytes) -> dict[str, Any]:
        message = BytesParser(policy=HTTP).parsebytes(f"content-type: {content_type}\r\n\r\n".encode() + body)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        assert fields["purpose"].get_content().strip() == "batch", "purpose must be batch"
        content = fields["file"].get_payload(decode=True)
        lines = [json.loads(x) for x in content.splitlines() if x.strip()]
        ids = [x["custom_id"] for x in lines]
        assert len(ids) == len(set(ids)), "custom_id must be unique in a file"
        assert len(lines) <= 50_000 and len(content) <= 200 * 1024 * 1024
        assert sum(len(x["body"]["input"]) for x in lines) <= 50_000
        assert len({x["body"]["model"] for x in lines}) == 1, "one model per file"
        for x in lines:
            assert x["method"] == "POST" and x["url"] == "/v1/embeddings" and len(x["body"]["input"]) <= 2048
        file_id = f"file-{len(self.files) + 1:04d}"
        with self.lock:
            self.files[file_id] = {"id": file_id, "content": content, "lines": lines}
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": fields["file"].get_filename(), "purpose": "batch"}

    def create(self, request: dict[str, Any]) -> dict[str, Any]:
        assert request["endpoint"] == "/v1/embeddings" and request["completion_window"] == "24h"
        assert request["input_file_id"] in self.files
        with self.lock:
            batch_id = f"batch_{len(self.batches) + 1:04d}"
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": "/v1/embeddings", "errors": None,
                "input_file_id": request["input_file_id"], "completion_window": "24h", "status": "validating",
                "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                "metadata": request.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "_steps": 0}
            self.order.append(batch_id)
            return self.public(self.batches[batch_id])

    def listing(self, query: dict[str, list[str]]) -> dict[str, Any]:
        ids = list(reversed(self.order))
        after = query.get("after", [None])[0]
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        limit = int(query.get("limit", ["20"])[0])
        page = ids[:limit]
        return {"object": "list", "data": [self.public(self.batches[i]) for i in page],
                "first_id": page[0] if page else None, "last_id": page[-1] if page else None,
                "has_more": len(ids) > limit}

    def retrieve(self, batch_id: str) -> dict[str, Any] | None:
        with self.lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            if batch["status"] == "validating" and self.over_limit(batch):
                return self.public(batch)
            if batch["status"] in STEPS[:-1] and self.instant:
                self.finish(batch)
            elif batch["status"] in STEPS[:-1]:
                batch["_steps"] += 1
                if batch["_steps"] >= self.steps_per_status:
                    batch["_steps"] = 0
                    following = STEPS[STEPS.index(batch["status"]) + 1]
                    if following == "completed":
                        self.finish(batch)
                    else:
                        batch["status"] = following
                        total = len(self.files[batch["input_file_id"]]["lines"])  # known once validated; all
                        done = total if following == "finalizing" else 0          # answered when finalizing
                        batch["request_counts"] = {"total": total, "completed": done, "failed": 0}
            return self.public(batch)

    def tokens(self, batch: dict[str, Any]) -> int:
        return sum(len(t.split()) for line in self.files[batch["input_file_id"]]["lines"] for t in line["body"]["input"])

    def over_limit(self, batch: dict[str, Any]) -> bool:
        """Validation against the enqueued-token limit, as OpenAI does it: a batch that would take the tokens of the
        batches in progress past the limit fails at once, with nothing answered (and nothing billed)."""
        if self.enqueued_limit is None:
            return False
        running = sum(self.tokens(b) for b in self.batches.values() if b["status"] in ("in_progress", "finalizing"))
        if running + self.tokens(batch) <= self.enqueued_limit:
            return False
        batch["status"] = "failed"
        batch["errors"] = {"object": "list", "data": [{
            "code": "token_limit_exceeded", "line": None, "param": None,
            "message": f"Enqueued token limit reached for {self.files[batch['input_file_id']]['lines'][0]['body']['model']} "
                       f"in organization org-test. Limit: {self.enqueued_limit:,} enqueued tokens. Please try again once "
                       "some in_progress batches have been completed."}]}
        return True

    def billed_inputs(self) -> list[str]:
        """The texts of the lines batches answered (a batch that failed validation answers and bills nothing)."""
        answered = {line["custom_id"] for b in self.batches.values() if b.get("output_file_id")
                    for line in self.files[b["output_file_id"]]["lines"]}
        return [t for b in self.batches.values() for line in self.files[b["input_file_id"]]["lines"]
                if line["custom_id"] in answered for t in line["body"]["input"]]

    @staticmethod
    def public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def finish(self, batch: dict[str, Any]) -> None:
        """Answer the lines (some, for a batch that ends early), shuffled, into an output and an error file."""
        lines = self.files[batch["input_file_id"]]["lines"]
        answered = lines if self.end_as == "completed" or self.complete_lines is None else lines[:self.complete_lines]
        if self.end_as == "failed" and self.complete_lines is None:
            answered = []
        outputs, errors = [], []
        for n, line in enumerate(answered):
            if n < self.error_lines:
                errors.append({"id": f"batch_req_{n}", "custom_id": line["custom_id"], "response": {
                    "status_code": 500, "request_id": f"req_{n}", "body": {"error": {
                        "message": "The server had an error processing your request", "type": "server_error"}}},
                               "error": None})
                continue
            answer = self.embedder.answer("/v1/embeddings", line["body"])
            if n < self.error_lines + self.wrong_length_lines:
                short = base64.b64decode(answer["data"][0]["embedding"])[:-4]
                answer["data"][0]["embedding"] = base64.b64encode(short).decode()
            outputs.append({"id": f"batch_req_{n}", "custom_id": line["custom_id"], "response": {
                "status_code": 200, "request_id": f"req_{n}", "body": answer}, "error": None})
        if self.stray_custom_id:
            stray = self.embedder.answer("/v1/embeddings", {**lines[0]["body"], "input": ["never sent"]})
            outputs.append({"id": "batch_req_x", "custom_id": "never-sent", "response": {
                "status_code": 200, "request_id": "req_x", "body": stray}, "error": None})
        random.Random(self.seed).shuffle(outputs)  # output order is not guaranteed: callers match by custom_id
        batch["status"] = self.end_as
        batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}
        for kind, rows in (("output_file_id", outputs), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{kind[:3]}-{batch['id']}"
                self.files[file_id] = {"id": file_id, "content": "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                       "lines": rows}
                batch[kind] = file_id

    # -- what a test counts ------------------------------------------------------------------------------

    def submitted_inputs(self) -> list[str]:
        """Every text in every uploaded batch input file (what would be billed if it completes)."""
        return [t for batch in self.batches.values() for line in self.files[batch["input_file_id"]]["lines"]
                for t in line["body"]["input"]]
