"""Real SGLang 0.5.23 servers for the tests (the environment `make sglang` builds).

    servers = start_real_servers({"a": (model_dir, []), "w": (model_dir, ["--api-key", K])}, logs)
    servers["a"].url

`start_real_servers` launches every server at once through `tools/sglang_cpu_server.sh`
(each start costs ~20-40 s of CPU on 2 cores, so they overlap) and waits until each is
ready. A server runs in its own process group under coreutils `timeout` (it dies even if
pytest is killed) and `stop()` ends the whole group. Every server writes the calls of the
`sgl_kernel` stand-in to `kernel_log` (see `patches/sglang_cpu/sgl_kernel`).

Without `.venv-sglang` the tests that need a server skip, naming `make sglang`; under
`make test` (`MOPD_REQUIRE_SGLANG=1`) they fail instead, so CI cannot pass without them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

import httpx
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGLANG_VENV = os.environ.get("SGLANG_VENV", os.path.join(REPO, ".venv-sglang"))
SERVER_SCRIPT = os.path.join(REPO, "tools", "sglang_cpu_server.sh")
HARD_TIMEOUT_S = 3600  # a server never outlives this
START_TIMEOUT_S = 300


def sglang_available() -> str | None:
    """None if the SGLang environment is there, else why not."""
    if not os.path.isfile(os.path.join(SGLANG_VENV, ".installed")):
        return f"real SGLang is not installed at {SGLANG_VENV}: run `make sglang`"
    return None


def require_sglang() -> None:
    """Skip (or, under `make test`, fail) when real SGLang is missing."""
    why = sglang_available()
    if why is None:
        return
    if os.environ.get("MOPD_REQUIRE_SGLANG") == "1":
        pytest.fail(why)
    pytest.skip(why)


@dataclass
class RealServer:
    """One `tools/sglang_cpu_server.sh` process group."""

    name: str
    model_dir: str
    port: int
    log_path: str
    kernel_log: str
    api_key: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, extra: list[str]) -> None:
        env = dict(os.environ, SGLANG_VENV=SGLANG_VENV, MOPD_SGL_KERNEL_LOG=self.kernel_log)
        env.setdefault("OMP_NUM_THREADS", "1")
        argv = ["timeout", "-k", "10", str(HARD_TIMEOUT_S), "bash", SERVER_SCRIPT]
        argv += ["--model-path", self.model_dir, "--port", str(self.port), *extra]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def wait_ready(self, deadline: float) -> None:
        """Until the script prints that the server is ready; fail with its log's end."""
        while time.monotonic() < deadline:
            if "sglang: ready at" in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = self.output()[-3000:]
        self.stop()
        raise RuntimeError(f"SGLang server {self.name} did not start:\n{tail}")

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=60, **kw)

    def post(self, path: str, body: dict | None = None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=120, **kw)

    def terminate(self) -> None:
        """SIGTERM to the process group (the script stops the server)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, wait: float = 20) -> None:
        """SIGTERM to the process group, then SIGKILL to what is left of it."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
        # the server's children (scheduler, detokenizer) share the group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        self.proc = None


def stop_all(servers) -> None:
    """Stop several servers at once."""
    for srv in servers:
        srv.terminate()
    for srv in servers:
        srv.stop()


def start_real_servers(
    specs: dict[str, tuple[str, list[str]]], log_dir: str, ports: dict[str, int]
) -> dict[str, RealServer]:
    """Start one real SGLang server per entry `name -> (model folder, extra flags)`, all at
    once, and wait for every one. `--api-key K` among the flags is remembered."""
    servers: dict[str, RealServer] = {}
    try:
        for name, (model_dir, extra) in specs.items():
            key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
            srv = RealServer(
                name,
                model_dir,
                ports[name],
                os.path.join(log_dir, f"sglang_{name}.log"),
                os.path.join(log_dir, f"sgl_kernel_{name}.log"),
                api_key=key,
            )
            srv.start(extra)
            servers[name] = srv
        deadline = time.monotonic() + START_TIMEOUT_S
        for srv in servers.values():
            srv.wait_ready(deadline)
    except BaseException:
        stop_all(servers.values())
        raise
    return servers


def kernel_stub_calls(servers: dict[str, RealServer]) -> list[str]:
    """The `sgl_kernel` stand-in's stubs that any server called (should be none)."""
    calls = []
    for srv in servers.values():
        if os.path.exists(srv.kernel_log):
            with open(srv.kernel_log) as f:
                calls += [f"{srv.name}: {line.strip()}" for line in f if "called-stub" in line]
    return calls
