"""Worker: checkpoints between the local and the Transformer Engine layer-spec names.

    python tests/workers/layer_spec_cases.py --out DIR --root ROOT --hf HF_DIR

(one process, no torchrun: the default group has an in-process store.)

Transformer Engine cannot be built on CPU, so a "TE model" is a local-spec model whose
`sharded_state_dict` presents TE's checkpoint keys (renamed as `convert.layer_specs`
says a TE model stores them) and whose spec `layer_specs.model_spec` reports as TE.

Cases (results: {name: {...}}):
- `te_to_local`: a model saved under TE names (`save_mcore_checkpoint(layer_spec=TE)`)
  loads into a local model of another seed: every parameter bitwise equal.
- `local_to_te`: a checkpoint saved under local names loads into a "TE model"; a plain
  dist_checkpointing load of the TE-named request (no mapping) must fail.
- `hf_te`: `hf_to_mcore(..., layer_spec="transformer_engine")` on CPU and the default
  (local) conversion: their keys (differ exactly at the pre-MLP norm), and both loaded into
  local models, bitwise equal.
- `resume_te`: a training state (distributed optimizer, fully_reshardable) saved under TE
  names after 2 steps, resumed by a local model of another seed: the next 2 losses equal
  those of the run that saved.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megatron_mopd.convert import layer_specs  # noqa: E402

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
    transformer_impl="local",
    seed=7,
)
PARALLEL = ParallelConfig(use_distributed_optimizer=True)
TRAIN = TrainConfig(lr=3e-3, lr_warmup_steps=0, max_steps=8, clip_grad=1.0)


def build(seed: int):
    from dataclasses import replace

    from megatron_mopd.student.model import build_model

    cfg = replace(MODEL, seed=seed)
    distributed.init_distributed(PARALLEL, cfg, seed=0)
    # the initialisation is seeded by the name: perturb the norms too (they start at 1)
    chunks = build_model(cfg, PARALLEL)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in chunks[0].named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return cfg, chunks


def params(chunks) -> dict[str, torch.Tensor]:
    from megatron_mopd.convert.mapping import unwrap

    return {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


def bitwise(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (or are missing)."""
    bad = [n for n in a if n not in b or not torch.equal(a[n], b[n])]
    return bad + [n for n in b if n not in a]


def present_as_te(chunks) -> None:
    """Make a local-spec chunk present TE's checkpoint keys, as a TE-built model would."""
    from megatron_mopd.convert.mapping import unwrap

    model = unwrap(chunks[0])
    own = model.sharded_state_dict

    def te_sharded_state_dict(self, *args, **kwargs):
        sd = own(*args, **kwargs)
        layer_specs.rename_sharded_keys(sd, True, layer_specs.LOCAL, layer_specs.TE)
        return sd

    model.sharded_state_dict = types.MethodType(te_sharded_state_dict, model)


def stored_keys(path: str) -> list[str]:
    return sorted(layer_specs.checkpoint_keys(path))


def case_te_to_local(root: str) -> dict:
    from megatron_mopd.convert.mcore import load_mcore_checkpoint, save_mcore_checkpoint

    cfg, src = build(7)
    ref = params(src)
    out = os.path.join(root, "te_named")
    save_mcore_checkpoint(src, cfg, out, layer_spec=layer_specs.TE)
    distributed.destroy(keep_process_group=True)
    _, dst = build(8)
    differs_before = len(bitwise(ref, params(dst)))
    load_mcore_checkpoint(dst, out)
    result = {
        "keys": stored_keys(out),
        "differs_before": differs_before,
        "mismatch": bitwise(ref, params(dst)),
        "count": len(ref),
    }
    distributed.destroy(keep_process_group=True)
    return result


