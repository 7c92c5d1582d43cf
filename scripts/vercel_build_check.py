"""Build the project with the real Vercel CLI, offline, and check what it would deploy.

    python scripts/vercel_build_check.py        (make vercel-check)
    python scripts/vercel_build_check.py --onnx DIR   (make vercel-check-onnx: a deployment serving an ONNX model)

With --onnx, the model directory is placed at models/<its name> in the copy (as a user commits it to their
deployment's repository), the build runs with EMBEDDINGS_PROVIDER=onnx in its environment (pyproject.toml's
install script then adds requirements.onnx.txt), and the built function is then run: its own files, its own _vendor, Python 3.12, through
`vercel_runtime`'s `vc_handler`, answering one embeddings request from the ONNX model.

Installs the Vercel CLI from the npm registry into .cache/vercel-cli (once), copies the
project into a scratch folder (the build writes pyproject.toml, uv.lock and .python-version
into the project root), plants a `.env` holding a sentinel, runs `vercel build`, and checks
`.vercel/output`: one function per `api/*.py`, nothing from tests/, bench/ or `.env*` in any
function or in the static output, and each function's size. Needs npm, uv and Python 3.12
on PATH (the Makefile's environments provide the last two).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI_VERSION = "60.1.3"  # later releases need a `sandbox` package version the registry does not serve
CLI_DIR = ROOT / ".cache" / "vercel-cli"
SENTINEL = "SENTINEL-must-never-be-deployed"
FORBIDDEN = ("tests/", "bench/", ".env", ".ci/", ".venv")


def cli() -> Path:
    binary = CLI_DIR / "node_modules" / ".bin" / "vercel"
    if not binary.exists():
        CLI_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(CLI_DIR),
                        f"vercel@{CLI_VERSION}"], check=True, stdout=sys.stderr)  # stdout is the report
    return binary


def python312_dir() -> str:
    found = shutil.which("python3.12")
    candidates = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    if candidates:
        return str(candidates[-1].parent)
    if found:
        return str(Path(found).parent)
    raise SystemExit("Python 3.12 is needed for `vercel build`")


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


# Above this the Python builder moves dependencies out of the bundle, to be installed at cold start (slower).
BUNDLE_LIMIT_MB = 225 * 1024 * 1024 / 1e6


def build(scratch: Path, onnx: Path | None = None) -> Path:
    for rel in project_files():
        dest = scratch / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    build_env: dict[str, str] = {}
    if onnx is not None:  # what the deployment's environment says, and the model as its repository holds it
        shutil.copytree(onnx, scratch / "models" / onnx.name, symlinks=False)
        build_env["EMBEDDINGS_PROVIDER"] = "onnx"
    (scratch / ".env").write_text(f"OPENAI_API_KEY=sk-{SENTINEL}\n")
    (scratch / ".env.local").write_text(f"SUPABASE_SERVICE_ROLE_KEY={SENTINEL}\n")
    (scratch / ".vercel").mkdir(exist_ok=True)
    (scratch / ".vercel" / "project.json").write_text(json.dumps(
        {"projectId": "prj_local_build_check", "orgId": "team_local_build_check", "settings": {"framework": None}}))
    uv = shutil.which("uv") or str(ROOT / ".venv" / "bin" / "uv")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(uv).parent), python312_dir(), os.environ["PATH"]]),
           "VERCEL_TELEMETRY_DISABLED": "1", **build_env}
    done = subprocess.run([str(cli()), "build", "--yes"], cwd=scratch, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildFailed((done.stdout + done.stderr)[-3000:])
    return scratch / ".vercel" / "output"


class BuildFailed(Exception):
    """`vercel build` refused the project; the message is the end of its output."""


def check(output: Path, scratch: Path) -> dict:
    problems: list[str] = []
    functions = sorted(p.relative_to(output / "functions").as_posix()
                       for p in (output / "functions").rglob("*.func"))
    expected = sorted(f"api/{p.stem}.func" for p in (ROOT / "api").glob("*.py") if not p.name.startswith("_"))
    if functions != expected:
        problems.append(f"functions {functions} != {expected}")
    sizes = {}
    packages: dict[str, list[str]] = {}
    streaming: dict[str, bool] = {}
    for func in functions:
        config = json.loads((output / "functions" / func / ".vc-config.json").read_text())
        mapped = config.get("filePathMap", {})
        # What the build installed into the function (name==version of each distribution), and whether the
        # platform streams its answers (a streamed answer is exempt from the 4.5 MB response limit).
        packages[func] = sorted(_dist(name) for name in mapped if name.startswith("_vendor/")
                                and name.endswith(".dist-info/METADATA"))
        streaming[func] = bool(config.get("supportsResponseStreaming"))
        inside = [p.relative_to(output / "functions" / func).as_posix()
                  for p in (output / "functions" / func).rglob("*") if p.is_file()]
        for name in list(mapped) + inside:
            if name.startswith(FORBIDDEN) or "/.env" in name:
                problems.append(f"{func} contains {name}")
        total = sum((scratch / src).stat().st_size for src in mapped.values() if (scratch / src).is_file())
        total += sum((output / "functions" / func / p).stat().st_size for p in inside)
        sizes[func] = round(total / 1e6, 1)
        for src in mapped.values():
            path = scratch / src
            if path.is_file() and path.suffix in ("", ".env", ".txt", ".py", ".json", ".local") and \
                    SENTINEL.encode() in path.read_bytes():
                problems.append(f"{func} carries the planted secret in {src}")
    static = sorted(p.relative_to(output / "static").as_posix() for p in (output / "static").rglob("*")
                    if p.is_file())
    for name in static:
        if not (ROOT / "public" / name).exists():
            problems.append(f"static output publishes {name}, which is not in public/")
    # The headers every answer gets (the page's Content-Security-Policy), as the build's routing table says.
    routes = json.loads((output / "config.json").read_text()).get("routes", [])
    headers = {k.lower(): v for route in routes if route.get("src") in ("^(?:/(.*))$", "/(.*)")
               for k, v in route.get("headers", {}).items()}
    return {"functions": functions, "size_mb": sizes, "static": static, "headers": headers, "problems": problems,
            "packages": packages, "streaming": streaming, "resolved": resolved(scratch)}


def _dist(metadata_path: str) -> str:
    """`_vendor/pydantic_core-2.46.4.dist-info/METADATA` -> `pydantic-core==2.46.4` (names normalised)."""
    name, _, version = metadata_path.split("/")[1].removesuffix(".dist-info").partition("-")
    return f"{name.lower().replace('_', '-')}=={version}"


def resolved(scratch: Path) -> list[str]:
    """What requirements.txt alone resolves to for the function's Python, by uv (the builder's own tool)."""
    uv = shutil.which("uv") or str(ROOT / ".venv" / "bin" / "uv")
    out = subprocess.run([uv, "pip", "compile", str(ROOT / "requirements.txt"), "--python-version", "3.12",
                          "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--no-annotate", "-q"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(line.strip().lower() for line in out.splitlines() if "==" in line)


def materialize(output: Path, scratch: Path, func: str, into: Path) -> Path:
    """The function's files as the platform lays them out (its .vc-config.json's filePathMap), as links."""
    root = output / "functions" / func
    config = json.loads((root / ".vc-config.json").read_text())
    for name, src in config.get("filePathMap", {}).items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(scratch / src, into / name)
    for path in root.rglob("*"):
        if path.is_file() and path.name != ".vc-config.json":
            (into / path.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into / path.relative_to(root))
    return into


SMOKE = """
import json, sys
sys.path.insert(0, ".")
import vc__handler__python as function
request = {"method": "POST", "path": "/v1/embeddings", "body": json.dumps({"input": sys.argv[1:], "encoding_format":
           "base64"}), "headers": {"content-type": "application/json", "authorization": "Bearer smoke-key"}}
