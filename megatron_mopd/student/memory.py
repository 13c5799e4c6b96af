"""A memory model of the train step: per-GPU bytes from the config alone (no GPU, no model).

    est = estimate_memory(cfg, world_size=16)
    est.total_bytes, est.rows()          # weights, gradients, optimizer, activations, logits

What is counted, per GPU of the worst pipeline stage (every stage is estimated; the
largest total is reported):

- **weights**: this rank's parameters (TP/PP/EP/ETP shards, the padded vocabulary of the
  embedding on the first stage and of the output layer on the last) x the parameter dtype.
- **gradients**: megatron's DDP gradient buffer, fp32 (`grad_reduce_in_fp32=True`, as
  `student.train_step.wrap_ddp` builds it), one value per local parameter (bucket padding
  not counted: under 0.1% here).
- **optimizer**: Adam's two fp32 moments, plus an fp32 main copy of every parameter when
  the parameters are bf16/fp16; with the distributed optimizer sharded over the data-
  parallel group (dense parameters) and the expert-data-parallel group
  (`tp * dp / (ep * etp)`, expert parameters).
- **activations**: what the forward pass keeps for the backward pass, per layer and per
  token (formulas below), x the layers of the stage x the micro-batches in flight under
  the 1F1B schedule (stage i of PP holds `min(PP - i, micro-batches)`; the first stage the
  most), with activation recomputation (`model.recompute_granularity` full or selective,
  `recompute_method` uniform or block, `recompute_num_layers`, `recompute_modules`)
  replacing a recomputed layer's activations by its input, plus the one layer (group) being
  recomputed during the backward pass.
- **logits**: on the last stage, the output layer's `[T, V/TP]` logits and their fp32
  softmax (`a + 8` bytes per logit at the peak: `student.logprobs`), whole or over chunks of
  `model.logits_chunk_tokens` tokens.

Activations per layer and token (`a` = bytes of the parameter dtype, `h` hidden, `q` =
heads x head dim, `kv` = query groups x head dim, `f` / `fe` the dense / expert FFN width,
`k` top-k, `E` experts, `s` sequence length; hidden-size terms / TP under sequence
parallelism, head and FFN terms / TP, expert terms / ETP; routed tokens balanced over EP):

| piece | Transformer Engine (GPU) | local spec (CPU, measured) |
| --- | --- | --- |
| input norm (+ qkv input) | `2ah + 4` (fused LayerNormLinear) | `8h + 4 + ah` (fp32 norm) |
| q/k norm | `a(q + kv) + 4(heads + groups)` | `8(q + kv) + 4(heads + groups)` |
| RoPE | `4 a hd` | `4 a hd` |
| core attention | flash: `a(q + 2kv) + aq + 4 heads` | unfused: `3aq + s + 4 heads s + a heads s` |
| attention projection input | (the attention output, counted above) | `aq` |
| pre-MLP norm | dense: `2ah + 4` fused; MoE: `2ah + 4` | `8h + 4 + ah` |
| dense MLP | `2af + af` | `2af + 3af` |
| router (MoE) | `8E + 20k` | `5E + 20k` |
| routed experts (per routed token) | `ah + 2a fe + 2a fe + 4` | `ah + 6a fe + 4` |

The local column is megatron-core's local spec as measured on CPU by summing the tensors
autograd saves (`tests/test_memory.py`, within the tolerance stated there); the TE column
follows the kernels' saved tensors as documented (Korthikanti et al. 2022's accounting with
flash attention, fused norms, SwiGLU and routed experts) and is not measured here (GPU).

Not covered (say it wherever the estimate is quoted): the CUDA context and allocator
fragmentation (typically 2-6 GB and 5-15% of the peak on an 80 GB GPU), NCCL buffers and
communicator workspaces (~0.5-2 GB), Transformer Engine / cuBLAS workspaces, temporary
buffers inside a kernel (e.g. the all-to-all dispatch buffers and the backward pass's
gradient of one layer's activations), routing imbalance between experts (the estimate
assumes every expert rank receives its share), the rollout engine and teachers (other
GPUs), virtual pipeline stages (not supported by the project), context parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_mopd.errors import ConfigError

GIB = 1024**3
GB = 10**9
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe")
DEFAULT_SELECTIVE_MODULES = ("core_attn",)


# --------------------------------------------------------------------------------------
# the settings read from the config (keys of other sections read defensively: the
# recompute / chunking / micro-batch keys are added by their owners)


@dataclass(frozen=True)
class Settings:
    """The knobs the estimate reads from a `Config` (see `settings_from_config`)."""

    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    params_bytes: int
    implementation: str  # "transformer_engine" or "local"
    seq_len: int  # tokens of one sequence (prompt + response)
    tokens_per_microbatch: int
    micro_batches: int  # per step and DP rank
    logits_chunk_tokens: int  # 0 = whole
    padded_vocab: int
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] = ()

    @property
    def edp(self) -> int:
        """The expert-data-parallel size: `tp * dp / (ep * etp)`."""
        return max(1, self.tp * self.dp // (self.ep * self.etp))


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: `vocab` rounded up to a multiple of `divisible_by * tp`."""
    multiple = max(1, divisible_by) * tp
    return int(math.ceil(vocab / multiple) * multiple)


