"""Worker: MOPD train steps with token-budget micro-batches, recomputation and overlap.

    python tests/workers/micro_cases.py --out DIR --cases '[{"name": "ref", "mbs": 1}]'
    torchrun --standalone --nproc-per-node 2 tests/workers/micro_cases.py --out DIR ...

Every case builds the tiny MoE student of tests/workers/mopd_cases.py (layout-independent
init), runs `steps` MOPD steps (sampled estimator, three domains) on one global batch of
8 sequences whose lengths differ a lot (so the two DP halves need different numbers of
token-budget micro-batches), and saves per case: the first step's output, every
parameter's gradient after it and every parameter before the first and after the last step (by global name
with shard info, tests/test_micro_batches.py unshards them), the micro-batches each
rank ran (count and shapes), and the bytes autograd saved for backward during the
forward passes of the first step (parameters excluded): what recomputation reduces.

Case keys: `mbs` (train.micro_batch_size), `max_tokens` (train.max_tokens_per_microbatch),
`tp`/`pp`/`ep`, `recompute` (a dict of model.recompute_*), `distopt`, `overlap_grad`,
`overlap_param`, `bucket` (parallel.ddp_bucket_size), `steps` (default 1), `resume_after`
(save the training state after that many steps, rebuild everything, load it, go on),
`optimizer_format`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mopd_cases import MODEL, collect_grads, loss_config  # noqa: E402
from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.batch import TrainBatch  # noqa: E402
from megatron_mopd.config import ParallelConfig, TrainConfig  # noqa: E402

DOMAINS = ["chat", "code", "math"]
# DP2 shares: [30, 4, 5, 3] and [20, 19, 18, 17]; at a budget of 36 tokens rank 0 needs 2
# micro-batches ([30], [5, 4, 3]) and rank 1 three ([20], [19], [18, 17])
LENGTHS = [30, 4, 5, 3, 20, 19, 18, 17]


def make_batch() -> TrainBatch:
    """8 sequences of `LENGTHS` tokens, prompts of 2 tokens, the rest the response."""
    gen = torch.Generator().manual_seed(99)
    B, T, V = len(LENGTHS), max(LENGTHS), MODEL.vocab_size
    tokens = torch.randint(3, V, (B, T), generator=gen)
    mask = torch.zeros(B, T)
    for i, n in enumerate(LENGTHS):
        tokens[i, n:] = 0
        mask[i, 2:n] = 1.0
    rollout = (-4.85 + 0.6 * torch.randn(B, T, generator=gen)) * mask
    teacher = (-4.85 + torch.randn(B, T, generator=gen)) * mask
    return TrainBatch(
        tokens_B_T=tokens,
        mask_B_T=mask,
        rollout_logprobs_B_T=rollout,
        teacher_logprobs_B_T=teacher,
        orm_advantages_B=torch.randn(B, generator=gen),
        domain_ids_B=torch.tensor([2, 1, 0, 2, 1, 0, 1, 2]),
        domains=list(DOMAINS),
        lengths_B=torch.tensor(LENGTHS),
    )


def collect_params(chunks) -> dict[str, tuple]:
    """Like `collect_grads`, for the parameters' values."""
    saved = {}
    for chunk in chunks:
        for p in chunk.parameters():
            saved[p] = p.main_grad if getattr(p, "main_grad", None) is not None else None
            p.main_grad = p.data
    try:
        return collect_grads(chunks)
    finally:
        for p, g in saved.items():
            p.main_grad = g


class SavedBytes:
    """Bytes autograd saves for backward outside backward passes (parameters excluded)."""

    def __init__(self, chunks):
        self.params = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
        self.total = 0

    def pack(self, t: torch.Tensor):
        if torch._C._current_graph_task_id() == -1 and (
            t.untyped_storage().data_ptr() not in self.params
        ):
            self.total += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def build(case: dict, model_cfg, parallel):
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    chunks = wrap_ddp(build_model(model_cfg, parallel), parallel)
    optimizer, scheduler = build_optimizer(
        chunks, TrainConfig(lr=1e-3, lr_warmup_steps=0, clip_grad=0.0), parallel
    )
    return chunks, optimizer, scheduler


def run_case(case: dict) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_mopd.student.mopd_step import micro_batches_for_rank, mopd_train_step
    from megatron_mopd.student.state import load_training_state, save_training_state

    parallel = ParallelConfig(
        tensor_model_parallel_size=case.get("tp", 1),
        pipeline_model_parallel_size=case.get("pp", 1),
        expert_model_parallel_size=case.get("ep", 1),
        use_distributed_optimizer=case.get("distopt", False),
        overlap_grad_reduce=case.get("overlap_grad", False),
        overlap_param_gather=case.get("overlap_param", False),
        ddp_bucket_size=case.get("bucket"),
    )
    model_cfg = dataclasses.replace(MODEL, **{f"recompute_{k}": v for k, v in case.get("recompute", {}).items()})  # fmt: skip
    model_cfg.validate("model")
    distributed.init_distributed(parallel, model_cfg, seed=0)
    batch = make_batch()
    cfg = loss_config("sampled")
    kw = dict(max_tokens_per_microbatch=case.get("max_tokens", 0))
    res: dict = {}
    dp_group = ps.get_data_parallel_group()
    mbs_list = micro_batches_for_rank(
        batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), case.get("mbs", 1),
        pad_to_multiple_of=parallel.tp, dp_group=dp_group, **kw,
    )  # fmt: skip
    res["shapes"] = [tuple(mb.tokens_B_T.shape) for mb in mbs_list]
    res["rows"] = [list(mb.index_B) for mb in mbs_list]
    chunks, optimizer, scheduler = build(case, model_cfg, parallel)
    res["params0"] = collect_params(chunks)
    steps = case.get("steps", 1)
    ckpt = None
    for step in range(steps):
        if case.get("resume_after") == step:
            ckpt = (
                tempfile.mkdtemp(prefix="micro_ckpt_") if ps.get_data_parallel_rank() == 0 else None
            )
            box = [ckpt]
            if torch.distributed.get_world_size() > 1:
                torch.distributed.broadcast_object_list(box, src=0)
            ckpt = os.path.join(box[0], "state")
            fmt = case.get("optimizer_format", "fully_reshardable")
            save_training_state(chunks, optimizer, scheduler, ckpt, optimizer_format=fmt)
            chunks, optimizer, scheduler = build(case, model_cfg, parallel)
            load_training_state(chunks, optimizer, scheduler, ckpt)
        counter = SavedBytes(chunks)
        with counter.hooks():
            out = mopd_train_step(chunks, optimizer, batch, cfg, case.get("mbs", 1), **kw)
        if step == 0:
            res["out"] = out
            res["grads"] = collect_grads(chunks)
            res["saved_bytes"] = counter.total
    res["params"] = collect_params(chunks)
    distributed.destroy(keep_process_group=True)
    return res


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
