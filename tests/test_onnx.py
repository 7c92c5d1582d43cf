"""The onnx provider (issue 20): exported sentence-transformers models on ONNX Runtime, no torch at serving time.

The exports are made once per session by the real command (`python -m lib export-onnx`, in a subprocess) from the
packaged all-MiniLM-L6-v2 and from a tiny random CLS-pooled XLM-RoBERTa model built here; everything else serves
those directories through the endpoint, the `Embedder` and the command line, against sentence-transformers itself.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib import Embedder, config
from lib.models import MINILM
from tests.conftest import ROOT, app_module, lib_command, start_devserver, stop_devserver

INT8_ID = MINILM + "@int8"


@pytest.fixture(scope="session")
def xlmr(tmp_path_factory):
    """A tiny random CLS-pooled XLM-R sentence-transformers model and its export."""
    from tests.tiny_models import build

    root = tmp_path_factory.mktemp("xlmr")
    st_dir = build(root)
    done = lib_command(["export-onnx", "--from", str(st_dir), "--model-id", "test/tiny-xlmr-cls",
                        "--out", str(root / "onnx")])
    assert done.returncode == 0, done.stderr
    return {"st": st_dir, "onnx": root / "onnx", "log": done.stderr}


@pytest.fixture(scope="session")
def minilm():
    """sentence-transformers' own all-MiniLM-L6-v2: the reference."""
    from sentence_transformers import SentenceTransformer

    from lib.providers.local import model_source

    return SentenceTransformer(model_source(MINILM), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def onnx_env(monkeypatch, tmp_path, models: dict[str, Path] | None = None, directory: Path | None = None,
             **extra: str) -> None:
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "onnx")
    monkeypatch.setenv("EMBEDDINGS_CACHE", "sqlite")
    monkeypatch.setenv("EMBEDDINGS_SQLITE_PATH", str(tmp_path / "cache.sqlite3"))
    if models:
        monkeypatch.setenv("EMBEDDINGS_ONNX_MODELS", ",".join(f"{k}={v}" for k, v in models.items()))
    if directory:
        monkeypatch.setenv("EMBEDDINGS_ONNX_MODEL_DIR", str(directory))
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    app_module.reset()


# -- the export ------------------------------------------------------------------------------------------------


