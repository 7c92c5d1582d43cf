"""One cold start, run in a fresh process: `python bench/coldstart.py import|request [body_file]`.

`import`: only imports the Vercel function. `request`: imports it and answers one request
through the handler class on a loopback socket, as Vercel's bridge does, then exits.
"""

import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

import api.embeddings  # noqa: E402

if sys.argv[1] == "request":
    import http.client
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), api.embeddings.handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = open(sys.argv[2], "rb").read()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    conn.request("POST", "/api/embeddings", body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    r.read()
    hits = r.getheader("x-cache-hits")
    assert r.status == 200 and hits == sys.argv[3], (r.status, hits)
