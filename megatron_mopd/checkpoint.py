"""Crash-safe training checkpoints: atomic publish, a `latest` marker, keep-last-K, resume.

Layout under the checkpoint root (default `RUN_DIR/checkpoints`):

    step_00000020/            a published checkpoint (never modified after publishing)
        mcore/                megatron-core dist_checkpointing (model, optimizer) when used
        rank_00000.pt ...     per-rank state (RNG streams, anything rank-local)
        trainer.json          step, data position, weight version, ... (rank 0)
        manifest.json         every file with its size and a fingerprint, written last
    latest                    text: the name of the newest published checkpoint
    tmp.step_00000030.<pid>/  a save in progress (ignored and removed on the next save)

A save writes everything under a temporary name, checks it, renames the folder into
place, then rewrites `latest` (itself through a temporary file and a rename). A crash at
any moment therefore leaves the previous checkpoint usable. On resume, `latest` is read;
if it names a checkpoint whose manifest is missing or does not match the files, that is
reported and the newest older checkpoint that verifies is used instead.

The collective parts (dist_checkpointing) are passed in as a callable so this module
stays free of Megatron: `save(step, write_fn)` calls `write_fn(tmp_dir)` on every rank
between barriers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_mopd.errors import UserError

_STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
LATEST = "latest"


@dataclass
class CheckpointInfo:
    """A published checkpoint found on disk."""

    step: int
    path: str


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of `step`."""
    return f"step_{step:08d}"


def _barrier(group=None) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (never half-written)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# files up to 3 MiB are hashed whole; larger ones by three 1 MiB samples (start, middle,
# end), so a save reads at most 3 MiB per file more
_SAMPLE_BYTES = 1 << 20
DIGEST_KIND = "blake2b-128 of the file, or of 3 samples of 1 MiB above 3 MiB"


