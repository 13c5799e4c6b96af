"""Worker: the memory model (`student.memory`) against real tensors and saved activations.

    torchrun --standalone --nproc-per-node 2 tests/workers/memory_cases.py --out DIR \
        --mode state
    python tests/workers/memory_cases.py --out DIR --mode activations

`state` (2 processes): for each layout case, build the tiny MoE student, wrap it in DDP,
build the (distributed) optimizer and give it its state (`ensure_optimizer_state`, what a
first step creates), then measure on this rank: the parameters' bytes, the DDP gradient
buffers' bytes (fp32, with megatron's padding) and the optimizer's (Adam moments and fp32
main parameters), beside the estimate for this rank's stage.

`activations` (one process): the bytes autograd saves for the backward pass during one
forward (saved-tensor hooks, each storage counted once, parameters excluded), for a
2-layer and a 4-layer model of the local spec: their difference / 2 is one layer's
activations, beside `layer_activation_bytes` (implementation "local"); also with full
recomputation (uniform, 1 layer), beside what `stage_activation_bytes` keeps per layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import Config, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    vocab_size=256,  # a multiple of 128 x TP: no vocabulary padding either way
    qk_layernorm=True,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
    transformer_impl="local",
)
STATE_CASES = {
    "dp2_distopt_bf16": dict(ep=1, distopt=True, dtype="bf16"),
    "ep2_distopt_bf16": dict(ep=2, distopt=True, dtype="bf16"),
    "dp2_adam_fp32": dict(ep=1, distopt=False, dtype="fp32"),
    "dp2_distopt_fp32_dense": dict(ep=1, distopt=True, dtype="fp32", dense=True),
}


def _estimate(model_cfg: ModelConfig, parallel: ParallelConfig, world: int, **kw):
    from megatron_mopd.student import memory

    cfg = Config(model=model_cfg, parallel=parallel, train=TrainConfig(micro_batch_size=1))
    s = dataclasses.replace(memory.settings_from_config(cfg, world), **kw)
    return memory.estimate_from_settings(model_cfg, s), s


def state_case(case: dict) -> dict:
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.state import _megatron_optimizers, ensure_optimizer_state
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    model_cfg = dataclasses.replace(MODEL, params_dtype=case["dtype"])
    if case.get("dense"):
        model_cfg = dataclasses.replace(model_cfg, num_moe_experts=None)
    parallel = ParallelConfig(
        expert_model_parallel_size=case["ep"], use_distributed_optimizer=case["distopt"]
    )
    world = torch.distributed.get_world_size()
    distributed.init_distributed(parallel, model_cfg, seed=0)
    chunks = wrap_ddp(build_model(model_cfg, parallel), parallel)
    optimizer, _ = build_optimizer(chunks, TrainConfig(), parallel)
    ensure_optimizer_state(optimizer)

    weights = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    grads = 0
    for c in chunks:
        for buf in list(c.buffers) + list(c.expert_parallel_buffers):
            grads += buf.grad_data.numel() * buf.grad_data.element_size()
    moments = main = 0
    model_ptrs = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    for opt in _megatron_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                moments += sum(
                    st[k].numel() * st[k].element_size()
                    for k in ("exp_avg", "exp_avg_sq")
                    if k in st
                )
                if p.untyped_storage().data_ptr() not in model_ptrs:
                    main += p.numel() * p.element_size()  # a separate fp32 main copy
    est, _ = _estimate(model_cfg, parallel, world)
    stage = est.stages[0]
    distributed.destroy(keep_process_group=True)
    return {
        "measured": {"weights": weights, "gradients": grads, "optimizer": moments + main},
        "estimated": {
            "weights": stage.weights,
            "gradients": stage.gradients,
            "optimizer": stage.optimizer,
        },
        "params": stage.params.total,
    }


def saved_bytes(num_layers: int, tokens: int, moe: bool, recompute: bool = False) -> int:
    """Bytes autograd keeps for the backward pass during one forward of the model (with
    `recompute`: megatron-core's full recomputation, uniform, one layer per checkpoint,
    set on the TransformerConfig the model is built from)."""
    from megatron_mopd.student import model as model_module
    from megatron_mopd.student.model import build_model

    real = model_module.to_transformer_config
    if recompute:

        def with_recompute(*args, **kwargs):
            config = real(*args, **kwargs)
            config.recompute_granularity = "full"
            config.recompute_method = "uniform"
            config.recompute_num_layers = 1
            return config

        model_module.to_transformer_config = with_recompute

    model_cfg = dataclasses.replace(
        MODEL, num_layers=num_layers, params_dtype="bf16", num_moe_experts=4 if moe else None
    )
    parallel = ParallelConfig()
    distributed.init_distributed(parallel, model_cfg, seed=0)
    try:
        model = build_model(model_cfg, parallel)[0]
    finally:
        model_module.to_transformer_config = real
    model.train()
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(tokens).unsqueeze(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, pos, attention_mask=None)
    distributed.destroy(keep_process_group=True)
    return sum(seen.values())


def activation_cases() -> dict:
    from megatron_mopd.student import memory

    out = {}
    for moe in (True, False):
        for tokens in (64, 256):
            measured = (saved_bytes(4, tokens, moe) - saved_bytes(2, tokens, moe)) / 2
            model_cfg = dataclasses.replace(
                MODEL, params_dtype="bf16", num_moe_experts=4 if moe else None
            )
            _, s = _estimate(
                model_cfg,
                ParallelConfig(),
                1,
                implementation="local",
                tokens_per_microbatch=tokens,
                seq_len=tokens,
            )
            pieces = memory.layer_activation_bytes(model_cfg, s, tokens, tokens)
            out[f"{'moe' if moe else 'dense'}_T{tokens}"] = {
                "measured": measured,
                "estimated": sum(pieces.values()),
            }
    for moe in (True, False):  # full recomputation: each layer keeps its input only
        tokens = 128
        measured = (
            saved_bytes(4, tokens, moe, recompute=True)
            - saved_bytes(2, tokens, moe, recompute=True)
        ) / 2
        model_cfg = dataclasses.replace(
            MODEL, params_dtype="bf16", num_moe_experts=4 if moe else None
        )
        _, s = _estimate(
            model_cfg,
            ParallelConfig(),
            1,
            implementation="local",
            tokens_per_microbatch=tokens,
            seq_len=tokens,
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=1,
            micro_batches=1,
        )
        # the stage with 4 layers minus the stage with 2, over 2: one layer's kept input
        four = memory.stage_activation_bytes(dataclasses.replace(model_cfg, num_layers=4), s, 0)
        two = memory.stage_activation_bytes(dataclasses.replace(model_cfg, num_layers=2), s, 0)
        out[f"{'moe' if moe else 'dense'}_T{tokens}_full_recompute"] = {
            "measured": measured,
            "estimated": (four["total"] - two["total"]) / 2,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("state", "activations"), required=True)
    args = parser.parse_args()
    if args.mode == "state":
        torch.distributed.init_process_group("gloo")
        results = {name: state_case(case) for name, case in STATE_CASES.items()}
    else:
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        results = activation_cases()
    save_result(args.out, torch.distributed.get_rank(), results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
