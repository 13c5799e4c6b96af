"""A rank under torchrun exits when its launcher is gone (`distributed.exit_with_launcher`).

The case the fault campaign met: torchrun killed (SIGKILL) while its ranks wait in a gloo
collective; without the watch they sleep until the process group's timeout. Here a real
`torchrun --standalone` of two ranks: rank 0 blocked in a barrier rank 1 never reaches,
rank 1 asleep; torchrun is SIGKILLed and both ranks must be gone within seconds, the
first to notice saying why on stderr (the other may end through its collective failing). Outside torchrun the watch is not started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

from megatron_mopd.distributed import exit_with_launcher

WORKER = textwrap.dedent(
    """
    import os, sys, time
    import torch.distributed as dist
    from megatron_mopd.distributed import exit_with_launcher
    assert exit_with_launcher(poll_seconds=0.2) is not None
    dist.init_process_group("gloo")
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never comes: blocked in gloo
    time.sleep(600)
    """
)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (re-parented: nobody here reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_not_started_outside_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert exit_with_launcher() is None


def test_ranks_exit_when_torchrun_is_killed(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(
        [*cmd, str(script), str(tmp_path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        pids = {}
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            for r in (0, 1):
                f = tmp_path / f"rank{r}.pid"
                if f.exists() and f.read_text():
                    pids[r] = int(f.read_text())
            time.sleep(0.2)
        assert len(pids) == 2, (tmp_path / "torchrun.log").read_text()[-2000:]
        time.sleep(1.0)  # rank 0 is in its barrier
        assert not any(gone(p) for p in pids.values())
        proc.kill()  # torchrun alone: its ranks are orphaned
        proc.wait()
        deadline = time.monotonic() + 20
        while not all(gone(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(gone(p) for p in pids.values()), "a rank outlived torchrun"
        log.flush()
        text = (tmp_path / "torchrun.log").read_text()
        # the first rank to notice says so; the other may go first through its collective
        # failing (its peer closed the connection)
        assert "torchrun launcher" in text and "is gone; exiting" in text, text[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the launch
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
