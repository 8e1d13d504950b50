"""A real HTTP server on loopback that answers from a script: the OpenAI-compatible client and the
/v1/completions engine adapter are tested against it (status codes, delays, bad bodies)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Script:
    """Per-path list of (status, body, delay_s) answers; the last one repeats."""

    def __init__(self):
        self.answers: dict[str, list[tuple[int, object, float]]] = {}
        self.seen: list[tuple[str, dict, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()


def make_server(script: Script) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null") if length else None
            with script.lock:
                script.seen.append((self.path, body, dict(self.headers)))
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
                queue = script.answers.get(self.path, [(404, {"error": "no such path"}, 0.0)])
                status, payload, delay = queue.pop(0) if len(queue) > 1 else queue[0]
            try:
                time.sleep(delay)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with script.lock:
                    script.in_flight -= 1

        do_POST = _answer
        do_GET = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture()
def served():
    script = Script()
    server = make_server(script)
    yield script, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
