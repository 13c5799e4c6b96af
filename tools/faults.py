"""A fault campaign: the tiny recipe trained many times with faults injected at random
moments, then a table of what survived, what resumed exactly and what was lost.

    python tools/faults.py --quick            # every fault twice: 294-430 s on 2 shared cores
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
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mopd.toy import fault_checks as checks  # noqa: E402
from megatron_mopd.toy.fault_campaign import (  # noqa: E402
    Chain,
    CreationWatch,
    Launch,
    Record,
    ServerPool,
    Setup,
    table,
)
from megatron_mopd.toy.fault_servers import FlakyProxy, hostile_requests  # noqa: E402
from megatron_mopd.toy.recipe_runs import build_tiny, kill_group  # noqa: E402

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
        if "through shared memory" in (checks.error_line(out) or ""):  # the limit hit /dev/shm
            needles = ["rollout engine", "File too large"]
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
        super().__init__("two_ranks", root, tiny, nproc=2, max_steps=8)
        self.sections["parallel"] = {"ep": 2, "use_distributed_optimizer": False}
        self.sections["rollout"] = {
            "backend": "sglang",
            "urls": ["http://127.0.0.1:9"],  # replaced by `overrides`
            "weight_sync": "disk",
            "max_retries": 2,
            "retry_backoff_seconds": 0.2,
            "startup_timeout_seconds": 120,
        }
        # every sequence forwarded alone: the server's batching of concurrent requests by
        # arrival time otherwise pads them differently from run to run, which moved
        # log mu (and a loss by ~1e-6) in a quick campaign, resumed or not
        self.rollout = ServerPool(tiny["student"], self.root, "--max-batch-tokens", "1")

    def overrides(self) -> list[str]:
        """The rollout server's URL (it changes when one is killed)."""
        return [f"rollout.urls=[{self.rollout.url}]"]

    def close(self) -> None:
        """Stop the rollout servers."""
        self.rollout.stop()

    def _kill_when(self, c: Chain, launch: Launch, fault: str, folder: str, prefix: str):
        """SIGKILL a rank 0-5 ms after a name starting with `prefix` is created in
        `folder` (a checkpoint or weight export being written)."""
        path = c.run_dir / folder
        watch = CreationWatch(path)
        try:
            name = watch.wait(prefix, 240, launch.proc)
        finally:
            watch.close()
        if name is None:
            return c.after_kill(fault, launch, f"{folder}/{prefix}* never appeared")
        time.sleep(c.rng.uniform(0, 0.005))
        who = c.kill_rank(launch)
        time.sleep(0.3)
        final = name.removeprefix("tmp.") if name.startswith("tmp.") else name[5:].rsplit("-", 1)[0]
        if (path / name).exists():
            where = "the write left unpublished"
        elif (path / final).exists():
            where = f"{final} published all the same"
        else:
            where = "the partial write removed"
        c.after_kill(fault, launch, f"{who} killed at {folder}/{name} ({where})")

    def chain(self, name: str, rng: random.Random) -> list[Record]:
        """Kill a rank during a step, a checkpoint write, a weight sync (random order);
        the rollout server killed mid-generation; hostile requests to it; to the end."""
        c = Chain(self, name, rng)
        (c.run_dir / "weights").mkdir()  # watched before the first export
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
        if c.wait_row(launch, s):  # hostile requests while a step runs, then a kill
            results = hostile_requests(self.rollout.url)
            bad = [r for r in results if r[1] != r[2]]
            c.record("hostile_rollout", f"{len(results)} requests, wrong: {bad}", not bad)
        else:
            c.record("hostile_rollout", f"row {s} never came", False)
        if c.wait_row(launch, s + 1):
            time.sleep(rng.uniform(0, 0.2))
            self.rollout.current[0].kill()
            note = f"killed after row {s + 1}"
        else:
            note = f"row {s + 1} never came"
        code, out = launch.wait()
        c.judge_stop("rollout_killed", code, out, [self.rollout.url], note)
        self.rollout.replace()
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
        super().__init__("teacher", root, tiny, nproc=1, max_steps=20)
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
        end = time.monotonic() + 60
        while self.armed and time.monotonic() < end:
            time.sleep(0.01)
        if self.armed:
            return "armed, but no scoring request came within 60 s"
        return f"scoring request #{self.proxy.count()} answered so"

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
            # the first right after the transient faults; later ones once this launch
            # has trained a step (the trainer may be a few steps ahead of this watcher:
            # `max_steps` leaves room)
            s = c.next_step() if c.launches > 1 else len(transient)
            if c.wait_row(launch, s):
                note = f"after row {c.rows()[-1]['step']}: {self._inject(c, kind)}"
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
    entries[-1][0] = float("nan")  # a response token's: never dropped by the client
    return answer


def _short_logprobs(answer):
    items = answer if isinstance(answer, list) else [answer]
    items[-1]["meta_info"]["input_token_logprobs"].pop()
    return answer


# --------------------------------------------------------------------------------------
# the campaign


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
    parser.add_argument("--jobs", type=int, default=3, help="set-ups run at once (default 3)")
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
        print(table(records, FAULTS))
        print(f"wall time {time.monotonic() - t0:.0f} s", flush=True)
        return 0 if all(r.survived and r.resumed and not r.lost for r in records) else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
