"""GET /api/openapi.json (rewritten here by vercel.json): the endpoint's OpenAPI document."""

from lib.handler import OpenAPIEndpoint


class handler(OpenAPIEndpoint):
    pass
