"""`mopd check RECIPE.yaml [key=value ...] [--offline] [--world-size N]`: validate a recipe.

Checks, one report line each (OK / FAIL / SKIP):

- config: the recipe loads and validates (unknown keys, bad values, overrides);
- layout: the parallel layout divides the model (its architecture read from
  `model.hf_path` when set) and, with `--world-size`, the number of processes;
- student tokenizer (`model.tokenizer_path` or `model.hf_path`), when there is one;
- datasets: each file exists, each line is a JSON object with `prompt` or `prompt_ids`
  and a `domain`, and every domain has a teacher (errors name file:line);
- teachers: embedded ones are HF folders whose tokenizer matches the student's; SGLang
  ones (and SGLang rollout servers) answer `/health_generate` and `/model_info`, and
  tokenize as the student does (see `teachers/preflight.py`).

`--offline` contacts no server. Local files are still checked (datasets, embedded
teachers, tokenizers), except the student's own folder: a recipe written for a cluster
names `model.hf_path` on the cluster's filesystem, so when that folder is not on this
machine the layout is checked against the recipe's `model.*` architecture fields instead
(the report says so; SKIP when the recipe sets none) and the student tokenizer is SKIP.
Without `--offline`, as in the trainer, a missing folder is an error.
The trainer calls `run_preflight(cfg)` at start-up, on the driver rank (also importable
from `megatron_mopd.teachers.preflight`): it raises a `UserError` on the first failure.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_mopd.errors import UserError

Status = Literal["OK", "FAIL", "SKIP"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mopd check` (no heavy imports here)."""
    parser.add_argument("recipe", help="the YAML recipe")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. parallel.tp=2"
    )
    parser.add_argument(
        "--offline", action="store_true", help="do not contact teacher or rollout servers"
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="check the parallel layout against N processes",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=80.0,
        metavar="GB",
        help="with --world-size: the GPU memory the per-GPU estimate is compared with "
        "(default 80; tools/memory_model.py prints the whole table)",
    )


@dataclass
class CheckResult:
    """One line of the report."""

    name: str
    status: Status
    detail: str

    def format(self) -> str:
        """`STATUS  name: detail`."""
        return f"{self.status:<4}  {self.name}: {self.detail}"


@dataclass
class PreflightReport:
    """The results of every check, in the order they ran."""

    results: list[CheckResult] = field(default_factory=list)
    echo: Callable[[str], None] | None = None

    def add(self, name: str, status: Status, detail: str) -> None:
        """Record one result (and print it when the report echoes)."""
        result = CheckResult(name, status, detail)
        self.results.append(result)
        if self.echo is not None:
            self.echo(result.format())

    def run(self, name: str, check: Callable[[], str | tuple[Status, str]]) -> bool:
        """Run one check: its return value is the OK detail (or a (status, detail) pair);
        a `UserError` is a FAIL line. Returns whether it did not fail."""
        try:
            out = check()
        except UserError as e:
            self.add(name, "FAIL", str(e))
            return False
        status, detail = out if isinstance(out, tuple) else ("OK", out)
        self.add(name, status, detail)
        return status != "FAIL"

    @property
    def failures(self) -> list[CheckResult]:
        """The failed checks."""
        return [r for r in self.results if r.status == "FAIL"]

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return not self.failures

    def format(self) -> str:
        """The whole report, one line per check."""
        return "\n".join(r.format() for r in self.results)

    def raise_if_failed(self) -> None:
        """Raise a `UserError` (one line: the count and the first failure) if any failed."""
        failures = self.failures
        if failures:
            first = failures[0]
            more = f" ({len(failures)} checks failed)" if len(failures) > 1 else ""
            raise UserError(f"{first.name}: {first.detail}{more}")


# ------------------------------------------------------------------------------ checks


def absent_model_folder(cfg: Any) -> str | None:
    """`model.hf_path=...` (or `model.mcore_path=...`) when it is set but not on this
    machine (a cluster path checked from elsewhere), else None."""
    for key in ("hf_path", "mcore_path"):
        path = getattr(cfg.model, key)
        if path and not os.path.exists(path):
            return f"model.{key}={path}"
    return None


