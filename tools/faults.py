"""A fault campaign: the tiny recipe trained many times with faults injected at random
moments, then a table of what survived, what resumed exactly and what was lost.

    python tools/faults.py --quick            # every fault twice, ~10 min on 2 cores
    python tools/faults.py                    # every fault 5 times
    python tools/faults.py --only teacher --reps 1 --seed 3

Three set-ups of the tiny recipe (`megatron_mopd/toy/recipe_runs.py`), each trained once
uninterrupted (the reference), then in chains: one run directory, launched again after
every fault until it reaches `max_steps`, faults injected one after another:

- `single`: one process, embedded teachers, the embedded rollout engine in a child
  process (`rollout.embedded_subprocess=on`): the engine child SIGKILLed mid-generation;
  the newest checkpoint corrupted; a dataset line made bad; the disk full during a save
  (RLIMIT_FSIZE below a checkpoint file's size, SIGXFSZ ignored: writes fail with EFBIG;
  no tmpfs or quota without root); SIGKILL during a step (full campaign).
- `two_ranks`: torchrun, 2 ranks (EP2), the rollout engine a `mopd serve` server with
  weights synced through disk: SIGKILL of one rank (chosen at random) during a step,
  during a checkpoint write (when `checkpoints/tmp.step_*` appears), during weight sync
  (when `weights/.tmp-step_*` appears); the rollout server SIGKILLed mid-generation;
  oversized and malformed requests to the rollout server.
- `teacher`: one process, one teacher served by `mopd serve` behind a fault-injecting
  proxy (`FlakyProxy`): slow, 500, hung (no answer until the client's timeout), killed
  and replaced (same address 1-3 s later), killed for good, malformed JSON, a NaN
  log-prob, a short log-prob list; oversized and malformed requests to the server.

Judged per fault: survived (the run went on, or stopped with one `mopd train: error:`
line naming what failed and no traceback; after a SIGKILL: the next launch resumed from
a checkpoint that verifies), resumed exactly (the chain's metrics rows equal the
reference's within 1e-6; wall times ignored), data lost (a step missing or twice in
metrics.jsonl, an unreadable line, a checkpoint missing or not verifying). A fault's
"resumed exactly" and "data lost" are those of its chain. Real SGLang is not used (a
start costs 20-50 s of CPU here); `mopd serve` stands in for every server.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mopd.toy import fault_checks as checks  # noqa: E402
from megatron_mopd.toy.fault_servers import (  # noqa: E402
    FlakyProxy,
    hostile_requests,
    start_serve_subprocess,  # noqa: E402
)
from megatron_mopd.toy.recipe_runs import (  # noqa: E402
    build_tiny,
    kill_group,
    make_recipe,
    start_train,
    write_recipe,
)

TOL = 1e-6
LAUNCH_TIMEOUT_S = 300  # a launch that runs longer is a hang
FAULTS = {  # key: (label, backend)
    "kill_step_1": ("SIGKILL during a step, 1 process", "embedded"),
    "kill_step_2": (
        "SIGKILL of a rank during a step, 2 ranks",
        "embedded teachers, mopd serve rollout",
    ),
    "kill_ckpt": (
        "SIGKILL of a rank during a checkpoint write, 2 ranks",
        "embedded teachers, mopd serve rollout",
    ),
    "kill_sync": ("SIGKILL of a rank during weight sync (disk), 2 ranks", "mopd serve rollout"),
    "teacher_killed": ("teacher server killed mid-step", "mopd serve"),
    "teacher_restarted": ("teacher server killed, back 1-3 s later", "mopd serve"),
    "teacher_hung": ("teacher hung (no answer)", "mopd serve + proxy"),
    "teacher_slow": ("teacher slow (2 s)", "mopd serve + proxy"),
    "teacher_500": ("teacher answers 500", "mopd serve + proxy"),
    "teacher_bad_json": ("teacher answers malformed JSON", "mopd serve + proxy"),
    "teacher_nan": ("teacher answers a NaN log-prob", "mopd serve + proxy"),
    "teacher_short": ("teacher answers a short log-prob list", "mopd serve + proxy"),
    "engine_killed": ("rollout engine child killed mid-generation", "embedded_subprocess"),
    "rollout_killed": ("rollout server killed mid-generation, 2 ranks", "mopd serve rollout"),
    "disk_full": ("disk full during a save (RLIMIT_FSIZE, EFBIG)", "embedded"),
    "corrupt_ckpt": ("newest checkpoint corrupted", "embedded"),
    "bad_data": ("a dataset line turns bad between launches", "embedded"),
    "hostile_teacher": ("oversized/malformed requests to the teacher server", "mopd serve"),
    "hostile_rollout": ("oversized/malformed requests to the rollout server", "mopd serve"),
}


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
    resumed: bool  # the run dir had a checkpoint: wait for "resuming from" first
    t0: float = field(default_factory=time.monotonic)

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

    def __init__(self, hf_dir: str, log_dir: Path):
        self.hf_dir, self.log_dir, self.n = hf_dir, log_dir, 0
        self._next: threading.Thread | None = None
        self._ready: tuple | None = None
        self.current = self._start()
        self._prepare()

    def _start(self):
        self.n += 1
        log = str(self.log_dir / f"serve_{Path(self.hf_dir).name}_{self.n}.log")
        return start_serve_subprocess(self.hf_dir, log, hard_timeout=7200)

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
        """Make the prepared server current (start another in advance); its URL."""
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
        while time.monotonic() < end and launch.proc.poll() is None:
            if not launch.resumed or "resuming from" in launch.output():
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
        ok = code not in (0, None) and line is not None and "Traceback" not in out
        missing = [n for n in needles if line is None or n not in line]
        ok = ok and not missing
        detail = f"exit {code}; {line or 'no error line'}"[:400]
        if missing:
            detail += f" (missing {missing})"
        if "Traceback" in out:
            detail += " (a traceback was printed)"
        rows = self.rows()
        newest = self.next_step() - 1
        if rows and rows[-1]["step"] != newest:
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
        self.forget_repaired()
        if launch.proc.poll() is None or code is None:
            kill_group(launch.proc)
            self.record(fault, f"{note}: the launch hung after the kill", False)
            return
        bad = checks.unreadable_checkpoints(self.run_dir, self.ignore)
        note = f"{note}: exit {code}" + (f"; unreadable: {bad}" if bad else "")
        self.pending = self.record(fault, note, not bad)  # confirmed by the next launch resuming

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
        end = time.monotonic() + 240
        while time.monotonic() < end and launch.proc.poll() is None:
            if "resuming from" in launch.output():
                return
            time.sleep(0.1)
        if "resuming from" not in launch.output():
            rec.survived = False
            rec.note += "; the next launch did not resume"

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


class Single(Setup):
    """One process, embedded teachers, the rollout engine in a child process."""

    def __init__(self, root: Path, tiny: dict, quick: bool):
        super().__init__("single", root, tiny, nproc=1, max_steps=6)
        self.sections["rollout"] = {"embedded_subprocess": "on"}
        self.quick = quick

    def chain(self, name: str, rng: random.Random) -> list[Record]:
        """Engine killed; newest checkpoint corrupted and a dataset line made bad (the
        next launch refuses it); disk full at the next save; a SIGKILL mid-step (full
        campaign); then to the end."""
        import psutil

        c = Chain(self, name, rng)
        launch = c.start()
        s = rng.randint(1, 2)
        if c.wait_row(launch, s):
            time.sleep(rng.uniform(0, 0.15))
            engines = [
                p
                for p in psutil.Process(launch.proc.pid).children()
                if "spawn_main" in " ".join(p.cmdline())
                and "resource_tracker" not in " ".join(p.cmdline())
            ]
            for child in engines:
                child.kill()
            note = f"engine child {[p.pid for p in engines]} SIGKILLed after row {s}"
        else:
            note = f"row {s} never came"
        code, out = launch.wait()
        c.judge_stop("engine_killed", code, out, ["rollout engine", "died"], note)
        # between launches: the newest checkpoint corrupted, a dataset line broken
        newest = c.next_step() - 1
        folder = c.run_dir / "checkpoints" / f"step_{newest:08d}"
        how = checks.corrupt_checkpoint(str(folder), rng)
        c.ignore.add(folder.name)
        line, kind, original = checks.break_dataset_line(c.data, rng)
        rows_before = len(c.rows())
        code, out = c.start().wait()
        ok_line = f"{c.data}:{line}" in (checks.error_line(out) or "")
        c.judge_stop("bad_data", code, out, [f"{c.data}:{line}"], f"line {line} {kind}")
        if ok_line and len(c.rows()) != rows_before:
            c.records[-1].survived = False
            c.records[-1].note += " (rows were written)"
        Path(c.data).write_text(original)
        # disk full at the next save; the launch must also skip the corrupt checkpoint
        limit = rng.randint(self.largest_file // 8, self.largest_file - 1)

        def small_disk() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        code, out = c.start(preexec_fn=small_disk).wait()
        skipped = f"skipping corrupt checkpoint {folder}" in out
        resumed_older = f"(step {newest - 1})" in out if newest > 1 else "resuming" not in out
        c.record("corrupt_ckpt", f"{folder.name}: {how}", skipped and resumed_older)
        needles = ["checkpoint of step", "could not be written"]
        c.judge_stop("disk_full", code, out, needles, f"files limited to {limit} bytes")
        if not self.quick:
            launch = c.start()
            s = c.next_step() + rng.randint(0, 1)
            if c.wait_row(launch, s):
                time.sleep(rng.uniform(0, 0.2))
                kill_group(launch.proc)
            c.after_kill("kill_step_1", launch, f"killed after row {s}")
        c.finish()
        return c.records


class TwoRanks(Setup):
    """torchrun with 2 ranks (EP2), a `mopd serve` rollout server, weights through disk."""

    def __init__(self, root: Path, tiny: dict):
        super().__init__("two_ranks", root, tiny, nproc=2, max_steps=6)
        self.sections["parallel"] = {"ep": 2, "use_distributed_optimizer": False}
        self.sections["rollout"] = {
            "backend": "sglang",
            "urls": ["http://127.0.0.1:9"],  # replaced by `overrides`
            "weight_sync": "disk",
            "max_retries": 2,
            "retry_backoff_seconds": 0.2,
            "startup_timeout_seconds": 120,
        }
        self.rollout = ServerPool(tiny["student"], self.root)

    def overrides(self) -> list[str]:
        """The rollout server's URL (it changes when one is killed)."""
        return [f"rollout.urls=[{self.rollout.url}]"]

    def close(self) -> None:
        """Stop the rollout servers."""
        self.rollout.stop()

    def _kill_when(self, c: Chain, launch: Launch, fault: str, folder: str, prefix: str):
        """SIGKILL a rank as soon as `folder` holds a name starting with `prefix`."""
        path = c.run_dir / folder
        end = time.monotonic() + 240
        while time.monotonic() < end and launch.proc.poll() is None:
            try:
                names = [n for n in os.listdir(path) if n.startswith(prefix)]
            except FileNotFoundError:
                names = []
            if names and (not launch.resumed or "resuming from" in launch.output()):
                who = c.kill_rank(launch)
                time.sleep(0.3)
                still = [n for n in os.listdir(path) if n.startswith(prefix)]
                where = "in the write" if still else "as the write ended"
                return c.after_kill(fault, launch, f"{who} killed at {names[0]} ({where})")
            time.sleep(0.002)
        c.after_kill(fault, launch, f"{folder}/{prefix}* never appeared")

    def chain(self, name: str, rng: random.Random) -> list[Record]:
        """Kill a rank during a step, a checkpoint write, a weight sync (random order);
        the rollout server killed mid-generation; hostile requests to it; to the end."""
        c = Chain(self, name, rng)
        kinds = ["kill_step_2", "kill_ckpt", "kill_sync"]
        rng.shuffle(kinds)
        for kind in kinds:
            launch = c.start()
            c.judge_resume(launch)
            if kind == "kill_step_2":
                s = c.next_step() + rng.randint(0, 1)
                if c.wait_row(launch, s):
                    time.sleep(rng.uniform(0, 0.3))
                    who = c.kill_rank(launch)
                    c.after_kill(kind, launch, f"{who} killed after row {s}")
                else:
                    c.after_kill(kind, launch, f"row {s} never came")
            elif kind == "kill_ckpt":
                self._kill_when(c, launch, kind, "checkpoints", "tmp.step_")
            else:
                self._kill_when(c, launch, kind, "weights", ".tmp-step_")
        launch = c.start()
        c.judge_resume(launch)
        s = c.next_step()
        if c.wait_row(launch, s):
            time.sleep(rng.uniform(0, 0.2))
            self.rollout.current[0].kill()
            note = f"killed after row {s}"
        else:
            note = f"row {s} never came"
        code, out = launch.wait()
        url = self.rollout.url
        c.judge_stop("rollout_killed", code, out, [url], note)
        self.rollout.replace()
        launch = c.start()
        s = c.next_step()
        if c.wait_row(launch, s):
            results = hostile_requests(self.rollout.url)
            bad = [r for r in results if r[1] != r[2]]
            c.record("hostile_rollout", f"{len(results)} requests, wrong: {bad}", not bad)
        else:
            c.record("hostile_rollout", f"row {s} never came", False)
        launch.wait()
        c.finish()
        return c.records


