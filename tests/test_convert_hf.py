"""Unit tests of the HF bridge that need no process group: reading `config.json`, the
QKV / gate-up layouts, vocabulary padding, writing HF folders."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_models

from megatron_mopd.config import ModelConfig
from megatron_mopd.convert import (
    HFCheckpoint,
    hf_config_dict,
    model_config_from_hf,
    save_hf_checkpoint,
)
from megatron_mopd.convert.hf import SafetensorsStreamWriter, _read_shard
from megatron_mopd.convert.mapping import (
    COPY,
    GATE_UP,
    QKV,
    ChunkLayout,
    ParamMap,
    map_parameter,
    to_hf,
    to_megatron,
)
from megatron_mopd.errors import UserError


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return make_models(str(tmp_path_factory.mktemp("convert_models")))


def _with_config(src: str, dst, **changes) -> str:
    """A copy of `src`'s config.json with `changes` (weights are not needed here)."""
    dst.mkdir()
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def test_model_config_from_hf_reads_each_architecture(models):
    moe = model_config_from_hf(models["qwen3_moe"])
    assert (moe.num_moe_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size) == (4, 2, 32)
    assert moe.qk_layernorm and not moe.add_qkv_bias and moe.kv_channels == 16
    assert moe.moe_router_pre_softmax is False  # norm_topk_prob=True
    assert moe.untie_embeddings_and_output_weights and moe.hf_path == models["qwen3_moe"]
    qwen2 = model_config_from_hf(models["qwen2"])
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and not qwen2.is_moe
    assert not qwen2.untie_embeddings_and_output_weights
    assert (qwen2.rotary_base, qwen2.layernorm_epsilon, qwen2.vocab_size) == (1e4, 1e-6, 128)
    assert model_config_from_hf(models["qwen3"]).qk_layernorm
    llama = model_config_from_hf(models["llama"])
    assert (llama.num_query_groups, llama.kv_channels, llama.ffn_hidden_size) == (2, 16, 128)
    q2moe = model_config_from_hf(models["qwen2_moe"])
    assert q2moe.moe_shared_expert_intermediate_size == 48 and q2moe.moe_shared_expert_gate
    assert q2moe.moe_router_pre_softmax and q2moe.add_qkv_bias  # norm_topk_prob=False


def test_model_config_keeps_the_callers_other_fields(models):
    base = ModelConfig(params_dtype="bf16", seed=99, num_layers=7, transformer_impl="local")
    cfg = model_config_from_hf(models["qwen2"], base=base)
    assert (cfg.params_dtype, cfg.seed, cfg.transformer_impl) == ("bf16", 99, "local")
    assert cfg.num_layers == 2


