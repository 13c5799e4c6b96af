"""Records passed between the stages of the loop.

One log-prob convention everywhere: for a token sequence `ids`, `logprobs[i]` is
log p(ids[i] | ids[:i]). A response that starts at index `s` of `ids` therefore has its
log-probs at positions s..len(ids)-1; the stop token, when sampled, is a response token.
Tensors are named by shape: `_B_T` is [batch, time], `_B` is [batch].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How the rollout engine samples (MOPD needs temperature 1 for log mu)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Rollout:
    """One sampled response, as the inference engine returned it."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # log mu(response_ids[t] | prompt, response[:t])
    finish_reason: str  # "stop" (a stop token was sampled) or "length"
    weight_version: str
    # The MoE experts the engine routed each token to (routing replay, R3): an int32
    # tensor [P + R - 1, num_layers, top_k] for the tokens prompt + response[:-1] (the
    # last sampled token is never fed to the model), layers in the model's order. None
    # when the engine does not return them (dense model, or not asked).
    routed_experts: Any = None


@dataclass
class ScoreRequest:
    """A sequence to score: `input_ids` = prompt + response; the response starts at
    index `response_start` (>= 1)."""

    input_ids: list[int]
    response_start: int


@dataclass
class ScoreResult:
    """A teacher's log-probs of the response tokens of one `ScoreRequest`.

    `logprobs[t]` is log p_teacher(input_ids[s + t] | input_ids[: s + t]) with
    s = response_start. When top-k was asked, `top_ids` (int64) and `top_logprobs`
    (float32) are `[n, k]` tensors, n = the response tokens: row t holds the k most likely
    tokens of the distribution that predicts input_ids[s + t] and their log-probs (most
    likely first). Both are None when no top-k was asked.
    """

    logprobs: list[float]
    top_ids: Any = None  # torch.LongTensor [n, k] or None
    top_logprobs: Any = None  # torch.FloatTensor [n, k] or None
