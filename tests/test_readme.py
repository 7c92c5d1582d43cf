"""Every code block of the README runs as written against `make dev`'s defaults (issue 23), or says what it needs.

The blocks run in order, each in a fresh process, in one scratch directory outside the repository (so
`from lib import Embedder` must work as an installed package), with the dev server's defaults: the local model,
an SQLite cache, no keys. The only change made to a block is the dev server's port. A block whose first line says
`needs: ...` gets what it needs where a test can give it (a small chunks.jsonl), or is listed as not runnable here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_devserver, stop_devserver

BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
NEEDS = re.compile(r"^(?:#|--)\s*needs:\s*(.+)$", re.M)
# What a test can provide, by the words of a block's `needs:` line: the directory the block then runs in.
PROVIDED = {
    "chunks.jsonl": lambda d: (d / "chunks.jsonl").write_text(
        "".join(json.dumps({"id": f"doc-{i}#0", "text": f"chunk {i} of the corpus"}) + "\n" for i in range(5)))
    and d,
    "vectors.npy": lambda d: d,  # written by the block before
    "a clone of this repository": lambda d: ROOT,  # `pip install -e` there: what `make` itself does
    "the development requirements, in a clone": lambda d: ROOT,  # this suite runs in them
}


def blocks() -> list[tuple[int, str, str]]:
    text = (ROOT / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def test_every_block_is_runnable_or_says_what_it_needs():
    for line, lang, code in blocks():
        assert lang in ("python", "sh", "sql"), f"README.md:{line}: a ```{lang} block this test cannot run"
        if lang == "sql":
            assert NEEDS.search(code), f"README.md:{line}: an SQL block must say what it needs (-- needs: ...)"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """`make dev`'s server (the same module and defaults), its cache file kept out of the repository."""
    cache = tmp_path_factory.mktemp("dev") / "embeddings.sqlite3"
    proc, url = start_devserver({"HF_HUB_OFFLINE": "1", "EMBEDDINGS_SQLITE_PATH": str(cache)})
    yield url
    stop_devserver(proc)


def test_the_readme_runs_as_written(dev, tmp_path):
    port = dev.rsplit(":", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "HF_", "SUPABASE_"))
           and k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    ran, not_here = [], []
    for line, lang, code in blocks():
        need = NEEDS.search(code)
        if need:
            wanted = need.group(1)
            provide = next((f for name, f in PROVIDED.items() if wanted.startswith(name)), None)
            if provide is None:
                not_here.append((line, wanted))
                continue
            cwd = provide(tmp_path)
        else:
            cwd = tmp_path
        code = code.replace("127.0.0.1:3000", f"127.0.0.1:{port}")
        if lang == "python":
            run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                                 text=True, timeout=300)
        elif re.fullmatch(r"(make \w+\s+#.*\n)+", code):  # the quickstart: the targets exist (CI runs `make test`)
            targets = re.findall(r"^make (\w+)", code, re.M)
            run = subprocess.run(["make", "-n", *targets], cwd=ROOT, capture_output=True, text=True, timeout=60)
        else:
            # A transcript ("$ command" then its output) runs its commands; any other block runs as a script.
            lines = code.splitlines()
            script = "\n".join(x[2:] for x in lines if x.startswith("$ ")) if lines[0].startswith("$ ") else code
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"README.md:{line} ({lang}) failed:\n{code}\n{run.stdout}\n{run.stderr}"
        ran.append(line)
    assert len(ran) >= 10
    # What cannot run here is only what needs a real service: Supabase, or OpenAI's and Azure's keys.
    assert not_here and all(any(w in wanted for w in ("Supabase", "an OpenAI key")) for _, wanted in not_here), \
        not_here
    assert (tmp_path / "vectors.npy").is_file()  # the corpus block ran, and the block after it read its output
