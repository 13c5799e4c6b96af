"""A small part of the fault campaign (`tools/faults.py`) in the default suite.

- the campaign's checks on their own: a corrupted checkpoint (each kind) against
  `find_resume`, a dataset line broken and the trainer's refusal of it, metrics rows
  compared within 1e-6, lost steps and duplicated steps found;
- oversized and malformed requests to `mopd serve`'s server (each answered 4xx, the
  server keeps serving), the proxy's hang and raw answers, the inotify watch;
- one chain of real `mopd train` launches: SIGKILLed before its first checkpoint, then
  relaunched under a file-size limit (the campaign's disk-full fault): the relaunch
  starts over without duplicating the killed launch's row, and its failed save is one
  clear error line with the partial save removed.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from sglang_helpers import FlakyProxy, InProcessServer
from trainer_helpers import build_tiny

from megatron_mopd.checkpoint import CheckpointManager
from megatron_mopd.toy import fault_checks as checks
from megatron_mopd.toy.fault_campaign import Chain, CreationWatch, Record, Setup, table
from megatron_mopd.toy.fault_servers import hostile_requests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """The tiny recipe's models and dataset, built once for the module."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def _save(mgr: CheckpointManager, step: int) -> None:
    def write(tmp: str) -> None:
        torch.save({"w": torch.arange(1000.0) * step}, f"{tmp}/rank_00000.pt")
        Path(tmp, "trainer.json").write_text(json.dumps({"step": step}))

    mgr.save(step, write)


def test_corruptions_and_what_resume_sees(tmp_path):
    """Each kind of corruption (a truncated file, same-size garbage, a missing manifest)
    makes the checkpoint fail to verify: resume falls back to the older one."""
    seen = set()
    for seed in range(20):
        run = tmp_path / str(seed)
        mgr = CheckpointManager(str(run / "checkpoints"), keep_last=5, log=lambda m: None)
        _save(mgr, 1)
        _save(mgr, 2)
        folder = run / "checkpoints" / "step_00000002"
        how = checks.corrupt_checkpoint(str(folder), random.Random(seed))
        seen.add(next(k for k in ("truncated", "random bytes", "manifest") if k in how))
        assert mgr.find_resume().step == 1, how
        problems = checks.unreadable_checkpoints(run)
        assert problems and problems[0].startswith("step_00000002: "), (how, problems)
    assert seen == {"truncated", "random bytes", "manifest"}


def test_broken_dataset_line_is_refused_with_file_and_line(tiny, tmp_path):
    from megatron_mopd.data import load_prompts
    from megatron_mopd.errors import UserError

    data = tmp_path / "train.jsonl"
    data.write_text(Path(tiny["data"]).read_text())
    kinds = set()
    for seed in range(12):
        line, kind, original = checks.break_dataset_line(str(data), random.Random(seed))
        kinds.add(kind)
        if kind == "unknown domain":  # refused by the domain check, not the loader
            rows = [json.loads(x) for x in data.read_text().splitlines()]
            assert rows[line - 1]["domain"] == "poetry"
        else:
            with pytest.raises(UserError, match=f"{data}:{line}: "):
                load_prompts(str(data))
        data.write_text(original)
    assert kinds == {"not JSON", "unknown domain", "no prompt"}


def test_rows_compared_and_lost_steps_found(tmp_path):
    rows = [{"step": s, "loss": 0.5 * s, "time/step": s, "skipped": False} for s in (1, 2, 3)]
    near = [{**r, "loss": r["loss"] + 1e-8, "time/step": 99.0} for r in rows]
    assert checks.rows_differ(near, rows) is None
    far = [dict(r) for r in rows]
    far[1]["loss"] += 1e-4
    assert "step 2: loss" in checks.rows_differ(far, rows)
    assert "steps" in checks.rows_differ(rows[:2], rows)
    run = tmp_path / "run"
    mgr = CheckpointManager(str(run / "checkpoints"), keep_last=5, log=lambda m: None)
    for s in (1, 2, 3):
        _save(mgr, s)
    lines = [json.dumps(r) for r in rows]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert checks.data_problems(run, 3) == []
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[0], lines[2], "{half"]) + "\n")
    (run / "checkpoints" / "step_00000002" / "rank_00000.pt").write_bytes(b"x")
    problems = " | ".join(checks.data_problems(run, 3))
    assert "1 unreadable line" in problems and "missing [2], twice [1]" in problems
    assert "step_00000002: file rank_00000.pt has 1 bytes" in problems


