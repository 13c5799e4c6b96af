"""What the fault campaign (`tools/faults.py`) checks after a faulted run: lost data,
unreadable checkpoints, metrics equal to an uninterrupted run, the one error line.

    problems = data_problems(run_dir, max_steps)   # [] when nothing was lost
    diff = rows_differ(metrics(run_dir), reference_rows, tol=1e-6)   # None when equal
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from megatron_mopd.checkpoint import LATEST, CheckpointManager, verify_checkpoint  # noqa: F401
from megatron_mopd.toy.recipe_runs import comparable


def read_rows(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The rows of a metrics file and how many of its lines are not JSON."""
    rows, bad = [], 0
    if not os.path.exists(path):
        return rows, bad
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad += 1
    return rows, bad


def unreadable_checkpoints(run_dir: str | os.PathLike, ignore: set[str] = frozenset()) -> list[str]:
    """Published checkpoints that do not verify (folder name: problem), and a `latest`
    marker naming no verified checkpoint; folders named in `ignore` are skipped."""
    root = os.path.join(run_dir, "checkpoints")
    problems = []
    for info in CheckpointManager(root, log=lambda m: None).published():
        name = os.path.basename(info.path)
        if name in ignore:
            continue
        problem = verify_checkpoint(info.path)
        if problem is None:
            state = json.loads(Path(info.path, "trainer.json").read_text())
            if state.get("step") != info.step:
                problem = f"trainer.json says step {state.get('step')}"
        if problem is not None:
            problems.append(f"{name}: {problem}")
    latest = os.path.join(root, LATEST)
    if os.path.isfile(latest):
        name = Path(latest).read_text().strip()
        if name not in ignore and verify_checkpoint(os.path.join(root, name)) is not None:
            problems.append(f"latest names {name!r}, which does not verify")
    return problems


def data_problems(run_dir: str | os.PathLike, max_steps: int, interval: int = 1) -> list[str]:
    """After a run finished: every step 1..max_steps logged exactly once, every line of
    metrics.jsonl readable, a checkpoint of every `interval`-th step (and of the last)
    that verifies, `latest` naming the last. [] when nothing was lost."""
    rows, bad = read_rows(Path(run_dir) / "metrics.jsonl")
    problems = []
    if bad:
        problems.append(f"{bad} unreadable line(s) in metrics.jsonl")
    steps = [r.get("step") for r in rows]
    if steps != list(range(1, max_steps + 1)):
        missing = sorted(set(range(1, max_steps + 1)) - set(steps))
        twice = sorted({s for s in steps if steps.count(s) > 1})
        problems.append(f"metrics steps {steps} (missing {missing}, twice {twice})")
    problems += unreadable_checkpoints(run_dir)
    want = {s for s in range(1, max_steps + 1) if s % interval == 0} | {max_steps}
    have = {c.step for c in CheckpointManager(os.path.join(run_dir, "checkpoints")).published()}
    if want - have:
        problems.append(f"no checkpoint of step(s) {sorted(want - have)}")
    latest = Path(run_dir, "checkpoints", LATEST)
    if not latest.is_file() or latest.read_text().strip() != f"step_{max_steps:08d}":
        problems.append("latest does not name the last step")
    return problems


def rows_differ(got: list[dict], want: list[dict], tol: float = 1e-6) -> str | None:
    """None when `got` has the rows of `want` (same steps and keys, numbers within `tol`
    absolute or relative, wall times ignored); else the first difference."""
    if [r.get("step") for r in got] != [r.get("step") for r in want]:
        return f"steps {[r.get('step') for r in got]} != {[r.get('step') for r in want]}"
    for g, w in zip(got, want):
        g, w = comparable(g), comparable(w)
        if g.keys() != w.keys():
            return f"step {w['step']}: keys differ: {sorted(g.keys() ^ w.keys())}"
        for key, value in w.items():
            other = g[key]
            if isinstance(value, float) and isinstance(other, float) and math.isfinite(value):
                if abs(other - value) > tol * max(1.0, abs(value)):
                    return f"step {w['step']}: {key} = {other!r}, uninterrupted {value!r}"
            elif other != value:
                return f"step {w['step']}: {key} = {other!r}, uninterrupted {value!r}"
    return None


def error_line(output: str) -> str | None:
    """The last `mopd train: error: ...` line of a run's output (None if there is none)."""
    lines = [ln for ln in output.splitlines() if "mopd train: error:" in ln]
    return lines[-1][lines[-1].index("mopd train: error:") :] if lines else None


def has_traceback(output: str, nproc: int) -> bool:
    """Whether a run's output holds a Python traceback of the trainer. Under torchrun
    (`nproc > 1`) the trainer's lines carry a `[rankN]:` prefix, and the launcher's own
    traceback (its `ChildFailedError` after a rank exited non-zero) does not count."""
    for line in output.splitlines():
        if "Traceback (most recent call last)" not in line:
            continue
        if nproc == 1 or line.startswith("[rank"):
            return True
    return False


def corrupt_checkpoint(folder: str, rng: random.Random) -> str:
    """Damage a published checkpoint as a failing disk or a stray write would; returns
    how. Kinds: a file truncated to half, a file's bytes overwritten with garbage of the
    same size (sizes still match the manifest), the manifest removed."""
    files = sorted(
        str(p) for p in Path(folder).rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    kind = rng.choice(["truncate", "garbage", "no_manifest"])
    if kind == "no_manifest":
        os.remove(os.path.join(folder, "manifest.json"))
        return "manifest.json removed"
    target = max(files, key=os.path.getsize) if rng.random() < 0.5 else rng.choice(files)
    size = os.path.getsize(target)
    rel = os.path.relpath(target, folder)
    if kind == "truncate":
        with open(target, "r+b") as f:
            f.truncate(size // 2)
        return f"{rel} truncated from {size} to {size // 2} bytes"
    with open(target, "r+b") as f:
        f.write(bytes(rng.randrange(256) for _ in range(size)))
    return f"{rel} overwritten with {size} random bytes"


def break_dataset_line(path: str, rng: random.Random) -> tuple[int, str, str]:
    """Make one random line of a JSONL dataset bad; returns (line number, how, the
    original text to restore)."""
    original = Path(path).read_text()
    lines = original.splitlines()
    n = rng.randrange(len(lines))
    kind = rng.choice(["not JSON", "unknown domain", "no prompt"])
    row = json.loads(lines[n])
    if kind == "not JSON":
        lines[n] = lines[n][: len(lines[n]) // 2]
    elif kind == "unknown domain":
        lines[n] = json.dumps({**row, "domain": "poetry"})
    else:
        lines[n] = json.dumps({k: v for k, v in row.items() if k != "prompt"})
    Path(path).write_text("\n".join(lines) + "\n")
    return n + 1, kind, original
