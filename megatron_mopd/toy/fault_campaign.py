"""The machinery of the fault campaign (`tools/faults.py`): launches of `mopd train` on
one run directory ("a chain"), judging each fault, servers that can be killed and
replaced, a file-creation watch to time kills, and the table.

A chain is one run directory launched again after every fault until it reaches
`max_steps`; its final metrics are compared with the set-up's uninterrupted reference.
"""

from __future__ import annotations

import ctypes
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_mopd.toy import fault_checks as checks
from megatron_mopd.toy.fault_servers import start_serve_subprocess
from megatron_mopd.toy.recipe_runs import kill_group, make_recipe, start_train, write_recipe

TOL = 1e-6
LAUNCH_TIMEOUT_S = 300  # a launch that runs longer is a hang


@dataclass
class Record:
    """One injected fault and how the run took it."""

    fault: str
    chain: str
    note: str = ""
    survived: bool = False
    resumed: bool = False
    lost: bool = False


@dataclass
class Launch:
    """One `mopd train` process of a chain."""

    proc: subprocess.Popen
    log: Path
    resumed: bool  # the run dir had a checkpoint
    t0: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.time)  # wall clock, for file times

    def output(self) -> str:
        """What the launch printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int | None, str]:
        """(exit code, output); None and the process group killed on a hang."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            return None, self.output()
        return self.proc.returncode, self.output()


class ServerPool:
    """`mopd serve` processes of one model, one kept started in advance (a replacement
    is ready when one is killed)."""

    def __init__(self, hf_dir: str, log_dir: Path, *extra: str):
        self.hf_dir, self.log_dir, self.n, self.extra = hf_dir, log_dir, 0, extra
        self._next: threading.Thread | None = None
        self._ready: tuple | None = None
        self.current = self._start()
        self._prepare()

    def _start(self):
        self.n += 1
        log = str(self.log_dir / f"serve_{Path(self.hf_dir).name}_{self.n}.log")
        return start_serve_subprocess(self.hf_dir, log, *self.extra, hard_timeout=7200)

    def _prepare(self) -> None:
        def run() -> None:
            self._ready = self._start()

        self._next = threading.Thread(target=run, daemon=True)
        self._next.start()

    @property
    def url(self) -> str:
        """The URL of the current server."""
        return self.current[1]

    def replace(self) -> str:
        """Make the prepared server current (start another in advance); its URL. The
        old one is stopped if it still runs."""
        self.current[0].stop()
        self._next.join(180)
        self.current, self._ready = self._ready, None
        self._prepare()
        return self.url

    def stop(self) -> None:
        """Stop every server."""
        self.current[0].stop()
        if self._next is not None:
            self._next.join(180)
        if self._ready is not None:
            self._ready[0].stop()


# --------------------------------------------------------------------------------------
# the chain: one run directory, launched until done