def recipe_has_architecture(model_cfg: Any) -> bool:
    """True when the recipe sets some architecture field of `model` (not only defaults)."""
    from megatron_mopd.config import ModelConfig
    from megatron_mopd.convert.hf_config import ARCH_FIELDS

    default = ModelConfig()
    return any(getattr(model_cfg, f) != getattr(default, f) for f in ARCH_FIELDS)


def _check_layout(
    cfg: Any, world_size: int | None, arch_out: list, offline: bool = False
) -> str | tuple[Status, str]:
    import dataclasses

    from megatron_mopd.config import check_world_size
    from megatron_mopd.student.load import resolve_model_config

    p = cfg.parallel
    layout = f"tp={p.tp} pp={p.pp} ep={p.ep} etp={p.etp}"
    absent = absent_model_folder(cfg) if offline else None
    if absent and not recipe_has_architecture(cfg.model):
        # nothing to check the layout against: only the world size
        note = f"{absent} is not on this machine and the recipe sets no model.* architecture"
        if world_size is None:
            return "SKIP", f"{note}: layout not checked"
        dp = check_world_size(p, world_size)
        return "SKIP", f"{layout} dp={dp} for world size {world_size}; {note}: not checked"
    if absent:
        # --offline on a machine without the cluster's folders: the recipe's fields stand
        # in for the folder's config.json (the trainer reads the folder)
        model = dataclasses.replace(cfg.model, hf_path=None, mcore_path=None)
        arch = resolve_model_config(model, p)
        source = (
            f" (architecture from the recipe's model.* fields: {absent} is not on this machine)"
        )
    else:
        # the student's real architecture (read from model.hf_path when set), checked
        # against the layout exactly as the trainer will check it
        arch = resolve_model_config(cfg.model, p)
        source = f" (architecture from {cfg.model.hf_path})" if cfg.model.hf_path else ""
    arch_out.append(arch)
    if world_size is None:
        return "OK", f"{layout} divides the model{source}; world size not given (--world-size N)"
    dp = check_world_size(p, world_size)
    return f"{layout} dp={dp} for world size {world_size}{source}"


def _check_student_tokenizer(
    cfg: Any, arch: Any, out: list, offline: bool = False
) -> str | tuple[Status, str]:
    from megatron_mopd.teachers.preflight import load_tokenizer

    path = cfg.model.tokenizer_path or cfg.model.hf_path
    if not path:
        return "SKIP", "no student tokenizer (set model.tokenizer_path): tokenizers not compared"
    if offline and not os.path.exists(path):
        return "SKIP", f"{path} is not on this machine (--offline): tokenizers not compared"
    tok = load_tokenizer(path, "student tokenizer")
    out.append(tok)
    if arch is not None and len(tok) > arch.vocab_size:
        raise UserError(
            f"student tokenizer {path} has {len(tok)} tokens but the model's vocabulary has "
            f"{arch.vocab_size} (model.vocab_size)"
        )
    return f"{path} ({len(tok)} tokens)"


def check_dataset(
    path: str, key: str, cfg: Any, vocab_size: int | None, has_tokenizer: bool
) -> tuple[str, dict[str, str]]:
    """Check one JSONL prompt file (parsed by `data.load_prompts`, as the trainer will);
    return a summary and each domain's first `file:line`.

    Raises `UserError` naming `file:line` for the first bad record or unrouted domain.
    """
    from megatron_mopd.data import load_prompts
    from megatron_mopd.teachers.router import check_domains

    if not os.path.isfile(path):
        raise UserError(f"{key}={path}: no such file")
    records = load_prompts(path)
    domains: dict[str, str] = {}
    for rec in records:
        domains.setdefault(rec.domain, rec.source)
        if rec.prompt_ids is not None:
            if vocab_size is not None and max(rec.prompt_ids) >= vocab_size:
                raise UserError(
                    f"{rec.source}: prompt_ids holds id {max(rec.prompt_ids)} outside the "
                    f"vocabulary [0, {vocab_size})"
                )
        elif not has_tokenizer:
            raise UserError(
                f"{rec.source}: a text prompt needs the student tokenizer "
                "(set model.tokenizer_path or model.hf_path), or give prompt_ids"
            )
    for domain, where in domains.items():  # the first unrouted domain, where it first appears
        try:
            check_domains(cfg, [domain])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return f"{path}: {len(records)} prompts, domains {sorted(domains)}", domains


