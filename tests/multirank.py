"""Launch multi-process (gloo, CPU) test workers under torchrun and collect their results.

    launch = start_workers("tests/workers/student_cases.py", nproc=2, args=[...])
    results = launch.wait()          # one dict per rank, as the workers saved them

A worker script gets `--out DIR` plus `args`; each rank saves its results with
`save_result(out_dir, rank, obj)` (a `torch.save` file), and `wait()` loads them in rank
order. Every launch runs `torchrun --standalone` (which rendezvouses on a free port the
OS picks, so concurrent launches never collide) in its own session with
OMP_NUM_THREADS=1 and a hard timeout: on timeout the whole process group is killed.
When a launch fails or times out, the workers' output (stdout and stderr, interleaved)
is in the assertion message.

`start_workers` returns at once, so independent launches can overlap (each torchrun
launch spends ~15 s importing on these 2-core machines).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def save_result(out_dir: str | os.PathLike, rank: int, obj: Any) -> None:
    """Called by a worker: save this rank's results (atomically) for `Launch.wait`."""
    path = Path(out_dir) / f"rank{rank}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class Launch:
    """A running torchrun launch."""

    proc: subprocess.Popen
    out_dir: Path
    log_path: Path
    nproc: int
    timeout: float
    started: float
    cmd: list[str]

    def wait(self) -> list[Any]:
        """Wait for the launch (up to its timeout) and return the per-rank results."""
        remaining = self.timeout - (time.monotonic() - self.started)
        try:
            self.proc.wait(timeout=max(remaining, 1.0))
        except subprocess.TimeoutExpired:
            _kill(self.proc)
            raise AssertionError(
                f"multi-rank launch timed out after {self.timeout:.0f} s: {' '.join(self.cmd)}\n"
                + self.output_tail()
            ) from None
        if self.proc.returncode != 0:
            raise AssertionError(
                f"multi-rank launch failed (exit {self.proc.returncode}): "
                f"{' '.join(self.cmd)}\n" + self.output_tail()
            )
        results = []
        for rank in range(self.nproc):
            path = self.out_dir / f"rank{rank}.pt"
            if not path.exists():
                raise AssertionError(f"rank {rank} wrote no result\n" + self.output_tail())
            results.append(torch.load(path, weights_only=False))
        return results

    @property
    def seconds(self) -> float:
        """Wall time since the launch started."""
        return time.monotonic() - self.started

    def output_tail(self, lines: int = 150) -> str:
        """The last `lines` lines the workers printed."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no output)"
        return "----- worker output (tail) -----\n" + "\n".join(text[-lines:])


def start_workers(
    script: str | os.PathLike,
    nproc: int,
    args: list[str] | None = None,
    *,
    timeout: float = 300.0,
    out_dir: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    torchrun: bool = True,
) -> Launch:
    """Start `torchrun --standalone --nproc-per-node nproc script --out DIR *args`
    (with `torchrun=False` and `nproc=1`: `python script ...`, no torch.distributed env)."""
    if not torchrun and nproc != 1:
        raise ValueError("torchrun=False needs nproc=1")
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="multirank-"))
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "workers.log"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [
        sys.executable,
        *(launcher if torchrun else []),
        str(script),
        "--out",
        str(out),
        *(args or []),
    ]
    full_env = dict(os.environ)
    full_env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
        TORCH_CPP_LOG_LEVEL="ERROR",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p),
    )
    full_env.update(env or {})
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the child exits
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return Launch(proc, out, log_path, nproc, timeout, time.monotonic(), cmd)


def run_workers(
    script: str | os.PathLike, nproc: int, args: list[str] | None = None, **kwargs: Any
) -> list[Any]:
    """`start_workers(...).wait()`."""
    return start_workers(script, nproc, args, **kwargs).wait()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
