"""A corpus on disk: reading texts from `.txt`, `.jsonl`, `.csv` or standard input, and writing vectors
to `.npy` or `.jsonl`, for `python -m lib embed`.

Reading is two passes over the file: `validate` checks every line before the first request (so a bad
line 90,000 costs nothing) and counts texts and distinct texts; `batches` then streams the texts again.
Memory is bounded by the batch size, not the corpus: distinct texts are counted in memory up to a bound,
then in a temporary SQLite file, and `.npy` output is written row by row at its place (no numpy needed).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMATS = (".txt", ".jsonl", ".csv")


class CorpusError(Exception):
    """A bad input, said in one line that names the file and the line."""


@dataclass
class Source:
    path: Path  # the file read (standard input is spooled to a temporary file first)
    name: str  # how errors name it ("-" for standard input)
    kind: str  # ".txt", ".jsonl" or ".csv"
    field: str = "text"  # .jsonl field / .csv column holding the text
    id_field: str | None = None  # .jsonl field / .csv column holding an id to carry to the output
    spooled: bool = False

    def close(self) -> None:
        if self.spooled:
            os.unlink(self.path)


def open_source(arg: str, *, field: str | None = None, id_field: str | None = None) -> Source:
    if arg == "-":
        import shutil
        import tempfile

        spool = tempfile.NamedTemporaryFile(prefix="embed-stdin-", suffix=".txt", delete=False)
        with spool:
            shutil.copyfileobj(sys.stdin.buffer, spool)
        return Source(Path(spool.name), "<stdin>", ".txt", spooled=True)
    path = Path(arg)
    kind = path.suffix.lower()
    if kind not in FORMATS:
        raise CorpusError(f"{arg}: unknown input format {kind or '(no extension)'!r}; use .txt (one text per line), "
                          ".jsonl, .csv or - for standard input")
    if not path.is_file():
        raise CorpusError(f"{arg}: no such file")
    if not os.access(path, os.R_OK):
        raise CorpusError(f"{arg}: not readable")
    return Source(path, arg, kind, field or "text", id_field)


def _decoded(src: Source) -> Iterator[str]:
    """The file's lines, endings kept, strictly UTF-8: a bad byte is reported with its line number."""
    with open(src.path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{src.name}:{number}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None


def _lines(src: Source) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending)."""
    for number, line in enumerate(_decoded(src), 1):
        yield number, line.rstrip("\r\n") if line.endswith("\n") else line


def records(src: Source) -> Iterator[tuple[int, Any, str]]:
    """(line number, id or None, text) for every text of the source, checked as it is read."""
    if src.kind == ".txt":
        for number, line in _lines(src):
            yield number, None, line
    elif src.kind == ".jsonl":
        for number, line in _lines(src):
            if not line.strip():
                raise CorpusError(f"{src.name}:{number}: blank line (each line must be one JSON object)")
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise CorpusError(f"{src.name}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{src.name}:{number}: not a JSON object")
            if src.field not in obj:
                raise CorpusError(f"{src.name}:{number}: no field {src.field!r} (choose it with --field)")
            text = obj[src.field]
            if not isinstance(text, str):
                raise CorpusError(f"{src.name}:{number}: field {src.field!r} is not a string")
            ident = None
            if src.id_field is not None:
                if src.id_field not in obj:
                    raise CorpusError(f"{src.name}:{number}: no id field {src.id_field!r}")
                ident = obj[src.id_field]
            yield number, ident, text
    else:
        reader = csv.reader(_decoded(src))  # fed line by line, so a bad byte is reported with its line
        try:
            header = next(reader, None)
            if header is None:
                raise CorpusError(f"{src.name}:1: empty file (a header row is needed)")
            if src.field not in header:
                raise CorpusError(f"{src.name}:1: no column {src.field!r} in the header (choose it with "
                                  "--column)")
            col = header.index(src.field)
            id_col = None
            if src.id_field is not None:
                if src.id_field not in header:
                    raise CorpusError(f"{src.name}:1: no id column {src.id_field!r} in the header")
                id_col = header.index(src.id_field)
            for row in reader:
                number = reader.line_num
                if len(row) <= max(col, id_col or 0):
                    raise CorpusError(f"{src.name}:{number}: the row has {len(row)} columns; the header has "
                                      f"{len(header)}")
                yield number, row[id_col] if id_col is not None else None, row[col]
        except csv.Error as exc:
            raise CorpusError(f"{src.name}:{reader.line_num}: {exc}") from None


@dataclass
class Census:
    texts: int
    distinct: int
    first: bytearray  # bit i set: text i is the first occurrence of its text (n/8 bytes, not the texts)

    def is_first(self, index: int) -> bool:
        return bool(self.first[index >> 3] & (1 << (index & 7)))


SEEN_IN_MEMORY = 100_000  # distinct texts counted in a set (about 10 MB); past that, in a temporary SQLite file


def validate(src: Source, max_chars: int, first: Callable[[str], None] | None = None) -> Census:
    """Check every text before anything is sent, and count texts and distinct texts (in memory up to
    `SEEN_IN_MEMORY` distinct texts; on disk beyond, so that memory stays flat). `first` is handed each
    distinct text as it is first met, for work that may start before the census ends (nothing paid: the
    Batch API path finds what the cache lacks in the same pass)."""
    count = distinct = 0
    firsts = bytearray()
    seen: set[bytes] | None = set()
    with ExitStack() as scratch:  # a temporary directory only if the count spills (most corpora never do)
        db: sqlite3.Connection | None = None
        for number, _, text in records(src):
            if not text.strip():
                raise CorpusError(f"{src.name}:{number}: empty text (every line must contain text)")
            if len(text) > max_chars:
                raise CorpusError(f"{src.name}:{number}: the text has {len(text)} characters; at most {max_chars} "
                                  "are allowed (EMBEDDINGS_MAX_INPUT_CHARS)")
            if count & 7 == 0:
                firsts.append(0)
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if seen is not None:
                new = digest not in seen
                if new:
                    seen.add(digest)
                    if len(seen) > SEEN_IN_MEMORY:
                        import tempfile

                        tmp = scratch.enter_context(tempfile.TemporaryDirectory(prefix="embed-census-"))
                        db = _spill(os.path.join(tmp, "seen.sqlite3"), seen)
                        seen = None
            else:
                assert db is not None
                new = db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,)).rowcount == 1
            if new:  # not seen before: its first occurrence
                firsts[count >> 3] |= 1 << (count & 7)
                distinct += 1
                if first is not None:
                    first(text)
            count += 1
        if db is not None:
            db.execute("COMMIT")
            db.close()
    if count == 0:
        raise CorpusError(f"{src.name}: no texts")
    return Census(count, distinct, firsts)


def _spill(path: str, seen: set[bytes]) -> sqlite3.Connection:
    """The digests counted so far, moved to a temporary SQLite file that takes the count on from here."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE seen (h BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute("BEGIN")
    db.executemany("INSERT INTO seen VALUES (?)", ((h,) for h in seen))
    return db