def test_the_export_writes_the_ecosystems_layout_and_reports_parity(exports):
    out = exports["fp32"]
    for name in ("onnx/model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json", "modules.json",
                 "1_Pooling/config.json", "sentence_bert_config.json", "embeddings-cache.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "embeddings-cache.json").read_text())
    assert manifest["model_id"] == MINILM and manifest["variant"] == "fp32"
    assert manifest["parity"]["texts"] >= 200 and manifest["parity"]["min_cosine"] >= 0.99999
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    # The packaged file's snags, mended: truncation at the model's 256 (not 128), no fixed padding.
    assert tokenizer["truncation"]["max_length"] == 256 and tokenizer["padding"] is None
    assert json.loads((out / "1_Pooling/config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 256
    said = re.search(r"min cosine (0\.\d+)", exports["fp32_log"])
    assert said and float(said.group(1)) >= 0.99999, exports["fp32_log"]
    assert not (out.parent / "minilm.partial").exists()


def test_int8_is_its_own_model_id_and_reports_its_agreement(exports):
    manifest = json.loads((exports["int8"] / "embeddings-cache.json").read_text())
    assert manifest["model_id"] == INT8_ID and manifest["variant"] == "int8"
    agreement = manifest["int8_agreement"]
    assert 0.9 < agreement["min_cosine"] < 0.9999 and 0.98 < agreement["mean_cosine"] < 1  # measurably different
    assert 0.5 < agreement["top10_neighbour_overlap"] <= 1
    assert "top-10 neighbour overlap" in exports["int8_log"]
    assert (exports["int8"] / "onnx/model.onnx").stat().st_size < 0.4 * (exports["fp32"] / "onnx/model.onnx").stat().st_size


# -- parity and batching -----------------------------------------------------------------------------------------


def test_parity_with_sentence_transformers_on_varied_texts_and_batch_invariance(exports, minilm):
    from lib.export_onnx import parity_corpus
    from lib.providers.onnx import OnnxModel

    texts = parity_corpus()
    assert len(texts) >= 200 and " " in texts and any(len(t) > 2000 for t in texts) and "🙂" in texts
    model = OnnxModel(exports["fp32"])
    got, tokens = model.encode(texts)
    want = minilm.encode(texts, convert_to_numpy=True)
    assert cosines(got, want).min() >= 0.99999
    assert tokens == sum(min(len(minilm.tokenizer(t)["input_ids"]), 256) for t in texts)  # the real count
    for i in (0, 150, 170, len(texts) - 1):  # alone, and inside a batch padded to a far longer text
        alone, _ = model.encode([texts[i]])
        assert cosines(alone, got[i:i + 1])[0] >= 0.999999


def test_a_cls_pooled_xlm_roberta_model_exports_and_matches(xlmr):
    from sentence_transformers import SentenceTransformer

    from lib.export_onnx import parity_corpus
    from lib.providers.onnx import OnnxModel

    model = OnnxModel(xlmr["onnx"])
    assert "token_type_ids" not in model.inputs and model.pad_id == 1 and model.layout.pooling == "cls"
    texts = parity_corpus()
    st = SentenceTransformer(str(xlmr["st"]), device="cpu")
    got, _ = model.encode(texts)
    assert cosines(got, st.encode(texts, convert_to_numpy=True)).min() >= 0.99999
    alone, _ = model.encode([texts[3]])
    assert cosines(alone, got[3:4])[0] >= 0.999999


# -- one vector space, one cache, every door ------------------------------------------------------------------


def test_onnx_and_local_share_keys_and_cache(monkeypatch, tmp_path, exports, serve):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    onnx_env(monkeypatch, tmp_path, directory=exports["fp32"])
    server = serve()
    r = server.embed({"input": texts, "encoding_format": "base64"})
    assert r.status_code == 200 and r.json()["model"] == MINILM and r.headers["x-cache-misses"] == "3", r.text
    first = [base64.b64decode(d["embedding"]) for d in r.json()["data"]]
    v = np.stack([np.frombuffer(b, "<f4") for b in first])
    assert round(float(v[0] @ v[1]), 4) == 0.7553 and round(float(v[0] @ v[2]), 4) == 0.2474  # the model's cosines
    # The local (torch) provider on the same cache: every text is a hit, the same bytes.
    local = Embedder.from_env(provider="local")
    result = local.embed(texts)
    assert (result.hits, result.misses) == (3, 0) and result.vectors == first
    # And the other way round: what the local model paid for is a hit for onnx.
    assert local.embed(["only the local model saw this"]).misses == 1
    again = server.embed({"input": "only the local model saw this"})
    assert again.headers["x-cache-hits"] == "1" and again.json()["usage"]["prompt_tokens"] == 0


def test_usage_reports_the_tokens_the_model_read(monkeypatch, tmp_path, exports, minilm, serve):
    onnx_env(monkeypatch, tmp_path, directory=exports["fp32"])
    server = serve()
    texts = ["count my tokens", "and mine, please", "count my tokens"]
    body = server.embed({"input": texts}).json()
    expected = sum(len(minilm.tokenizer(t)["input_ids"]) for t in dict.fromkeys(texts))  # each distinct text once
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    assert server.embed({"input": texts}).json()["usage"]["prompt_tokens"] == 0  # all hits


def test_int8_never_shares_the_fp32_entries(monkeypatch, tmp_path, exports, serve):
    onnx_env(monkeypatch, tmp_path, models={MINILM: exports["fp32"], INT8_ID: exports["int8"]})
    server = serve()
    assert server.embed({"input": "one text"}).headers["x-cache-misses"] == "1"
    r = server.embed({"input": "one text", "model": INT8_ID, "encoding_format": "base64"})
    assert r.status_code == 200 and r.json()["model"] == INT8_ID and r.headers["x-cache-misses"] == "1"
    health = server.client.get("/api/health").json()
    assert health["provider"] == "onnx" and set(health["models"]) == {MINILM, INT8_ID}


def test_several_models_at_once_each_under_its_id(monkeypatch, tmp_path, exports, xlmr, serve):
    onnx_env(monkeypatch, tmp_path, models={MINILM: exports["fp32"], "test/tiny-xlmr-cls": xlmr["onnx"]})
    server = serve()
    a = server.embed({"input": "same text", "encoding_format": "base64"}).json()
    b = server.embed({"input": "same text", "model": "test/tiny-xlmr-cls", "encoding_format": "base64"}).json()
    assert a["model"] == MINILM and len(base64.b64decode(a["data"][0]["embedding"])) == 384 * 4
    assert b["model"] == "test/tiny-xlmr-cls" and len(base64.b64decode(b["data"][0]["embedding"])) == 32 * 4
    wrong = server.embed({"input": "x", "model": "text-embedding-3-small"})
    assert wrong.status_code == 400 and "test/tiny-xlmr-cls" in wrong.json()["error"]["message"]


def test_the_command_line_and_the_page_serve_onnx_without_torch(exports, tmp_path):
    (tmp_path / "in.txt").write_text("first\nsecond\nfirst\n")
    env = {"EMBEDDINGS_PROVIDER": "onnx", "EMBEDDINGS_ONNX_MODEL_DIR": str(exports["fp32"]),
           "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "c.sqlite3")}
    done = lib_command(["embed", "in.txt", "--out", "v.npy"], env, tmp_path)
    assert done.returncode == 0 and "3 texts (2 distinct)" in done.stderr, done.stderr
    assert np.load(tmp_path / "v.npy").shape == (3, 384)
    # The serving process never imports torch or transformers (the export does; serving does not).
    script = ("import sys; from lib import Embedder; Embedder.from_env().embed(['no torch here']); "
              "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers', 'huggingface_hub') "
              "if m in sys.modules))")
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("EMBEDDINGS_")}, **env, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=full, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr
    proc, url = start_devserver({**env, "EMBEDDINGS_SQLITE_PATH": str(tmp_path / "d.sqlite3")})
    try:
        import httpx

        assert httpx.get(url + "/").status_code == 200  # the page itself
        health = httpx.get(url + "/api/health").json()  # what the page's status strip reads
        assert health["provider"] == "onnx" and health["model"] == MINILM
    finally:
        out = stop_devserver(proc)
    assert "provider=onnx" in out


# -- trusted names, bad directories --------------------------------------------------------------------------


def test_a_directory_that_claims_a_builtin_id_must_reproduce_it(exports, tmp_path):
    with pytest.raises(config.ConfigError) as info:
        Embedder(provider="onnx", onnx_models={MINILM: str(exports["int8"])}, cache="memory")
    message = str(info.value)
    assert str(exports["int8"]) in message and re.search(r"cosine 0\.9\d+", message), message
    # Under a model id of the user's own choosing it is taken as given.
    assert Embedder(provider="onnx", onnx_models={"my/int8": str(exports["int8"])}, cache="memory").models == \
        ["my/int8"]
    # And a start of the dev server with the false claim stops at once, with that one message.
    proc = subprocess.run([sys.executable, "-m", "lib.devserver", "--port", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "EMBEDDINGS_PROVIDER": "onnx",
                                                      "EMBEDDINGS_ONNX_MODELS": f"{MINILM}={exports['int8']}"})
    assert proc.returncode == 2 and "does not reproduce its reference vectors" in proc.stderr
    assert "Traceback" not in proc.stderr


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx"))
    (dst / "onnx").mkdir(exist_ok=True)
    os.symlink(src / "onnx" / "model.onnx", dst / "onnx" / "model.onnx")
    return dst


def _four_d_model(path: Path) -> None:
    """A graph whose output is [batch, tokens, 1, 1]: neither token embeddings nor sentence vectors."""
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", 1, 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["f", "axes"], ["out"])]
    graph = helper.make_graph(nodes, "four_d", [ids, mask], [out], initializer=[axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("damage, names", [
    ("no tokenizer", "tokenizer.json"),
    ("corrupt model", "model.onnx"),
    ("tokenizer of another model", "tokenizer.json"),
    ("4-D output", "model.onnx"),
    ("no model file", "onnx/model.onnx"),
    ("pooling not supported", "1_Pooling/config.json"),
    ("broken JSON", "modules.json"),
])
def test_a_bad_directory_is_one_configuration_error_naming_the_file(exports, xlmr, tmp_path, damage, names):
    bad = _copy(exports["fp32"], tmp_path / "bad")
    model = bad / "onnx" / "model.onnx"
    if damage == "no tokenizer":
        (bad / "tokenizer.json").unlink()
    elif damage == "corrupt model":
        model.unlink()
        model.write_bytes(b"\x08\x07not a protobuf at all" * 100)
    elif damage == "tokenizer of another model":  # MiniLM's 30,522-token vocabulary against a 150-token model
        shutil.rmtree(bad)
        bad = _copy(xlmr["onnx"], tmp_path / "bad")
        shutil.copy(exports["fp32"] / "tokenizer.json", bad / "tokenizer.json")
        shutil.copy(exports["fp32"] / "tokenizer_config.json", bad / "tokenizer_config.json")
    elif damage == "4-D output":
        model.unlink()
        _four_d_model(model)
    elif damage == "no model file":
        model.unlink()
    elif damage == "pooling not supported":
        (bad / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    elif damage == "broken JSON":
        (bad / "modules.json").write_text("[{")
    with pytest.raises(config.ConfigError) as info:
        Embedder(provider="onnx", onnx_models={"my/model": str(bad)}, cache="memory")
    assert names in str(info.value) and str(bad) in str(info.value), str(info.value)


def test_the_default_directory_and_its_manifest(tmp_path, exports, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match=r"models/not-exported: no such directory.*export-onnx"):
        config.load({"EMBEDDINGS_PROVIDER": "onnx", "EMBEDDINGS_ONNX_MODEL_DIR": "models/not-exported"})
    target = tmp_path / ".cache" / "onnx" / "all-MiniLM-L6-v2"
    target.parent.mkdir(parents=True)
    os.symlink(exports["fp32"], target)
    assert config.load({"EMBEDDINGS_PROVIDER": "onnx"}).onnx_models == {MINILM: ".cache/onnx/all-MiniLM-L6-v2"}
    # A relative directory not under the working directory is looked for under the project's root (a deployment's).
    monkeypatch.chdir("/")
    os.symlink(exports["fp32"], ROOT / "tests" / ".onnx-test-model")
    try:
        found = config.load({"EMBEDDINGS_PROVIDER": "onnx", "EMBEDDINGS_ONNX_MODEL_DIR": "tests/.onnx-test-model"})
        assert found.onnx_models == {MINILM: str(ROOT / "tests" / ".onnx-test-model")}
    finally:
        (ROOT / "tests" / ".onnx-test-model").unlink()
    bare = _copy(exports["fp32"], tmp_path / "bare")
    (bare / "embeddings-cache.json").unlink()
    with pytest.raises(config.ConfigError, match="EMBEDDINGS_ONNX_MODELS=<model id>="):
        config.load({"EMBEDDINGS_PROVIDER": "onnx", "EMBEDDINGS_ONNX_MODEL_DIR": str(bare)})
