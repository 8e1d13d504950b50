"""A real HTTP server on loopback that speaks OpenAI's API with scripted answers: the client, the
/v1/completions engine adapter and the data generator's stages are tested against it.

Each route (``/v1/chat/completions`` for stage 1's LLM, ``/v1/completions`` with token-id prompts for
the engine and stage 2) gets a ``script(body, attempt) -> Action`` function; ``attempt`` counts how
often this exact request body was received before (0 for the first time), so "fail once, then answer"
behaviours are deterministic under any concurrency. :func:`in_order` makes a script from a list of
actions (the last one repeats).

Actions: :class:`Reply` (a chat completion), :class:`TokenReply` (a token-id completion, with one
log-prob per token when the request asks for them, as vLLM answers), :class:`Answer` (any JSON body,
or text, with any status), :class:`Status` (an HTTP error such as 429 or 500) and :class:`Slow`
(sleep, then perform another action; with a sleep longer than the client's timeout it is a timeout).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
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
class Answer:
    body: object  # JSON-encoded unless it is a str (sent as it is)
    status: int = 200


@dataclass
class Status:
    code: int
    body: str = '{"error": {"message": "scripted failure"}}'
    retry_after_s: float | None = 0.01
    """Sent as ``Retry-After-Ms`` (the client waits that long before its retry); None: no header, the
    client's own backoff applies."""


@dataclass
class Slow:
    seconds: float
    then: Action = field(default_factory=lambda: Status(500))


Action = Union[Reply, TokenReply, Answer, Status, Slow]
Script = Callable[[dict, int], Action]


@dataclass
class Request:
    path: str
    body: dict
    headers: Message  # case-insensitive lookup


def in_order(*actions: Action) -> Script:
    """A script answering with ``actions`` one after another, whatever the body; the last one repeats."""
    queue = list(actions)
    lock = threading.Lock()

    def script(body: dict, attempt: int) -> Action:
        with lock:
            return queue.pop(0) if len(queue) > 1 else queue[0]

    return script


def body_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _completion(body: dict, action: TokenReply, n: int) -> dict:
    ids = list(action.token_ids)
    choice = {"index": 0, "text": "", "token_ids": ids, "finish_reason": action.finish_reason}
    if body.get("logprobs") is not None:
        choice["logprobs"] = {"token_logprobs": [-1.0] * len(ids)}
    return {
        "id": f"cmpl-{n}",
        "object": "text_completion",
        "created": 0,
        "model": body.get("model") or "scripted",
        "choices": [choice],
        "usage": {
            "prompt_tokens": len(body.get("prompt") or []),
            "completion_tokens": len(ids),
            "total_tokens": len(body.get("prompt") or []) + len(ids),
        },
    }


def _chat_completion(body: dict, action: Reply, n: int) -> dict:
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": 0,
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


class ScriptedOpenAI:
    """``with ScriptedOpenAI(chat_script, completions_script) as server:`` ... ``server.url`` ends in ``/v1``."""

    def __init__(self, script: Script | None = None, completions: Script | None = None):
        self.scripts = {"/v1/chat/completions": script, "/v1/completions": completions}
        self.lock = threading.Lock()
        self.requests: list[Request] = []  # every request, in arrival order
        self.statuses: list[int] = []  # every status sent (200 for replies)
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                route = owner.scripts.get(self.path.rstrip("/"))
                with owner.lock:
                    key = body_key(body)
                    attempt = owner._seen.get(key, 0)
                    owner._seen[key] = attempt + 1
                    owner.requests.append(Request(self.path, body, self.headers))
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    if route is None:
                        return self._send(404, '{"error": "unknown path"}')
                    action = route(body, attempt)
                    while isinstance(action, Slow):
                        time.sleep(action.seconds)
                        action = action.then
                    n = len(owner.requests)
                    if isinstance(action, Status):
                        headers = {}
                        if action.retry_after_s is not None:
                            headers["Retry-After-Ms"] = f"{action.retry_after_s * 1000:g}"
                        self._send(action.code, action.body, headers)
                    elif isinstance(action, Answer):
                        text = action.body if isinstance(action.body, str) else json.dumps(action.body)
                        self._send(action.status, text)
                    elif isinstance(action, TokenReply):
                        self._send(200, json.dumps(_completion(body, action, n)))
                    else:
                        self._send(200, json.dumps(_chat_completion(body, action, n)))
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def _send(self, code: int, text: str, headers: dict[str, str] | None = None):
                data = text.encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
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

    @property
    def received(self) -> list[dict]:
        """Every request body, in arrival order."""
        return [r.body for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ScriptedOpenAI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
