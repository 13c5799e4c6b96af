"""A plain-PyTorch prototype of the MOPD loop on the toy's HF models (no Megatron).

It fixes the numbers the demo needs (batch, learning rate, warmup, steps) and measures
the sampled-token estimator before the Megatron trainer exists. One step:

    1. sample:  the student (temperature 1) answers `prompts_per_step` prompts,
                `samples_per_prompt` times each, recording log mu of every sampled token
    2. score:   the teacher of each prompt's domain gives log pi_T of every response token
    3. train:   log pi_theta in one forward; r = pi/mu; IcePop w = r in [eps_low, eps_high]
                else 0; A = sg[log pi_T - log pi_theta];
                loss = -(1/B) sum_i (1/|y_i|) sum_t w_t A_t log pi_theta(y_t); Adam with a
                linear learning-rate warmup and gradient clipping

Sampling and training use the same weights, so r = 1 up to float noise here (the Megatron
trainer's r measures its real train/inference mismatch).

Estimators (`estimator`):
- `sampled`: MiMo's sampled-token advantage (above), one scored token per position.
- `multi_draw`: `draws` extra tokens drawn from the student at every visited position,
  scored from the teacher's full log-probs; a lower-variance version of `sampled`.
- `exact`: the full-vocabulary reverse KL at every visited position (the reference).

Metrics logged every step: mean advantage (expected value: minus the reverse KL) next
to the exact reverse KL at the same positions, the student's stop-token probability where
the teacher does not stop, response length, IcePop discards, gradient norm, time per phase.
Greedy exact-match accuracy per domain every `eval_interval` steps; the run stops once
every domain is within `margin` of its teacher.

Left out: the outcome-reward term (`alpha * A_ORM`, MOPD.md: it did not help on this toy
while success was rare), data parallelism and weight sync (one process holds everything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_mopd.toy.sft import decode, encode, evaluate, load_model
from megatron_mopd.toy.tasks import Example, read_jsonl


@dataclass
class ProtoConfig:
    """The prototype's settings (names follow the trainer's config where it has them)."""

    prompts_per_step: int = 32
    samples_per_prompt: int = 4
    lr: float = 3e-4
    warmup_steps: int = 20
    lr_decay_style: Literal["constant", "cosine", "linear"] = "constant"  # over max_steps
    min_lr: float = 0.0
    max_steps: int = 400
    clip_grad: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    eps_low: float = 0.5
    eps_high: float = 5.0
    estimator: Literal["sampled", "multi_draw", "exact"] = "sampled"
    draws: int = 8  # tokens drawn per position for `multi_draw`
    max_new_tokens: int = 8
    eval_interval: int = 20
    margin: float = 0.02  # stop once accuracy >= teacher - margin in every domain
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "prompts_per_step",
            "samples_per_prompt",
            "max_steps",
            "draws",
            "max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.eps_low <= 1 <= self.eps_high:
            raise ValueError(
                f"need 0 <= eps_low <= 1 <= eps_high, got {self.eps_low}, {self.eps_high}"
            )


@dataclass
class Batch:
    """Prompt + response sequences, right-padded. `resp_B_T` marks response tokens; the
    log-prob of token `ids_B_T[b, t]` is predicted at position t - 1."""

    ids_B_T: torch.Tensor
    resp_B_T: torch.Tensor
    mu_B_T: torch.Tensor  # log mu of response tokens (0 elsewhere)
    domains: list[str]
    lengths_B: torch.Tensor  # response lengths |y_i|


def make_batch(prompts: Sequence[list[int]], responses, mus, domains, pad_id: int) -> Batch:
    """Assemble sampled responses into one right-padded `Batch`."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    B, T = len(seqs), max(map(len, seqs))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.bool)
    mu = torch.zeros((B, T))
    for i, (p, r, m) in enumerate(zip(prompts, responses, mus, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        resp[i, len(p) : len(p) + len(r)] = True
        mu[i, len(p) : len(p) + len(r)] = torch.tensor(m)
    lengths = resp.sum(-1)
    return Batch(ids, resp, mu, list(domains), lengths)


def logprobs_all(model, ids_B_T: torch.Tensor) -> torch.Tensor:
    """`lp[b, t, v]` = log p(v | ids[b, :t]) for t >= 1 (row 0 is unused, zeros)."""
    logits = model(input_ids=ids_B_T).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def teacher_logprobs(teachers: dict, batch: Batch) -> torch.Tensor:
    """Full teacher log-probs `[B, T, V]`, each row from its domain's teacher."""
    out = None
    for dom in sorted(set(batch.domains)):
        rows = torch.tensor([i for i, d in enumerate(batch.domains) if d == dom])
        with torch.no_grad():
            lp = logprobs_all(teachers[dom], batch.ids_B_T[rows])
        if out is None:
            out = torch.zeros(batch.ids_B_T.shape + (lp.shape[-1],))
        out[rows] = lp
    return out


def mopd_loss(
    lp_B_T_V: torch.Tensor,
    tlp_B_T_V: torch.Tensor,
    batch: Batch,
    cfg: ProtoConfig,
    eos_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The MOPD surrogate for `cfg.estimator`, and its metrics.

    `lp_B_T_V` are the student's log-probs (with gradient), `tlp_B_T_V` the teachers'.
    `eos_id` is the stop token (for the stop-probability metric).
    Per response: (1/|y|) sum over its tokens; then the mean over responses.
    """
    mask = batch.resp_B_T
    ids = batch.ids_B_T
    pi = lp_B_T_V.gather(-1, ids[..., None]).squeeze(-1)  # log pi_theta(y_t)
    t_lp = tlp_B_T_V.gather(-1, ids[..., None]).squeeze(-1)  # log pi_T(y_t)
    ratio = torch.exp(pi.detach() - batch.mu_B_T)
    keep = (ratio >= cfg.eps_low) & (ratio <= cfg.eps_high)
    w = torch.where(keep, ratio, torch.zeros_like(ratio))
    adv = t_lp - pi.detach()
    if cfg.estimator == "sampled":
        tok = w * adv * pi
    elif cfg.estimator == "multi_draw":
        probs = lp_B_T_V.detach().exp().flatten(0, 1)
        draws = torch.multinomial(probs, cfg.draws, replacement=True, generator=generator)
        draws = draws.view(*ids.shape, cfg.draws)
        d_lp = lp_B_T_V.gather(-1, draws)
        d_adv = tlp_B_T_V.gather(-1, draws) - d_lp.detach()
        tok = w * (d_adv * d_lp).mean(-1)
    elif cfg.estimator == "exact":
        p = lp_B_T_V.exp()
        # minus the reverse KL, so that loss = -(...) is the KL itself
        tok = w.detach() * -(p * (lp_B_T_V - tlp_B_T_V)).sum(-1)
    else:
        raise ValueError(f"unknown estimator {cfg.estimator!r}")
    per_seq = (tok * mask).sum(-1) / batch.lengths_B.clamp(min=1)
    loss = -per_seq.mean()

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        p = lp_B_T_V.detach().exp()
        kl = (p * (lp_B_T_V.detach() - tlp_B_T_V)).sum(-1)
        eos = eos_id
        t_no_stop = mask & (tlp_B_T_V[..., eos].exp() < 0.5)
        m = {
            "loss": loss.item(),
            "adv_mean": (adv * mask).sum().item() / n.item(),
            "kl_exact": (kl * mask).sum().item() / n.item(),
            "adv_min": adv[mask].min().item() if mask.any() else 0.0,
            "frac_adv_below_-5": ((adv < -5) & mask).sum().item() / n.item(),
            "stop_prob_where_teacher_continues": (
                (p[..., eos] * t_no_stop).sum().item() / max(1, t_no_stop.sum().item())
            ),
            "discard_frac": ((~keep) & mask).sum().item() / n.item(),
            "ratio_dev": ((ratio - 1).abs() * mask).sum().item() / n.item(),
            "resp_len": batch.lengths_B.float().mean().item(),
        }
        for dom in sorted(set(batch.domains)):
            rows = torch.tensor([d == dom for d in batch.domains])
            mm = mask & rows[:, None]
            m[f"kl_{dom}"] = (kl * mm).sum().item() / max(1, mm.sum().item())
    return loss, m


def lr_at(step: int, cfg: ProtoConfig) -> float:
    """The learning rate of step `step` (1-based): linear warmup over `warmup_steps`, then
    `lr_decay_style` from `lr` to `min_lr` at `max_steps` (Megatron's schedule shape)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_decay_style == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.lr_decay_style == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * frac
    return cfg.lr


@dataclass
class ProtoResult:
    """What a prototype run measured."""

    config: dict
    teacher_accuracy: dict[str, float]
    reached_step: int | None
    reached_seconds: float | None
    reached_cpu_seconds: float | None
    evals: list[dict]
    steps: list[dict]


def proto_step(
    student,
    teachers: dict,
    opt: torch.optim.Optimizer,
    tok,
    exs: Sequence[Example],
    step: int,
    cfg: ProtoConfig,
    gen: torch.Generator,
) -> dict:
    """One MOPD step on the examples `exs` (each repeated `samples_per_prompt` times):
    sample, score, train. Returns the step's metrics, with the time of each phase."""
    t0 = time.perf_counter()
    exs = [ex for ex in exs for _ in range(cfg.samples_per_prompt)]
    prompts = [encode(tok, ex.prompt) for ex in exs]
    # 1. sample
    student.eval()
    out = decode(
        student, prompts, cfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id, False, gen
    )
    student.train()
    batch = make_batch(
        prompts, out.response_ids, out.logprobs, [e.domain for e in exs], tok.pad_token_id
    )
    t1 = time.perf_counter()
    # 2. score
    tlp = teacher_logprobs(teachers, batch)
    t2 = time.perf_counter()
    # 3. train
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    lp = logprobs_all(student, batch.ids_B_T)
    loss, m = mopd_loss(lp, tlp, batch, cfg, tok.eos_token_id, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
    opt.step()
    t3 = time.perf_counter()
    m.update(
        step=step,
        grad_norm=float(gnorm),
        t_sample=t1 - t0,
        t_score=t2 - t1,
        t_train=t3 - t2,
        stopped=sum(out.stopped) / len(out.stopped),
    )
    return m


def _step_line(m: dict) -> str:
    return (
        f"step {m['step']}: adv {m['adv_mean']:.3f} kl {m['kl_exact']:.3f} "
        f"(add {m.get('kl_add', 0):.3f} rev {m.get('kl_reverse', 0):.3f}) "
        f"stop {m['stop_prob_where_teacher_continues']:.3f} len {m['resp_len']:.2f} "
        f"gn {m['grad_norm']:.2f} {m['t_sample'] + m['t_score'] + m['t_train']:.3f}s"
    )


def run(
    student_path: str,
    teacher_paths: dict[str, str],
    train: Sequence[Example],
    eval_examples: Sequence[Example],
    teacher_accuracy: dict[str, float],
    cfg: ProtoConfig,
    log: Callable[[str], None] | None = print,
    save_to: str | None = None,
) -> ProtoResult:
    """Run MOPD from `student_path` until every domain is within `cfg.margin` of its
    teacher's accuracy (on `eval_examples`) or `cfg.max_steps` steps have run."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_path)
    torch.manual_seed(cfg.seed)
    student = load_model(student_path)
    teachers = {d: load_model(p).eval() for d, p in teacher_paths.items()}
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    cursor = 0
    steps, evals = [], []
    target = {d: a - cfg.margin for d, a in teacher_accuracy.items()}
    train_wall = train_cpu = 0.0
    reached = None

    def do_eval(step: int) -> bool:
        acc = evaluate(student, tok, eval_examples)
        evals.append(
            {"step": step, "seconds": round(train_wall, 2), "cpu": round(train_cpu, 2), **acc}
        )
        if log:
            log(f"  eval step {step}: {acc} (train {train_wall:.1f}s wall, {train_cpu:.1f}s cpu)")
        return all(acc[d] >= target[d] for d in target)

    do_eval(0)
    for step in range(1, cfg.max_steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        if cursor + cfg.prompts_per_step > len(order):
            rng.shuffle(order)
            cursor = 0
        exs = [train[j] for j in order[cursor : cursor + cfg.prompts_per_step]]
        cursor += cfg.prompts_per_step
        m = proto_step(student, teachers, opt, tok, exs, step, cfg, gen)
        train_wall += time.perf_counter() - t0
        train_cpu += time.process_time() - c0
        steps.append({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()})
        if log and (step % 10 == 0 or step == 1):
            log(_step_line(m))
        if step % cfg.eval_interval == 0 and do_eval(step):
            reached = step
            break
    if save_to:
        student.save_pretrained(save_to, safe_serialization=True)
        tok.save_pretrained(save_to)
    last = evals[-1]
    return ProtoResult(
        dataclasses.asdict(cfg),
        dict(teacher_accuracy),
        reached,
        last["seconds"] if reached else None,
        last["cpu"] if reached else None,
        evals,
        steps,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m megatron_mopd.toy.prototype RUN_DIR [key=value ...]` (after build.py)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="ProtoConfig fields, key=value")
    parser.add_argument("--out", help="write the measurements to this JSON file")
    parser.add_argument("--save", help="save the final student (an HF folder) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with open(os.path.join(args.run_dir, "toy", "toy.json")) as f:
        toy = json.load(f)
    fields = {f.name: f.type for f in dataclasses.fields(ProtoConfig)}
    kw = {}
    for item in args.overrides:
        key, value = item.split("=", 1)
        if key not in fields:
            parser.error(f"unknown setting {key!r}; choose from {sorted(fields)}")
        kw[key] = json.loads(value) if value[:1] in "0123456789-[{.tf" else value
    cfg = ProtoConfig(**kw)
    res = run(
        toy["student"],
        toy["teachers"],
        read_jsonl(toy["train_jsonl"]),
        read_jsonl(toy["eval_jsonl"]),
        toy["teacher_accuracy"],
        cfg,
        save_to=args.save,
    )
    print(
        f"reached at step {res.reached_step}: {res.reached_seconds}s wall, {res.reached_cpu_seconds}s cpu"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dataclasses.asdict(res), f)


if __name__ == "__main__":
    main()