class Chain:
    """One run directory of a set-up, launched again after each fault."""

    def __init__(self, setup: Setup, name: str, rng: random.Random):
        self.setup, self.name, self.rng = setup, name, rng
        self.root = setup.root / name
        self.root.mkdir(parents=True)
        self.run_dir = self.root / "run"
        self.data = str(self.root / "train.jsonl")
        shutil.copy(setup.tiny["data"], self.data)
        raw = make_recipe(setup.tiny, self.run_dir, **setup.sections)
        raw["data"] = {"train_path": self.data, "eval_path": self.data}
        self.recipe = write_recipe(self.root / "recipe.yaml", raw)
        self.records: list[Record] = []
        self.launches = 0
        self.ignore: set[str] = set()  # checkpoints corrupted on purpose
        self.pending: Record | None = None  # a kill, confirmed when the next launch resumes
        self.pending_from = 0
        (self.run_dir / "checkpoints").mkdir(parents=True)  # watched before the first save

    def start(self, env: dict | None = None, preexec_fn=None) -> Launch:
        """Launch `mopd train` (again) on this chain's run dir."""
        self.launches += 1
        log = self.root / f"launch_{self.launches}.log"
        resumed = bool(checks.CheckpointManager(str(self.run_dir / "checkpoints")).published())
        proc = start_train(
            self.recipe,
            *self.setup.overrides(),
            log=log,
            nproc=self.setup.nproc,
            env=env,
            preexec_fn=preexec_fn,
        )
        return Launch(proc, log, resumed)

    def rows(self) -> list[dict]:
        """The metrics rows so far."""
        return checks.read_rows(self.run_dir / "metrics.jsonl")[0]

    def wait_row(self, launch: Launch, step: int, timeout: float = 240) -> bool:
        """Until this launch has logged step `step` (False if it exited or timed out)."""
        end = time.monotonic() + timeout
        path = self.run_dir / "metrics.jsonl"
        while time.monotonic() < end and launch.proc.poll() is None:
            # rows left by an earlier launch do not count: the file must have been written
            # (truncated on resume, or appended to) by this launch
            fresh = path.exists() and path.stat().st_mtime > launch.started
            if fresh:
                rows = self.rows()
                if rows and rows[-1].get("step", 0) >= step:
                    return True
            time.sleep(0.02)
        return False

    def next_step(self) -> int:
        """The step the next launch starts training at (1 + newest checkpoint)."""
        root = str(self.run_dir / "checkpoints")
        info = checks.CheckpointManager(root, log=lambda msg: None).find_resume()
        return (info.step if info else 0) + 1

    def record(self, fault: str, note: str, survived: bool) -> Record:
        """Note a fault and whether the run survived it; print one line."""
        rec = Record(fault, self.name, note, survived)
        self.records.append(rec)
        mark = "survived" if survived else "NOT SURVIVED"
        print(f"[{self.name}] {fault}: {note} -> {mark}", flush=True)
        return rec

    def judge_stop(self, fault: str, code: int | None, out: str, needles: list[str], note: str):
        """A fault that must stop the run with one clear error line naming it."""
        self.forget_repaired()
        line = checks.error_line(out)
        traceback = checks.has_traceback(out, self.setup.nproc)
        ok = code not in (0, None) and line is not None and not traceback
        missing = [n for n in needles if line is None or n not in line]
        ok = ok and not missing
        detail = f"exit {code}; {line or 'no error line'}"[:400]
        if missing:
            detail += f" (missing {missing})"
        if traceback:
            detail += " (a traceback was printed)"
        rows = self.rows()
        newest = self.next_step() - 1
        if rows and rows[-1]["step"] != newest and not self.ignore:
            detail += f" (rows to step {rows[-1]['step']}, newest checkpoint {newest})"
        self.record(fault, f"{note}: {detail}", ok)

    def kill_rank(self, launch: Launch) -> str:
        """SIGKILL one trainer process (a random rank under torchrun); which one."""
        import psutil

        if self.setup.nproc == 1:
            os.kill(launch.proc.pid, signal.SIGKILL)
            return "the trainer"
        workers = []
        for child in psutil.Process(launch.proc.pid).children():
            try:
                workers.append((int(child.environ().get("RANK", -1)), child))
            except psutil.Error:
                continue
        rank, victim = self.rng.choice(sorted(workers, key=lambda w: w[0]))
        victim.kill()
        return f"rank {rank}"

    def after_kill(self, fault: str, launch: Launch, note: str) -> None:
        """A SIGKILLed launch must end (torchrun takes the other rank down); whether the
        next launch resumes is judged when it starts (`judge_resume`)."""
        code, _ = launch.wait(120)
        # a rank could outlive torchrun (asleep in a gloo collective): seen 3 times in the
        # first full campaign, before distributed.exit_with_launcher; still counted here
        survivors = _session_alive(launch.proc.pid)
        kill_group(launch.proc)
        if survivors:
            note += f"; {survivors} process(es) of the launch outlived it (killed)"
        self.forget_repaired()
        if launch.proc.poll() is None or code is None:
            kill_group(launch.proc)
            self.record(fault, f"{note}: the launch hung after the kill", False)
            return
        bad = checks.unreadable_checkpoints(self.run_dir, self.ignore)
        note = f"{note}: exit {code}" + (f"; unreadable: {bad}" if bad else "")
        self.pending = self.record(fault, note, not bad)
        self.pending_from = (
            self.next_step() - 1
        )  # the step the next launch must resume at  # confirmed by the next launch resuming

    def forget_repaired(self) -> None:
        """Checkpoints corrupted on purpose that have been saved again since."""
        ckpts = self.run_dir / "checkpoints"
        self.ignore = {n for n in self.ignore if checks.verify_checkpoint(str(ckpts / n))}

    def judge_resume(self, launch: Launch) -> None:
        """The launch after a kill: it must say it resumes (from a checkpoint)."""
        rec = getattr(self, "pending", None)
        if rec is None:
            return
        self.pending = None
        step = self.pending_from
        if step == 0:  # killed before the first checkpoint: the next launch starts over
            if not self.wait_row(launch, 1):
                rec.survived = False
                rec.note += "; the next launch did not start over"
            return
        want = f"(step {step})"
        end = time.monotonic() + 240
        while time.monotonic() < end and launch.proc.poll() is None:
            if "resuming from" in launch.output():
                break
            time.sleep(0.1)
        out = launch.output()
        if "resuming from" not in out or want not in out:
            rec.survived = False
            rec.note += f"; the next launch did not resume at step {step}"

    def finish(self) -> None:
        """Run to the end, then judge the chain: exact and nothing lost."""
        launch = self.start()
        self.judge_resume(launch)
        code, out = launch.wait()
        steps = self.setup.max_steps
        if code != 0:
            print(f"[{self.name}] final launch: exit {code}: {out[-1500:]}", flush=True)
        problems = checks.data_problems(self.run_dir, steps)
        diff = checks.rows_differ(self.rows(), self.setup.reference, TOL)
        for rec in self.records:
            rec.resumed = code == 0 and diff is None
            rec.lost = bool(problems)
        verdict = "exact" if diff is None else f"DIFFERS: {diff}"
        lost = f"; DATA LOST: {problems}" if problems else "; nothing lost"
        print(f"[{self.name}] done in {self.launches} launches: {verdict}{lost}", flush=True)