@pytest.mark.parametrize(
    "arch,changes,needle",
    [
        ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ("qwen2", {"use_sliding_window": True}, "sliding"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("qwen2", {"model_type": "gpt2"}, "model_type='gpt2'"),
    ],
    ids=["mlp-only-layers", "sparse-step", "rope-scaling", "sliding", "gelu", "bias", "gpt2"],
)
def test_unsupported_architectures_are_refused(models, tmp_path, arch, changes, needle):
    folder = _with_config(models[arch], tmp_path / "m", **changes)
    with pytest.raises(UserError) as e:
        model_config_from_hf(folder)
    assert needle in str(e.value) and folder in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_or_corrupt_folders(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        model_config_from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json: no such file"):
        model_config_from_hf(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        model_config_from_hf(tmp_path / "bad")
    with pytest.raises(UserError, match="no model.safetensors"):
        HFCheckpoint(tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        HFCheckpoint(tmp_path / "bad")


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2", "qwen3", "llama", "qwen2_moe"])
def test_hf_config_dict_round_trips(models, tmp_path, arch):
    """ModelConfig -> config.json (as mcore-to-hf writes it, without a source folder) ->
    ModelConfig is the identity on the architecture, and transformers reads it."""
    import transformers

    cfg = model_config_from_hf(models[arch])
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps(hf_config_dict(dataclasses.replace(cfg, hf_path=None)))
    )
    back = model_config_from_hf(out)
    assert back == dataclasses.replace(cfg, hf_path=str(out))
    assert transformers.AutoConfig.from_pretrained(out).model_type == arch


def _layout(tp_rank=0, tp=1, ep_rank=0, ep=1, etp_rank=0, etp=1, layers=None, tied=False):
    return ChunkLayout(tp_rank, tp, ep_rank, ep, etp_rank, etp, layers or {0: 0, 1: 1}, tied)


def test_qkv_layout_is_interleaved_per_query_group():
    """Megatron's fused QKV rows: per group, its query heads, then its key, then its value."""
    cfg = ModelConfig(num_attention_heads=4, num_query_groups=2, kv_channels=3, hidden_size=5)
    q = torch.arange(4 * 3).float().repeat_interleave(5).view(12, 5)  # row r holds r
    k = 100 + torch.arange(2 * 3).float().repeat_interleave(5).view(6, 5)
    v = 200 + torch.arange(2 * 3).float().repeat_interleave(5).view(6, 5)
    pm = ParamMap("x", QKV, ("q", "k", "v"), 0, 0, 1)
    fused = to_megatron(pm, [q, k, v], cfg)
    expected = [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202]  # group 0: q heads 0, 1; k0; v0
    expected += [6, 7, 8, 9, 10, 11, 103, 104, 105, 203, 204, 205]
    assert fused[:, 0].tolist() == expected
    assert all(torch.equal(a, b) for a, b in zip(to_hf(pm, fused, cfg), [q, k, v]))
    bias = to_megatron(pm, [q[:, 0], k[:, 0], v[:, 0]], cfg)  # a bias has no input dim
    assert bias.tolist() == expected


def test_gate_up_is_concatenated_per_shard():
    cfg = ModelConfig()
    pm = ParamMap("x", GATE_UP, ("g", "u"), 0, 1, 2)
    gate, up = torch.zeros(4, 3), torch.ones(4, 3)
    fused = to_megatron(pm, [gate, up], cfg)
    assert fused[:4].eq(0).all() and fused[4:].eq(1).all()
    assert [t.shape for t in to_hf(pm, fused, cfg)] == [(4, 3), (4, 3)]


def test_map_parameter_places_experts_and_layers():
    cfg = ModelConfig(num_moe_experts=8, num_layers=4)
    layout = _layout(ep_rank=1, ep=2, etp_rank=1, etp=2, layers={0: 2, 1: 3})
    pm = map_parameter(
        "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight", layout, cfg
    )
    assert pm.key == "decoder.layers.3.mlp.experts.6.linear_fc1.weight"
    assert pm.hf_names == (
        "model.layers.3.mlp.experts.6.gate_proj.weight",
        "model.layers.3.mlp.experts.6.up_proj.weight",
    )
    assert (pm.shard_dim, pm.shard, pm.shards) == (0, 1, 2)
    te = map_parameter("decoder.layers.0.mlp.experts.linear_fc2.weight3", layout, cfg)
    assert te.hf_names == ("model.layers.2.mlp.experts.7.down_proj.weight",)
    assert te.shard_dim == 1
    fused_norm = map_parameter(
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", layout, cfg
    )
    assert fused_norm.hf_names == ("model.layers.2.input_layernorm.weight",)
    tied = map_parameter("output_layer.weight", _layout(tied=True), cfg)
    assert tied.hf_names == ("model.embed_tokens.weight",) and tied.kind == COPY
    with pytest.raises(KeyError):
        map_parameter("decoder.layers.0.mlp.experts.weight1", layout, cfg)


def test_padded_vocabulary_rows_are_zero(tmp_path):
    """A vocabulary of 130 padded to 2 x 66 rows: shard 1 gets rows 66..129 and 2 zeros."""
    emb = torch.randn(130, 4)
    save_file({"model.embed_tokens.weight": emb}, str(tmp_path / "model.safetensors"))
    ckpt = HFCheckpoint(tmp_path)
    pm = ParamMap(
        "embedding.word_embeddings.weight",
        COPY,
        ("model.embed_tokens.weight",),
        0,
        1,
        2,
        vocab=True,
    )
    part = _read_shard(ckpt, pm, "model.embed_tokens.weight", rows=66)
    ckpt.close()
    assert torch.equal(part[:64], emb[66:]) and part[64:].eq(0).all()


def test_save_hf_checkpoint_single_file_and_duplicates(tmp_path):
    cfg = {"model_type": "llama"}
    tensors = [("a.weight", torch.ones(2, 2)), ("b.weight", torch.zeros(3))]
    save_hf_checkpoint(iter(tensors), cfg, tmp_path / "one")
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="given twice"):
        save_hf_checkpoint(iter(tensors + tensors[:1]), cfg, tmp_path / "two")


def test_stream_writer_reads_back_like_safetensors(tmp_path):
    """Every dtype, non-contiguous and empty tensors, metadata: what safetensors reads back
    from the streamed file equals what it reads from its own `save_file` of the same tensors."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.bf16": torch.randn(7, generator=g).bfloat16(),
        "w.f16": torch.randn(2, 2, generator=g).half(),
        "i.t": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # non-contiguous
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
    }
    w = SafetensorsStreamWriter(str(tmp_path / "ours.safetensors"), {"format": "pt"})
    for k, v in tensors.items():
        w.add(k, v)
    w.close()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors")
    ours, ref = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(os.listdir(tmp_path)) == ["ours.safetensors", "ref.safetensors"]  # no spool


def test_save_hf_checkpoint_shards_stream_and_clean_up_on_error(tmp_path):
    cfg = {"model_type": "llama"}
    tensors = [(f"t{i}.weight", torch.full((256,), float(i))) for i in range(5)]  # 1 KiB each
    save_hf_checkpoint(iter(tensors), cfg, tmp_path / "sharded", max_shard_bytes=2048)
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files == ["config.json", *shards, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    for name, t in tensors:
        got = load_file(tmp_path / "sharded" / index["weight_map"][name])[name]
        assert torch.equal(got, t)

    def failing():
        yield tensors[0]
        raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError, match="gather failed"):
        save_hf_checkpoint(failing(), cfg, tmp_path / "broken")
    assert os.listdir(tmp_path / "broken") == []  # no spool, no half-written shard