def settings_from_config(cfg: Any, world_size: int) -> Settings:
    """The estimate's settings from a `Config` and the number of training processes.

    `ConfigError` (naming the key) when the layout does not fit `world_size` or a
    recompute setting is not megatron-core's."""
    from megatron_mopd.config import check_world_size
    from megatron_mopd.distributed import sequence_parallel_enabled

    m, par, train = cfg.model, cfg.parallel, cfg.train
    dp = check_world_size(par, world_size)
    impl = m.transformer_impl
    if impl == "auto":
        impl = "transformer_engine"  # the GPU path the estimate is for
    seq_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    seqs = cfg.train.prompts_per_step * cfg.rollout.n_samples_per_prompt
    per_rank = max(1, seqs // dp)
    budget = train.max_tokens_per_microbatch
    if budget > 0:
        tokens_mb = max(budget, seq_len)  # one sequence longer than the budget goes alone
        micro_batches = max(1, math.ceil(per_rank * seq_len / tokens_mb))
    else:
        tokens_mb = train.micro_batch_size * seq_len
        micro_batches = max(1, math.ceil(per_rank / train.micro_batch_size))
    # the recompute settings were validated with the config (ModelConfig.validate)
    granularity, modules = m.recompute_granularity, m.recompute_modules
    method, num_layers = m.recompute_method, m.recompute_num_layers
    mods: tuple[str, ...] = ()
    if granularity == "selective":
        mods = tuple(modules) if modules else DEFAULT_SELECTIVE_MODULES
        bad = [x for x in mods if x not in RECOMPUTE_MODULES]
        if bad:
            raise ConfigError(
                f"model.recompute_modules: {bad} not modelled; choose from {list(RECOMPUTE_MODULES)}"
            )
    return Settings(
        tp=par.tp,
        pp=par.pp,
        ep=par.ep,
        etp=par.etp,
        dp=dp,
        sequence_parallel=sequence_parallel_enabled(par, m),
        distributed_optimizer=par.use_distributed_optimizer,
        params_bytes=_BYTES[m.params_dtype],
        implementation=impl,
        seq_len=seq_len,
        tokens_per_microbatch=tokens_mb,
        micro_batches=micro_batches,
        logits_chunk_tokens=m.logits_chunk_tokens,
        padded_vocab=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, par.tp),
        recompute_granularity=granularity,
        recompute_method=method,
        recompute_num_layers=num_layers,
        recompute_modules=mods,
    )


