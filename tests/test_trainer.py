"""`mopd train` end to end on tiny models: bad inputs, failures mid-run, kill and resume.

The recipe (`make_recipe`): a tiny Qwen3-MoE student, two embedded teachers (domains
`add` and `rev`), a 40-line JSONL dataset, 4 prompts x 2 samples a step, an embedded
rollout engine, the distributed optimizer, checkpoints every 2 steps.

Default run (1-1.5 minutes on 2 cores):

- bad inputs (in this process, through `cli.main`): each is exit code 2 with one error
  line and no traceback, before any training (no metrics row, no checkpoint); an
  unreachable teacher is given up on after its `startup_timeout_seconds`;
- the GPU recipe's topology in small: teacher and rollout servers (our SGLang-compatible
  server) each behind the real sglang-router, weights synced through disk;
- a teacher served by `mopd serve` and stopped after step 2: the scoring request is
  retried per the teacher's `max_retries`, then the run stops naming the teacher, with
  no metrics row for the failed step and a checkpoint of the last trained step whose
  prompt sampler has not skipped the failed step's prompts;
- non-finite steps (a reward function returning NaN with `loss.alpha > 0`: the GRPO
  advantage, hence the loss and every gradient, is NaN; no hook in the product code):
  logged with `skipped: true`, and the run stops after `train.max_consecutive_nonfinite`
  in a row, with a checkpoint;
- SIGKILL after the first checkpoint, then the same command again: the metrics (and
  eval) rows of every step equal those of an uninterrupted run *exactly* (all logged
  numbers but wall times and throughput). Exact, not within a tolerance: on one process
  with one thread the resumed run does the same float operations on the same values
  (model, Adam moments and step count, LR schedule, prompt sampler, and rollout seeds
  derived from (seed, step)), so any difference is a resume bug, not noise;
- `tools/launch.sh`: usage and refused environments.

Slow (multi-process): the same kill-and-resume under torchrun with 2 ranks (EP2, plain
optimizer, compared exactly with an uninterrupted run started through `tools/launch.sh`
with the c10d rendezvous); a checkpoint written at world size 1 resumed by 2 ranks as DP2
and as EP2: the later steps match the uninterrupted single-process run within 1e-5
(gradients are reduced in another order, so exact equality is not expected; measured
differences are below 1e-6); a teacher dying under torchrun: every rank stops together
after saving, and only rank 0 reports it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from trainer_helpers import (
    PROMPTS_PER_STEP,
    PY,
    REPO,
    assert_rows_close,
    build_tiny,
    checkpoints,
    closed_port,
    finish,
    kill_group,
    main,
    make_recipe,
    metrics,
    one_error_line,
    start_train,
    subprocess_env,
    train_in_process,
    wait_for,
    write_recipe,
)

# --------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """The models and the dataset, built once for the module."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


# --------------------------------------------------------------------------------------
# bad input: one error line, exit code 2, nothing trained


def _bad_dataset(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_inputs_fail_before_training(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny, run_dir))
    good = json.dumps({"prompt": "1+1=", "domain": "add", "answer": "2"})
    malformed = _bad_dataset(tmp_path, "malformed.jsonl", [good, good, '{"prompt": "2+2=", "do'])
    no_domain = _bad_dataset(
        tmp_path, "poetry.jsonl", [good, json.dumps({"prompt": "roses", "domain": "poetry"})]
    )
    port = closed_port()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    cases = [
        # (overrides or a recipe, what the one error line must contain)
        (
            [write_recipe(tmp_path / "k.yaml", {**make_recipe(tiny, run_dir), "trian": {}})],
            ["unknown key 'trian'"],
        ),
        ([recipe, "train.max_steps=many"], ["train.max_steps='many' must be an integer"]),
        ([recipe, "train.nope=1"], ["unknown key 'train.nope'"]),
        ([recipe, "train.max_steps"], ["is not of the form key.path=value"]),
        (
            [recipe, f"data.train_path={tmp_path}/missing.jsonl"],
            [f"{tmp_path}/missing.jsonl: no such file"],
        ),
        ([recipe, f"data.train_path={malformed}"], [f"{malformed}:3: not valid JSON"]),
        (
            [recipe, f"data.eval_path={no_domain}"],
            [f"{no_domain}:2:", "'poetry'", "no teacher"],
        ),
        (
            [
                recipe,
                "teachers.adder.backend=sglang",
                "teachers.adder.hf_path=null",
                f"teachers.adder.urls=[http://127.0.0.1:{port}]",
                "teachers.adder.startup_timeout_seconds=2",
            ],
            ["teacher 'adder'", f"http://127.0.0.1:{port}", "domain(s) 'add'", "refused"],
        ),
        ([recipe, f"run_dir={blocker}/run"], [f"run_dir {blocker}/run: not writable"]),
    ]
    for argv, needles in cases:
        t0 = time.monotonic()
        code, err = train_in_process(capsys, *argv)
        line = one_error_line(err)
        assert code == 2, (argv, err)
        for needle in needles:
            assert needle in line, (needle, line)
        assert metrics(run_dir) == [] and checkpoints(run_dir) == [], argv
        # the unreachable teacher is given up on after its startup_timeout_seconds
        assert time.monotonic() - t0 < 60, argv