def test_hostile_requests_and_the_proxy(tiny, tmp_path):
    server = InProcessServer(tiny["t_add"])
    answers = [("hang", 1.0), ("raw", lambda body: body[:7]), None]
    proxy = FlakyProxy(server.url, lambda n, m, p: answers[n] if n < len(answers) else None)
    try:
        results = hostile_requests(server.url)
        assert len(results) == 10 and all(want == got for _, want, got in results), results
        body = {"input_ids": [1, 5], "sampling_params": {"max_new_tokens": 0}}
        t0 = time.monotonic()
        with pytest.raises(httpx.HTTPError):  # no answer, not forwarded
            httpx.post(proxy.url + "/generate", json=body, timeout=5)
        assert 0.9 < time.monotonic() - t0 < 5
        cut = httpx.post(proxy.url + "/generate", json=body, timeout=30)
        assert cut.status_code == 200 and len(cut.content) == 7
        assert httpx.post(proxy.url + "/generate", json=body, timeout=30).json()["meta_info"]
    finally:
        proxy.stop()
        server.stop()


def test_creation_watch(tmp_path):
    watch = CreationWatch(tmp_path)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "other").mkdir()
        (tmp_path / "tmp.step_00000001").mkdir()
        assert watch.wait("tmp.step_", 5, sleeper) == "tmp.step_00000001"
        assert watch.wait("tmp.step_", 0.3, sleeper) is None
    finally:
        sleeper.kill()
        watch.close()


def test_killed_before_first_checkpoint_then_disk_full(tiny, tmp_path):
    """Two launches of one chain (checkpoint every 2 steps): SIGKILL after step 1, then a
    relaunch whose files may not exceed 64 KiB (the model's checkpoint file is ~870 KB)."""
    setup = Setup("mini", tmp_path, tiny, nproc=1, max_steps=2)
    setup.sections["checkpoint"] = {"interval": 2, "keep_last": 5}
    chain = Chain(setup, "chain", random.Random(0))
    launch = chain.start()
    assert chain.wait_row(launch, 1, timeout=200), launch.output()[-3000:]
    launch.proc.send_signal(signal.SIGKILL)
    launch.wait(60)
    assert [r["step"] for r in chain.rows()] == [1] and chain.next_step() == 1

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    code, out = chain.start(preexec_fn=small_disk).wait(200)
    chain.judge_stop("disk_full", code, out, ["checkpoint of step 2 could not be written"], "")
    assert code == 2 and chain.records[-1].survived, out[-3000:]
    assert "no earlier checkpoint exists" in checks.error_line(out)
    assert [r["step"] for r in chain.rows()] == [1, 2]  # the killed launch's row is gone
    assert not list((chain.run_dir / "checkpoints").iterdir())  # partial save removed
    chain.records.append(Record("kill_step_1", "chain", "", True, False, False))
    text = table(chain.records, {"kill_step_1": ("kill", "x"), "disk_full": ("disk", "y")})
    assert text.splitlines()[-1] == "2 faults injected, 2 survived, 0 resumed exactly, 0 data lost"


def test_shared_memory_refusal_is_a_clear_error():
    """The engine child's weights go through /dev/shm: torch's refusal there (full, or a
    file-size limit, as the campaign's disk-full fault met) is a TeacherError naming the
    engine, not a traceback."""
    from megatron_mopd.child_process import ChildProcess
    from megatron_mopd.errors import TeacherError

    class Refusing:
        def send(self, msg):
            raise RuntimeError(
                "unable to resize file </torch_1_2_0> to the right size: File too large (27)"
            )

    child = ChildProcess.__new__(ChildProcess)
    child.what, child.pid, child._conn = "embedded rollout engine (/m)", 123, Refusing()
    with pytest.raises(TeacherError) as e:
        child.send(("weights", {}, [], "step_1"))
    assert str(e.value).startswith("embedded rollout engine (/m) (child process 123): cannot hand")
    assert "File too large (27)" in str(e.value) and "/dev/shm" in str(e.value)
