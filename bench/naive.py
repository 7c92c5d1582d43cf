"""The naive design the product replaces, for comparison on the same Postgres and PostgREST.

The old "cached external service": vectors stored as jsonb, one select (one PostgREST call)
per text, JSON floats parsed and written back out. Run as
`python -m bench.naive PORT POSTGREST_URL KEY`; serves POST /v1/embeddings for cached texts only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
from array import array

import httpx

from tests.loopback import QuietHandler, serve

SQL = """
create table if not exists public.naive_cache (hash text primary key, embedding jsonb not null);
create or replace function public.naive_get(h text) returns jsonb language sql stable set search_path = ''
  as $$ select embedding from public.naive_cache where hash = h $$;
revoke all on function public.naive_get(text) from public, anon, authenticated;
grant execute on function public.naive_get(text) to service_role;
grant select on public.naive_cache to service_role;
"""


def main() -> None:
    port, rest, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    client = httpx.Client(base_url=rest, headers={"apikey": key, "Authorization": f"Bearer {key}"})

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.send(200, b"{}")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = []
            for i, text in enumerate(texts):
                h = hashlib.sha256(text.encode()).hexdigest()
                vec = client.post("/rest/v1/rpc/naive_get", json={"h": h}).json()
                emb = (base64.b64encode(array("f", vec).tobytes()).decode()
                       if body.get("encoding_format") == "base64" else vec)
                data.append({"object": "embedding", "index": i, "embedding": emb})
            out = {"object": "list", "data": data, "model": body.get("model", "text-embedding-3-small"),
                   "usage": {"prompt_tokens": 0, "total_tokens": 0}}
            self.send(200, json.dumps(out).encode())

    serve(Handler, port)
    threading.Event().wait()  # the server runs in its thread until this process is killed


if __name__ == "__main__":
    main()
