"""The product installs the way Python users expect (issue 23): `pip install -e .` (what `make dev` and `make test`
do), and from a git URL, with the command line as a console script; both used from outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def outside(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment that knows nothing of the repository: no PYTHONPATH, our variables cleared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDINGS_", "OPENAI_", "HF_", "SUPABASE_"))
           and k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "c.sqlite3"), **extra})
    return env


def test_the_embedder_imports_and_embeds_from_another_directory(tmp_path, fake_openai):
    script = ("from lib import Embedder\n"
              "e = Embedder.from_env()\n"
              "r = e.embed(['from elsewhere', 'from elsewhere', 'too'])\n"
              "print(r.hits, r.misses, len(r.vectors), r.dimensions)\n")
    env = outside(tmp_path, EMBEDDINGS_PROVIDER="openai", OPENAI_API_KEY="sk-test-SENTINEL-not-a-real-key",
                  OPENAI_BASE_URL=fake_openai.url)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "2", "3", "1536"] and fake_openai.calls == 1


def test_the_console_script_runs_from_another_directory(tmp_path, fake_openai):
    (tmp_path / "in.txt").write_text("alpha\nbeta\nalpha\n")
    env = outside(tmp_path, EMBEDDINGS_PROVIDER="openai", OPENAI_API_KEY="sk-test-SENTINEL-not-a-real-key",
                  OPENAI_BASE_URL=fake_openai.url)
    embed = subprocess.run([str(BIN / "embeddings-cache"), "embed", "in.txt", "--out", "v.npy"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert embed.returncode == 0 and "3 texts (2 distinct)" in embed.stderr, embed.stderr
    stats = subprocess.run([str(BIN / "embeddings-cache"), "stats"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert stats.returncode == 0 and stats.stdout.startswith("text-embedding-3-small 2 rows, 1536 dims"), stats


def test_a_git_url_install_carries_the_whole_package(tmp_path):
    """`pip install git+<url>` builds from the committed tree: every subpackage and the OpenAPI document come along,
    and the command line is there. (--no-deps: the dependencies are this environment's already.)"""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--no-deps", "--target", str(target), f"git+file://{ROOT}"], capture_output=True, text=True,
                         timeout=300)
    assert pip.returncode == 0, pip.stderr
    script = ("import lib, lib.cache.sqlite, lib.providers.openai, lib.openapi\n"
              "from lib import Embedder\n"
              "print(lib.__file__)\n"
              "print(lib.openapi.PATH.is_file())\n"
              "print(Embedder(cache='memory', provider='openai', openai_api_key='sk-x').model)\n")
    env = {**outside(tmp_path), "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    where, has_spec, model = run.stdout.split()
    assert where.startswith(str(target)) and has_spec == "True" and model == "text-embedding-3-small"
    assert (target / "bin" / "embeddings-cache").is_file()