# --------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one rank of a pipeline stage: dense (replicated over DP) and
    expert (replicated over expert-DP)."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def layer_params(m: Any, s: Settings) -> tuple[int, int]:
    """(dense, expert) parameters of one decoder layer on one rank."""
    h, t = m.hidden_size, s.tp
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    hd = m.kv_channels or h // heads
    q, kv = heads * hd, groups * hd
    dense = 2 * h  # input norm, pre-MLP norm
    dense += (q + 2 * kv) * h // t + q * h // t  # qkv, projection
    if m.add_qkv_bias:
        dense += (q + 2 * kv) // t
    if m.qk_layernorm:
        dense += 2 * hd
    expert = 0
    if m.is_moe:
        fe = m.moe_ffn_hidden_size or m.ffn_hidden_size
        dense += m.num_moe_experts * h  # router (replicated)
        expert = (m.num_moe_experts // s.ep) * 3 * fe * h // s.etp
        shared = m.moe_shared_expert_intermediate_size or 0
        if shared:
            dense += 3 * shared * h // t
            if m.moe_shared_expert_gate:
                dense += h
    else:
        dense += 3 * m.ffn_hidden_size * h // t
    return dense, expert


def stage_params(m: Any, s: Settings, stage: int) -> StageParams:
    """The parameters of one rank of pipeline stage `stage` (0-based)."""
    layers = m.num_layers // s.pp
    dense, expert = layer_params(m, s)
    dense, expert = dense * layers, expert * layers
    vocab_rows = s.padded_vocab * m.hidden_size // s.tp
    first, last = stage == 0, stage == s.pp - 1
    if first:
        dense += vocab_rows
    if last:
        dense += m.hidden_size  # final norm
        tied = not m.untie_embeddings_and_output_weights
        if not (tied and first):  # a tied output layer shares the embedding on one stage
            dense += vocab_rows
    return StageParams(dense, expert)


# --------------------------------------------------------------------------------------
# activations


def layer_activation_bytes(m: Any, s: Settings, tokens: int, seq_len: int) -> dict[str, float]:
    """Bytes one decoder layer keeps for the backward pass over a micro-batch of `tokens`
    tokens (sequences of `seq_len`), by piece, without recomputation (module docstring)."""
    a = s.params_bytes
    t = s.tp
    sp = t if s.sequence_parallel else 1
    h = m.hidden_size
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    hd = m.kv_channels or h // heads
    q, kv = heads * hd / t, groups * hd / t
    nh, ng = heads / t, groups / t
    te = s.implementation == "transformer_engine"
    hh = h / sp  # hidden-size terms under sequence parallelism
    out: dict[str, float] = {}
    norm = (2 * a * hh + 4) if te else (8 * hh + 4 + a * hh)
    out["input_norm"] = norm
    if m.qk_layernorm:
        out["qk_norm"] = (a if te else 8) * (q + kv) + 4 * (nh + ng)
    out["rope"] = 4 * a * hd  # cos and sin, for q and k
    if te:
        out["core_attn"] = a * (q + 2 * kv) + a * q + 4 * nh
    else:
        out["core_attn"] = 3 * a * q + seq_len + 4 * nh * seq_len + a * nh * seq_len
        out["attn_proj"] = a * q
    out["pre_mlp_norm"] = norm
    if m.is_moe:
        e, k = m.num_moe_experts, m.moe_router_topk
        fe = (m.moe_ffn_hidden_size or m.ffn_hidden_size) / s.etp
        routed = k * s.etp / sp  # routed tokens per local token (balanced)
        out["router"] = (8 * e + 20 * k) if te else (5 * e + 20 * k)
        act = (2 * a * fe) if te else (4 * a * fe)
        out["experts_fc1"] = routed * (a * h + 2 * a * fe + 4)
        out["moe_act"] = routed * act
        shared = m.moe_shared_expert_intermediate_size or 0
        if shared:
            out["shared_experts"] = a * hh + (3 if te else 5) * a * shared / t
    else:
        f = m.ffn_hidden_size / t
        out["mlp"] = 2 * a * f + (1 if te else 3) * a * f
    return {k: v * tokens for k, v in out.items()}


def _selective_saving(pieces: dict[str, float], m: Any, s: Settings, tokens: int) -> float:
    """Bytes selective recomputation of `s.recompute_modules` saves in one layer."""
    a = s.params_bytes
    te = s.implementation == "transformer_engine"
    h = m.hidden_size / (s.tp if s.sequence_parallel else 1)
    saved = 0.0
    for mod in s.recompute_modules:
        if mod == "core_attn":
            heads = m.num_attention_heads / s.tp
            hd = m.kv_channels or m.hidden_size // m.num_attention_heads
            keep = a * (heads + 2 * (m.num_query_groups or m.num_attention_heads) / s.tp) * hd
            saved += max(0.0, pieces["core_attn"] - keep * tokens)
        elif mod == "moe_act" and "moe_act" in pieces:
            saved += pieces["moe_act"]
        elif mod == "layernorm":
            per = (a * h) if te else (8 * h)
            saved += 2 * per * tokens
        elif mod == "mlp" and "mlp" in pieces:
            saved += pieces["mlp"]
        elif mod == "moe" and m.is_moe:
            saved += pieces.get("experts_fc1", 0) + pieces.get("moe_act", 0) + pieces["router"]
    return saved


def stage_activation_bytes(m: Any, s: Settings, stage: int) -> dict[str, float]:
    """Activation bytes of one rank of `stage`: `per_layer` (one layer, one micro-batch,
    with selective recomputation applied), `in_flight` micro-batches, and `total`."""
    layers = m.num_layers // s.pp
    tokens = s.tokens_per_microbatch
    pieces = layer_activation_bytes(m, s, tokens, min(s.seq_len, tokens))
    full_layer = sum(pieces.values())
    per_layer = full_layer
    if s.recompute_granularity == "selective":
        per_layer -= _selective_saving(pieces, m, s, tokens)
    in_flight = min(s.pp - stage, s.micro_batches)
    sp = s.tp if s.sequence_parallel else 1
    layer_input = s.params_bytes * m.hidden_size / sp * tokens  # a checkpoint's input
    if s.recompute_granularity == "full":
        n = min(s.recompute_num_layers or 1, layers)
        if s.recompute_method == "uniform":
            kept = math.ceil(layers / n) * layer_input
            live = n * full_layer  # one group recomputed during the backward pass
        else:  # block: the first n layers of the stage recomputed, the others kept
            kept = n * layer_input + (layers - n) * full_layer
            live = full_layer if n else 0.0
        total = in_flight * kept + live
    else:
        total = in_flight * layers * per_layer
    extra = 0.0
    if stage == 0:
        extra += 8 * tokens * in_flight  # token ids
    return {
        "per_layer": per_layer,
        "layers": layers,
        "in_flight": in_flight,
        "total": total + extra,
    }


def logits_bytes(m: Any, s: Settings) -> float:
    """Peak bytes of the output layer's logits and their fp32 softmax on the last stage."""
    tokens = s.tokens_per_microbatch
    if s.logits_chunk_tokens > 0:
        tokens = min(tokens, s.logits_chunk_tokens)
    hidden = s.params_bytes * m.hidden_size * s.tokens_per_microbatch  # final norm output
    return tokens * (s.padded_vocab / s.tp) * (s.params_bytes + 8) + hidden


# --------------------------------------------------------------------------------------
# the estimate


@dataclass
class StageEstimate:
    """Bytes per GPU of one pipeline stage, by component."""

    stage: int
    params: StageParams
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    in_flight: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


@dataclass
class MemoryEstimate:
    """The per-GPU estimate of every pipeline stage; `worst` is the largest."""

    settings: Settings
    stages: list[StageEstimate] = field(default_factory=list)

    @property
    def worst(self) -> StageEstimate:
        return max(self.stages, key=lambda st: st.total)

    @property
    def total_bytes(self) -> float:
        return self.worst.total

    def rows(self) -> list[tuple[str, float]]:
        """(component, bytes) of the worst stage, then the total."""
        w = self.worst
        return [
            ("weights", w.weights),
            ("gradients (fp32 main grads)", w.gradients),
            (
                "optimizer (Adam"
                + (", distributed)" if self.settings.distributed_optimizer else ")"),
                w.optimizer,
            ),
            (f"activations ({w.in_flight} micro-batches in flight)", w.activations),
            ("logits", w.logits),
            ("total", w.total),
        ]


def optimizer_bytes(p: StageParams, s: Settings) -> float:
    """Adam's fp32 moments (+ fp32 main params for bf16/fp16), sharded by the distributed
    optimizer over DP (dense) and expert-DP (experts)."""
    per_param = 8 + (4 if s.params_bytes != 4 else 0)
    if not s.distributed_optimizer:
        return per_param * p.total
    return per_param * (p.dense / s.dp + p.expert / s.edp)


def estimate_from_settings(m: Any, s: Settings) -> MemoryEstimate:
    """The estimate of every stage for model config `m` and settings `s`."""
    est = MemoryEstimate(s)
    for stage in range(s.pp):
        p = stage_params(m, s, stage)
        act = stage_activation_bytes(m, s, stage)
        est.stages.append(
            StageEstimate(
                stage=stage,
                params=p,
                weights=p.total * s.params_bytes,
                gradients=p.total * 4.0,
                optimizer=optimizer_bytes(p, s),
                activations=act["total"],
                logits=logits_bytes(m, s) if stage == s.pp - 1 else 0.0,
                in_flight=act["in_flight"],
            )
        )
    return est


def estimate_memory(cfg: Any, world_size: int) -> MemoryEstimate:
    """The per-GPU memory estimate of the train step of `cfg` on `world_size` processes."""
    return estimate_from_settings(cfg.model, settings_from_config(cfg, world_size))


def format_table(est: MemoryEstimate, gpu_gb: float | None = None) -> str:
    """A printable table of the worst stage (GiB), every stage's total, and the headroom
    against a GPU of `gpu_gb` GB."""
    s = est.settings
    lines = [
        f"layout TP{s.tp} PP{s.pp} EP{s.ep} ETP{s.etp} DP{s.dp} (expert DP {s.edp}), "
        f"{s.implementation}, {s.tokens_per_microbatch} tokens per micro-batch, "
        f"{s.micro_batches} micro-batches per step and DP rank",
        f"recompute: {s.recompute_granularity or 'none'}"
        + (
            f" {s.recompute_method} {s.recompute_num_layers}"
            if s.recompute_granularity == "full"
            else ""
        )
        + (f" {list(s.recompute_modules)}" if s.recompute_modules else "")
        + f"; logits: {'chunks of ' + str(s.logits_chunk_tokens) + ' tokens' if s.logits_chunk_tokens else 'whole'}"
        + f"; padded vocabulary {s.padded_vocab}",
        f"worst stage: {est.worst.stage} of {s.pp}",
        f"{'component':<44} {'GiB':>9}",
    ]
    for name, value in est.rows():
        lines.append(f"{name:<44} {value / GIB:>9.2f}")
    for st in est.stages:
        lines.append(
            f"  stage {st.stage}: {st.total / GIB:.2f} GiB ({st.params.dense / 1e9:.2f}B dense + "
            f"{st.params.expert / 1e9:.2f}B expert parameters, {st.in_flight} in flight)"
        )
    if gpu_gb:
        lines.append(headroom_line(est, gpu_gb))
    return "\n".join(lines)


def headroom_line(est: MemoryEstimate, gpu_gb: float) -> str:
    """One line: the estimated total per GPU and what it leaves of a `gpu_gb` GB GPU."""
    cap = gpu_gb * GB
    free = cap - est.total_bytes
    if free >= 0:
        room = f"leaves {free / cap * 100:.0f}% of a {gpu_gb:g} GB GPU free"
        if free < 0.1 * cap:
            room += " (less than 10%)"
    else:
        room = f"exceeds a {gpu_gb:g} GB GPU by {-free / GIB:.1f} GiB"
    return (
        f"{est.total_bytes / GIB:.1f} GiB per GPU estimated (worst: pipeline stage "
        f"{est.worst.stage}), {room}; not counted: CUDA context, fragmentation, NCCL and "
        "kernel workspaces (tools/memory_model.py: the table)"
    )
