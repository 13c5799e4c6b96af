"""The tiny recipe and `mopd train` runs of it as subprocesses: build, start, kill, read.

Shared by the trainer tests (`tests/trainer_helpers.py`) and the fault campaign
(`tools/faults.py`): a tiny Qwen3-MoE student, two tiny teachers (domains `add` and
`rev`), a 40-line JSONL dataset, and what a run leaves behind (metrics rows, published
checkpoints).

    tiny = build_tiny(Path("/tmp/t"))
    recipe = write_recipe("/tmp/r.yaml", make_recipe(tiny, "/tmp/run"))
    proc = start_train(recipe, log="/tmp/train.log")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
PROMPTS_PER_STEP = 4
# logged values that measure wall time: never compared between runs
TIMING_KEYS = ("time/", "tokens_per_s")


class WaitError(AssertionError):
    """A wait gave up (timed out, or the process watched exited first)."""


def dataset_lines() -> list[dict]:
    """The 40 rows of the tiny dataset: `i+i=` (domain add) and `rev:abi=` (domain rev)."""
    rows = []
    for i in range(20):
        rows.append({"prompt": f"{i}+{i}=", "domain": "add", "answer": str(2 * i)})
        rows.append({"prompt": f"rev:ab{i}=", "domain": "rev", "answer": f"ab{i}"[::-1]})
    return rows


def build_tiny(root: Path) -> dict[str, str]:
    """The tiny recipe's models and dataset under `root` (paths by role)."""
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dataset_lines()))
    return {
        "root": str(root),
        "student": make_tiny_hf_model("qwen3_moe", str(root / "student"), seed=0),
        "t_add": make_tiny_hf_model("qwen3_moe", str(root / "t_add"), seed=1),
        "t_rev": make_tiny_hf_model("qwen3", str(root / "t_rev"), seed=2),
        "data": str(data),
    }


def make_recipe(tiny: dict[str, str], run_dir: str | os.PathLike, **sections) -> dict:
    """The tiny recipe as a dict; `sections` extend its top-level sections (`teachers`
    is replaced as a whole)."""
    raw = {
        "run_dir": str(run_dir),
        "model": {"hf_path": tiny["student"]},
        # resumable at any layout (with the plain optimizer, not across EP=1 and EP>1)
        "parallel": {"use_distributed_optimizer": True},
        "data": {"train_path": tiny["data"], "eval_path": tiny["data"]},
        "rollout": {"n_samples_per_prompt": 2, "max_new_tokens": 6},
        "teachers": {
            "adder": {"hf_path": tiny["t_add"], "domains": ["add"]},
            "reverser": {"hf_path": tiny["t_rev"], "domains": ["rev"]},
        },
        "train": {
            "max_steps": 6,
            "prompts_per_step": PROMPTS_PER_STEP,
            "micro_batch_size": 2,
            "lr": 1.0e-3,
            "eval_interval": 3,
            "eval_prompts": 8,
        },
        "checkpoint": {"interval": 2, "keep_last": 10, "save_hf": False},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for key, value in sections.items():
        if key != "teachers" and isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def write_recipe(path: str | os.PathLike, raw: dict) -> str:
    """Write a recipe dict as YAML; returns its path."""
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of `mopd` subprocesses: one thread, no warnings, repo importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONUNBUFFERED="1",
        TORCH_CPP_LOG_LEVEL="ERROR",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    env.update(extra or {})
    return env


def start_train(
    recipe: str,
    *overrides: str,
    log: str | os.PathLike,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    preexec_fn=None,
) -> subprocess.Popen:
    """`mopd train` in a new session (so the whole process group can be killed), output to
    `log`; with `nproc > 1` under `torchrun --standalone`. `env` adds variables;
    `preexec_fn` runs in the child before exec (e.g. a resource limit)."""
    launcher = (
        [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else [PY]
    )
    with open(log, "wb") as f:
        return subprocess.Popen(
            [*launcher, "-m", "megatron_mopd", "train", recipe, *overrides],
            cwd=REPO,
            env=subprocess_env(env),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def metrics(run_dir: str | os.PathLike, name: str = "metrics.jsonl") -> list[dict]:
    """The rows of a run's `metrics.jsonl` (or `eval.jsonl`); raises ValueError on a line
    that is not JSON."""
    path = Path(run_dir) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """The published checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.glob("step_*")) if root.exists() else []


def comparable(row: dict) -> dict:
    """A metrics row without its wall-time fields."""
    return {k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)}


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    """Poll `predicate()` until true; raise `WaitError` on timeout or when `proc` exits
    first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise WaitError(f"the run exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise WaitError(f"timed out waiting for {what}")
