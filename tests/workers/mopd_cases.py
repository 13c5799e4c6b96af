"""Worker: one MOPD train step per case (layout x estimator), gradients saved unsharded.

    torchrun --standalone --nproc-per-node 2 tests/workers/mopd_cases.py \
        --out DIR --cases '[{"name": "tp2", "tp": 2, "mbs": 2}, ...]'

Every case builds the same tiny MoE student (layout-independent init), runs
`mopd_train_step` on the same global batch of 7 sequences with uneven response lengths
(one empty) over three domains, once with the sampled estimator everywhere and once with
top-k estimators on two domains, and saves the step's output and every parameter's
gradient by global name with its shard info (tests/test_mopd_parallel.py unshards them).
With `"dense": true` (world size 1 only) it also computes the same loss and gradient with
plain autograd on the whole batch at once: full log_softmax, no schedule, no micro-batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.batch import TrainBatch  # noqa: E402
from megatron_mopd.config import (  # noqa: E402
    LossConfig,
    LossOverride,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_mopd.student.logprobs import full_logits, unwrap_model  # noqa: E402

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    vocab_size=128,
    qk_layernorm=True,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
    init_method_std=0.05,
    seed=7,
)
DOMAINS = ["chat", "code", "math"]
K = 4


def loss_config(estimator: str) -> LossConfig:
    """Three domains with different alpha, bounds, corrections and (for "topk") estimators."""
    topk = estimator == "topk"
    cfg = LossConfig(
        alpha=0.5,
        per_domain={
            "code": LossOverride(
                alpha=1.0,
                correction="tis",
                eps_high=2.0,
                estimator="topk_reverse_kl" if topk else None,
            ),
            "chat": LossOverride(
                alpha=0.0,
                correction="none",
                estimator="topk_forward_kl" if topk else None,
            ),
        },
    )
    cfg.validate("loss")
    return cfg


def make_batch() -> TrainBatch:
    """7 sequences: prompts of 2-5 tokens, responses of 0-12 tokens (sequence 3 empty)."""
    gen = torch.Generator().manual_seed(4321)
    prompts = torch.randint(2, 6, (7,), generator=gen).tolist()
    responses = [9, 1, 12, 0, 5, 11, 3]
    lengths = [p + r for p, r in zip(prompts, responses)]
    B, T, V = len(lengths), max(lengths), MODEL.vocab_size
    tokens = torch.randint(3, V, (B, T), generator=gen)
    mask = torch.zeros(B, T)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        tokens[i, n:] = 0
        mask[i, p:n] = 1.0
    # the random student is near uniform (log 1/128 = -4.85): ratios spread around 1
    rollout = (-4.85 + 0.6 * torch.randn(B, T, generator=gen)) * mask
    teacher = (-4.85 + torch.randn(B, T, generator=gen)) * mask
    top_ids = torch.rand(B, T, V, generator=gen).topk(K, dim=-1).indices
    top_lp = torch.log_softmax(2 * torch.randn(B, T, K + 1, generator=gen), -1)[..., :K]
    top_lp = top_lp.sort(dim=-1, descending=True).values
    return TrainBatch(
        tokens_B_T=tokens,
        mask_B_T=mask,
        rollout_logprobs_B_T=rollout,
        teacher_logprobs_B_T=teacher,
        orm_advantages_B=torch.randn(B, generator=gen),
        domain_ids_B=torch.tensor([2, 1, 0, 2, 1, 0, 1]),
        domains=list(DOMAINS),
        lengths_B=torch.tensor(lengths),
        teacher_topk_ids_B_T_K=top_ids,
        teacher_topk_logprobs_B_T_K=top_lp,
    )


def collect_grads(chunks) -> dict[str, tuple]:
    """{global name: (grad, partition dim, stride, world, rank)} of this rank's params."""
    from megatron.core import parallel_state as ps

    from megatron_mopd.student.logprobs import unwrap_model
    from megatron_mopd.student.model import global_param_name

    out = {}
    for chunk in chunks:
        inner = unwrap_model(chunk)
        for name, p in inner.named_parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            info: tuple = (None, 1, 1, 0)
            if getattr(p, "tensor_model_parallel", False):
                if ".local_experts." in name:  # routed experts: sharded over expert-TP
                    world = ps.get_expert_tensor_parallel_world_size()
                    rank = ps.get_expert_tensor_parallel_rank()
                else:
                    world = ps.get_tensor_model_parallel_world_size()
                    rank = ps.get_tensor_model_parallel_rank()
                info = (p.partition_dim, getattr(p, "partition_stride", 1), world, rank)
            out[global_param_name(name, inner, MODEL)] = (g.detach().clone().float(), *info)
    return out