answer = function.vc_handler({"body": json.dumps(request)}, None)
import onnxruntime, tokenizers
print("@@smoke " + json.dumps({"status": answer["statusCode"], "body": json.loads(answer["body"]),
    "vendored": all("/_vendor/" in m.__file__ for m in (onnxruntime, tokenizers)),
    "heavy": sorted(m for m in ("torch", "transformers", "huggingface_hub") if m in sys.modules)}))
"""


def smoke(output: Path, scratch: Path, model_dir: str) -> dict:
    """Run the built embeddings function on its own files: one request served by the ONNX model."""
    import base64

    with tempfile.TemporaryDirectory(prefix="vercel-func-") as tmp:
        func = materialize(output, scratch, "api/embeddings.func", Path(tmp))
        python = str(Path(python312_dir()) / "python3.12")
        env = {"PATH": os.environ["PATH"], "VERCEL": "1", "EMBEDDINGS_API_KEYS": "smoke-key",
               "EMBEDDINGS_PROVIDER": "onnx", "EMBEDDINGS_ONNX_MODEL_DIR": model_dir, "EMBEDDINGS_CACHE": "memory"}
        texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
        run = subprocess.run([python, "-I", "-c", SMOKE, *texts], cwd=func, env=env, capture_output=True, text=True,
                             timeout=300)
    line = next((x for x in run.stdout.splitlines() if x.startswith("@@smoke ")), None)
    if line is None:
        return {"status": None, "error": (run.stdout + run.stderr)[-2000:]}
    result = json.loads(line.removeprefix("@@smoke "))
    body = result.pop("body")
    if result["status"] == 200:
        import array

        vectors = [array.array("f", base64.b64decode(d["embedding"])) for d in body["data"]]
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731 - normalised vectors: the cosine
        result.update(model=body["model"], dimensions=len(vectors[0]),
                      cosines=[round(dot(vectors[0], vectors[1]), 4), round(dot(vectors[0], vectors[2]), 4)])
    else:
        result["error"] = body
    return result


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=None, help="an ONNX model directory to deploy with the functions")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="vercel-build-"))
    try:
        try:
            output = build(scratch, args.onnx)
        except BuildFailed as exc:
            print(json.dumps({"problems": [f"vercel build failed: {exc}"], "size_mb": {}}, indent=1))
            return 1
        report = check(output, scratch)
        if args.onnx is not None:
            report["smoke"] = smoke(output, scratch, f"models/{args.onnx.name}")
            report["bundle_limit_mb"] = round(BUNDLE_LIMIT_MB, 1)
            if report["smoke"].get("status") != 200:
                report["problems"].append(f"the built function did not serve the ONNX model: {report['smoke']}")
            if max(report["size_mb"].values()) > BUNDLE_LIMIT_MB:
                report["problems"].append(f"a function is over the builder's {BUNDLE_LIMIT_MB:.0f} MB: {report['size_mb']}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
