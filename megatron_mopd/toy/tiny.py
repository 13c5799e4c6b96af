"""Tiny Hugging Face models and tokenizers built locally (no model hub).

Tests, benchmarks and the CPU demo build their models here:

    path = make_tiny_hf_model("qwen3_moe", "/tmp/m", seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)

Every folder has `config.json`, `model.safetensors` and a tokenizer (`tokenizer.json`
with the usual files), so `transformers.AutoTokenizer.from_pretrained` loads it too.
"""

from __future__ import annotations

import json
import os
import string

import torch

ARCHS = ("qwen2", "qwen3", "qwen3_moe", "llama")

# Defaults: small enough to run in a test in well under a second per forward.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)


def char_vocab(extra: str = "") -> list[str]:
    """A character vocabulary: special tokens first, then printable ASCII (+ `extra`)."""
    chars = list(string.digits + string.ascii_letters + string.punctuation + " \n") + list(extra)
    seen: dict[str, None] = {}
    for c in chars:
        seen.setdefault(c, None)
    return ["<pad>", "<bos>", "<eos>", "<unk>", *seen]


def make_char_tokenizer(out_dir: str, extra_chars: str = "", vocab_size: int | None = None):
    """Write a character-level fast tokenizer to `out_dir` and return it.

    Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then one id per character. With
    `vocab_size` the vocabulary is padded with unused `<extra_i>` tokens to that size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = char_vocab(extra_chars)
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size={vocab_size} < {len(vocab)} characters")
        vocab += [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()  # decode joins characters without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_hf_config(arch: str, vocab_size: int = 128, **overrides):
    """A `transformers` config of a tiny model of architecture `arch` (see `ARCHS`)."""
    import transformers

    kw = dict(_COMMON, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        cls = transformers.Qwen2Config
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        kw.update(head_dim=16)
    elif arch == "qwen3_moe":
        cls = transformers.Qwen3MoeConfig
        kw.update(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            mlp_only_layers=[],
            router_aux_loss_coef=0.0,
            output_router_logits=False,
        )
    elif arch == "llama":
        cls = transformers.LlamaConfig
        kw.update(attention_bias=False, mlp_bias=False)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    kw.update(overrides)
    config = cls(**kw)
    config.dtype = torch.float32
    return config


def make_tiny_hf_model(
    arch: str,
    out_dir: str,
    seed: int = 0,
    vocab_size: int = 128,
    init_std: float = 0.1,
    **overrides,
) -> str:
    """Build a randomly initialised tiny HF model and save it (with a tokenizer) to `out_dir`.

    Weights are drawn with a larger std than HF's default (0.02) so the logits are far
    from uniform and parity tests are meaningful. Returns `out_dir`.
    """
    import transformers

    config = tiny_hf_config(arch, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    make_char_tokenizer(out_dir, vocab_size=vocab_size)
    with open(os.path.join(out_dir, "mopd_tiny.json"), "w") as f:
        json.dump({"arch": arch, "seed": seed}, f)
    return out_dir
