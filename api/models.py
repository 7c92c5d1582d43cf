"""GET /v1/models and /v1/models/{id} (rewritten here by vercel.json), and /api/models."""

from lib.handler import ModelsEndpoint


class handler(ModelsEndpoint):
    pass
