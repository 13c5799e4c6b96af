"""The embedded rollout engine in a child process, so that sampling overlaps training.

    engine = SubprocessRolloutEngine({"hf_path": "/path/to/student_hf", "seed": 1234})
    for idx, rollouts in engine.generate_stream(prompts, sampling): ...
    engine.update_weights_from_state_dict(named_tensors, "step_3")
    engine.close()

`rollout.embedded_subprocess` (auto = on with `rollout.overlap`) selects it in
`rollout.factory`. The child (multiprocessing's spawn context: a fresh interpreter, one
torch thread) holds an `EmbeddedRolloutEngine` built from the given keyword arguments
and answers one request at a time over a pipe, so on CPU the second core samples while
the trainer's core trains; in one process the two would share the interpreter lock and
take turns. Same interface and results as the in-process engine: the child runs the same
code on the same weights with the same seeds.

Weights: the HF-named tensors of the student's export go as one flat tensor per dtype
plus their names and shapes (torch's multiprocessing pickler moves the flat storage to
shared memory: one segment, nothing written to disk); the child copies them in and they
are the new version (on the demo's toy a sync takes 0.038 s this way, 0.097 s with one
message per tensor; 0.004 s in one process). A child that dies (killed, out of
memory) is reported as a `TeacherError` naming the engine and its exit status, whichever
call was waiting; a child whose parent dies exits on its own (pipe closed, or its parent
changed). Standard library `multiprocessing` is what carries this; no server is needed.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

from megatron_mopd.errors import TeacherError, UserError
from megatron_mopd.rollout.base import RolloutEngine
from megatron_mopd.types import Rollout, SamplingParams

_POLL_SECONDS = 0.5


def _child_main(conn, engine_kwargs: dict, parent_pid: int) -> None:
    """The child's loop: build the engine, then answer requests until told to stop."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine

    try:
        engine = EmbeddedRolloutEngine(**engine_kwargs)
    except BaseException as e:  # reported to the parent, which raises it
        conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))
        return
    conn.send(("ready", engine.weight_version))
    while True:
        while not conn.poll(_POLL_SECONDS):
            if os.getppid() != parent_pid:  # the trainer died: nobody will ask again
                return
        try:
            msg = conn.recv()
        except EOFError:
            return
        op = msg[0]
        try:
            if op == "stream":
                for idx, rolls in engine.generate_stream(msg[1], msg[2]):
                    conn.send(("piece", list(idx), rolls))
                conn.send(("done", engine.weight_version))
            elif op == "weights":
                _, flats, layout, version = msg
                named = [
                    (name, flats[dtype][off : off + numel].view(shape))
                    for name, dtype, off, numel, shape in layout
                ]
                engine.update_weights_from_state_dict(named, version)
                conn.send(("done", engine.weight_version))
            elif op == "disk":
                engine.update_weights_from_disk(msg[1], msg[2])
                conn.send(("done", engine.weight_version))
            elif op == "close":
                conn.send(("done", None))
                return
            else:
                conn.send(("error", "ValueError", f"unknown request {op!r}", ""))
        except BaseException as e:
            conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))