def batches(src: Source, size: int, only: Census | None = None) -> Iterator[list[tuple[Any, str]]]:
    """The (id, text) pairs, `size` at a time, in input order; with `only`, first occurrences alone."""
    batch: list[tuple[Any, str]] = []
    for index, (_, ident, text) in enumerate(records(src)):
        if only is not None and not only.is_first(index):
            continue
        batch.append((ident, text))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- output -----------------------------------------------------------------------------------------------


class Output:
    """Vectors written in input order under `<name>.partial`, renamed to `<name>` only when complete."""

    def __init__(self, path: Path, total: int) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.total = total
        self.written = 0
        self._file: IO[bytes] = open(self.partial, "wb")

    def write(self, ids: list[Any], start: int, vectors: list[bytes]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        self._file.close()
        os.replace(self.partial, self.path)

    def abandon(self) -> None:
        """Leave nothing that looks complete: the partial file goes (a re-run rebuilds it from the cache)."""
        self._file.close()
        try:
            os.unlink(self.partial)
        except FileNotFoundError:
            pass


class NpyOutput(Output):
    """A `.npy` file, float32 little-endian, shape (n, d): the header is written once d is known (first batch)."""

    def write(self, ids: list[Any], start: int, vectors: list[bytes]) -> None:
        if self.written == 0:
            dims = len(vectors[0]) // 4
            header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({self.total}, {dims}), }}"
            pad = 64 - (10 + len(header) + 1) % 64
            header = header + " " * pad + "\n"
            self._file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1"))
            self._file.flush()
        _write_all(self._file.fileno(), vectors)  # gathered by the kernel: no joined copy of the batch
        self.written += len(vectors)


def _write_all(fd: int, buffers: list[bytes]) -> None:
    """os.writev until every byte is written (a write may be partial; at most IOV_MAX buffers a call)."""
    views = [memoryview(b) for b in buffers if b]
    while views:
        sent = os.writev(fd, views[:1024])
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


class JsonlOutput(Output):
    """One `{"id" or "index", "embedding"}` object per line, floats as the endpoint writes them."""

    def write(self, ids: list[Any], start: int, vectors: list[bytes]) -> None:
        from .vectors import float_json

        lines = []
        for offset, (ident, text) in enumerate(zip(ids, float_json(vectors))):
            head = json.dumps({"id": ident} if ident is not None else {"index": start + offset})[:-1]
            lines.append(head.encode() + b', "embedding": ' + text + b"}\n")
        self._file.write(b"".join(lines))
        self.written += len(vectors)


def open_output(path: str, total: int) -> Output:
    target = Path(path)
    kind = target.suffix.lower()
    if kind == ".npy":
        return NpyOutput(target, total)
    if kind == ".jsonl":
        return JsonlOutput(target, total)
    raise CorpusError(f"{path}: unknown output format {kind or '(no extension)'!r}; use .npy or .jsonl")