# --------------------------------------------------------------------------------------
# the set-ups


class Setup:
    """A configuration of the tiny recipe with its servers and reference run."""

    def __init__(self, name: str, root: Path, tiny: dict, nproc: int, max_steps: int):
        self.name, self.tiny, self.nproc, self.max_steps = name, tiny, nproc, max_steps
        self.root = root / name
        self.root.mkdir(parents=True)
        self.sections: dict = {
            "train": {"max_steps": max_steps, "eval_interval": 0},
            "checkpoint": {"interval": 1, "keep_last": 100},
        }
        self.reference: list[dict] = []
        self.largest_file = 0

    def overrides(self) -> list[str]:
        """Command-line overrides of every launch (server URLs that change)."""
        return []

    def run_reference(self) -> None:
        """The uninterrupted run."""
        t0 = time.monotonic()
        chain = Chain(self, "reference", random.Random(0))
        code, out = chain.start().wait()
        if code != 0:
            raise SystemExit(f"faults: the {self.name} reference run failed:\n{out[-3000:]}")
        self.reference = chain.rows()
        files = [p for p in (chain.run_dir / "checkpoints").rglob("*") if p.is_file()]
        self.largest_file = max(p.stat().st_size for p in files)
        print(
            f"[{self.name}] reference: {len(self.reference)} steps in {time.monotonic() - t0:.0f} s",
            flush=True,
        )

    def close(self) -> None:
        """Stop the set-up's servers."""


def table(records: list[Record], faults: dict[str, tuple[str, str]]) -> str:
    """The campaign's table and its last line."""
    head = ("fault", "backend", "runs", "survived", "resumed exactly", "data lost")
    rows = []
    for key, (label, backend) in faults.items():
        mine = [r for r in records if r.fault == key]
        if not mine:
            continue
        rows.append(
            (
                label,
                backend,
                str(len(mine)),
                str(sum(r.survived for r in mine)),
                str(sum(r.resumed for r in mine)),
                str(sum(r.lost for r in mine)),
            )
        )
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    n = len(records)
    lines.append(
        f"{n} faults injected, {sum(r.survived for r in records)} survived, "
        f"{sum(r.resumed for r in records)} resumed exactly, "
        f"{sum(r.lost for r in records)} data lost"
    )
    return "\n".join(lines)


def _session_alive(sid: int) -> int:
    """How many processes of session `sid` (a launch started in its own) still run."""
    import psutil

    n = 0
    for p in psutil.process_iter(["pid"]):
        try:
            n += os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE
        except (OSError, psutil.Error):
            continue
    return n


# --------------------------------------------------------------------------------------
# timing a kill: inotify on a folder

_IN_CREATE, _IN_MOVED_TO = 0x100, 0x80


class CreationWatch:
    """Names created in (or moved into) a folder, as the kernel reports them (inotify):
    a kill lands within a millisecond or so of the creation, where polling the folder
    misses saves that take a few milliseconds."""

    def __init__(self, folder: str | os.PathLike):
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = self._libc.inotify_add_watch(self.fd, str(folder).encode(), _IN_CREATE | _IN_MOVED_TO)
        if wd < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")

    def wait(self, prefix: str, timeout: float, proc: subprocess.Popen) -> str | None:
        """The next name starting with `prefix` (None on timeout or when `proc` exits)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.poll() is None:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(self.fd, 65536)
            pos = 0
            while pos + 16 <= len(data):
                _, _, _, length = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16 : pos + 16 + length].rstrip(b"\0").decode()
                pos += 16 + length
                if name.startswith(prefix):
                    return name
        return None

    def close(self) -> None:
        """Stop watching."""
        os.close(self.fd)
