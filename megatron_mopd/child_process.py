"""A worker in a child process that answers requests over a pipe, one at a time.

    child = ChildProcess(build_and_serve, (config,), name="mopd-teachers", what="teachers")
    child.call(("score", ...), "done")      # send one request, wait for its answer
    child.close()

The embedded rollout engine (`rollout/engine_process.py`) and the embedded teachers
(`teachers/process.py`) run this way when training overlaps sampling and scoring: on CPU
each process gets its own core, where threads of one process would share the interpreter
lock and take turns. Standard library `multiprocessing` (spawn: a fresh interpreter with
one torch thread) carries it; no server is needed.

The child's side is `serve(conn, parent_pid, handle)`: it answers each message with
`handle(msg, send)` until a `("close",)` arrives, the pipe closes, or its parent dies (its
parent pid changes), so a trainer killed with SIGKILL leaves no child behind. Errors in
the child go back as `("error", kind, text, traceback)`; the parent raises the same kind
for the errors users act on (`UserError`, `ConfigError`, `TeacherError`) and a
`RuntimeError` with the child's traceback for the rest. A child that dies while a call
waits (killed, out of memory) is a `TeacherError` naming the worker and its exit status;
one that stops answering is a `TeacherError` after `timeout_seconds`.

Tensors: requests go with multiprocessing's pickler, to which torch gives shared memory
for tensors (one segment per tensor: right for the weights of a sync, sent as one flat
tensor per dtype). Answers go with `dumps`, which sends CPU tensors as numpy arrays inside
the pickle: a step's 128 routed-expert tensors cost 1 ms that way against 13 ms to pickle
(and more to receive) as 128 shared-memory segments, or 27 ms with plain pickle; the
overlapped toy step went from 0.22 to 0.17 s (tools/bench_vs_trl.py).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable

from megatron_mopd.errors import ConfigError, TeacherError, UserError

_POLL_SECONDS = 0.5
_ERRORS = {"UserError": UserError, "ConfigError": ConfigError, "TeacherError": TeacherError}


def child_setup() -> None:
    """What every worker child does first: one torch thread (the parent's core stays free)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


class _Pickler(pickle.Pickler):
    """Standard pickle, with CPU tensors of numpy's dtypes as numpy arrays (see above)."""

    def reducer_override(self, obj):
        torch = sys.modules.get("torch")
        if (
            torch is not None
            and type(obj) is torch.Tensor
            and obj.device.type == "cpu"
            and obj.layout == torch.strided
            and not obj.requires_grad
            and str(obj.dtype) in _NUMPY_DTYPES
        ):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


_NUMPY_DTYPES = {
    f"torch.{n}"
    for n in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def dumps(obj) -> bytes:
    """`obj` pickled for `Connection.send_bytes` (the receiver's `recv` loads it), with
    CPU tensors as numpy arrays inside the pickle instead of shared-memory segments."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def send_error(conn, e: BaseException) -> None:
    """Report an exception to the parent (which raises it)."""
    conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))


def serve(conn, parent_pid: int, handle: Callable[[tuple, Callable[[tuple], None]], None]) -> None:
    """The child's loop: `handle(msg, send)` for each message until told to stop (`send`
    pickles with `dumps`)."""
    while True:
        while not conn.poll(_POLL_SECONDS):
            if os.getppid() != parent_pid:  # the trainer died: nobody will ask again
                return
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "close":
            conn.send(("done", None))
            return
        try:
            handle(msg, lambda answer: conn.send_bytes(dumps(answer)))
        except BaseException as e:
            send_error(conn, e)


class ChildProcess:
    """The parent's side: start the child, send requests, read answers, stop it."""

    def __init__(
        self,
        target: Callable,
        args: tuple,
        name: str,
        what: str,
        timeout_seconds: float = 600.0,
    ) -> None:
        """Start `target(conn, *args, parent_pid)` in a spawned child and wait for its
        `("ready", ...)` message (kept as `self.ready`). `what` names the worker in
        errors; `timeout_seconds` bounds the wait for every answer."""
        self.what = what
        self.timeout = timeout_seconds
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=target, args=(child, *args, os.getpid()), name=name, daemon=True
        )
        self._proc.start()
        self.pid = self._proc.pid
        child.close()
        self.lock = threading.Lock()  # one request at a time over the pipe
        try:
            self.ready = self.recv("ready")
        except BaseException:
            self.close()
            raise

    @property
    def where(self) -> str:
        """The worker and its process, for messages."""
        return f"{self.what} (child process {self.pid})"

    def died(self) -> TeacherError:
        """The error of a child that is gone, with how it ended."""
        self._proc.join(5)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
        return TeacherError(f"{self.where} died ({how})")

    def send(self, msg: tuple) -> None:
        """Send one message (a `TeacherError` if the child is gone)."""
        try:
            self._conn.send(msg)
        except OSError:
            raise self.died() from None
        except RuntimeError as e:  # torch could not put a tensor in shared memory
            raise TeacherError(
                f"{self.where}: cannot hand it the {msg[0]!r} request through shared memory "
                f"({e}); is /dev/shm full, or a file-size limit (ulimit -f) set?"
            ) from None

    def recv(self, *expected: str) -> tuple:
        """The child's next message; a clear error if it died, failed or went quiet."""
        end = time.monotonic() + self.timeout
        try:
            while not self._conn.poll(_POLL_SECONDS):
                if not self._proc.is_alive():
                    raise self.died()
                if time.monotonic() > end:
                    raise TeacherError(f"{self.where}: no answer within {self.timeout:.0f} s")
            msg = self._conn.recv()
        except (EOFError, OSError):
            raise self.died() from None
        if msg[0] == "error":
            _, kind, text, tb = msg
            if kind in _ERRORS:
                raise _ERRORS[kind](text)
            raise RuntimeError(f"{self.where}: {kind}: {text}\n{tb}")
        assert msg[0] in expected, (msg[0], expected)
        return msg

    def call(self, msg: tuple, *expected: str) -> tuple:
        """Send `msg` and return its one answer (holding the lock)."""
        with self.lock:
            self.send(msg)
            return self.recv(*expected)

    def is_alive(self) -> bool:
        """Whether the child still runs."""
        return self._proc is not None and self._proc.is_alive()

    def close(self) -> None:
        """Stop the child (asked first, then terminated, then killed)."""
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
