"""Launch a vLLM OpenAI-compatible server for a local model folder, as a context manager.

    with VLLMServer(VLLMServerConfig(model="runs/tiny")) as server:
        engine = OpenAICompletionsEngine(base_url=server.url)
        ...

It picks a free port on 127.0.0.1, turns on prefix caching and cached-token
reporting (``--enable-prefix-caching --enable-prompt-tokens-details``), runs in
eager mode by default, keeps every cache (torch inductor, vLLM) and the server
log inside ``work_dir``, waits for ``/health`` (failing with the log's tail if
the server dies or does not come up in time) and stops the server's whole
process group with SIGTERM on exit (SIGKILL if it lingers).

On a CPU build of vLLM, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set from
``kv_cache_space_gib`` unless the environment already sets it, and the engine core
is kept off the API server's core (``separate_engine_core``). Scripts that
start a server need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health in time."""


@dataclass
class VLLMServerConfig:
    """How to launch ``python -m vllm.entrypoints.openai.api_server``."""

    model: str = ""
    """Local HF model folder (tokenizer included)."""
    host: str = "127.0.0.1"
    """Interface to bind; loopback by default."""
    port: int = 0
    """0 = pick a free port."""
    served_model_name: str | None = None
    """Name clients send as ``model``; None: the folder path (clients may also omit ``model``)."""
    max_model_len: int | None = None
    """Context length; None: the model's own."""
    dtype: str = "auto"
    """``auto``, ``float32``, ``bfloat16``, ..."""
    enforce_eager: bool = True
    """No graph capture / compilation: fastest start-up (minutes saved on CPU)."""
    kv_cache_space_gib: float = 2.0
    """CPU builds only: ``VLLM_CPU_KVCACHE_SPACE`` unless already set in the environment."""
    gpu_memory_utilization: float | None = None
    """GPU builds: vLLM's ``--gpu-memory-utilization``; None: vLLM's default."""
    max_num_seqs: int | None = None
    """Most sequences scheduled at once; None: vLLM's default."""
    startup_timeout_s: float = 600.0
    """Seconds to wait for /health (a CPU start takes 60-95 s on 2 cores)."""
    extra_args: list[str] = field(default_factory=list)
    """More command-line arguments for the server, as is."""
    work_dir: str | None = None
    """Folder for the server log and caches; None: a fresh temporary folder (removed on exit)."""
    separate_engine_core: bool = True
    """CPU builds: once the server is up, pin vLLM's busy-waiting engine core beside its worker and the API
    server onto the cores left (:mod:`threadweaver_verl.rollout.cpu_affinity`; 6.6x faster fork/join at 16
    in flight on 2 cores). No effect where vLLM does not bind its worker to a subset of the cores (GPUs)."""
    weight_reload: bool = False
    """Allow :meth:`VLLMServer.reload_weights` (serve another checkpoint of the same architecture without a
    restart). It turns on vLLM's development endpoints (``VLLM_SERVER_DEV_MODE=1``): loopback use only."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class VLLMServer:
    """A running vLLM server (see the module doc). ``url`` is the server root (no ``/v1``)."""

    def __init__(self, config: VLLMServerConfig | str | os.PathLike, **overrides: Any):
        if not isinstance(config, VLLMServerConfig):
            config = VLLMServerConfig(model=str(config))
        if overrides:
            config = VLLMServerConfig(**{**config.__dict__, **overrides})
        if not config.model or not Path(config.model).is_dir():
            raise FileNotFoundError(
                f"model folder {config.model!r} not found; pass a local HF model folder "
                "(e.g. build one with `python -m threadweaver_verl tiny-model --out DIR`)"
            )
        self.config = config
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.port = config.port or free_port(config.host)
        self.url = f"http://{config.host}:{self.port}"
        self.work_dir: Path | None = None
        self.log_path: Path | None = None
        self.core_plan = None
        """The cores the engine core and the API server were pinned to (``separate_engine_core``), or None."""

    def command(self) -> list[str]:
        c = self.config
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(c.model),
            "--host",
            c.host,
            "--port",
            str(self.port),
            "--dtype",
            c.dtype,
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
        ]
        if c.served_model_name:
            cmd += ["--served-model-name", c.served_model_name]
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        if c.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.max_num_seqs:
            cmd += ["--max-num-seqs", str(c.max_num_seqs)]
        return cmd + list(c.extra_args)

    def environment(self, work: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.config.kv_cache_space_gib:g}")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
        env.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.config.weight_reload:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    def start(self) -> VLLMServer:
        if self.config.work_dir:
            work = Path(self.config.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="threadweaver-vllm-")
            work = Path(self._tmp.name)
        self.work_dir = work
        self.log_path = work / f"vllm-{self.port}.log"
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(work), start_new_session=True
            )
        finally:
            log.close()
        try:
            self._wait_healthy()
            if self.config.separate_engine_core:
                from threadweaver_verl.rollout.cpu_affinity import separate_engine_core

                self.core_plan = separate_engine_core(self.process.pid)
        except ServerStartError as e:
            kept = self._keep_log()
            self.stop()
            raise ServerStartError(f"{e} Log {kept}, last lines:\n{_tail(kept)}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def _keep_log(self) -> Path:
        """The server log, at a path that outlives :meth:`stop`: a log inside a temporary ``work_dir`` is
        copied next to that folder first (``threadweaver-vllm-<port>.log`` in the system temp folder)."""
        assert self.log_path is not None
        if self._tmp is None:
            return self.log_path
        kept = Path(tempfile.gettempdir()) / f"threadweaver-vllm-{self.port}.log"
        try:
            shutil.copyfile(self.log_path, kept)
        except OSError:
            return self.log_path
        return kept

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll() if self.process else -1
                if code is not None:
                    raise ServerStartError(
                        f"vLLM server for {self.config.model} exited with code {code} before it was ready."
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"vLLM server for {self.config.model} did not answer {self.url}/health within "
                        f"{self.config.startup_timeout_s:g} s (raise startup_timeout_s on a slow machine)."
                    )
                time.sleep(1.0)

    def stop(self, grace_s: float = 30.0) -> None:
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def reload_weights(self, model_dir: str | os.PathLike, timeout_s: float = 600.0) -> None:
        """Load the weights of ``model_dir`` (an HF folder or ``checkpoint-N`` of the same architecture and
        tokenizer) into the running server, and empty its prefix cache (cached KV came from the old weights)."""
        if not self.config.weight_reload:
            raise RuntimeError(
                "this server was started without weight_reload=True; start it with "
                "VLLMServerConfig(weight_reload=True) to reload weights in place"
            )
        if self.process is None:
            raise RuntimeError("the server is not running; start() it first")
        path = Path(model_dir)
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors weights in {path}; pass an HF model or checkpoint folder")
        with httpx.Client(timeout=timeout_s) as client:
            for endpoint, body in (
                ("collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path.resolve())}}),
                ("reset_prefix_cache", None),
            ):
                reply = client.post(f"{self.url}/{endpoint}", json=body)
                if reply.status_code != 200:
                    raise RuntimeError(
                        f"vLLM /{endpoint} failed with HTTP {reply.status_code} while loading "
                        f"{path}: {reply.text[:500]}. Log {self.log_path}"
                    )

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