def dense_reference(chunks, batch: TrainBatch, cfg: LossConfig) -> tuple[float, dict]:
    """The loss over the whole batch by plain autograd (world size 1)."""
    from megatron_mopd.loss import mopd_loss, sequence_settings

    for chunk in chunks:
        chunk.zero_grad_buffer()
    tokens = batch.tokens_B_T
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = full_logits(chunks, tokens, pos)
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    train = torch.nn.functional.pad(logp.gather(-1, tokens[:, 1:, None])[..., 0], (1, 0))
    top = torch.nn.functional.pad(
        logp.gather(-1, batch.teacher_topk_ids_B_T_K[:, 1:]), (0, 0, 1, 0)
    )
    settings = sequence_settings(cfg, [batch.domains[i] for i in batch.domain_ids_B.tolist()])
    loss, _ = mopd_loss(
        train,
        batch.rollout_logprobs_B_T.double(),
        batch.teacher_logprobs_B_T.double(),
        batch.mask_B_T,
        batch.orm_advantages_B.double(),
        student_topk_logprobs=top,
        teacher_topk_logprobs=batch.teacher_topk_logprobs_B_T_K.double(),
        topk_tail=cfg.topk_tail,
        **settings.kwargs(),
    )
    loss.backward()
    return loss.item(), collect_grads(chunks)


def run_case(case: dict) -> dict:
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.mopd_step import mopd_train_step
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    parallel = ParallelConfig(
        tensor_model_parallel_size=case.get("tp", 1),
        pipeline_model_parallel_size=case.get("pp", 1),
        expert_model_parallel_size=case.get("ep", 1),
    )
    start = time.perf_counter()
    layout = distributed.init_distributed(parallel, MODEL, seed=0)
    batch = make_batch()
    results: dict = {"layout": (layout.tp, layout.pp, layout.ep, layout.dp)}
    model = dataclasses.replace(MODEL, logits_chunk_tokens=case.get("chunk", 512))
    for estimator in ("sampled", "topk"):
        cfg = loss_config(estimator)
        chunks = wrap_ddp(build_model(model, parallel), parallel)
        optimizer, _ = build_optimizer(
            chunks, TrainConfig(lr=1.0, adam_eps=1.0, lr_warmup_steps=0, clip_grad=0.0), parallel
        )
        res: dict = {}
        if case.get("dense"):
            res["dense_loss"], res["dense_grads"] = dense_reference(chunks, batch, cfg)
        res["out"] = mopd_train_step(chunks, optimizer, batch, cfg, case["mbs"])
        res["grads"] = collect_grads(chunks)
        # Adam with eps = 1 (and lr = 1): the first update is about the gradient itself,
        # so parameters compare like gradients (eps ~ 0 would amplify rounding in tiny ones)
        res["params"] = {
            n: p.detach().clone() for c in chunks for n, p in unwrap_model(c).named_parameters()
        }
        results[estimator] = res
    results["seconds"] = time.perf_counter() - start
    distributed.destroy(keep_process_group=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of case dicts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {case["name"]: run_case(case) for case in json.loads(args.cases)}
    save_result(args.out, int(os.environ.get("RANK", "0")), results)
    distributed.destroy()


if __name__ == "__main__":
    main()
