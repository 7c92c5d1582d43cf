"""POST /v1/embeddings (rewritten here by vercel.json) and /api/embeddings."""

from lib.handler import EmbeddingsEndpoint


class handler(EmbeddingsEndpoint):
    pass