def _check_embedded_teacher(name: str, tcfg: Any, student_tok: Any) -> str | tuple[Status, str]:
    from megatron_mopd.convert.hf_config import read_hf_config
    from megatron_mopd.teachers.preflight import compare_tokenizers, load_tokenizer

    raw = read_hf_config(tcfg.hf_path)
    what = f"{tcfg.hf_path} ({raw.get('model_type', '?')})"
    if student_tok is None:
        return "OK", f"{what}; tokenizer not compared (no student tokenizer)"
    compare_tokenizers(
        student_tok, load_tokenizer(tcfg.hf_path, f"tokenizer of teacher {name!r}"), name
    )
    return f"{what}; tokenizer matches the student's"


def _check_server(
    url: str,
    name: str,
    label: str,
    student_tok: Any,
    timeout: float,
    wait: float,
    api_key: str | None = None,
) -> str | tuple[Status, str]:
    from megatron_mopd.teachers.preflight import check_server_tokenizer, server_status

    info = server_status(url, timeout, wait_seconds=wait, api_key=api_key)
    if info.get("is_generation") is False:
        raise UserError(f"{label} {name!r} at {url} serves a non-generative model")
    what = (
        f"{url} healthy, model_path={info.get('model_path')}, "
        f"weight_version={info.get('weight_version')}"
    )
    if student_tok is None:
        return "OK", f"{what}; tokenizer not compared (no student tokenizer)"
    how = check_server_tokenizer(
        student_tok, url, name, info, label=label, timeout=timeout, api_key=api_key
    )
    return f"{what}; {how}"


def _check_teacher_server(
    url: str, name: str, tcfg: Any, student_tok: Any, wait: float
) -> str | tuple[Status, str]:
    """`_check_server` for a teacher; a failure also names the domains it scores."""
    from megatron_mopd.sglang.client import api_key_from_env

    try:
        key = api_key_from_env(tcfg.api_key_env, f"teachers.{name}.api_key_env")
        return _check_server(url, name, "teacher", student_tok, tcfg.timeout_seconds, wait, key)
    except UserError as e:
        domains = ", ".join(map(repr, tcfg.domains)) or "none (the default teacher)"
        raise type(e)(f"{e} (the teacher of domain(s) {domains})") from None


def _rollout_api_key(cfg: Any) -> str | None:
    from megatron_mopd.sglang.client import api_key_from_env

    return api_key_from_env(cfg.rollout.api_key_env, "rollout.api_key_env")


def _check_servers(
    report: PreflightReport,
    cfg: Any,
    student_tok: Any,
    offline: bool,
    wait: Callable[[float], float],
) -> None:
    """The teachers' and the rollout engine's checks (`wait(startup_timeout)`: how long a
    server still starting may be polled)."""
    for name, tcfg in cfg.teachers.items():
        if tcfg.backend == "embedded":
            report.run(
                f"teacher {name!r}",
                lambda n=name, t=tcfg: _check_embedded_teacher(n, t, student_tok),
            )
            continue
        for url in tcfg.urls:
            if offline:
                report.add(f"teacher {name!r}", "SKIP", f"{url} not contacted (--offline)")
                continue
            report.run(
                f"teacher {name!r}",
                lambda n=name, u=url, t=tcfg: _check_teacher_server(
                    u, n, t, student_tok, wait(t.startup_timeout_seconds)
                ),
            )

    if cfg.rollout.backend == "sglang":
        for url in cfg.rollout.urls:
            if offline:
                report.add("rollout server", "SKIP", f"{url} not contacted (--offline)")
                continue
            report.run(
                "rollout server",
                lambda u=url: _check_server(
                    u,
                    "student",
                    "rollout server",
                    student_tok,
                    cfg.rollout.timeout_seconds,
                    wait(cfg.rollout.startup_timeout_seconds),
                    _rollout_api_key(cfg),
                ),
            )
    elif cfg.model.hf_path:
        report.add("rollout", "OK", f"embedded engine will load {cfg.model.hf_path}")
    else:
        report.add(
            "rollout", "OK", "embedded engine will load the student exported to HF at start-up"
        )


