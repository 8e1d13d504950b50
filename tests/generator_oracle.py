"""An "oracle model" behind ``/v1/completions``: it plays back chosen trajectories, request by request,
exactly as fork/join inference asks for them (the random tiny model cannot write correct answers,
so stage 2's keep path is driven by this server; the junk path runs on real vLLM).

For each prompt it holds a list of candidates, one per sample: a valid response TEXT (replayed
through ``split_requests``, so each fork/join request gets the completion the trajectory has for
that context) or RAW completion ids returned for the first request as they are. The k-th request
carrying the bare prompt gets candidate k; later requests are matched by their context ids.
"""

from __future__ import annotations

import threading

from _scripted_openai import Status, TokenReply

from threadweaver_verl.data.chat import response_ids
from threadweaver_verl.format import split_requests


class Raw(list):
    """Completion ids returned as they are for the bare prompt (may be invalid or non-canonical)."""


class Oracle:
    def __init__(self, fmt, candidates: dict[tuple[int, ...], list]):
        self.fmt = fmt
        self.first: dict[tuple, list[list[int]]] = {}
        self.later: dict[tuple, list[int]] = {}
        self.counter: dict[tuple, int] = {}
        self.broken: set[tuple] = set()
        self.lock = threading.Lock()
        for prompt, cands in candidates.items():
            firsts = []
            for c in cands:
                if isinstance(c, Raw):
                    firsts.append(list(c))
                    continue
                reqs = split_requests(list(prompt), response_ids(fmt, c), fmt)
                firsts.append(list(reqs[0].completion_ids))
                for r in reqs[1:]:
                    prev = self.later.setdefault(r.context_ids, list(r.completion_ids))
                    assert prev == list(r.completion_ids), "two candidates disagree after one shared context"
            self.first[tuple(prompt)] = firsts

    def __call__(self, body: dict, attempt: int):
        ctx = tuple(body["prompt"])
        with self.lock:
            if ctx in self.broken:
                return Status(400, '{"error": {"message": "oracle: this prompt is broken"}}')
            if ctx in self.first:
                k = self.counter.get(ctx, 0)
                self.counter[ctx] = k + 1
                ids = self.first[ctx][k % len(self.first[ctx])]
            elif ctx in self.later:
                ids = self.later[ctx]
            else:
                return Status(400, '{"error": {"message": "oracle: unknown context"}}')
        if len(ids) > body["max_tokens"]:
            return TokenReply(ids[: body["max_tokens"]], "length")
        return TokenReply(ids, "stop" if ids and ids[-1] in body["stop_token_ids"] else "length")
