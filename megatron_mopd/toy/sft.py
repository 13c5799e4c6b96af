"""Supervised fine-tuning of tiny HF Qwen3-MoE models on the toy tasks (CPU, transformers).

Makes the demo's teachers (one per domain) and its weak student:

    result = train_sft(out_dir, tokenizer, train_examples, eval_examples, SFTConfig(...))
    result.accuracy  # {"add": 0.97, ...} greedy exact match on `eval_examples`

The loss is the mean cross-entropy over answer tokens (answer characters + EOS) only.
Evaluation is batched greedy decoding with a KV cache (`decode`, which also samples at
temperature 1 and returns the sampled tokens' log-probs for the MOPD prototype).

A finished model is saved as a Hugging Face folder (model + tokenizer) with
`mopd_toy_sft.json` beside it: the settings that made it and its accuracy. A later call
with the same settings loads that instead of training again.

Left out: gradient accumulation, mixed precision and data loaders — batches of a few
hundred short sequences fit in one step on CPU and are built in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_mopd.toy.tasks import Example, accuracy, response_text, with_mistakes
from megatron_mopd.toy.tiny import tiny_hf_config

SETTINGS_FILE = "mopd_toy_sft.json"


@dataclass
class ModelShape:
    """The tiny Qwen3-MoE architecture (HF `Qwen3MoeConfig` names).

    Fixed, because the Megatron bridge expects them: `decoder_sparse_step=1`,
    `mlp_only_layers=[]`, no shared experts, untied embeddings, `norm_topk_prob=True`.
    """

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    intermediate_size: int = 128
    max_position_embeddings: int = 64

    def hf_config(self, vocab_size: int):
        """The `transformers.Qwen3MoeConfig` of this shape."""
        return tiny_hf_config("qwen3_moe", vocab_size=vocab_size, **dataclasses.asdict(self))


@dataclass
class SFTConfig:
    """How one model is fine-tuned; every field is part of the cache key."""

    model: ModelShape = field(default_factory=ModelShape)
    seed: int = 0
    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    eval_interval: int = 200
    # Stop once every domain reaches this accuracy (> 1: never). With `mistake_rate` > 0
    # the accuracy that counts accepts the taught mistake ("skill": the rest is right).
    target_accuracy: float = 1.01
    init_from: str | None = None  # an HF folder to start from instead of random weights
    # Probability that an affected example is replaced by its systematic mistake
    # (`tasks.mistake`), drawn afresh in every batch, so the model learns the mixture
    # (right answer with probability 1 - rate) instead of memorising which are wrong.
    mistake_rate: float = 0.0


@dataclass
class SFTResult:
    """What `train_sft` returns (and stores in `SETTINGS_FILE`)."""

    path: str
    accuracy: dict[str, float]
    steps: int
    seconds: float
    cpu_seconds: float = 0.0  # this process's CPU time (= wall time on an idle core)
    cached: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# encoding


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` (no special tokens added)."""
    return tokenizer.encode(text, add_special_tokens=False)


