"""Shared pytest fixtures: the tokenizers, one tiny model per session, one vLLM server per session.

Tokenizers (every format tag one token; the same vocabulary in all):

- ``tok`` / ``fmt``: the tiny tokenizer built in memory, and its TokenFormat: no model is built.
- ``tok_dir``: ``tok`` saved to a folder, for settings that name a tokenizer folder.
- ``tiny_tokenizer`` / ``tiny_fmt``: the tokenizer saved with the tiny model, for tests that serve or
  load that model (its ids then go through the model's own save/load path).

Models and servers:

- ``tiny_model_dir``: a tiny Qwen3-style model + tokenizer folder (built once, ~7 s).
- ``vllm_server``: ONE vLLM OpenAI-compatible server (CPU build here) serving the tiny model with
  prefix caching and cached-token reporting, started on first use (60-95 s on 2 cores) and shared
  by every test of the session. Tests using it are ``@pytest.mark.slow``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok():
    """The tiny tokenizer (every format tag one token), without building a model."""
    from threadweaver_verl.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tok_dir(tok, tmp_path_factory):
    """``tok`` saved to a folder (tokenizer files only); the folder's path as a string, as settings take it."""
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def fmt(tok):
    from threadweaver_verl.format import TokenFormat

    return TokenFormat.from_tokenizer(tok)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from threadweaver_verl.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tokenizer as saved with the tiny model (same vocabulary as ``tok``), for tests that serve or
    load that model: ids then go through the same save/load path as the model's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_fmt(tiny_tokenizer):
    from threadweaver_verl.format import TokenFormat

    return TokenFormat.from_tokenizer(tiny_tokenizer)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory):
    from threadweaver_verl.rollout.vllm_server import VLLMServer, VLLMServerConfig

    config = VLLMServerConfig(
        model=str(tiny_model_dir), work_dir=str(tmp_path_factory.mktemp("vllm")), max_model_len=4096
    )
    with VLLMServer(config) as server:
        yield server
