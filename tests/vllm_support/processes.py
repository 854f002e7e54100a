"""Real vLLM server processes for tests and benchmarks: start, wait until healthy, stop by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from workers.engines.vllm.launch import VllmLaunchSpec, private_rpc_dir, vllm_command


class VllmServer:
    """One ``python -m vllm.entrypoints.openai.api_server`` in its own process group.

    vLLM spawns its EngineCore and worker as children; they share the group, so stopping the group
    stops exactly what this started.
    """

    def __init__(
        self,
        name: str,
        spec: VllmLaunchSpec,
        *,
        python: Path,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: more environment (e.g. the keys its KV connector authenticates with)."""
        self.name = name
        self.spec = spec
        self.url = f"http://127.0.0.1:{spec.port}"
        self.log_path = log_dir / f"vllm-{name}.log"
        self.rpc_dir = private_rpc_dir()
        argv, env = vllm_command(
            spec, python=str(python), base_env={**os.environ, **(env or {})}, rpc_dir=self.rpc_dir
        )
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40, *, notable_only: bool = False) -> str:
        """The last ``lines`` of its log, without the access lines of metrics scrapes (which
        otherwise fill the tail of a server that is being watched); ``notable_only``: without
        vLLM's INFO lines either (warnings, errors, tracebacks and the connector's own lines)."""
        text = self.log_path.read_text(errors="replace").splitlines()
        kept = [
            line for line in text if '"GET /metrics ' not in line and not (notable_only and " INFO " in line)
        ]
        return "\n".join(kept[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Children may outlive the server for a moment; the group id is still ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.rpc_dir, ignore_errors=True)


def wait_healthy(servers: Iterable[VllmServer], timeout_s: float = 300.0) -> None:
    """Block until every server answers /health; raise with its log if one dies or time runs out."""
    pending = list(servers)
    deadline = time.monotonic() + timeout_s
    while pending:
        for server in list(pending):
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM {server.name} exited ({server.proc.returncode}):\n{server.log_tail()}"
                )
            if server.healthy():
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(
                f"vLLM {[s.name for s in pending]} not healthy in {timeout_s}s:\n{pending[0].log_tail()}"
            )
        time.sleep(0.5)
