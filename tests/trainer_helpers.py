"""Helpers of the trainer tests (`test_trainer.py`): the tiny recipe, running `mopd train`
in this process or as a subprocess, reading what a run wrote, waiting and killing."""

from __future__ import annotations

import math
import os
import socket
import subprocess
from pathlib import Path

import pytest

from megatron_mopd.cli import main
from megatron_mopd.toy.recipe_runs import (  # noqa: F401 - re-exported to the tests
    PROMPTS_PER_STEP,
    PY,
    REPO,
    TIMING_KEYS,
    build_tiny,
    checkpoints,
    comparable,
    dataset_lines,
    kill_group,
    make_recipe,
    metrics,
    start_train,
    subprocess_env,
    wait_for,
    write_recipe,
)


def train_in_process(capsys, recipe: str, *overrides: str) -> tuple[int, str]:
    """`mopd train` through the CLI entry point in this process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", recipe, *overrides])
    return e.value.code, capsys.readouterr().err


def finish(proc: subprocess.Popen, log: str | os.PathLike, timeout: float = 400) -> str:
    """Wait for a `start_train` process; fail with its output unless it exits 0."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"mopd train timed out:\n{Path(log).read_text()[-4000:]}") from None
    out = Path(log).read_text(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    return out


def assert_rows_close(got: list[dict], want: list[dict], tol: float) -> None:
    """Same steps, same keys, every number within `tol` (absolute and relative)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        g, w = comparable(g), comparable(w)
        assert g.keys() == w.keys(), (g.keys() ^ w.keys(), g["step"])
        for key, value in w.items():
            if isinstance(value, float) and math.isfinite(value):
                assert g[key] == pytest.approx(value, rel=tol, abs=tol), (g["step"], key)
            else:
                assert g[key] == value, (g["step"], key)


def one_error_line(err: str) -> str:
    """The single `mopd train: error:` line of `err` (which holds no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum(": error: " in line for line in lines) == 1, err
    assert lines[-1].startswith("mopd train: error: "), err
    return lines[-1]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
