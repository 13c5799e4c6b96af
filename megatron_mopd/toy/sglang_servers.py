"""Real SGLang servers on this machine, for the demo (`mopd demo --sglang`) and the tests.

    with LocalSGLang.start_all({"student": (hf_dir, []), "add": (teacher_dir, [])}, log_dir) as s:
        s["student"].url        # http://127.0.0.1:PORT, ready

Each server is `tools/sglang_cpu_server.sh` (real SGLang 0.5.23 from `.venv-sglang`, built
by `make sglang`) in its own process group under coreutils `timeout`, so it ends even if
this process is killed; `stop()` ends the whole group. All servers of one `start_all` are
launched at once (a start costs ~20-40 s of CPU here, so they overlap) and waited for
together. Each writes its log to `log_dir/sglang_NAME.log` and the calls of the
`sgl_kernel` stand-in to `log_dir/sgl_kernel_NAME.log`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from megatron_mopd.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_SCRIPT = os.path.join(REPO, "tools", "sglang_cpu_server.sh")


def sglang_venv() -> str:
    """The SGLang environment: `$SGLANG_VENV`, else `.venv-sglang` in the repository."""
    return os.environ.get("SGLANG_VENV", os.path.join(REPO, ".venv-sglang"))


def sglang_missing() -> str | None:
    """None if the SGLang environment is built, else what to do about it."""
    if not os.path.isfile(os.path.join(sglang_venv(), ".installed")):
        return f"real SGLang is not installed at {sglang_venv()}: run `make sglang`"
    return None


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalSGLang:
    """One `tools/sglang_cpu_server.sh` process group serving `model_dir` on `port`."""

    name: str
    model_dir: str
    port: int
    log_path: str
    kernel_log: str
    api_key: str | None = None
    hard_timeout_s: int = 4 * 3600
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def launch(self, extra: list[str]) -> None:
        """Start the script (returns at once; `wait_ready` waits)."""
        env = dict(os.environ, SGLANG_VENV=sglang_venv(), MOPD_SGL_KERNEL_LOG=self.kernel_log)
        env.setdefault("OMP_NUM_THREADS", "1")
        argv = ["timeout", "-k", "10", str(self.hard_timeout_s), "bash", SERVER_SCRIPT]
        argv += ["--model-path", self.model_dir, "--port", str(self.port), *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def output(self) -> str:
        """What the server printed so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, deadline: float) -> None:
        """Until the script says the server is ready; `UserError` with the log's end."""
        while time.monotonic() < deadline:
            if "sglang: ready at" in self.output():
                return
            if self.proc is None or self.proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = self.output()[-2000:]
        self.stop()
        raise UserError(f"SGLang server {self.name!r} ({self.model_dir}) did not start:\n{tail}")

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
        try:  # the server's children (scheduler, detokenizer) share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        self.proc = None

    @staticmethod
    def start_all(
        specs: dict[str, tuple[str, list[str]]], log_dir: str, timeout: float = 600
    ) -> Servers:
        """Start one server per `name -> (HF folder, extra SGLang flags)`, all at once,
        and wait until every one is ready (`--api-key K` among the flags is remembered)."""
        missing = sglang_missing()
        if missing:
            raise UserError(missing)
        os.makedirs(log_dir, exist_ok=True)
        servers = Servers()
        try:
            for name, (model_dir, extra) in specs.items():
                key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
                srv = LocalSGLang(
                    name,
                    model_dir,
                    free_port(),
                    os.path.join(log_dir, f"sglang_{name}.log"),
                    os.path.join(log_dir, f"sgl_kernel_{name}.log"),
                    api_key=key,
                )
                srv.launch(extra)
                servers[name] = srv
            deadline = time.monotonic() + timeout
            for srv in servers.values():
                srv.wait_ready(deadline)
        except BaseException:
            servers.stop()
            raise
        return servers


class Servers(dict):
    """`LocalSGLang`s by name; a context manager that stops them all."""

    def stop(self) -> None:
        """Stop every server (SIGTERM to all first, so they stop together)."""
        for srv in self.values():
            srv.terminate()
        for srv in self.values():
            srv.stop()

    def stub_calls(self) -> list[str]:
        """The `sgl_kernel` stand-in's stubs that any server called (should be none)."""
        calls = []
        for srv in self.values():
            if os.path.exists(srv.kernel_log):
                with open(srv.kernel_log) as f:
                    calls += [f"{srv.name}: {x.strip()}" for x in f if "called-stub" in x]
        return calls

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
