"""Which Hugging Face tensors make each local Megatron parameter, and how.

One function, `map_parameter`, describes a local parameter of a `GPTModel` chunk: the HF
tensors it is built from, the dimension its tensor/expert-tensor-parallel group splits, this
rank's shard index, and a global key (the Megatron name with global layer and expert
indices) that is the same on every rank holding a copy. Loading and exporting both use it,
so the two directions cannot drift apart.

Megatron layouts handled (names of the local spec; the Transformer Engine spec's fused norm
names `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` and TE grouped experts
`experts.linear_fc1.weight{i}` map to the same tensors):

- `linear_qkv` is interleaved per query group: for each group, its query heads, then its key
  head, then its value head (`[ng, heads_per_group + 2, head_dim, hidden]`); TP splits whole
  groups, so a shard is built from contiguous row ranges of q_proj, k_proj and v_proj.
- `linear_fc1` of a SwiGLU MLP is `[gate; up]` *per TP shard*: shard r holds gate rows and
  up rows of range r, concatenated.
- Row-parallel layers (`linear_proj`, `linear_fc2`) split the input dimension (dim 1).
- Experts: local expert i on expert-parallel rank e is global expert `e * local + i`, and is
  split over the expert-tensor-parallel group like a dense MLP.
- Vocabulary rows are padded by Megatron to the embedding's size; padding rows are zero and
  never reach HF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_mopd.config import ModelConfig

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"


@dataclass(frozen=True)
class ChunkLayout:
    """Where one model chunk sits in the parallel layout (ranks within its groups)."""

    tp_rank: int
    tp_size: int
    ep_rank: int
    ep_size: int
    etp_rank: int
    etp_size: int
    layer_numbers: dict[int, int]  # local layer index -> global 0-based layer index
    tied: bool  # embeddings and output layer share weights


@dataclass(frozen=True)
class ParamMap:
    """How one local Megatron parameter is made from HF tensors.

    `key` is the parameter's global Megatron name; `(key, shard)` names the same values on
    every rank. `shard_dim` is None for replicated parameters (then `shard`=0, `shards`=1).
    """

    key: str
    kind: str  # COPY, QKV or GATE_UP
    hf_names: tuple[str, ...]
    shard_dim: int | None
    shard: int
    shards: int
    vocab: bool = False

    @property
    def order(self) -> tuple:
        """A sort key giving HF's order: embedding, layers in order, final norm, head."""
        m = re.match(r"decoder\.layers\.(\d+)\.", self.key)
        if self.key.startswith("embedding."):
            return (0, 0, self.key)
        if m:
            return (1, int(m.group(1)), _natural(self.key))
        if self.key.startswith("decoder."):
            return (2, 0, self.key)
        return (3, 0, self.key)