def _memory_line(cfg: Any, arch: Any, world_size: int, gpu_memory_gb: float) -> str:
    """The per-GPU memory estimate of the train step (`student.memory`) and its headroom."""
    import dataclasses

    from megatron_mopd.student.memory import estimate_memory, headroom_line

    est = estimate_memory(dataclasses.replace(cfg, model=arch), world_size)
    return headroom_line(est, gpu_memory_gb)


def run_preflight(
    cfg: Any,
    offline: bool = False,
    world_size: int | None = None,
    echo: Callable[[str], None] | None = None,
    strict: bool = True,
    wait_for_servers: bool = False,
    gpu_memory_gb: float | None = None,
) -> PreflightReport:
    """Every check of `mopd check` on a loaded config; returns the report.

    All checks run; then, with `strict` (what the trainer wants), a failure raises a
    `UserError` naming the first one. With `strict=False` failures are only FAIL lines.
    `echo` prints lines as they come; `offline` skips every network check;
    `wait_for_servers` polls servers that are still starting until each one's
    `startup_timeout_seconds` after the checks began (what the trainer wants: servers
    start in parallel, so the waits overlap instead of adding up). With `gpu_memory_gb`
    and `world_size`, a `memory` line gives the per-GPU estimate of `student.memory`
    against that GPU size (informational: never a failure).
    """
    report = PreflightReport(echo=echo)
    began = time.monotonic()

    def wait(startup_timeout: float) -> float:
        if not wait_for_servers:
            return 0.0
        return max(0.0, startup_timeout - (time.monotonic() - began))

    arch_box: list = []
    report.run("layout", lambda: _check_layout(cfg, world_size, arch_box, offline))
    arch = arch_box[0] if arch_box else None
    if gpu_memory_gb and world_size and arch is not None:
        report.run("memory", lambda: _memory_line(cfg, arch, world_size, gpu_memory_gb))

    tok_box: list = []
    report.run("student tokenizer", lambda: _check_student_tokenizer(cfg, arch, tok_box, offline))
    student_tok = tok_box[0] if tok_box else None
    has_text_tokenizer = bool(cfg.model.tokenizer_path or cfg.model.hf_path)
    vocab_size = arch.vocab_size if arch is not None else None

    datasets = [("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)]
    for key, path in datasets:
        if path is None:
            if key == "data.train_path":
                report.add("dataset " + key, "FAIL", f"{key} is not set")
            continue
        report.run(
            f"dataset {key}",
            lambda k=key, p=path: check_dataset(p, k, cfg, vocab_size, has_text_tokenizer)[0],
        )

    _check_servers(report, cfg, student_tok, offline, wait)
    if strict:
        report.raise_if_failed()
    return report


def run(args: argparse.Namespace) -> int:
    """Load the recipe, run every check, print the report; a failure exits non-zero."""
    from megatron_mopd.config import load_config

    report = PreflightReport(echo=print)
    cfg_box: list = []

    def load() -> str:
        cfg_box.append(load_config(args.recipe, args.overrides))
        return f"{args.recipe}" + (f" with {' '.join(args.overrides)}" if args.overrides else "")

    if report.run("config", load):
        sub = run_preflight(
            cfg_box[0],
            args.offline,
            args.world_size,
            echo=print,
            strict=False,
            gpu_memory_gb=getattr(args, "gpu_memory_gb", 80.0),
        )
        report.results.extend(sub.results)
    report.raise_if_failed()
    skipped = sum(r.status == "SKIP" for r in report.results)
    print(f"all checks passed ({skipped} skipped)" if skipped else "all checks passed")
    return 0
