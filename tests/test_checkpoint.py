"""The atomic checkpoint manager: publish, keep-last-K, corruption and crash recovery."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_mopd.checkpoint import (
    CheckpointManager,
    rng_state,
    set_rng_state,
    step_dir_name,
    verify_checkpoint,
)


def _writer(payload):
    def write(tmp):
        torch.save(payload, os.path.join(tmp, "rank_00000.pt"))
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            f.write(json.dumps({"step": payload["step"]}))

    return write


def test_save_publishes_and_keeps_last_k(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2, log=lambda m: None)
    for step in (1, 2, 3):
        mgr.save(step, _writer({"step": step}))
    names = sorted(os.listdir(tmp_path))
    assert names == sorted([step_dir_name(2), step_dir_name(3), "latest"])
    assert (tmp_path / "latest").read_text() == step_dir_name(3)
    info = mgr.find_resume()
    assert info.step == 3
    assert torch.load(os.path.join(info.path, "rank_00000.pt"))["step"] == 3


def test_corrupt_newest_falls_back_and_is_reported(tmp_path):
    logs = []
    mgr = CheckpointManager(str(tmp_path), keep_last=3, log=logs.append)
    mgr.save(1, _writer({"step": 1}))
    mgr.save(2, _writer({"step": 2}))
    # truncate a file of the newest checkpoint
    victim = tmp_path / step_dir_name(2) / "rank_00000.pt"
    victim.write_bytes(victim.read_bytes()[:10])
    assert "bytes, expected" in verify_checkpoint(str(tmp_path / step_dir_name(2)))
    info = mgr.find_resume()
    assert info.step == 1
    assert any("corrupt" in m and step_dir_name(2) in m for m in logs)


def test_same_size_garbage_is_caught_by_the_fingerprint(tmp_path):
    """Bytes changed after the save with the size unchanged: whole-file fingerprint for a
    small file, the sampled one (start, middle, end) for a file over 3 MiB; an older
    manifest without fingerprints still verifies by size."""
    mgr = CheckpointManager(str(tmp_path), keep_last=3, log=lambda m: None)
    big = torch.zeros(1_100_000)  # 4.4 MB: sampled

    def write(tmp):
        _writer({"step": 2})(tmp)
        torch.save(big, os.path.join(tmp, "big.pt"))

    mgr.save(1, _writer({"step": 1}))
    mgr.save(2, write)
    folder = tmp_path / step_dir_name(2)
    small, large = folder / "rank_00000.pt", folder / "big.pt"
    data = bytearray(small.read_bytes())
    data[len(data) // 2] ^= 0xFF
    small.write_bytes(bytes(data))
    assert "rank_00000.pt does not match its fingerprint" in verify_checkpoint(str(folder))
    assert mgr.find_resume().step == 1
    mgr.save(2, write)
    with open(large, "r+b") as f:  # the last bytes of a sampled file
        f.seek(os.path.getsize(large) - 10)
        f.write(b"x" * 10)
    assert "big.pt does not match its fingerprint" in verify_checkpoint(str(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["digests"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(str(folder)) is None


def test_missing_manifest_is_partial(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=3, log=lambda m: None)
    mgr.save(1, _writer({"step": 1}))
    os.makedirs(tmp_path / step_dir_name(5))  # a folder that was never completed
    assert mgr.find_resume().step == 1
    assert mgr.find_resume() is not None


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=3, log=lambda m: None)
    mgr.save(1, _writer({"step": 1}))

    def boom(tmp):
        _writer({"step": 2})(tmp)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mgr.save(2, boom)
    assert mgr.find_resume().step == 1
    # the next save cleans the leftover temporary folder
    mgr.save(3, _writer({"step": 3}))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("tmp.")]
    assert mgr.find_resume().step == 3


def test_full_disk_is_one_clear_error(tmp_path):
    """A write that fails for lack of room (an OSError, or torch's zip writer's short-write
    message wrapped by dist checkpoint) is a UserError naming the step and the intact
    checkpoint, with the partial save removed; another error propagates as it is."""
    import errno

    from megatron_mopd.errors import UserError

    mgr = CheckpointManager(str(tmp_path), keep_last=3, log=lambda m: None)
    mgr.save(1, _writer({"step": 1}))

    def full(tmp):
        _writer({"step": 2})(tmp)
        raise OSError(errno.ENOSPC, "No space left on device")

    def short(tmp):
        raise RuntimeError(
            "Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
        )

    for fn, reason in (
        (full, "[Errno 28] No space left on device"),
        (short, "unexpected pos 704 vs 598"),
    ):
        with pytest.raises(UserError) as e:
            mgr.save(2, fn)
        msg = str(e.value)
        assert msg.startswith("checkpoint of step 2 could not be written to ") and reason in msg
        assert f"the newest intact checkpoint is {tmp_path / step_dir_name(1)}" in msg
        assert not [n for n in os.listdir(tmp_path) if n.startswith("tmp.")]
        assert mgr.find_resume().step == 1
    with pytest.raises(KeyError):  # a bug, not the disk: not dressed up
        mgr.save(2, lambda tmp: {}["nope"])


def test_sigkill_during_save_keeps_previous(tmp_path):
    """A process killed (SIGKILL) in the middle of writing a checkpoint loses nothing."""
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch
        from megatron_mopd.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r}, keep_last=3, log=lambda m: None)
        def write(step, slow):
            def fn(tmp):
                torch.save({{"step": step}}, os.path.join(tmp, "rank_00000.pt"))
                if slow:
                    print("writing", flush=True)
                    time.sleep(60)
            return fn
        mgr.save(1, write(1, False))
        mgr.save(2, write(2, True))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    mgr = CheckpointManager(str(tmp_path), keep_last=3, log=lambda m: None)
    info = mgr.find_resume()
    assert info.step == 1
    assert torch.load(os.path.join(info.path, "rank_00000.pt"))["step"] == 1


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