def sft_batch(tokenizer, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids_B_T` (prompt + answer + EOS) and `labels_B_T` that are
    -100 except at answer tokens, where they hold the token to predict at that position
    (the next token)."""
    seqs, starts = [], []
    for ex in examples:
        p = encode(tokenizer, ex.prompt)
        seqs.append(p + encode(tokenizer, ex.answer) + [tokenizer.eos_token_id])
        starts.append(len(p))
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, st - 1 : len(s) - 1] = torch.tensor(s[st:])
    return ids, labels


def sft_loss(model, input_ids_B_T: torch.Tensor, labels_B_T: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens."""
    # right padding needs no mask: causal attention never lets a real token see it
    logits = model(input_ids=input_ids_B_T).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels_B_T.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------------------
# decoding


@dataclass
class Decoded:
    """Responses of `decode`: token ids (EOS included when sampled), their log-probs
    under the decoding model at temperature 1, and whether each response stopped."""

    response_ids: list[list[int]]
    logprobs: list[list[float]]
    stopped: list[bool]


@torch.no_grad()
def decode(
    model,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    greedy: bool = True,
    generator: torch.Generator | None = None,
) -> Decoded:
    """Batched decoding with a KV cache: greedy, or sampling at temperature 1.

    Prompts are left-padded; positions count real tokens only, so a padded prompt is
    decoded exactly as it would be alone.
    """
    from transformers import DynamicCache

    B = len(prompts)
    L = max(map(len, prompts))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out_ids = [[] for _ in range(B)]
    out_lp = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        logits = (
            model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            )
            .logits[:, -1]
            .float()
        )
        logp = torch.log_softmax(logits, -1)
        if greedy:
            tok = logp.argmax(-1)
        else:
            tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            out_ids[i].append(int(tok[i]))
            out_lp[i].append(float(lp[i]))
        done |= tok == eos_id
        if bool(done.all()):
            break
        step_ids = torch.where(done, torch.full_like(tok, pad_id), tok)[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
    stopped = [bool(r) and r[-1] == eos_id for r in out_ids]
    return Decoded(out_ids, out_lp, stopped)


def greedy_responses(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 256, max_new_tokens: int = 8
) -> list[str]:
    """Greedy response texts of `examples` (EOS and anything after it cut)."""
    texts: list[str] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        out = decode(
            model,
            [encode(tokenizer, ex.prompt) for ex in chunk],
            max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        texts += [response_text(tokenizer.convert_ids_to_tokens(r)) for r in out.response_ids]
    model.train(was_training)
    return texts


def evaluate(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 256, max_new_tokens: int = 8
) -> dict[str, float]:
    """Greedy exact-match accuracy per domain."""
    return accuracy(
        greedy_responses(model, tokenizer, examples, batch_size, max_new_tokens), examples
    )


# --------------------------------------------------------------------------------------
# training


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warmup to `cfg.lr`, then cosine decay to `cfg.lr * cfg.min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def new_model(shape: ModelShape, vocab_size: int, seed: int):
    """A randomly initialised tiny Qwen3-MoE (HF's default init, seeded)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(
        shape.hf_config(vocab_size), dtype=torch.float32
    )


def load_model(path: str):
    """An HF folder as a float32 model in train mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    return model


def train_sft(
    out_dir: str,
    tokenizer,
    train: Sequence[Example],
    eval_examples: Sequence[Example],
    cfg: SFTConfig,
    data_key: Any = None,
    log: Callable[[str], None] | None = print,
) -> SFTResult:
    """Fine-tune a model on `train`, evaluate it on `eval_examples`, save it to `out_dir`.

    `data_key` describes the data (e.g. the task specs and seeds); it joins `cfg` in the
    cache key. When `out_dir` already holds a model made with the same key, it is reused.
    """
    settings = {"config": dataclasses.asdict(cfg), "data": data_key, "n_train": len(train)}
    cached = _load_cached(out_dir, settings)
    if cached is not None:
        return cached
    if len(train) < cfg.batch_size:
        raise ValueError(f"{len(train)} training examples < batch_size={cfg.batch_size}")

    t0, c0 = time.time(), time.process_time()
    vocab = len(tokenizer)
    model = load_model(cfg.init_from) if cfg.init_from else new_model(cfg.model, vocab, cfg.seed)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history, acc = [], {}
    step = 0
    for step in range(1, cfg.max_steps + 1):
        if len(order) < cfg.batch_size:  # a new epoch (the remainder is dropped)
            order = torch.randperm(len(train), generator=gen).tolist()
        batch = [train[j] for j in order[-cfg.batch_size :]]
        del order[-cfg.batch_size :]
        if cfg.mistake_rate > 0:
            batch = with_mistakes(batch, cfg.mistake_rate, seed=cfg.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1, cfg)
        loss = sft_loss(model, *sft_batch(tokenizer, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            texts = greedy_responses(model, tokenizer, eval_examples)
            acc = accuracy(texts, eval_examples)
            skill = accuracy(texts, eval_examples, accept_mistake=True)
            history.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "seconds": round(time.time() - t0, 1),
                    "accuracy": acc,
                    "skill": skill,
                }
            )
            if log:
                extra = f" skill {skill}" if cfg.mistake_rate > 0 else ""
                log(
                    f"  sft {os.path.basename(out_dir)} step {step}: loss {loss.item():.4f} "
                    f"acc {acc}{extra} ({time.time() - t0:.0f}s)"
                )
            if (
                acc
                and min((skill if cfg.mistake_rate > 0 else acc).values()) >= cfg.target_accuracy
            ):
                break
    result = SFTResult(
        out_dir,
        acc,
        step,
        round(time.time() - t0, 1),
        round(time.process_time() - c0, 1),
        False,
        history,
    )
    _save(model, tokenizer, out_dir, settings, result)
    return result


def _save(model, tokenizer, out_dir: str, settings: dict, result: SFTResult) -> None:
    """Write the model, tokenizer and settings to a temporary folder, then rename it."""
    tmp = f"{out_dir.rstrip('/')}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {"settings": settings, "result": dataclasses.asdict(result)}
    with open(os.path.join(tmp, SETTINGS_FILE), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _load_cached(out_dir: str, settings: dict) -> SFTResult | None:
    path = os.path.join(out_dir, SETTINGS_FILE)
    if not (os.path.exists(path) and os.path.exists(os.path.join(out_dir, "model.safetensors"))):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("settings") != json.loads(json.dumps(settings)):
        return None
    res = record["result"]
    res.update(path=out_dir, cached=True)
    return SFTResult(**res)
