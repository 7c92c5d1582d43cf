"""Sentence-transformers models exported to ONNX, run by ONNX Runtime in this process: no torch, no key, no bill.

A model directory has the layout the ecosystem uses (what `python -m lib export-onnx` writes, and what
sentence-transformers' own `backend="onnx"` reads): `onnx/model.onnx` (or `model.onnx`), `tokenizer.json`,
`tokenizer_config.json`, `config.json`, `modules.json`, `1_Pooling/config.json` and `sentence_bert_config.json`
where present. Pooling (mean, CLS, last token, max), normalisation and the maximum sequence length come from those
files, never from code per model. Everything about a directory is checked when it is loaded, once per process, so
a bad directory is one configuration error at start naming the file, never a traceback per request.

Only onnxruntime, `tokenizers` and numpy are imported, and only when a model is loaded.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..deadline import Deadline
from ..errors import ProviderError
from ..models import ModelSpec
from .base import Batch, Item, chunk_by_limits

BATCH_SIZE = 32  # texts per run of the model (sorted by length first, so each is padded to similar lengths)
PLAN_SIZE = 256  # texts per batch handed over by the service (cached as each lands)
POOLING = ("mean", "cls", "lasttoken", "max")
# The id a directory claims, and what the export knows of it, are written beside the model by the export.
MANIFEST = "embeddings-cache.json"


@dataclass(frozen=True)
class Layout:
    """What a model directory says about how to turn the transformer's output into one vector per text."""

    pooling: str  # one of POOLING
    normalize: bool
    max_length: int  # tokens, [CLS] and [SEP] included
    lowercase: bool
    dimensions: int | None  # from 1_Pooling/config.json, when it says


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def model_file(directory: Path) -> Path:
    for candidate in (directory / "onnx" / "model.onnx", directory / "model.onnx"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{directory}: no model file (onnx/model.onnx or model.onnx)")


def pooling_mode(config: Mapping[str, Any], path: Path) -> str:
    """sentence-transformers 6 writes {"pooling_mode": "cls"}; models on the hub say pooling_mode_cls_token: true."""
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"].replace("_token", "").replace("mean_tokens", "mean")]
    else:
        names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_lasttoken": "lasttoken", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens":
                 "weightedmean"}
        modes = [mode for key, mode in names.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING:
        raise ConfigError(f"{path}: pooling {modes or 'none'} is not supported (one of {', '.join(POOLING)})")
    return modes[0]


def read_layout(directory: Path) -> Layout:
    """Pooling, normalisation and length limit, from the directory's files (the model's own configuration)."""
    modules_path = directory / "modules.json"
    pooling, normalize, dimensions = "mean", False, None
    if modules_path.is_file():
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise ConfigError(f"{modules_path}: expected a list of modules")
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
            if kind == "Transformer":
                continue
            if kind == "Pooling":
                pool_path = directory / module.get("path", "1_Pooling") / "config.json"
                pool = _read_json(pool_path)
                pooling = pooling_mode(pool, pool_path)
                dims = pool.get("word_embedding_dimension") or pool.get("embedding_dimension")
                dimensions = int(dims) if isinstance(dims, int) else None
            elif kind == "Normalize":
                normalize = True
            else:  # a Dense layer, say: its weights are not in the ONNX graph, and a guess would be a wrong vector
                raise ConfigError(f"{modules_path}: module {module.get('type')!r} is not supported")
    else:  # a bare transformer export: the hub's convention for sentence embeddings
        pool_path = directory / "1_Pooling" / "config.json"
        if pool_path.is_file():
            pool = _read_json(pool_path)
            pooling = pooling_mode(pool, pool_path)
    limits = []
    sbert_path = directory / "sentence_bert_config.json"
    lowercase = False
    if sbert_path.is_file():
        sbert = _read_json(sbert_path)
        lowercase = bool(sbert.get("do_lower_case"))
        if isinstance(sbert.get("max_seq_length"), int):
            limits.append(sbert["max_seq_length"])
    if not limits:  # what sentence-transformers falls back to: the tokenizer's and the position table's limits
        tok_config = directory / "tokenizer_config.json"
        tok_limit = _read_json(tok_config).get("model_max_length") if tok_config.is_file() else None
        if isinstance(tok_limit, int):
            limits.append(tok_limit)
        config = _read_json(directory / "config.json")
        if isinstance(config.get("max_position_embeddings"), int):
            # RoBERTa-family position ids start after the padding id: two positions fewer are usable.
            offset = 2 if config.get("model_type") in ("roberta", "xlm-roberta", "camembert") else 0
            limits.append(config["max_position_embeddings"] - offset)
    if not limits:
        raise ConfigError(f"{directory}: no maximum sequence length (sentence_bert_config.json max_seq_length)")
    return Layout(pooling, normalize, min(limits), lowercase, dimensions)


class OnnxModel:
    """One model directory, loaded: its tokenizer, its ONNX Runtime session (one per process, shared by request
    threads) and its layout. Construction checks everything; `encode` then cannot fail on the directory."""

    def __init__(self, directory: str | Path, *, threads: int | None = None) -> None:
        import numpy as np

        self._np = np
        self._lock = threading.Lock()
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"{self.directory}: not a directory")
        self.layout = read_layout(self.directory)
        self.tokenizer, self.pad_id = self._tokenizer()
        self.path = model_file(self.directory)
        self.session = self._session(threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        output = self.session.get_outputs()[0]
        if len(output.shape) not in (2, 3):
            raise ConfigError(f"{self.path}: the model's output {output.name!r} has {len(output.shape)} dimensions; "
                              "expected 3 (token embeddings, pooled here) or 2 (one vector per text)")
        # One real run now: a tokenizer that does not match the model (ids beyond its vocabulary) fails here.
        try:
            probe = self._infer(self.tokenize(["probe"]))
        except Exception as exc:
            raise ConfigError(f"{self.path}: the model does not run on the tokens of "
                              f"{self.directory / 'tokenizer.json'} ({type(exc).__name__}: {str(exc)[:200]})") from None
        self.dimensions = int(probe.shape[1])
        if self.layout.dimensions is not None and self.layout.dimensions != self.dimensions:
            raise ConfigError(f"{self.path}: vectors of {self.dimensions} dimensions, but 1_Pooling/config.json says "
                              f"{self.layout.dimensions}")

    def _tokenizer(self) -> tuple[Any, int]:
        from tokenizers import Tokenizer

        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{path}: missing")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ConfigError(f"{path}: not a tokenizer ({str(exc)[:200]})") from None
        # The packaged tokenizer.json carries truncation at 128 and fixed padding to 128: truncation at the model's
        # own limit, and padding to each run's longest text (done here), are what sentence-transformers does.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.layout.max_length)
        pad_id = 0
        config_path = self.directory / "tokenizer_config.json"
        if config_path.is_file():
            token = _read_json(config_path).get("pad_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                pad_id = tokenizer.token_to_id(token)  # XLM-R pads with id 1
        return tokenizer, pad_id

    def _session(self, threads: int | None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Every core this process may use, for one run at a time (fewer threads than cores costs about 40 %).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        options.intra_op_num_threads = threads or cores
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(str(self.path), options, providers=_providers(ort))
        except Exception as exc:
            raise ConfigError(f"{self.path}: not a model ONNX Runtime can load ({str(exc)[:200]})") from None

    def tokenize(self, texts: Sequence[str]) -> list[Any]:
        """Each text's encoding, truncated at the model's limit and not padded."""
        if self.layout.lowercase:
            texts = [t.lower() for t in texts]
        return self.tokenizer.encode_batch(list(texts))

    def _infer(self, encodings: Sequence[Any]) -> Any:
        """One run of the model over encodings padded to the longest of them: float32 vectors, one row each."""
        np = self._np
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
        # The feed is built from the session's own input names: XLM-R models take no token_type_ids.
        feed = {name: value for name, value in (("input_ids", ids), ("attention_mask", mask),
                                                ("token_type_ids", types)) if name in self.inputs}
        out = self.session.run(None, feed)[0].astype(np.float32, copy=False)
        if out.ndim == 3:
            out = _pool(np, out, mask, self.layout.pooling)
        if self.layout.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def encode(self, texts: Sequence[str], deadline: Deadline | None = None) -> tuple[Any, int]:
        """Vectors for `texts` (float32, input order) and the tokens the model read. Texts are sorted by length
        and run BATCH_SIZE at a time, each run padded to its own longest text (a mixed batch padded to its
        longest costs up to twice as much); the deadline is checked between runs."""
        np = self._np
        encodings = self.tokenize(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        with self._lock:  # one run at a time, on every core
            for start in range(0, len(order), BATCH_SIZE):
                if deadline is not None and deadline.expired():
                    raise ProviderError(504, "The ONNX model ran out of this request's time", retryable=False,
                                        code="provider_timeout")
                group = order[start:start + BATCH_SIZE]
                out[group] = self._infer([encodings[i] for i in group])
        return out, sum(len(e.ids) for e in encodings)


def _pool(np: Any, tokens: Any, mask: Any, pooling: str) -> Any:
    """sentence-transformers' pooling over token embeddings [batch, tokens, hidden], padding masked out."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "lasttoken":  # right padding: the last real token of each row
        return tokens[np.arange(len(tokens)), mask.sum(axis=1) - 1]
    weights = mask[:, :, None].astype(np.float32)
    if pooling == "max":
        return np.where(weights > 0, tokens, -1e9).max(axis=1)
    return (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _providers(ort: Any) -> list[str]:
    """CUDA where onnxruntime-gpu offers it (EMBEDDINGS_ONNX_DEVICE=cpu turns it off), else the CPU."""
    available = ort.get_available_providers()
    if os.environ.get("EMBEDDINGS_ONNX_DEVICE", "").strip().lower() != "cpu" and \
            "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def available() -> bool:
    """Whether onnxruntime and tokenizers are installed (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "tokenizers"))


def claimed_id(directory: Path) -> str | None:
    """The model id a directory's manifest (written by the export) gives, if any."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    model_id = _read_json(path).get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"{path}: no model_id")
    return model_id


class OnnxProvider:
    """Serves every configured model directory under its model id. Each is loaded and checked at start (a
    directory that claims a built-in model id must reproduce that model's reference vectors)."""

    name = "onnx"
    concurrency = 1  # one run at a time uses every core already

    def __init__(self, directories: Mapping[str, str], *, threads: int | None = None) -> None:
        from .reference import verify

        if not available():
            raise ConfigError("EMBEDDINGS_PROVIDER=onnx needs onnxruntime and tokenizers (pip install "
                              "-r requirements.onnx.txt, or pip install -e '.[onnx]')")
        self.models: dict[str, OnnxModel] = {}
        for model_id, directory in directories.items():
            model = OnnxModel(directory, threads=threads)
            verify(model_id, model)
            self.models[model_id] = model

    def specs(self) -> dict[str, tuple[int, int]]:
        """Model id -> (dimensions, maximum tokens), for the registry."""
        return {mid: (m.dimensions, m.layout.max_length) for mid, m in self.models.items()}

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        return {}

    def plan(self, items: Sequence[Item], model: ModelSpec) -> list[list[int]]:
        return chunk_by_limits(items, PLAN_SIZE, 10**9)

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        texts = [x for x in items if isinstance(x, str)]
        if len(texts) != len(items):
            raise ProviderError(400, "Token-id inputs are only accepted by OpenAI models", retryable=False,
                                code="invalid_input", type="invalid_request_error")
        array, tokens = self.models[model.id].encode(texts, deadline)
        array = array.astype("<f4", copy=False)
        return Batch([row.tobytes() for row in array], tokens)