class SubprocessRolloutEngine(RolloutEngine):
    """An `EmbeddedRolloutEngine` in a child process, behind the same interface."""

    def __init__(self, engine_kwargs: dict[str, Any], timeout_seconds: float = 600.0):
        """Start the child and wait until its engine is loaded. `engine_kwargs` are
        `EmbeddedRolloutEngine`'s; `timeout_seconds` bounds every call."""
        self.hf_path = engine_kwargs.get("hf_path", "")
        self.timeout = timeout_seconds
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main,
            args=(child, dict(engine_kwargs), os.getpid()),
            name="mopd-rollout-engine",
            daemon=True,
        )
        self._proc.start()
        self.pid = self._proc.pid
        child.close()
        self._lock = threading.Lock()
        self._version = "0"
        try:
            self._version = self._recv("ready")[1]
        except BaseException:
            self.close()
            raise

    @property
    def where(self) -> str:
        return f"embedded rollout engine ({self.hf_path}, child process {self.pid})"

    @property
    def weight_version(self) -> str:
        """The version of the weights that produce the next rollouts."""
        return self._version

    def _died(self) -> TeacherError:
        self._proc.join(5)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
        return TeacherError(f"{self.where} died ({how})")

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except OSError:
            raise self._died() from None
        except RuntimeError as e:  # torch could not put a tensor in shared memory
            raise TeacherError(
                f"{self.where}: cannot hand it the {msg[0]!r} request through shared memory "
                f"({e}); is /dev/shm full, or a file-size limit (ulimit -f) set?"
            ) from None

    def _recv(self, *expected: str) -> tuple:
        """The child's next message; a clear error if it died, failed or went quiet."""
        end = time.monotonic() + self.timeout
        try:
            while not self._conn.poll(_POLL_SECONDS):
                if not self._proc.is_alive():
                    raise self._died()
                if time.monotonic() > end:
                    raise TeacherError(f"{self.where}: no answer within {self.timeout:.0f} s")
            msg = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if msg[0] == "error":
            _, kind, text, tb = msg
            if kind in ("UserError", "ConfigError"):
                raise UserError(text)
            raise RuntimeError(f"{self.where}: {kind}: {text}\n{tb}")
        assert msg[0] in expected, (msg[0], expected)
        return msg

    def generate_stream(
        self, prompts: list[list[int]], sampling: SamplingParams
    ) -> Iterator[tuple[list[int], list[Rollout]]]:
        """The child engine's pieces, each as soon as it has sampled it."""
        with self._lock:
            self._send(("stream", [list(p) for p in prompts], sampling))
            done = False
            try:
                while True:
                    msg = self._recv("piece", "done")
                    if msg[0] == "done":
                        done = True
                        return
                    yield msg[1], msg[2]
            finally:
                while not done and self._proc.is_alive():  # left early: drain the answer
                    try:
                        done = self._recv("piece", "done")[0] == "done"
                    except Exception:
                        break

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One `Rollout` per prompt, in order (the pieces of `generate_stream`, joined)."""
        out: list[Rollout | None] = [None] * len(prompts)
        for idx, rolls in self.generate_stream(prompts, sampling):
            for i, r in zip(idx, rolls):
                out[i] = r
        return out  # type: ignore[return-value]

    def update_weights_from_state_dict(
        self, named_tensors: Iterable[tuple[str, Any]] | dict[str, Any], weight_version: str
    ) -> None:
        """Send HF-named tensors (shared memory) and make them version `weight_version`."""
        import torch

        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        parts: dict[torch.dtype, list] = {}
        layout, offsets = [], {}
        for name, t in items:
            off = offsets.get(t.dtype, 0)
            layout.append((name, t.dtype, off, t.numel(), tuple(t.shape)))
            offsets[t.dtype] = off + t.numel()
            parts.setdefault(t.dtype, []).append(t.detach().reshape(-1))
        # one flat tensor per dtype: one shared-memory segment instead of one per tensor
        flats = {dtype: torch.cat(ts) for dtype, ts in parts.items()}
        with self._lock:
            self._send(("weights", flats, layout, weight_version))
            self._version = self._recv("done")[1]

    def update_weights_from_disk(self, hf_dir: str, weight_version: str) -> None:
        """Reload every weight from an HF folder (in the child)."""
        with self._lock:
            self._send(("disk", hf_dir, weight_version))
            self._version = self._recv("done")[1]
            self.hf_path = hf_dir

    def close(self) -> None:
        """Stop the child (asked first, then terminated)."""
        proc = getattr(self, "_proc", None)
        if proc is None:
            return
        if proc.is_alive():
            try:
                self._conn.send(("close",))
                proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        self._conn.close()
        self._proc = None
