"""Sampling rules of `HFEngine.generate`, vectorised over the rows of a decode batch.

    rows = RowParams.build(params, ignore_eos, eos_token_ids, return_original_logprob)
    probs = truncate_batch(torch.softmax(logits / rows.temps, -1), rows.top_k, rows.top_p)

Per row: logits / temperature, then top-k, then top-p (nucleus); `temperature < 1e-5` or
`top_k == 1` is greedy (argmax). `truncate_batch` applies each row's own top_k / top_p
to a [B, V] tensor at once and keeps exactly what `truncate` (the one-row rule) keeps:
the probabilities are zeroed outside the kept set, not renormalised (`torch.multinomial`
accepts unnormalised weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_mopd.types import SamplingParams

GREEDY_EPS = 1e-5


def is_greedy(sp: SamplingParams) -> bool:
    """Whether a request decodes by argmax (temperature ~0 or top_k == 1)."""
    return sp.temperature < GREEDY_EPS or sp.top_k == 1


def temperature(sp: SamplingParams) -> float:
    """The temperature the logits are divided by (1 for greedy requests)."""
    return 1.0 if is_greedy(sp) else float(sp.temperature)


def truncate(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the probabilities of one row outside the top-k and the top-p nucleus (not
    renormalised). The reference rule that `truncate_batch` vectorises."""
    if top_k > 0 and top_k < probs.numel():
        kth = probs.topk(top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0) / sorted_p.sum()
        drop = (cum - sorted_p / sorted_p.sum()) >= top_p  # mass before this token >= top_p
        sorted_p = torch.where(drop, torch.zeros_like(sorted_p), sorted_p)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return probs


def truncate_batch(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`truncate` of every row of `probs` [B, V] with its own `top_k[r]` (<= 0 or >= V:
    off) and `top_p[r]` (1.0: off), in one sort. Returns `probs` itself when no row
    truncates."""
    vocab = probs.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    use_p = top_p < 1.0
    use_k = k < vocab
    if not bool(use_k.any()) and not bool(use_p.any()):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    kth = sorted_p.gather(-1, (k - 1)[:, None])
    keep = sorted_p >= kth  # ties with the k-th are kept, as `truncate` keeps them
    if bool(use_p.any()):
        kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        total = kept.sum(-1, keepdim=True)
        before = kept.cumsum(-1) / total - kept / total  # mass before this token
        keep &= ~((before >= top_p[:, None]) & use_p[:, None])
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    return torch.where(mask, probs, torch.zeros_like(probs))


@dataclass
class RowParams:
    """The sampling settings of a decode batch as tensors, one entry per row."""

    temps: torch.Tensor  # float32 [B, 1]; 1 for greedy rows
    greedy: torch.Tensor  # bool [B]
    sampled: list[int]  # the non-greedy rows, in order
    sampled_idx: torch.Tensor  # long [len(sampled)]
    top_k: torch.Tensor  # long [B] (-1 = off)
    top_p: torch.Tensor  # float32 [B]
    use_raw: torch.Tensor  # bool [B]: return the unscaled log_softmax
    any_scaled: bool  # some row returns log_softmax(logits / T)
    stop_ids: torch.Tensor  # long [B, S], padded with -1
    max_new: torch.Tensor  # long [B]

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        ignore_eos: Sequence[bool],
        eos_token_ids: set[int],
        original_logprob: bool,
    ) -> RowParams:
        """From one `SamplingParams` and one `ignore_eos` flag per row."""
        greedy = torch.tensor([is_greedy(sp) for sp in params], dtype=torch.bool)
        sampled = [r for r, g in enumerate(greedy.tolist()) if not g]
        stops = [
            sorted(set(sp.stop_token_ids) | (set() if ign else eos_token_ids))
            for sp, ign in zip(params, ignore_eos)
        ]
        width = max((len(s) for s in stops), default=0)
        stop_ids = torch.full((len(params), width), -1, dtype=torch.long)
        for r, s in enumerate(stops):
            stop_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        use_raw = greedy | original_logprob
        return cls(
            temps=torch.tensor([temperature(sp) for sp in params], dtype=torch.float32)[:, None],
            greedy=greedy,
            sampled=sampled,
            sampled_idx=torch.tensor(sampled, dtype=torch.long),
            top_k=torch.tensor([sp.top_k for sp in params], dtype=torch.long),
            top_p=torch.tensor([sp.top_p for sp in params], dtype=torch.float32),
            use_raw=use_raw,
            any_scaled=not bool(use_raw.all()),
            stop_ids=stop_ids,
            max_new=torch.tensor([sp.max_new_tokens for sp in params], dtype=torch.long),
        )


def draw(
    logits: torch.Tensor,
    rows: RowParams,
    batch_gen: torch.Generator | None,
    gens: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """One token per row of `logits` [B, V] (float32): greedy rows take the argmax; the
    others sample from their truncated distribution, all at once from `batch_gen`
    (`inverse_cdf`), or (`batch_gen` None) row by row from their own
    generator `gens[r]`."""
    next_ids = logits.argmax(dim=-1)
    if not rows.sampled:
        return next_ids
    every = len(rows.sampled) == logits.shape[0]
    idx = rows.sampled_idx
    sub = logits if every else logits[idx]
    temps = rows.temps if every else rows.temps[idx]
    probs = torch.softmax(sub / temps, dim=-1)
    top_k = rows.top_k if every else rows.top_k[idx]
    top_p = rows.top_p if every else rows.top_p[idx]
    probs = truncate_batch(probs, top_k, top_p)
    if batch_gen is not None:
        picked = inverse_cdf(probs, batch_gen)
        if every:
            return picked
        next_ids[idx] = picked
        return next_ids
    assert gens is not None
    for j, r in enumerate(rows.sampled):
        next_ids[r] = torch.multinomial(probs[j], 1, generator=gens[r])[0]
    return next_ids


def inverse_cdf(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of the unnormalised weights `probs` [B, V], drawn by inverse
    transform sampling: one uniform per row from `gen`, and the first index whose
    cumulative weight exceeds it (zero-weight indices are never drawn). The same
    distribution as `torch.multinomial(probs, 1)`, at a tenth of its cost on [128, 128]
    (0.06 vs 0.79 ms, measured on this machine)."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """float32 [B]: log_softmax(logits) of each row's token, or of logits / temperature
    for rows that return scaled log-probs (SGLang's rule; see `hf_engine`)."""
    tok = tokens[:, None]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tok)[:, 0]
    if rows.any_scaled:
        scaled = torch.log_softmax(logits / rows.temps, dim=-1).gather(-1, tok)[:, 0]
        lp = torch.where(rows.use_raw, lp, scaled)
    return lp