class TeacherSide(Setup):
    """One process, one teacher (`mopd serve`) behind a fault-injecting proxy."""

    TRANSIENT = [
        "teacher_slow",
        "teacher_500",
        "teacher_hung",
        "teacher_restarted",
        "hostile_teacher",
    ]
    STOPPING = ["teacher_bad_json", "teacher_nan", "teacher_short", "teacher_killed"]

    def __init__(self, root: Path, tiny: dict):
        super().__init__("teacher", root, tiny, nproc=1, max_steps=10)
        self.server = ServerPool(tiny["t_add"], self.root)
        self.armed: list = []
        self.proxy = FlakyProxy(self.server.url, self._plan)
        self.sections["teachers"] = {
            "adder": {
                "backend": "sglang",
                "urls": [self.proxy.url],
                "domains": ["add", "rev"],
                "timeout_seconds": 3,
                "max_retries": 4,
                "retry_backoff_seconds": 0.5,
                "startup_timeout_seconds": 120,
            }
        }

    def _plan(self, n: int, method: str, path: str):
        if path == "/generate" and self.armed:
            return self.armed.pop(0)
        return None

    def close(self) -> None:
        """Stop the proxy and the servers."""
        self.proxy.stop()
        self.server.stop()

    def _action(self, kind: str):
        if kind == "teacher_slow":
            return ("sleep", 2.0)
        if kind == "teacher_500":
            return "500"
        if kind == "teacher_hung":
            return ("hang", 8.0)
        if kind == "teacher_bad_json":
            return ("raw", lambda body: body[: len(body) // 2])
        if kind == "teacher_nan":
            return ("mutate", _nan_logprob)
        return ("mutate", _short_logprobs)

    def _inject(self, c: Chain, kind: str) -> str:
        """Inject a teacher fault now (it hits the next scoring request)."""
        if kind == "teacher_killed":
            self.server.current[0].kill()
            return "server SIGKILLed"
        if kind == "teacher_restarted":
            self.server.current[0].kill()
            down = c.rng.uniform(1, 3)
            time.sleep(down)
            self.proxy.target = self.server.replace()
            return f"server SIGKILLed, a new one at the address {down:.1f} s later"
        self.armed.append(self._action(kind))
        return "armed for the next scoring request"

    def chain(self, name: str, rng: random.Random) -> list[Record]:
        """The transient faults in one launch (one per step, random order), then each
        stopping fault in a launch of its own (random order); then to the end."""
        c = Chain(self, name, rng)
        transient = list(self.TRANSIENT)
        stopping = list(self.STOPPING)
        rng.shuffle(transient)
        rng.shuffle(stopping)
        launch = c.start()
        for i, kind in enumerate(transient, start=1):
            if not c.wait_row(launch, i):
                c.record(kind, f"row {i} never came (the run stopped)", False)
                continue
            if kind == "hostile_teacher":
                results = hostile_requests(self.server.url)
                bad = [r for r in results if r[1] != r[2]]
                note = f"after row {i}: {len(results)} requests, wrong: {bad}"
                ok = not bad
            else:
                note, ok = f"after row {i}: {self._inject(c, kind)}", True
            c.record(kind, note, ok)
            self.pending_transient = c.records[-1]
        first = True
        for kind in stopping:
            if not first:
                launch = c.start()
            first = False
            s = c.next_step() if c.launches > 1 else len(transient) + 1
            if c.wait_row(launch, s):
                note = f"after row {s}: {self._inject(c, kind)}"
            else:
                note = f"row {s} never came"
            code, out = launch.wait()
            if c.launches == 1:  # the transient faults' launch went on until here
                for rec in c.records:
                    if rec.fault in self.TRANSIENT and c.rows()[-1]["step"] < len(transient):
                        rec.survived = False
            c.judge_stop(kind, code, out, ["teacher 'adder'", self.proxy.url], note)
            self.armed.clear()
            if kind == "teacher_killed":
                self.proxy.target = self.server.replace()
        c.finish()
        return c.records


def _nan_logprob(answer):
    items = answer if isinstance(answer, list) else [answer]
    entries = items[0]["meta_info"]["input_token_logprobs"]
    entries[len(entries) // 2][0] = float("nan")
    return answer


def _short_logprobs(answer):
    items = answer if isinstance(answer, list) else [answer]
    items[-1]["meta_info"]["input_token_logprobs"].pop()
    return answer


# --------------------------------------------------------------------------------------
# the campaign


def table(records: list[Record]) -> str:
    """The campaign's table and its last line."""
    head = ("fault", "backend", "runs", "survived", "resumed exactly", "data lost")
    rows = []
    for key, (label, backend) in FAULTS.items():
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


def run_setup(setup: Setup, reps: int, seed: int, out: list[Record]) -> None:
    """The reference, then `reps` chains of one set-up."""
    try:
        setup.run_reference()
        for i in range(reps):
            rng = random.Random(f"{seed}-{setup.name}-{i}")
            out += setup.chain(f"{setup.name}#{i + 1}", rng)
    finally:
        setup.close()


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; print one line per fault and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every fault twice (~10 min)")
    parser.add_argument("--reps", type=int, default=None, help="chains per set-up (5; 2 quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the faults' moments")
    parser.add_argument("--only", nargs="*", default=None, help="set-ups: single two_ranks teacher")
    parser.add_argument("--jobs", type=int, default=2, help="set-ups run at once (default 2)")
    parser.add_argument("--keep", default=None, help="work folder to keep (default: temporary)")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    t0 = time.monotonic()
    root = Path(args.keep or tempfile.mkdtemp(prefix="mopd_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        tiny = build_tiny(root / "tiny")
        makers = {
            "two_ranks": lambda: TwoRanks(root, tiny),
            "teacher": lambda: TeacherSide(root, tiny),
            "single": lambda: Single(root, tiny, args.quick),
        }
        names = [n for n in makers if args.only is None or n in args.only]
        records: list[Record] = []
        pending = list(names)
        threads: list[threading.Thread] = []
        while pending or threads:
            threads = [t for t in threads if t.is_alive()]
            while pending and len(threads) < args.jobs:
                setup = makers[pending.pop(0)]()
                t = threading.Thread(target=run_setup, args=(setup, reps, args.seed, records))
                t.start()
                threads.append(t)
            time.sleep(0.5)
        print(table(records))
        print(f"wall time {time.monotonic() - t0:.0f} s", flush=True)
        return 0 if all(r.survived and r.resumed and not r.lost for r in records) else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