def file_digest(path: str) -> str:
    """A fingerprint of a file's bytes (see `DIGEST_KIND`): catches a file overwritten or
    garbled after the save even where its size still matches; a change confined to
    the unsampled middle of a large file is not seen."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= 3 * _SAMPLE_BYTES:
            h.update(f.read())
        else:
            for offset in (0, size // 2 - _SAMPLE_BYTES // 2, size - _SAMPLE_BYTES):
                f.seek(offset)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def write_manifest(folder: str) -> dict[str, int]:
    """Record every file under `folder` with its size and fingerprint in
    `folder/manifest.json`."""
    files: dict[str, int] = {}
    digests: dict[str, str] = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel == MANIFEST:
                continue
            files[rel] = os.path.getsize(full)
            digests[rel] = file_digest(full)
    manifest = {"files": files, "digests": digests, "digest": DIGEST_KIND, "time": time.time()}
    write_text_atomic(
        os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True)
    )
    return files


def verify_checkpoint(folder: str) -> str | None:
    """None when `folder` is a complete checkpoint; otherwise what is wrong with it."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return "missing folder"
    if not os.path.isfile(manifest):
        return f"no {MANIFEST} (the save did not finish)"
    try:
        with open(manifest) as f:
            content = json.load(f)
        files = content["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    digests = content.get("digests", {})  # absent in manifests of older versions
    for rel, size in files.items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"file {rel} is missing"
        if os.path.getsize(full) != size:
            return f"file {rel} has {os.path.getsize(full)} bytes, expected {size}"
        if rel in digests and file_digest(full) != digests[rel]:
            return f"file {rel} does not match its fingerprint (its bytes changed after the save)"
    return None


class CheckpointManager:
    """Saves and finds checkpoints under `root`; collective when torch.distributed is up.

    Every rank must call `save` and `find_resume` (they contain barriers); rank 0 does
    the renames and the `latest` marker.
    """

    def __init__(self, root: str, keep_last: int = 2, group=None, log=None):
        self.root = root
        self.keep_last = keep_last
        self.group = group
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # ---------------------------------------------------------------- listing
    def published(self) -> list[CheckpointInfo]:
        """All published checkpoint folders, oldest first (verified or not)."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = _STEP_RE.match(name)
            if m and os.path.isdir(os.path.join(self.root, name)):
                found.append(CheckpointInfo(int(m.group(1)), os.path.join(self.root, name)))
        return sorted(found, key=lambda c: c.step)

    def find_resume(self) -> CheckpointInfo | None:
        """The checkpoint to resume from: `latest` if it verifies, else the newest that does.

        Corrupt or partial checkpoints are reported (not deleted).
        """
        candidates = self.published()
        latest_name = None
        latest_file = os.path.join(self.root, LATEST)
        if os.path.isfile(latest_file):
            with open(latest_file) as f:
                latest_name = f.read().strip()
        if latest_name:
            # prefer what `latest` names; newer folders without `latest` were never published
            named = [c for c in candidates if os.path.basename(c.path) == latest_name]
            if named:
                candidates = [c for c in candidates if c.step <= named[0].step]
            else:
                self.log(f"checkpoint: {latest_file} names {latest_name!r}, which does not exist")
        for info in reversed(candidates):
            problem = verify_checkpoint(info.path)
            if problem is None:
                return info
            self.log(f"checkpoint: skipping corrupt checkpoint {info.path}: {problem}")
        return None

    # ---------------------------------------------------------------- saving
    def save(self, step: int, write_fn: Callable[[str], None]) -> str:
        """Write checkpoint `step` atomically; `write_fn(tmp_dir)` runs on every rank."""
        rank = _rank()
        final = os.path.join(self.root, step_dir_name(step))
        tmp = os.path.join(self.root, f"tmp.{step_dir_name(step)}")
        if rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise UserError(f"checkpoint directory {self.root}: cannot create: {e}") from None
            for name in os.listdir(self.root):
                if name.startswith("tmp."):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier(self.group)
        try:
            write_fn(tmp)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            self._refuse_on_write_error(step, tmp, e, rank)
            raise
        _barrier(self.group)
        if rank == 0:
            try:
                write_manifest(tmp)
            except OSError as e:
                self._refuse_on_write_error(step, tmp, e, rank)
                raise
            _fsync_dir(tmp)
            if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            write_text_atomic(os.path.join(self.root, LATEST), step_dir_name(step))
            self._prune()
        _barrier(self.group)
        return final

    def _refuse_on_write_error(self, step: int, tmp: str, error: BaseException, rank: int):
        """A save that failed writing (a full disk, a file-size limit, a lost mount):
        remove the partial save and raise a `UserError` saying what is intact. Other
        errors (bugs) are left to propagate as they are."""
        reason = write_error(error)
        if reason is None:
            return
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        older = [c for c in self.published() if verify_checkpoint(c.path) is None]
        intact = (
            f"the newest intact checkpoint is {older[-1].path}: free space and run the same "
            "command again to resume from it"
            if older
            else "no earlier checkpoint exists"
        )
        raise UserError(
            f"checkpoint of step {step} could not be written to {tmp} ({reason}); the "
            f"partial save was removed; {intact}"
        ) from None

    def _prune(self) -> None:
        published = self.published()
        for info in published[: max(0, len(published) - self.keep_last)]:
            shutil.rmtree(info.path, ignore_errors=True)


_ERRNO_RE = re.compile(r"\[Errno \d+\][^\n]*")
# what torch's zip writer (`torch.save`, dist checkpoint's files) says when a write came up
# short: ENOSPC, EFBIG (a file-size limit) and EIO end up as one of these
_SHORT_WRITE_RE = re.compile(r"(unexpected pos \d+ vs \d+|file write failed)")


def write_error(error: BaseException) -> str | None:
    """The OS error behind a failed write, as text (`[Errno 28] No space left on
    device`), found in `error`, its causes, or the text of the per-rank failures torch's
    dist checkpoint wraps; None when it is not a write error."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno is not None:
            return f"[Errno {error.errno}] {error.strerror}"
        text = str(error)
        found = _ERRNO_RE.search(text)
        if found:
            return found.group(0).strip()
        found = _SHORT_WRITE_RE.search(text)
        if found:
            return f"a write came up short: {found.group(0)}; is the disk full?"
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def rng_state() -> dict:
    """This process's random streams (python, numpy, torch CPU, CUDA when present)."""
    import random

    import numpy as np

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        from megatron.core import tensor_parallel

        state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # megatron not initialised in this process
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` returned."""
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
