"""Tiny HF models, fixed token sequences and HF's own log-probs, shared by the tests of
the weight bridge (`test_hf_parity.py`, `test_convert_roundtrip.py`).

Qwen2 is built with tied embeddings (as Qwen2.5-0.5B) so the tied output layer is covered;
the others are untied. Qwen3-MoE has 4 experts, top-2, `norm_topk_prob=True`; Qwen2-MoE
(not in `megatron_mopd.toy.tiny`, built here) adds QKV bias, a sigmoid-gated shared expert and
`norm_topk_prob=False`.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_mopd.toy.tiny import make_tiny_hf_model

ARCH_OVERRIDES: dict[str, dict] = {
    "qwen3_moe": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {},
    "llama": {},
    "qwen2_moe": {},
}
ALL_ARCHS = tuple(ARCH_OVERRIDES)

# uneven lengths, a 1-token sequence (-> []), token ids across the whole vocabulary
SEQUENCES: list[list[int]] = [
    [int(t) for t in torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n))]
    for n in (9, 1, 24, 2, 15, 40, 6)
]


def make_models(root: str, archs=tuple(ARCH_OVERRIDES)) -> dict[str, str]:
    """Write the tiny models under `root`; return {arch: folder}."""
    dirs = {}
    for i, arch in enumerate(archs):
        path = os.path.join(root, arch)
        if not os.path.isfile(os.path.join(path, "config.json")):
            if arch == "qwen2_moe":
                make_tiny_qwen2_moe(path, seed=10 + i)
            else:
                make_tiny_hf_model(arch, path, seed=10 + i, **ARCH_OVERRIDES[arch])
        dirs[arch] = path
    return dirs


def make_tiny_qwen2_moe(out_dir: str, seed: int = 0) -> str:
    """A tiny random Qwen2-MoE (shared expert with a gate) saved with a char tokenizer."""
    import transformers

    from megatron_mopd.toy.tiny import make_char_tokenizer

    config = transformers.Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    make_char_tokenizer(out_dir, vocab_size=128)
    return out_dir


def write_input(path: str, sequences: list[list[int]] = SEQUENCES) -> str:
    """Write `sequences` as the `logprobs` command's input JSONL."""
    with open(path, "w") as f:
        for ids in sequences:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    return path


def read_output(path: str) -> list[torch.Tensor]:
    """The `logprobs` command's output JSONL as float64 tensors."""
    with open(path) as f:
        return [torch.tensor(json.loads(line)["logprobs"], dtype=torch.float64) for line in f]


@torch.no_grad()
def hf_logprobs(hf_dir: str, sequences: list[list[int]] = SEQUENCES) -> list[torch.Tensor]:
    """log p(ids[i] | ids[:i]) for i >= 1 from HF transformers' own fp32 forward."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    out = []
    for ids in sequences:
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
        target = torch.tensor(ids[1:]).unsqueeze(-1)
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, target).squeeze(-1))
    return out