def case_local_to_te(root: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_mopd.convert.dist_ckpt import (
        dist_checkpointing_io,
        load_error_text,
        model_sharded_state_dict,
    )
    from megatron_mopd.convert.mcore import load_mcore_checkpoint, save_mcore_checkpoint

    cfg, src = build(7)
    ref = params(src)
    out = os.path.join(root, "local_named")
    save_mcore_checkpoint(src, cfg, out)
    distributed.destroy(keep_process_group=True)
    _, dst = build(8)
    present_as_te(dst)
    real_spec = layer_specs.model_spec
    layer_specs.model_spec = lambda chunk: layer_specs.TE
    try:
        # without the mapping, the TE names are not in the checkpoint
        plain_error = None
        try:
            with dist_checkpointing_io():
                dist_checkpointing.load(model_sharded_state_dict(dst), out)
        except BaseException as e:  # noqa: BLE001 (torch's CheckpointException is one)
            plain_error = load_error_text(e)
        load_mcore_checkpoint(dst, out)
    finally:
        layer_specs.model_spec = real_spec
    result = {
        "keys": stored_keys(out),
        "plain_error": plain_error,
        "mismatch": bitwise(ref, params(dst)),
        "count": len(ref),
    }
    distributed.destroy(keep_process_group=True)
    return result


def case_hf_te(root: str, hf_dir: str) -> dict:
    from megatron_mopd.convert.mcore import hf_to_mcore, load_mcore_checkpoint, read_mcore_config
    from megatron_mopd.student.model import build_model

    te_dir, local_dir = os.path.join(root, "hf_te"), os.path.join(root, "hf_local")
    hf_to_mcore(hf_dir, te_dir, layer_spec="transformer_engine")
    hf_to_mcore(hf_dir, local_dir)
    loaded = []
    for path in (te_dir, local_dir):
        cfg = read_mcore_config(path)
        distributed.init_distributed(PARALLEL, cfg, seed=0)
        chunks = build_model(cfg, PARALLEL, init_params=False, megatron_init=False)
        load_mcore_checkpoint(chunks, path)
        loaded.append(params(chunks))
        distributed.destroy(keep_process_group=True)
    import json

    with open(os.path.join(te_dir, "mopd_model.json")) as f:
        described = json.load(f).get("layer_spec")
    return {
        "te_keys": stored_keys(te_dir),
        "local_keys": stored_keys(local_dir),
        "described": described,
        "mismatch": bitwise(loaded[0], loaded[1]),
        "count": len(loaded[0]),
    }


def case_resume_te(root: str) -> dict:
    from megatron_mopd.student.logprobs import make_micro_batches
    from megatron_mopd.student.state import load_training_state, save_training_state
    from megatron_mopd.student.train_step import build_optimizer, train_step, wrap_ddp

    def batch(k: int):
        gen = torch.Generator().manual_seed(100 + k)
        seqs = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (7, 11, 5, 9)]
        return make_micro_batches(seqs, 2)

    def loss_fn(logprobs_B_T, mb):
        mask = mb.loss_mask_B_T.to(logprobs_B_T.dtype)
        return -(mask * logprobs_B_T).sum() / 40.0, {}

    out = os.path.join(root, "resume_te")
    losses = {}
    for role, seed in (("saved", 7), ("resumed", 8)):
        _, chunks = build(seed)
        chunks = wrap_ddp(chunks, PARALLEL)
        optimizer, scheduler = build_optimizer(chunks, TRAIN, PARALLEL)
        if role == "saved":
            for k in range(2):
                train_step(chunks, optimizer, batch(k), loss_fn, scheduler=scheduler)
            save_training_state(
                chunks, optimizer, scheduler, out, model_cfg=MODEL, layer_spec=layer_specs.TE
            )
        else:
            load_training_state(chunks, optimizer, scheduler, out)
        losses[role] = [
            train_step(chunks, optimizer, batch(k), loss_fn, scheduler=scheduler)["loss"]
            for k in (2, 3)
        ]
        distributed.destroy(keep_process_group=True)
    return {"keys": stored_keys(out), **losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--hf", required=True)
    args = parser.parse_args()
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    results = {
        "te_to_local": case_te_to_local(args.root),
        "local_to_te": case_local_to_te(args.root),
        "hf_te": case_hf_te(args.root, args.hf),
        "resume_te": case_resume_te(args.root),
    }
    save_result(args.out, torch.distributed.get_rank(), results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
