"""Embedded teachers in a child process of their own, so that scoring overlaps training.

    host = TeacherHost({"adder": tcfg_add, "reverser": tcfg_rev})
    teacher = SubprocessTeacher("adder", host)
    results = teacher.score(requests, top_k=0)

`teachers.<name>.subprocess` (auto = on with `rollout.overlap`) selects it in
`teachers.router.build_teachers`: every embedded teacher so configured is loaded into one
shared child (one more interpreter, not one per teacher), which answers one score request
at a time. With overlap, the trainer's producer scores each sampled piece while the
student trains; in the trainer's process that scoring takes turns with training for the
interpreter lock and the core, in a child it runs beside it (on CPU, on the second core).
The child runs `EmbeddedTeacher.score` itself, so the results and the errors (a
`TeacherError` naming the teacher) are the same as in-process; a child that dies is a
`TeacherError` naming the teachers it held and how it ended (`megatron_mopd.child_process`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_mopd.child_process import ChildProcess, child_setup, send_error, serve
from megatron_mopd.teachers.base import Teacher
from megatron_mopd.types import ScoreRequest, ScoreResult

if TYPE_CHECKING:
    from megatron_mopd.config import TeacherConfig


def _host_main(conn, configs: dict, parent_pid: int) -> None:
    """The child: load every teacher, then score until told to stop."""
    child_setup()
    from megatron_mopd.teachers.embedded import EmbeddedTeacher

    try:
        teachers = {name: EmbeddedTeacher.from_config(name, t) for name, t in configs.items()}
    except BaseException as e:  # reported to the parent, which raises it
        send_error(conn, e)
        return
    conn.send(("ready", sorted(teachers)))

    def handle(msg: tuple, send) -> None:
        op, name, requests, top_k = msg
        if op != "score":
            raise ValueError(f"unknown request {op!r}")
        send(("done", teachers[name].score(requests, top_k=top_k)))

    serve(conn, parent_pid, handle)


class TeacherHost:
    """The child process that holds the embedded teachers (shared by their proxies)."""

    def __init__(self, configs: dict[str, TeacherConfig], timeout_seconds: float = 600.0):
        """Start the child and wait until every teacher is loaded."""
        self.names = sorted(configs)
        self._child = ChildProcess(
            _host_main,
            (dict(configs),),
            name="mopd-teachers",
            what=f"embedded teachers {', '.join(self.names)}",
            timeout_seconds=timeout_seconds,
        )
        self.pid = self._child.pid
        self._open = set(self.names)

    def score(self, name: str, requests: list[ScoreRequest], top_k: int) -> list[ScoreResult]:
        """Teacher `name`'s `score`, run in the child."""
        return self._child.call(("score", name, list(requests), top_k), "done")[1]

    def release(self, name: str) -> None:
        """Teacher `name` is closed; the child stops with the last one."""
        self._open.discard(name)
        if not self._open:
            self._child.close()


class SubprocessTeacher(Teacher):
    """One teacher held by a `TeacherHost`, behind the `Teacher` interface."""

    def __init__(self, name: str, host: TeacherHost) -> None:
        self.name = name
        self.host = host

    def score(self, requests: list[ScoreRequest], top_k: int = 0) -> list[ScoreResult]:
        """Log-probs (and top-k) of every response token, in order (see `Teacher.score`)."""
        return self.host.score(self.name, requests, top_k)

    def close(self) -> None:
        """Release this teacher (the child stops when every teacher is closed)."""
        self.host.release(self.name)