# --------------------------------------------------------------------------------------
# the GPU recipe's topology: teacher and rollout servers behind sglang-router


def test_train_through_sglang_router(tiny, tmp_path, capsys):
    """Teacher and student served by `SGLangCompatibleServer`s, each behind the real
    sglang-router (as `examples/qwen3_30b_a3b` deploys them): the start-up checks pass
    through the routers, and every step's weights reach the rollout worker from disk."""
    from sglang_helpers import InProcessServer, start_router

    servers = [InProcessServer(tiny["t_add"]), InProcessServer(tiny["student"])]
    routers = []
    try:
        for i, server in enumerate(servers):
            router, url = start_router([server.url], str(tmp_path / f"router{i}.log"))
            if router is None:
                pytest.skip(url)
            routers.append((router, url))
        (_, teacher_url), (_, rollout_url) = routers
        run_dir = tmp_path / "run"
        raw = make_recipe(
            tiny,
            run_dir,
            teachers={
                "adder": {"backend": "sglang", "urls": [teacher_url], "domains": ["add", "rev"]}
            },
            rollout={"backend": "sglang", "urls": [rollout_url], "weight_sync": "disk"},
            train={"max_steps": 2, "eval_interval": 0},
            checkpoint={"interval": 0},
        )
        code, err = train_in_process(capsys, write_recipe(tmp_path / "r.yaml", raw))
        assert code == 0, err
        assert servers[1].server.engine.weight_version == "step_2"
    finally:
        for router, _ in routers:
            router.stop()
        for server in servers:
            server.stop()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and not any(r["skipped"] for r in rows)
    assert rows[-1]["teacher_sequences/add"] + rows[-1]["teacher_sequences/rev"] == 8
    assert (run_dir / "weights" / "step_2" / "config.json").exists()
    assert checkpoints(run_dir) == ["step_00000002"]


# --------------------------------------------------------------------------------------
# a teacher dies mid-run


def test_teacher_dies_mid_run(tiny, tmp_path, capsys):
    from sglang_helpers import start_serve_subprocess

    server, url = start_serve_subprocess(tiny["t_add"], str(tmp_path / "serve.log"))
    run_dir = tmp_path / "run"
    raw = make_recipe(
        tiny,
        run_dir,
        teachers={  # one teacher for both domains: one scoring request per step
            "adder": {
                "backend": "sglang",
                "urls": [url],
                "domains": ["add", "rev"],
                "max_retries": 2,
                "retry_backoff_seconds": 0.1,
                "startup_timeout_seconds": 30,
            }
        },
        train={"max_steps": 100, "eval_interval": 0},
        checkpoint={"interval": 0},  # only the failure leaves a checkpoint
    )
    recipe = write_recipe(tmp_path / "r.yaml", raw)

    def stop_after_step_2() -> None:
        try:
            wait_for(lambda: len(metrics(run_dir)) >= 2, 300, what="step 2")
        finally:
            server.stop()

    killer = threading.Thread(target=stop_after_step_2, daemon=True)
    killer.start()
    try:
        code, err = train_in_process(capsys, recipe)
    finally:
        server.stop()
        killer.join(10)
    line = one_error_line(err)
    assert code == 2
    rows = metrics(run_dir)
    assert rows, err
    trained = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, trained + 1)) and trained >= 2
    assert not any(r["skipped"] for r in rows)
    # the failed step: retried per the teacher's policy, named, and not trained
    assert f"step {trained + 1} failed and was not trained" in line
    assert "teacher 'adder'" in line and url in line
    assert "failed after 3 attempt(s) (max_retries=2)" in line
    assert f"checkpoint of step {trained}" in line
    # the checkpoint is that of the last trained step, and its sampler has not consumed
    # the failed step's prompts (a resume trains them)
    assert checkpoints(run_dir) == [f"step_{trained:08d}"]
    state = json.loads(
        (run_dir / "checkpoints" / f"step_{trained:08d}" / "trainer.json").read_text()
    )
    assert state["step"] == trained
    assert state["sampler"]["epoch"] * 40 + state["sampler"]["pos"] == trained * PROMPTS_PER_STEP


