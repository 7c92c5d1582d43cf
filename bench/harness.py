"""Timing, the result table, and the pieces every section shares."""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY311 = sys.executable
PY312 = str(ROOT / ".venv312" / "bin" / "python")


@dataclass
class Row:
    section: str
    what: str
    median: float  # seconds, or the unit named in `unit`
    spread: float  # half the inter-quartile range, same unit
    unit: str = "s"
    per_second: float | None = None  # embeddings per second, where it means something
    ratio: float | None = None
    ratio_to: str = ""
    target: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)


def measure(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median_spread(times)


def median_spread(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return statistics.median(values), (max(values) - min(values)) / 2
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), (q[2] - q[0]) / 2


class KeepAlive:
    """A keep-alive HTTP/1.1 client with almost no overhead of its own (http.client)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
        self.conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
        r = self.conn.getresponse()
        data = r.read()
        return r.status, data, dict(r.getheaders())


def start(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float = 90) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "SUPABASE_", "HF_"))}
    full.update(env)
    # Logs go to a file: a pipe nobody reads fills up and stalls the server mid-benchmark.
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if ready():
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def health_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        host, port = url.removeprefix("http://").split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=1)
        c.request("GET", "/api/health")
        return c.getresponse().status == 200

    return check


def fmt_row(r: Row) -> str:
    if r.unit == "s":
        med = f"{r.median * 1000:9.2f} ms ±{r.spread * 1000:6.2f}"
    else:
        med = f"{r.median:9.2f} {r.unit:2} ±{r.spread:6.2f}"
    eps = f"{r.per_second:10.0f}/s" if r.per_second else " " * 12
    ratio = f"{r.ratio:8.2f}x {r.ratio_to}" if r.ratio is not None else ""
    target = f" [{r.target}]" if r.target else ""
    note = f"  ({r.note})" if r.note else ""
    return f"{r.section:<4} {r.what:<58} {med} {eps} {ratio}{target}{note}"


def write(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                "python": sys.version.split()[0], "rows": [asdict(r) for r in rows]}, indent=1))
