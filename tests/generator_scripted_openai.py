"""A real HTTP server on loopback that speaks OpenAI's API with scripted answers.

``/v1/chat/completions`` (stage 1's LLM) and ``/v1/completions`` with token-id
prompts (stage 2's engine) each get a ``script(body, attempt) -> Action``
function; ``attempt`` counts
how often this exact request body was received before (0 for the first time),
so "fail once, then answer" behaviours are deterministic under any concurrency.

Actions: :class:`Reply` (a chat completion), :class:`TokenReply` (a token-id
completion), :class:`Status` (an HTTP error
such as 429 or 500) and :class:`Slow` (sleep, then perform another action; with
a sleep longer than the client's timeout it is a timeout).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Union


@dataclass
class Reply:
    content: str
    finish_reason: str = "stop"
    prompt_tokens: int = 100
    completion_tokens: int = 20


@dataclass
class TokenReply:
    token_ids: list
    finish_reason: str = "stop"


@dataclass
class Status:
    code: int
    body: str = '{"error": {"message": "scripted failure"}}'


@dataclass
class Slow:
    seconds: float
    then: Action = field(default_factory=lambda: Status(500))


Action = Union[Reply, TokenReply, Status, Slow]


def body_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class ScriptedOpenAI:
    def __init__(
        self,
        script: Callable[[dict, int], Action] | None = None,
        completions: Callable[[dict, int], Action] | None = None,
    ):
        self.scripts = {"/v1/chat/completions": script, "/v1/completions": completions}
        self.lock = threading.Lock()
        self.received: list[dict] = []  # every request body, in arrival order
        self.statuses: list[int] = []  # every status sent (200 for replies)
        self._seen: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                route = owner.scripts.get(self.path.rstrip("/"))
                if route is None:
                    return self._send(404, '{"error": "unknown path"}')
                with owner.lock:
                    key = body_key(body)
                    attempt = owner._seen.get(key, 0)
                    owner._seen[key] = attempt + 1
                    owner.received.append(body)
                action = route(body, attempt)
                while isinstance(action, Slow):
                    time.sleep(action.seconds)
                    action = action.then
                if isinstance(action, Status):
                    return self._send(action.code, action.body)
                if isinstance(action, TokenReply):
                    ids = list(action.token_ids)
                    answer = {
                        "id": f"cmpl-{len(owner.received)}",
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": "", "token_ids": ids, "finish_reason": action.finish_reason}],
                        "usage": {"prompt_tokens": len(body.get("prompt") or []), "completion_tokens": len(ids)},
                    }
                    return self._send(200, json.dumps(answer))
                answer = {
                    "id": f"chatcmpl-{len(owner.received)}",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": action.finish_reason,
                            "message": {"role": "assistant", "content": action.content},
                        }
                    ],
                    "usage": {
                        "prompt_tokens": action.prompt_tokens,
                        "completion_tokens": action.completion_tokens,
                        "total_tokens": action.prompt_tokens + action.completion_tokens,
                    },
                }
                self._send(200, json.dumps(answer))

            def _send(self, code: int, text: str):
                data = text.encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                with owner.lock:
                    owner.statuses.append(code)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ScriptedOpenAI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
