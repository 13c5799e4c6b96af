"""Routing by domain: each prompt's responses go to the teacher of its domain.

    teachers = build_teachers(cfg)                 # one `Teacher` per `teachers.<name>`
    router = TeacherRouter.from_config(cfg, teachers)
    results = router.score(requests, domains)      # same order as `requests`
    metrics = router.take_counts()                 # per-domain sequences / tokens scored

`check_domains(cfg, domains)` refuses a dataset whose domains have no teacher (and no
`default_teacher`) before training starts, listing every unrouted domain at once.

Requests are grouped by teacher (not by domain: a teacher that serves several domains
gets one batch), the groups run concurrently in threads (HTTP waits and torch kernels
both release the GIL), and results are put back in request order.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from megatron_mopd.config import Config, TeacherConfig
from megatron_mopd.errors import ConfigError, TeacherError
from megatron_mopd.teachers.base import Teacher
from megatron_mopd.teachers.validate import check_score_results
from megatron_mopd.types import ScoreRequest, ScoreResult


def teacher_location(tcfg: TeacherConfig) -> str:
    """Where a teacher runs, for messages: its URL(s) or its HF folder."""
    if tcfg.backend == "sglang":
        return ", ".join(tcfg.urls) or "<no url>"
    return f"hf_path={tcfg.hf_path}"


def check_domains(cfg: Config, domains_in_dataset: Iterable[str]) -> None:
    """Raise `ConfigError` if some dataset domain has no teacher and there is no default."""
    if cfg.default_teacher is not None:
        return
    routed = {d for t in cfg.teachers.values() for d in t.domains}
    missing = sorted(set(domains_in_dataset) - routed)
    if missing:
        raise ConfigError(
            f"dataset domain(s) {', '.join(map(repr, missing))} have no teacher: add them to "
            f"some teachers.<name>.domains or set default_teacher "
            f"(teachers: {sorted(cfg.teachers) or 'none'})"
        )


def teacher_in_subprocess(cfg: Config, tcfg: TeacherConfig) -> bool:
    """`teachers.<name>.subprocess` resolved: auto = on for an embedded teacher when
    `rollout.overlap` is."""
    if tcfg.backend != "embedded" or tcfg.subprocess == "off":
        return False
    return tcfg.subprocess == "on" or cfg.rollout.overlap


def build_teachers(cfg: Config) -> dict[str, Teacher]:
    """One `Teacher` per `teachers.<name>`, the backend chosen by `backend`; the embedded
    teachers that run in a child process share one (`teachers/process.py`).

    Backends are imported only when used: the embedded one pulls in transformers, the
    SGLang one an HTTP client.
    """
    teachers: dict[str, Teacher] = {}
    try:
        hosted = {n: t for n, t in cfg.teachers.items() if teacher_in_subprocess(cfg, t)}
        if hosted:
            from megatron_mopd.teachers.process import SubprocessTeacher, TeacherHost

            timeout = max(t.timeout_seconds for t in hosted.values())
            host = TeacherHost(hosted, timeout_seconds=timeout)
            teachers.update({name: SubprocessTeacher(name, host) for name in hosted})
        for name, tcfg in cfg.teachers.items():
            if name in hosted:
                continue
            if tcfg.backend == "embedded":
                from megatron_mopd.teachers.embedded import EmbeddedTeacher

                teachers[name] = EmbeddedTeacher.from_config(name, tcfg)
            elif tcfg.backend == "sglang":
                from megatron_mopd.teachers.sglang import SGLangTeacher

                teachers[name] = SGLangTeacher(name, tcfg)
            else:  # config validation makes this unreachable
                raise ConfigError(f"teachers.{name}.backend={tcfg.backend!r} is not supported")
    except BaseException:
        for teacher in teachers.values():
            teacher.close()
        raise
    return teachers


@dataclass
class DomainCounts:
    """What was scored for one domain since the last `take_counts()`."""

    sequences: int = 0
    tokens: int = 0


class TeacherRouter:
    """Scores each request with the teacher of its domain and reassembles the results."""

    def __init__(
        self,
        teachers: dict[str, Teacher],
        routes: dict[str, str],
        default_teacher: str | None = None,
        locations: dict[str, str] | None = None,
        top_k: dict[str, int] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """`routes` maps domain -> teacher name; `locations` names where each teacher runs
        (for error messages); `top_k` is each teacher's configured top-k (default 0);
        `vocab_size` is the student's real vocabulary, which bounds every teacher's top-k
        ids (teachers share the student's tokenizer; None: ids only checked >= 0)."""
        for domain, name in routes.items():
            if name not in teachers:
                raise ConfigError(f"domain {domain!r} is routed to unknown teacher {name!r}")
        if default_teacher is not None and default_teacher not in teachers:
            raise ConfigError(f"default_teacher={default_teacher!r} is not a teacher")
        self.teachers = teachers
        self.routes = dict(routes)
        self.default_teacher = default_teacher
        self.locations = dict(locations or {})
        self.top_k = dict(top_k or {})
        self.vocab_size = vocab_size
        self._counts: dict[str, DomainCounts] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        teachers: dict[str, Teacher] | None = None,
        vocab_size: int | None = None,
    ) -> TeacherRouter:
        """A router over `teachers` (built with `build_teachers(cfg)` when not given);
        `vocab_size`: the student's (see `__init__`)."""
        if teachers is None:
            teachers = build_teachers(cfg)
        routes = {d: name for name, t in cfg.teachers.items() for d in t.domains}
        return cls(
            teachers,
            routes,
            cfg.default_teacher,
            locations={name: teacher_location(t) for name, t in cfg.teachers.items()},
            top_k={name: t.top_k for name, t in cfg.teachers.items()},
            vocab_size=vocab_size,
        )

    def teacher_for(self, domain: str) -> str:
        """The name of the teacher that scores `domain`."""
        name = self.routes.get(domain, self.default_teacher)
        if name is None:
            raise ConfigError(
                f"domain {domain!r} has no teacher: add it to some teachers.<name>.domains "
                f"or set default_teacher (teachers: {sorted(self.teachers)})"
            )
        return name

    def score(
        self, requests: list[ScoreRequest], domains: list[str], top_k: int | None = None
    ) -> list[ScoreResult]:
        """Teacher log-probs of every request's response tokens, in request order.

        `domains[i]` is the domain of `requests[i]`. `top_k=None` uses each teacher's
        configured `top_k`. A failing teacher raises `TeacherError` naming the teacher,
        where it runs and the domains of its batch.
        """
        if len(domains) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(domains)} domains")
        groups: dict[str, list[int]] = {}
        for i, domain in enumerate(domains):
            groups.setdefault(self.teacher_for(domain), []).append(i)

        def run(name: str, idx: list[int]) -> list[ScoreResult]:
            k = self.top_k.get(name, 0) if top_k is None else top_k
            batch = [requests[i] for i in idx]
            group_domains = sorted({domains[i] for i in idx})
            where = (
                f"teacher {name!r} ({self.locations.get(name, 'location unknown')}) "
                f"scoring domain {', '.join(map(repr, group_domains))}"
            )
            try:
                results = self.teachers[name].score(batch, top_k=k)
                check_score_results(where, batch, results, k, self.vocab_size)
            except TeacherError as e:
                msg = str(e)
                if msg.startswith(where):
                    pass
                elif msg.startswith(f"teacher {name!r}"):  # the backend named itself already
                    msg = f"{msg} (scoring domain {', '.join(map(repr, group_domains))})"
                else:
                    msg = f"{where}: {msg}"
                raise TeacherError(msg) from e
            except Exception as e:
                raise TeacherError(f"{where}: {type(e).__name__}: {e}") from e
            return results

        out: list[ScoreResult | None] = [None] * len(requests)
        if len(groups) == 1:
            ((name, idx),) = groups.items()
            done = {name: run(name, idx)}
        else:
            with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
                futures = {name: pool.submit(run, name, idx) for name, idx in groups.items()}
                done = {name: f.result() for name, f in futures.items()}
        for name, idx in groups.items():
            for i, res in zip(idx, done[name]):
                out[i] = res
        self._count(requests, domains)
        return out  # type: ignore[return-value]

    def _count(self, requests: list[ScoreRequest], domains: list[str]) -> None:
        with self._lock:
            for req, domain in zip(requests, domains):
                c = self._counts.setdefault(domain, DomainCounts())
                c.sequences += 1
                c.tokens += len(req.input_ids) - req.response_start

    def take_counts(self) -> dict[str, DomainCounts]:
        """Per-domain counts since the last call (for per-step logging), then reset."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def close(self) -> None:
        """Close every teacher."""
        for teacher in self.teachers.values():
            teacher.close()