# --------------------------------------------------------------------------------------
# non-finite steps


NAN_REWARDS = '''
"""A reward that is NaN on chosen steps (8 calls per step: 4 prompts x 2 samples)."""
import os

CALLS = 0


def reward(response: str, answer: str) -> float:
    global CALLS
    step = CALLS // 8 + 1
    CALLS += 1
    bad = {int(s) for s in os.environ["MOPD_TEST_NAN_STEPS"].split(",")}
    return float("nan") if step in bad else float(response.strip() == answer.strip())
'''


def test_nonfinite_steps_are_skipped_then_stop(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "nan_rewards.py").write_text(NAN_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MOPD_TEST_NAN_STEPS", "2,4,5")
    run_dir = tmp_path / "run"
    raw = make_recipe(
        tiny,
        run_dir,
        rewards={"add": "nan_rewards:reward", "rev": "nan_rewards:reward"},
        loss={"alpha": 1.0},
        train={"max_steps": 8, "eval_interval": 0, "max_consecutive_nonfinite": 2},
        checkpoint={"interval": 0},
    )
    code, err = train_in_process(capsys, write_recipe(tmp_path / "r.yaml", raw))
    line = one_error_line(err)
    assert code == 2
    assert "stopped at step 5: 2 steps in a row had a non-finite loss or gradient" in line
    rows = metrics(run_dir)
    assert [(r["step"], r["skipped"]) for r in rows] == [
        (1, False),
        (2, True),
        (3, False),
        (4, True),
        (5, True),
    ]
    assert all(r["loss"] == "nan" for r in rows if r["skipped"])
    assert all(math.isfinite(r["loss"]) for r in rows if not r["skipped"])
    # a skipped step does not move the LR schedule (warmup: lr grows only on real steps)
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == lrs[1] < lrs[2] == lrs[3] == lrs[4]
    assert checkpoints(run_dir) == ["step_00000005"]


# --------------------------------------------------------------------------------------
# kill and resume


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> tuple[Path, subprocess.Popen]:
    """An uninterrupted single-process run of the tiny recipe (6 steps, checkpoints at
    2, 4, 6), started in the background (it overlaps with the test that needs it);
    `uninterrupted_done` waits for it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(root / "r.yaml", make_recipe(tiny, root / "run"))
    proc = start_train(recipe, log=root / "train.log")
    return root, proc


def uninterrupted_done(uninterrupted: tuple[Path, subprocess.Popen]) -> Path:
    """Wait for the `uninterrupted` run; returns its run_dir."""
    root, proc = uninterrupted
    if proc.returncode is None:
        finish(proc, root / "train.log")
    assert proc.returncode == 0
    return root / "run"


def test_kill_and_resume_single_process(tiny, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny, run_dir))
    log = tmp_path / "killed.log"
    proc = start_train(recipe, log=log)
    try:
        # kill it after its first checkpoint, in the middle of the next interval
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 300, proc, "checkpoint")
        wait_for(lambda: len(metrics(run_dir)) >= 3, 300, proc, "step 3")
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(metrics(run_dir))
    assert killed_at < 6
    out = finish(start_train(recipe, log=tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert "resuming from" in out and ("(step 2)" in out or "(step 4)" in out)
    reference = uninterrupted_done(uninterrupted)
    assert_rows_close(metrics(run_dir), metrics(reference), tol=0.0)
    assert_rows_close(metrics(run_dir, "eval.jsonl"), metrics(reference, "eval.jsonl"), tol=0.0)
    assert checkpoints(run_dir) == checkpoints(reference)


# --------------------------------------------------------------------------------------
# slow: several ranks


def _launch_script(recipe: str, log: Path, *overrides: str) -> subprocess.Popen:
    """`tools/launch.sh RECIPE` on one node with 2 processes (c10d rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NNODES": "1",
            "NODE_RANK": "0",
            "NPROC_PER_NODE": "2",
            "PYTHON": PY,
        }
    )
    with open(log, "wb") as f:
        return subprocess.Popen(
            ["bash", str(REPO / "tools" / "launch.sh"), recipe, *overrides],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_launch_script_usage_and_bad_environment(tmp_path):
    script = str(REPO / "tools" / "launch.sh")
    out = subprocess.run(["bash", script], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: tools/launch.sh RECIPE.yaml" in out.stdout
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "NODE_RANK" in out.stdout
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run_dir: x\n")
    for env, needle in [
        ({"NNODES": "2", "NODE_RANK": "2"}, "0 <= NODE_RANK < NNODES"),
        ({"NNODES": "2", "NODE_RANK": "1"}, "needs MASTER_ADDR"),
        ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two must be"),
    ]:
        out = subprocess.run(
            ["bash", script, str(recipe)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        assert out.returncode == 2 and needle in out.stderr, (env, out.stderr)
    out = subprocess.run(["bash", script, str(tmp_path / "nope.yaml")], capture_output=True)
    assert out.returncode == 2 and b"no such file" in out.stderr


@pytest.mark.slow
@pytest.mark.multirank
def test_kill_and_resume_two_ranks(tiny, tmp_path):
    """EP2 on 2 ranks with the plain optimizer: killed after its first checkpoint and
    restarted, it logs exactly what an uninterrupted run (started with tools/launch.sh)
    logs."""
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    layout = {"ep": 2, "use_distributed_optimizer": False}
    base_recipe = write_recipe(tmp_path / "b.yaml", make_recipe(tiny, base_dir, parallel=layout))
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny, run_dir, parallel=layout))
    base = _launch_script(base_recipe, tmp_path / "base.log")
    proc = start_train(recipe, log=tmp_path / "killed.log", nproc=2)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 600, proc, "checkpoint")
        wait_for(lambda: len(metrics(run_dir)) >= 3, 600, proc, "step 3")
    finally:
        kill_group(proc)
    assert len(metrics(run_dir)) < 6
    log = tmp_path / "resumed.log"
    out = finish(start_train(recipe, log=log, nproc=2), log, timeout=600)
    assert "resuming from" in out
    finish(base, tmp_path / "base.log", timeout=600)
    assert_rows_close(metrics(run_dir), metrics(base_dir), tol=0.0)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.ep=1"], ids=["ep2", "dp2"])
def test_resume_at_another_layout(tiny, tmp_path, uninterrupted, layout):
    """A checkpoint of the single-process run (step 2) resumed by 2 ranks continues with
    the same metrics within 1e-5."""
    reference = uninterrupted_done(uninterrupted)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")  # resume from step 2
    raw = make_recipe(tiny, run_dir)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    log = tmp_path / "resumed.log"
    out = finish(start_train(recipe, layout, log=log, nproc=2), log, timeout=600)
    assert "(step 2)" in out
    assert_rows_close(metrics(run_dir), metrics(reference), tol=1e-5)


@pytest.mark.slow
@pytest.mark.multirank
def test_teacher_dies_mid_run_two_ranks(tiny, tmp_path):
    """Under torchrun the driver's failure reaches every rank through the batch broadcast:
    they save the last trained step together (no hang in mismatched collectives), and
    only rank 0 reports the error."""
    from sglang_helpers import start_serve_subprocess

    server, url = start_serve_subprocess(tiny["t_add"], str(tmp_path / "serve.log"))
    run_dir = tmp_path / "run"
    teacher = {"backend": "sglang", "urls": [url], "domains": ["add", "rev"], "max_retries": 1}
    raw = make_recipe(
        tiny,
        run_dir,
        parallel={"ep": 2},
        teachers={"adder": {**teacher, "retry_backoff_seconds": 0.1}},
        train={"max_steps": 100, "eval_interval": 0},
        checkpoint={"interval": 0},
    )
    log = tmp_path / "train.log"
    proc = start_train(write_recipe(tmp_path / "r.yaml", raw), log=log, nproc=2)
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 2, 600, proc, "step 2")
        server.stop()
        proc.wait(timeout=300)
    finally:
        server.stop()
        if proc.poll() is None:
            kill_group(proc)
    out = log.read_text(errors="replace")
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if "mopd train: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("mopd train: error: step "), out[-3000:]
    trained = metrics(run_dir)[-1]["step"]
    assert f"step {trained + 1} failed and was not trained" in errors[0]
    assert "teacher 'adder'" in errors[0] and f"checkpoint of step {trained}" in errors[0]
    assert checkpoints(run_dir) == [f"step_{trained:08d}"]
    assert len(list((run_dir / "checkpoints" / f"step_{trained:08d}").glob("rank_*.pt"))) == 2


