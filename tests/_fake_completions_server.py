"""A real OpenAI-compatible HTTP server in its own process, for tests that kill, signal or refuse it.

    python tests/_fake_completions_server.py PORT_FILE LOG_FILE --ids 1,2,3 [--delay 0.3]
        [--max-model-len 4096] [--status 200]

``/v1/models`` reports ``max_model_len``; ``/v1/completions`` answers every request, after ``delay``
seconds, with the token ids ``ids`` (finish ``stop``), or with HTTP ``status`` when it is not 200. Each
completion request is appended to LOG_FILE as one JSON line (``user``: the routing key, ``max_tokens``,
``prompt_len``), so a test can tell which trajectories were requested and with which budget. The port
is written to PORT_FILE once the server listens.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port_file")
    ap.add_argument("log_file")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--status", type=int, default=200)
    args = ap.parse_args()
    ids = [int(x) for x in args.ids.split(",")]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status: int, payload: object) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "fake", "max_model_len": args.max_model_len}]})
            else:
                self._send(404, {"error": "no such path"})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not raw:  # the client went away before sending its body (it was killed)
                return
            body = json.loads(raw)
            with lock, open(args.log_file, "a") as log:
                entry = {
                    "user": body.get("user"),
                    "max_tokens": body.get("max_tokens"),
                    "prompt_len": len(body["prompt"]),
                }
                log.write(json.dumps(entry) + "\n")
            time.sleep(args.delay)
            if args.status != 200:
                self._send(args.status, {"error": {"message": "scripted failure"}})
                return
            answer = list(ids[: body.get("max_tokens") or len(ids)])
            self._send(
                200,
                {
                    "choices": [{"token_ids": answer, "text": "", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(answer)},
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
