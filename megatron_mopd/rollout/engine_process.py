"""The embedded rollout engine in a child process, so that sampling overlaps training.

    kwargs = {"hf_path": "/path/to/student_hf", "seed": 1234, "batch_size": 16}
    engine = SubprocessRolloutEngine(kwargs)      # EmbeddedRolloutEngine(**kwargs) in a child
    for idx, rollouts in engine.generate_stream(prompts, sampling): ...
    engine.update_weights_from_state_dict(named_tensors, "step_3")
    engine.close()

`rollout.embedded_subprocess` (auto = on with `rollout.overlap`) selects it in
`rollout.factory`. The child (multiprocessing's spawn context: a fresh interpreter, one
torch thread) holds an `EmbeddedRolloutEngine` built from the given keyword arguments
(`batch_size` among them: the size of each streamed piece) and answers one request at a
time over a pipe, so on CPU the second core samples while the trainer's core trains; in
one process the two would share the interpreter lock and take turns. Same interface and
results as the in-process engine: the child runs the same code on the same weights with
the same seeds.

Weights: the HF-named tensors of the student's export go as one flat tensor per dtype
plus their names and shapes (torch's multiprocessing pickler moves the flat storage to
shared memory: one segment, nothing written to disk); the child copies them in and they
are the new version (on the demo's toy a sync takes 0.038 s this way, 0.097 s with one
message per tensor; 0.004 s in one process). A child that dies (killed, out of
memory) is reported as a `TeacherError` naming the engine and its exit status, whichever
call was waiting; a child whose parent dies exits on its own (pipe closed, or its parent
changed). The process, pipe and errors are `megatron_mopd.child_process`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from megatron_mopd.child_process import ChildProcess, child_setup, send_error, serve
from megatron_mopd.rollout.base import RolloutEngine, join_pieces
from megatron_mopd.types import Rollout, SamplingParams


def _child_main(conn, engine_kwargs: dict, parent_pid: int) -> None:
    """The child: build the engine, then answer requests until told to stop."""
    child_setup()
    from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine

    try:
        engine = EmbeddedRolloutEngine(**engine_kwargs)
    except BaseException as e:  # reported to the parent, which raises it
        send_error(conn, e)
        return
    conn.send(("ready", engine.weight_version))

    def handle(msg: tuple, send) -> None:
        op = msg[0]
        if op == "stream":
            for idx, rolls in engine.generate_stream(msg[1], msg[2]):
                send(("piece", list(idx), rolls))
        elif op == "weights":
            _, flats, layout, version = msg
            named = [
                (name, flats[dtype][off : off + numel].view(shape))
                for name, dtype, off, numel, shape in layout
            ]
            engine.update_weights_from_state_dict(named, version)
        elif op == "disk":
            engine.update_weights_from_disk(msg[1], msg[2])
        else:
            raise ValueError(f"unknown request {op!r}")
        send(("done", engine.weight_version))

    serve(conn, parent_pid, handle)


class SubprocessRolloutEngine(RolloutEngine):
    """An `EmbeddedRolloutEngine` in a child process, behind the same interface."""

    def __init__(self, engine_kwargs: dict[str, Any], timeout_seconds: float = 600.0):
        """Start the child and wait until its engine is loaded. `engine_kwargs` are
        `EmbeddedRolloutEngine`'s; `timeout_seconds` bounds every call."""
        self.hf_path = engine_kwargs.get("hf_path", "")
        self._child = ChildProcess(
            _child_main,
            (dict(engine_kwargs),),
            name="mopd-rollout-engine",
            what=f"embedded rollout engine ({self.hf_path})",
            timeout_seconds=timeout_seconds,
        )
        self.pid = self._child.pid
        self._version = self._child.ready[1]

    @property
    def where(self) -> str:
        """The engine and its process, for messages."""
        return self._child.where

    @property
    def weight_version(self) -> str:
        """The version of the weights that produce the next rollouts."""
        return self._version

    def generate_stream(
        self, prompts: list[list[int]], sampling: SamplingParams
    ) -> Iterator[tuple[list[int], list[Rollout]]]:
        """The child engine's pieces, each as soon as it has sampled it."""
        child = self._child
        with child.lock:
            child.send(("stream", [list(p) for p in prompts], sampling))
            done = False
            try:
                while True:
                    msg = child.recv("piece", "done")
                    if msg[0] == "done":
                        done = True
                        return
                    yield msg[1], msg[2]
            finally:
                while not done and child.is_alive():  # left early: drain the answer
                    try:
                        done = child.recv("piece", "done")[0] == "done"
                    except Exception:
                        break

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One `Rollout` per prompt, in order (the pieces of `generate_stream`, joined)."""
        return join_pieces(len(prompts), self.generate_stream(prompts, sampling))

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
        self._version = self._child.call(("weights", flats, layout, weight_version), "done")[1]

    def update_weights_from_disk(self, hf_dir: str, weight_version: str) -> None:
        """Reload every weight from an HF folder (in the child)."""
        self._version = self._child.call(("disk", hf_dir, weight_version), "done")[1]
        self.hf_path = hf_dir

    def close(self) -> None:
        """Stop the child (asked first, then terminated)."""
        self._child.close()
