"""GET /api/health: provider, model, cache backend, and whether the cache answers. No secrets."""

from lib.handler import HealthEndpoint


class handler(HealthEndpoint):
    pass