# --------------------------------------------------------------------------------------
# the ablation's ORM-only arm: the teacher term switched off inside the Megatron step


def test_orm_only_ignores_the_teachers(tiny, tmp_path, capsys):
    """`loss.distill_coef=0` with `alpha=1`: swapping the two teachers changes the logged
    reverse KL (the teachers are scored and differ) but not one loss value or gradient
    norm; with the teacher term on, the same swap changes the loss."""
    swapped = {
        "adder": {"hf_path": tiny["t_rev"], "domains": ["add"]},
        "reverser": {"hf_path": tiny["t_add"], "domains": ["rev"]},
    }
    rewards = {"add": "exact_match", "rev": "exact_match"}
    rows = {}
    for name, coef in (("orm", "0"), ("mopd", "1")):
        for teachers in ("plain", "swapped"):
            run = tmp_path / f"{name}_{teachers}"
            sections = {"rewards": rewards, "train": {"max_steps": 2, "eval_interval": 0}}
            if teachers == "swapped":
                sections["teachers"] = swapped
            recipe = write_recipe(
                tmp_path / f"{name}_{teachers}.yaml", make_recipe(tiny, run, **sections)
            )
            code, err = train_in_process(
                capsys, recipe, "loss.alpha=1.0", f"loss.distill_coef={coef}"
            )
            assert code == 0, err
            rows[name, teachers] = metrics(run)
    for a, b in zip(rows["orm", "plain"], rows["orm", "swapped"]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
        kl = [k for k in a if k.startswith("reverse_kl")]
        assert kl and any(a[k] != b[k] for k in kl)
    assert rows["mopd", "plain"][0]["loss"] != rows["mopd", "swapped"][0]["loss"]


BROKEN_REWARDS = '''
"""A reward function with a bug that shows on its 17th call (step 3: 8 calls per step)."""
CALLS = 0


def reward(response: str, answer: str) -> float:
    global CALLS
    CALLS += 1
    if CALLS > 16:
        raise KeyError("oops")
    return float(response.strip() == answer.strip())
'''


def test_driver_error_mid_run_saves_and_stops(tiny, tmp_path, capsys, monkeypatch):
    """An exception on the driver between rollout and batch (here a user reward function):
    the step is not trained, the last trained step is checkpointed, the error is named (its
    traceback printed above the one-line error), exit code 2."""
    (tmp_path / "broken_rewards.py").write_text(BROKEN_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    raw = make_recipe(
        tiny,
        run_dir,
        rewards={"add": "broken_rewards:reward", "rev": "broken_rewards:reward"},
        loss={"alpha": 1.0},
        train={"max_steps": 6, "eval_interval": 0},
        checkpoint={"interval": 0},
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", write_recipe(tmp_path / "r.yaml", raw)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "Traceback" in err and "KeyError: 'oops'" in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mopd train: error: step 3 failed and was not trained: KeyError")
    assert "checkpoint of step 2" in line
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert checkpoints(run_dir) == ["step_00000002"]
