"""Our onnx provider's model runner beside fastembed, on the same model directory, in one process (so both use the
same onnxruntime: the one fastembed installed, first on the path). `python bench/fastembed_side.py DIR REPEATS`
prints one JSON object: texts/s for each batch size and text length, ours and fastembed's, and their agreement."""

import json
import statistics
import sys
import time

sys.path.insert(1, __file__.rsplit("/bench/", 1)[0])

import numpy as np  # noqa: E402
from fastembed import TextEmbedding  # noqa: E402
from fastembed.common.model_description import ModelSource, PoolingType  # noqa: E402

from lib.providers.onnx import OnnxModel  # noqa: E402

directory, repeats = sys.argv[1], int(sys.argv[2])
TextEmbedding.add_custom_model(model="bench/minilm", pooling=PoolingType.MEAN, normalization=True,
                               sources=ModelSource(hf="bench/minilm"), dim=384, model_file="onnx/model.onnx")
theirs = TextEmbedding(model_name="bench/minilm", specific_model_path=directory)
ours = OnnxModel(directory)
short = [f"Sentence {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(256)]
long = [" ".join(f"word{i}x{j} about caching embeddings" for j in range(40)) for i in range(128)]


def passes(fns, pool, batch):
    """Texts/s of each function, measured in alternating passes (so the machine's drift falls on both alike)."""
    times = [[] for _ in fns]
    for n in range(repeats + 1):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            for i in range(0, len(pool), batch):
                fn(pool[i:i + batch], batch)
            if n:  # the first pass warms up
                times[k].append(time.perf_counter() - t)
    return [len(pool) / statistics.median(ts) for ts in times]


rows = []
for label, pool, batch in (("short, batch 1", short[:64], 1), ("short, batch 8", short, 8),
                           ("short, batch 32", short, 32), ("short, batch 128", short, 128),
                           ("~200-token, batch 32", long, 32)):
    a, b = passes([lambda texts, b: ours.encode(texts), lambda texts, b: list(theirs.embed(texts, batch_size=b))],
                  pool, batch)
    rows.append({"what": label, "ours": a, "fastembed": b})
import onnxruntime  # noqa: E402


def agreement(pool):
    got, _ = ours.encode(pool)
    return float((got * np.array(list(theirs.embed(pool)))).sum(1).min())


# fastembed truncates at 128 tokens on this directory (not at sentence_bert_config's 256): on long texts its
# vectors are not the model's, and it does half the work. The long row's agreement says so.
print(json.dumps({"rows": rows, "min_cosine": agreement(short[:32]), "long_min_cosine": agreement(long[:32]),
                  "onnxruntime": onnxruntime.__version__}))
