"""Drive Vercel's real Python bridge (`vercel_runtime.vc_init`) from a test, under Python 3.12.

Run as: VENV312/bin/python tests/vercel_bridge.py, with `__VC_HANDLER_*` set for one
`api/*.py` file. Reads one JSON request per line on stdin ({method, path, headers, body}),
passes each through `vc_handler` exactly as Vercel does, and prints the result as one JSON line.
"""

import json
import sys

from vercel_runtime.vc_init import vc_handler

for line in sys.stdin:
    request = json.loads(line)
    result = vc_handler({"body": json.dumps(request)}, None)
    print("@@result " + json.dumps(result), flush=True)  # the runtime logs on stdout too