def _natural(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The `GPTModel` inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def chunk_layout(chunk: torch.nn.Module) -> ChunkLayout:
    """Read a (unwrapped) `GPTModel` chunk's ranks from its own process groups."""
    pgs = chunk.pg_collection
    layers = getattr(chunk.decoder, "layers", [])
    ep = getattr(pgs, "ep", None)
    etp = getattr(pgs, "expt_tp", None)
    return ChunkLayout(
        tp_rank=pgs.tp.rank(),
        tp_size=pgs.tp.size(),
        ep_rank=ep.rank() if ep is not None else 0,
        ep_size=ep.size() if ep is not None else 1,
        etp_rank=etp.rank() if etp is not None else 0,
        etp_size=etp.size() if etp is not None else 1,
        layer_numbers={i: layer.layer_number - 1 for i, layer in enumerate(layers)},
        tied=bool(getattr(chunk, "share_embeddings_and_output_weights", False)),
    )


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(
    r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$"
)


def map_parameter(name: str, layout: ChunkLayout, cfg: ModelConfig) -> ParamMap:
    """Describe local parameter `name` of a chunk at `layout`; raises `KeyError` for a name
    the bridge does not know (a bug or an unsupported module, never silently skipped)."""
    tp = (layout.tp_rank, layout.tp_size)
    if name == "embedding.word_embeddings.weight":
        return ParamMap(name, COPY, ("model.embed_tokens.weight",), 0, *tp, vocab=True)
    if name == "output_layer.weight":
        src = "model.embed_tokens.weight" if layout.tied else "lm_head.weight"
        return ParamMap(name, COPY, (src,), 0, *tp, vocab=True)
    if name == "decoder.final_layernorm.weight":
        return ParamMap(name, COPY, ("model.norm.weight",), None, 0, 1)
    m = _LAYER.match(name)
    if not m:
        raise KeyError(name)
    layer = layout.layer_numbers[int(m.group(1))]
    rest = m.group(2)
    p = f"model.layers.{layer}."
    g = f"decoder.layers.{layer}."

    def rep(hf: str, key: str) -> ParamMap:
        return ParamMap(g + key, COPY, (p + hf,), None, 0, 1)

    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return rep("input_layernorm.weight", "input_layernorm.weight")
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return rep("post_attention_layernorm.weight", "pre_mlp_layernorm.weight")
    if rest == "self_attention.q_layernorm.weight":
        return rep("self_attn.q_norm.weight", rest)
    if rest == "self_attention.k_layernorm.weight":
        return rep("self_attn.k_norm.weight", rest)
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        suffix = rest.rsplit(".", 1)[1]
        names = tuple(f"{p}self_attn.{x}_proj.{suffix}" for x in "qkv")
        return ParamMap(g + rest, QKV, names, 0, *tp)
    if rest == "self_attention.linear_proj.weight":
        return ParamMap(g + rest, COPY, (p + "self_attn.o_proj.weight",), 1, *tp)
    if rest == "mlp.linear_fc1.weight":
        names = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        return ParamMap(g + rest, GATE_UP, names, 0, *tp)
    if rest == "mlp.linear_fc2.weight":
        return ParamMap(g + rest, COPY, (p + "mlp.down_proj.weight",), 1, *tp)
    if rest == "mlp.router.weight":
        return rep("mlp.gate.weight", rest)
    if rest == "mlp.shared_experts.linear_fc1.weight":
        names = (p + "mlp.shared_expert.gate_proj.weight", p + "mlp.shared_expert.up_proj.weight")
        return ParamMap(g + rest, GATE_UP, names, 0, *tp)
    if rest == "mlp.shared_experts.linear_fc2.weight":
        return ParamMap(g + rest, COPY, (p + "mlp.shared_expert.down_proj.weight",), 1, *tp)
    if rest == "mlp.shared_experts.gate_weight":
        return rep("mlp.shared_expert_gate.weight", rest)
    e = _EXPERT.match(rest)
    if e:
        local = int(e.group(1) if e.group(1) is not None else e.group(4))
        fc = e.group(2) or e.group(3)
        num_local = cfg.num_moe_experts // layout.ep_size
        expert = layout.ep_rank * num_local + local
        key = f"{g}mlp.experts.{expert}.{fc}.weight"
        hp = f"{p}mlp.experts.{expert}."
        etp = (layout.etp_rank, layout.etp_size)
        if fc == "linear_fc1":
            names = (hp + "gate_proj.weight", hp + "up_proj.weight")
            return ParamMap(key, GATE_UP, names, 0, *etp)
        return ParamMap(key, COPY, (hp + "down_proj.weight",), 1, *etp)
    raise KeyError(name)


def qkv_split_sizes(cfg: ModelConfig) -> tuple[int, int]:
    """(query heads per group, head dim)."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads // groups, head_dim


def to_megatron(pm: ParamMap, pieces: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Build a local shard from the HF tensors' matching slices (same order as `hf_names`)."""
    if pm.kind == COPY:
        return pieces[0]
    if pm.kind == GATE_UP:
        return torch.cat(pieces, dim=0)
    per_group, head_dim = qkv_split_sizes(cfg)
    q, k, v = pieces
    tail = q.shape[1:]
    groups = k.shape[0] // head_dim
    parts = (
        q.reshape(groups, per_group * head_dim, *tail),
        k.reshape(groups, head_dim, *tail),
        v.reshape(groups, head_dim, *tail),
    )
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def to_hf(pm: ParamMap, shard: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Split a local shard into the HF tensors' matching slices (inverse of `to_megatron`)."""
    if pm.kind == COPY:
        return [shard]
    if pm.kind == GATE_UP:
        return list(torch.chunk(shard, 2, dim=0))
    per_group, head_dim = qkv_split_sizes(cfg)
    tail = shard.shape[1:]
    grouped = shard.reshape(-1, (per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return [x.reshape(-1, *tail) for x in (q, k, v)]
