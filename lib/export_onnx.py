"""`python -m lib export-onnx`: a sentence-transformers model as a complete ONNX model directory, checked.

Development requirements only (torch, sentence-transformers, onnx): the export runs once, on a developer's machine;
what it writes runs in production with onnxruntime, `tokenizers` and numpy alone (`lib/providers/onnx.py`).

The directory is written under `<out>.partial` and renamed only once the ONNX runtime's vectors, computed by the
very code that serves them, agree with sentence-transformers' on a fixed corpus of 200+ varied texts (and a text
alone agrees with the same text inside a padded batch). `--int8` writes a per-channel int8 variant under its own
model id (its vectors differ measurably: a different vector space, never mixed with fp32's in the cache) and prints
its agreement with fp32.

Known snags, handled here: the packaged `tokenizer.json` carries truncation at 128 and fixed padding (rewritten:
truncation at the model's real limit, no padding); sentence-transformers 6 writes `{"pooling_mode": "cls"}` where
models on the hub use `pooling_mode_cls_token` (the hub's keys are written); XLM-R models have no `token_type_ids`
(the graph's inputs are the tokenizer's own) and pad with id 1 (`tokenizer_config.json` keeps its pad token).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .providers.onnx import MANIFEST, OnnxModel

FP32_MIN_COSINE = 0.99999
OPSET = 17


def parity_corpus() -> list[str]:
    """200+ fixed, varied texts: short and long (past any 256-token limit), accents, CJK, Arabic, emoji, digits,
    code, shouting, a lone space. Deterministic, so every export is checked on the same texts."""
    rng = random.Random(20)
    words = ("the cache pays for each distinct text once while the model reads every token of a sentence and "
             "returns one vector per text so that similar meanings land near each other in the space").split()
    subjects = ["A man", "The woman", "A child", "Our team", "The server", "A cat", "The market", "My neighbour"]
    verbs = ["is eating", "reads", "deploys", "watches", "fixes", "sells", "paints", "forgets"]
    objects = ["food.", "a piece of bread.", "the new release.", "a horse.", "the old bridge.", "prices.",
               "a red door.", "the password."]
    texts = [f"{s} {v} {o}" for s in subjects for v in verbs for o in objects[:2]]  # 128 short sentences
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(40)]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(300, 500))) for _ in range(12)]  # truncated
    texts += ["Crème brûlée à la française, s'il vous plaît.", "Größe, Straße, Übermaß.", "日本語の文章です。",
              "中文句子，用于测试。", "هذه جملة عربية للاختبار.", "Это предложение на русском.", "🙂", "🚀🔥 launch day!",
              "emoji 👩‍👩‍👧 family and flags 🇫🇷", "  leading and trailing spaces  ", " ", "a", "?", "1234567890",
              "def f(x): return x * 2  # code", "SHOUTING IN CAPITALS", "MiXeD cAsE tExT", "tab\tand\nnewline",
              "https://example.com/path?query=1", "e-mail: someone@example.com", "ünïcödé ñ ç ø å æ œ",
              "Ελληνικά κείμενα", "עברית משפט", "हिन्दी वाक्य", "한국어 문장", "ไทย ประโยค"]
    texts += [f"short {i}" for i in range(30)]
    return texts


def _cosines(a: Any, b: Any) -> Any:
    import numpy as np

    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _pooling_config(st: Any) -> dict[str, Any]:
    """The Pooling module's configuration in the hub's keys (what fastembed and older readers understand)."""
    from .providers.onnx import pooling_mode

    pool = st[1]
    config = pool.get_config_dict()
    mode = pooling_mode(config, Path("1_Pooling/config.json"))
    dims = config.get("word_embedding_dimension") or config.get("embedding_dimension")
    return {"word_embedding_dimension": dims, "pooling_mode_cls_token": mode == "cls",
            "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max",
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": mode == "lasttoken"}


def _write_layout(st: Any, out: Path) -> None:
    """Everything but the graph: tokenizer files, configs, modules, pooling, the length limit."""
    kinds = [type(m).__name__ for m in st]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise SystemExit(f"error: modules {kinds} are not supported (Transformer, Pooling, then Normalize at most)")
    transformer = st[0]
    limit = int(st.max_seq_length)
    tokenizer = transformer.tokenizer
    tokenizer.model_max_length = limit  # fastembed truncates at this, not at sentence_bert_config's limit
    tokenizer.save_pretrained(str(out))
    transformer.auto_model.config.to_json_file(str(out / "config.json"))
    from tokenizers import Tokenizer

    fixed = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    fixed.no_padding()
    fixed.enable_truncation(max_length=limit)
    fixed.save(str(out / "tokenizer.json"))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if "Normalize" in kinds:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(_pooling_config(st), indent=2) + "\n")
    lowercase = bool(getattr(transformer, "do_lower_case", False))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": limit, "do_lower_case": lowercase},
                                                              indent=2) + "\n")


def _export_graph(st: Any, path: Path) -> list[str]:
    """The transformer alone (token embeddings out; pooling is the runtime's), with eager attention so that
    ONNX Runtime's optimizer can fuse it. Inputs are the tokenizer's own names: XLM-R has no token_type_ids."""
    import torch

    model = st[0].auto_model
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    model.eval()
    names = list(st.tokenizer.model_input_names)

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors))).last_hidden_state

    sample = st.tokenizer(["an example sentence", "and a second, longer example sentence"], padding=True,
                          return_tensors="pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes, about code not ours
        torch.onnx.export(Graph(), tuple(sample[n] for n in names), str(path), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return names


def _optimize(path: Path, config: Any) -> bool:
    """Fuse attention, embeddings and layer norms (ONNX Runtime's transformer optimizer). Returns whether it
    changed the file; the parity check decides whether the fused graph is kept."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size, opt_level=None)
        fused = optimized.get_fused_operator_statistics()
        if not fused.get("Attention"):
            return False
        optimized.save_model_to_file(str(path))
        return True
    except Exception as exc:  # an architecture the optimizer does not know: the plain graph is correct too
        print(f"note: the graph was not fused ({type(exc).__name__}); the plain export is kept", file=sys.stderr)
        return False


def _agreement(st_vectors: Any, runtime: OnnxModel, texts: list[str]) -> dict[str, float]:
    import numpy as np

    got, _ = runtime.encode(texts)
    cos = _cosines(got, st_vectors)
    # A text alone and the same text inside a padded batch of the others: the same vector.
    alone = np.stack([runtime.encode([t])[0][0] for t in texts[::23]])
    invariance = _cosines(alone, got[::23])
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "batch_invariance_min_cosine": float(invariance.min()), "texts": len(texts)}


def _neighbours(a: Any, b: Any, k: int = 10) -> float:
    """Mean overlap of each text's k nearest neighbours (by cosine) in two spaces: 1.0 is the same ranking."""
    import numpy as np

    def top(v: Any) -> Any:
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    ta, tb = top(a), top(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def _manifest(out: Path, **fields: Any) -> None:
    (out / MANIFEST).write_text(json.dumps({**fields, "exported_by": "python -m lib export-onnx"}, indent=2) + "\n")


def _place(partial: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def export(source: str, out: Path, model_id: str, int8: bool) -> int:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" would draw a bar with carriage returns into the output
    started = time.monotonic()
    st = SentenceTransformer(source, device="cpu")
    texts = parity_corpus()
    reference = st.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    out = out.resolve()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write_layout(st, partial)
        graph = partial / "onnx" / "model.onnx"
        _export_graph(st, graph)
        plain = graph.read_bytes()
        fused = _optimize(graph, st[0].auto_model.config)
        fp32 = _agreement(reference, OnnxModel(partial), texts)
        if fused and fp32["min_cosine"] < FP32_MIN_COSINE:  # the fusion changed the vectors: keep the plain graph
            print(f"note: the fused graph agreed only to {fp32['min_cosine']:.7f}; the plain graph is kept",
                  file=sys.stderr)
            graph.write_bytes(plain)
            fused = False
            fp32 = _agreement(reference, OnnxModel(partial), texts)
        worst = min(fp32["min_cosine"], fp32["batch_invariance_min_cosine"])
        print(f"fp32 parity with sentence-transformers on {len(texts)} texts: min cosine {fp32['min_cosine']:.7f}, "
              f"mean {fp32['mean_cosine']:.7f}; a text alone vs in a padded batch: min cosine "
              f"{fp32['batch_invariance_min_cosine']:.7f}" + (" (fused graph)" if fused else ""), file=sys.stderr)
        if worst < FP32_MIN_COSINE:
            print(f"error: the export does not reproduce sentence-transformers (at least {FP32_MIN_COSINE} needed); "
                  "nothing was written", file=sys.stderr)
            shutil.rmtree(partial, ignore_errors=True)
            return 1
        if not int8:
            _manifest(partial, model_id=model_id, variant="fp32", source=Path(source).name, fused=fused, parity=fp32)
            size = graph.stat().st_size
            _place(partial, out)
            print(f"done: {model_id} (fp32, {size / 1e6:.0f} MB) in {out}, "
                  f"{time.monotonic() - started:.0f} s", file=sys.stderr)
            return 0
        fp32_vectors, _ = OnnxModel(partial).encode(texts)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = partial / "onnx" / "model.int8.onnx"
        from onnx import TensorProto

        # The fused graph's contrib ops defeat shape inference: their outputs are float32, as the note says.
        logging.disable(logging.WARNING)  # its advice to pre-process, printed on every run through the root logger
        try:
            quantize_dynamic(str(graph), str(quantized), per_channel=True, weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
        quantized.replace(graph)
        int8_vectors, _ = OnnxModel(partial).encode(texts)
        cos = _cosines(int8_vectors, fp32_vectors)
        agreement = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                     "top10_neighbour_overlap": _neighbours(int8_vectors, fp32_vectors), "texts": len(texts)}
        print(f"int8 agreement with fp32 on {len(texts)} texts: mean cosine {agreement['mean_cosine']:.4f}, min "
              f"{agreement['min_cosine']:.4f}, top-10 neighbour overlap {agreement['top10_neighbour_overlap']:.2f} "
              "(a different vector space: served under its own model id)", file=sys.stderr)
        _manifest(partial, model_id=model_id, variant="int8", source=Path(source).name, fp32_parity=fp32,
                  int8_agreement=agreement)
        size = graph.stat().st_size
        _place(partial, out)
        print(f"done: {model_id} (int8, {size / 1e6:.0f} MB) in {out}, "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)
        return 0
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def main(out: str | None, source: str | None, model_id: str | None, int8: bool) -> int:
    from .config import DEFAULT_ONNX_DIR
    from .models import MINILM
    from .providers.local import available, model_source

    if not available():
        print("error: export-onnx needs the development requirements (torch, sentence-transformers): use "
              ".venv/bin/python, or pip install -e '.[local,onnx]' plus onnx", file=sys.stderr)
        return 2
    if source is None:
        source, model_id = model_source(MINILM), model_id or MINILM
    elif model_id is None:
        print("error: name the model id the directory will be served under with --model-id (the cache is keyed by "
              "it)", file=sys.stderr)
        return 2
    if int8 and "@int8" not in model_id:
        model_id += "@int8"  # a different vector space: a different model id, so the cache never mixes them
    target = Path(out or (DEFAULT_ONNX_DIR + ("-int8" if int8 else "")))
    return export(source, target, model_id, int8)
