"""Prompt datasets and a resumable prompt sampler.

A dataset is a JSONL file, one record per line:

    {"prompt": "12+34=", "domain": "add", "answer": "46"}
    {"prompt_ids": [1, 17, 18], "domain": "add", "answer": "46"}   # pre-tokenised

`prompt` (text) or `prompt_ids` (token ids) is required, and `domain`; `answer` is needed
only by outcome rewards and evaluation. Every problem is reported as `FILE:LINE: ...`.

`PromptSampler` walks the dataset in a seeded random order, epoch after epoch; its
state is two integers, saved in checkpoints, so a resumed run sees exactly the prompts an
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from megatron_mopd.errors import UserError


@dataclass
class PromptRecord:
    """One prompt of a dataset, with where it came from (for error messages)."""

    domain: str
    prompt: str | None
    prompt_ids: list[int] | None
    answer: str | None
    source: str  # "FILE:LINE"


def load_prompts(
    path: str, known_domains: set[str] | None = None, need_answer: bool = False
) -> list[PromptRecord]:
    """Read and validate a JSONL prompt dataset; errors name the file and line."""
    records = []
    try:
        f = open(path)
    except FileNotFoundError:
        raise UserError(f"dataset {path}: no such file") from None
    except OSError as e:
        raise UserError(f"dataset {path}: cannot read: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: a record must be a JSON object")
            domain = obj.get("domain")
            if not isinstance(domain, str) or not domain:
                raise UserError(f"{where}: missing field 'domain'")
            if known_domains is not None and domain not in known_domains:
                raise UserError(
                    f"{where}: domain {domain!r} has no teacher "
                    f"(teachers cover {sorted(known_domains)}; or set default_teacher)"
                )
            prompt, ids = obj.get("prompt"), obj.get("prompt_ids")
            if prompt is None and ids is None:
                raise UserError(f"{where}: missing field 'prompt' (or 'prompt_ids')")
            if prompt is not None and not isinstance(prompt, str):
                raise UserError(f"{where}: 'prompt' must be a string")
            if ids is not None and (
                not isinstance(ids, list)
                or not ids
                or not all(isinstance(t, int) and t >= 0 for t in ids)
            ):
                raise UserError(f"{where}: 'prompt_ids' must be a non-empty list of token ids")
            answer = obj.get("answer")
            if need_answer and answer is None:
                raise UserError(f"{where}: missing field 'answer' (needed for rewards/eval)")
            records.append(
                PromptRecord(
                    domain=domain,
                    prompt=prompt,
                    prompt_ids=ids,
                    answer=None if answer is None else str(answer),
                    source=where,
                )
            )
    if not records:
        raise UserError(f"dataset {path}: no records")
    return records


def tokenize_prompts(
    records: list[PromptRecord],
    tokenizer,
    apply_chat_template: bool = False,
    max_prompt_length: int | None = None,
) -> list[list[int]]:
    """Token ids of every prompt (pre-tokenised ids are kept as they are)."""
    out = []
    vocab = len(tokenizer) if tokenizer is not None else None
    for r in records:
        if r.prompt_ids is not None:
            ids = list(r.prompt_ids)
        elif apply_chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(
                    f"{r.source}: data.apply_chat_template is true but the student's "
                    "tokenizer has no chat template"
                )
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": r.prompt}], add_generation_prompt=True, tokenize=True
            )
        else:
            # the tokenizer's own convention for special tokens (Qwen adds none; Llama a BOS)
            ids = tokenizer(r.prompt)["input_ids"]
        if vocab is not None and max(ids) >= vocab:
            raise UserError(f"{r.source}: token id {max(ids)} >= vocabulary size {vocab}")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise UserError(
                f"{r.source}: prompt has {len(ids)} tokens > data.max_prompt_length="
                f"{max_prompt_length}"
            )
        out.append(ids)
    return out


class PromptSampler:
    """Seeded epoch-wise shuffling over `n` prompts; `state()`/`load_state()` resume it."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        """The next `k` prompt indices (wrapping into a new, reshuffled epoch)."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            take = min(k - len(out), self.n - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        """What a checkpoint stores."""
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        """Continue from a saved `state()`."""
        if state["n"] != self.n:
            raise UserError(
                f"the checkpoint was written for a dataset of {state['n']} prompts; "
                f"this one has {self.n}: resume with the same data.train_path"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make_order()
