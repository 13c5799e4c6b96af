"""One typed configuration tree, loaded from YAML plus `key=value` overrides.

    cfg = load_config("examples/toy/mopd.yaml", ["train.max_steps=10", "parallel.tp=2"])

Every section is a dataclass that checks its own fields in `validate(path)`; the root
`Config.validate()` runs the cross-section checks (layout against the model, teachers
against domains). Unknown keys are rejected, and every error names the key path and
what is allowed. `check_world_size(cfg, world_size)` checks the parallel layout against
the number of processes *before* any process group is created.

Megatron's model settings live in one section (`model`) whose names follow megatron-core's
`TransformerConfig`, so Megatron users recognise them; they are not re-exposed as flags.
Short aliases are accepted for the parallel sizes (`parallel.tp`, `pp`, `ep`, `etp`).
The generic machinery (building dataclasses from mappings, overrides) is `config_tree.py`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from megatron_mopd.config_tree import apply_override, from_dict
from megatron_mopd.errors import ConfigError

# --------------------------------------------------------------------------------------
# sections

# megatron-core's selective-recompute modules this project's architectures have (no MLA)
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "moe_act", "shared_experts")


@dataclass
class ModelConfig:
    """The student architecture (megatron-core `TransformerConfig` names).

    Either `hf_path` (architecture and weights read from a Hugging Face folder) or
    `mcore_path` (a Megatron checkpoint written by `mopd convert hf-to-mcore`), or
    neither: then the fields below define a randomly initialised model.
    """

    hf_path: str | None = None
    mcore_path: str | None = None
    tokenizer_path: str | None = None  # the student's tokenizer (default: hf_path)
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = 2
    kv_channels: int | None = None
    vocab_size: int = 128  # the real vocabulary (the tokenizer's; what HF and SGLang see)
    # Megatron's padding: the embedding and output layer hold vocab_size rounded up to a
    # multiple of make_vocab_size_divisible_by * TP; padded logits get no probability
    make_vocab_size_divisible_by: int = 128
    # the output layer and log-probs over chunks of this many tokens (0: whole logits)
    logits_chunk_tokens: int = 512
    max_position_embeddings: int = 4096
    rotary_base: float = 1_000_000.0
    layernorm_epsilon: float = 1e-6
    qk_layernorm: bool = False
    add_qkv_bias: bool = False
    untie_embeddings_and_output_weights: bool = True
    # MoE (num_moe_experts: None or 0 = dense)
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    moe_aux_loss_coeff: float = 0.0
    # numerics and implementation
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    init_method_std: float = 0.02  # random init (no checkpoint): N(0, std) weights
    seed: int = 1234
    # activation recomputation (megatron-core's names, passed to TransformerConfig):
    # "full" recomputes whole layers (recompute_method uniform/block + recompute_num_layers),
    # "selective" the `recompute_modules` of every layer (default ["core_attn"])
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None

    def validate(self, path: str) -> None:
        """Check the model's own fields."""
        if self.hf_path and self.mcore_path:
            raise ConfigError(f"{path}.hf_path and {path}.mcore_path are exclusive: set one")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            _positive(self, name, path)
        _positive(self, "vocab_size", path)
        _positive(self, "make_vocab_size_divisible_by", path)
        if self.logits_chunk_tokens < 0:
            raise ConfigError(
                f"{path}.logits_chunk_tokens={self.logits_chunk_tokens} must be >= 0 "
                "(0: the whole logits at once)"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"{path}.num_query_groups={groups} must divide "
                f"{path}.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_moe_experts:
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                raise ConfigError(
                    f"{path}.moe_router_topk={self.moe_router_topk} must be in "
                    f"[1, {path}.num_moe_experts={self.num_moe_experts}]"
                )
        self._validate_recompute(path)

    def _validate_recompute(self, path: str) -> None:
        """megatron-core's rules for the recompute settings, with the key path named."""
        gran, method, num = (
            self.recompute_granularity,
            self.recompute_method,
            self.recompute_num_layers,
        )
        if gran is None:
            for name in ("recompute_method", "recompute_num_layers", "recompute_modules"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{path}.{name} is set but {path}.recompute_granularity is null: "
                        "set recompute_granularity to full or selective"
                    )
            return
        if gran == "full":
            if method is None or num is None:
                raise ConfigError(
                    f"{path}.recompute_granularity=full needs {path}.recompute_method "
                    f"(uniform or block) and {path}.recompute_num_layers (got "
                    f"recompute_method={method}, recompute_num_layers={num})"
                )
            if num < 1:
                raise ConfigError(f"{path}.recompute_num_layers={num} must be >= 1")
            if self.recompute_modules is not None:
                raise ConfigError(
                    f"{path}.recompute_modules applies to recompute_granularity=selective only"
                )
        else:  # selective
            if num is not None:
                raise ConfigError(
                    f"{path}.recompute_num_layers must be null with "
                    f"{path}.recompute_granularity=selective (every layer recomputes "
                    f"{path}.recompute_modules)"
                )
            if method is not None:
                raise ConfigError(
                    f"{path}.recompute_method must be null with "
                    f"{path}.recompute_granularity=selective"
                )
            modules = self.recompute_modules or []
            bad = sorted(set(modules) - set(RECOMPUTE_MODULES))
            if bad:
                raise ConfigError(
                    f"{path}.recompute_modules: {bad} not supported; choose from "
                    f"{list(RECOMPUTE_MODULES)}"
                )
            if not self.is_moe and {"moe", "moe_act", "shared_experts"} & set(modules):
                raise ConfigError(
                    f"{path}.recompute_modules: moe / moe_act / shared_experts need an MoE "
                    f"model ({path}.num_moe_experts is unset)"
                )

    @property
    def is_moe(self) -> bool:
        """True when the model has routed experts."""
        return bool(self.num_moe_experts)


@dataclass
class ParallelConfig:
    """The parallel layout. DP is whatever is left: world_size / (TP * PP).

    Expert layers use EP x ETP inside each TP x DP block (megatron-core's expert grid);
    `expert_tensor_parallel_size` defaults to the TP size, as in Megatron.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    sequence_parallel: bool | None = None  # None: on when TP > 1 and the model is MoE
    use_distributed_optimizer: bool = False
    # megatron DDP: overlap the gradient reduction with the backward pass, the parameter
    # all-gather (distributed optimizer only) with the forward pass; bucket size in
    # parameters (null: megatron's default, max(4e7, 1e6 * DP))
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: int | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_minutes: float = 30.0

    ALIASES = {
        "tp": "tensor_model_parallel_size",
        "pp": "pipeline_model_parallel_size",
        "ep": "expert_model_parallel_size",
        "etp": "expert_tensor_parallel_size",
    }

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def validate(self, path: str) -> None:
        """Check the layout's own fields."""
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
        ):
            _positive(self, name, path)
        if self.expert_tensor_parallel_size is not None:
            _positive(self, "expert_tensor_parallel_size", path)
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError(
                f"{path}.overlap_param_gather=true needs {path}.use_distributed_optimizer=true "
                "(only the distributed optimizer all-gathers parameters)"
            )
        if self.ddp_bucket_size is not None:
            _positive(self, "ddp_bucket_size", path)


@dataclass
class DataConfig:
    """Prompt datasets: JSONL records `{"prompt", "domain", "answer"}` or `prompt_ids`."""

    train_path: str | None = None
    eval_path: str | None = None
    apply_chat_template: bool = False
    max_prompt_length: int = 1024
    shuffle: bool = True

    def validate(self, path: str) -> None:
        _positive(self, "max_prompt_length", path)


@dataclass
class RolloutConfig:
    """The student's inference engine: sampling settings and where it runs."""

    backend: Literal["embedded", "sglang"] = "embedded"
    urls: list[str] = field(default_factory=list)
    n_samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = field(default_factory=list)
    # the engine's forward precision, so log mu differs from Megatron's log pi as on GPUs:
    # embedded: the transformers copy runs in it; sglang: it must equal the servers'
    # `--dtype` (checked against GET /server_info where the server reports one)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    timeout_seconds: float = 600.0
    max_retries: int = 3
    max_in_flight: int = 32
    weight_sync: Literal["disk", "tensor", "distributed"] = "disk"
    # weight_sync=distributed (GPU): the NCCL group formed at start-up between the trainer's
    # rank 0 (group rank 0, at this address and port, which the servers must reach; default:
    # this host's name) and every server's TP ranks (`server_tp_size` per server)
    weight_sync_address: str | None = None
    weight_sync_port: int = 29650
    # the broadcast group's backend: nccl (GPUs) or gloo (CPU tensors); auto = nccl with CUDA
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    server_tp_size: int = 1
    # tensor and distributed sync: weights go in buckets of at most this many MiB (a larger
    # tensor is a bucket of its own), each gathered from the TP/PP/EP shards when it is sent
    weight_sync_bucket_mb: float = 512.0
    # after an update, how long SGLang may take to finish running requests before it
    # flushes its prefix cache
    drain_timeout_seconds: float = 60.0
    # sglang servers started with --api-key: the environment variable holding the key
    api_key_env: str | None = None
    # prompts per request (sglang: per /generate request; embedded: per sampling batch,
    # each one a piece of the stream with its own seed); sglang backend: backoff of the
    # first retry (doubles each time), how long to wait for GET /health_generate at start-up
    batch_size: int = 16
    retry_backoff_seconds: float = 0.5
    startup_timeout_seconds: float = 600.0
    # one-step off-policy: while step k trains, the rollouts of step k+1 are sampled (and
    # scored as they complete) from older weights; IcePop's ratio corrects the staleness
    overlap: bool = False
    # the most optimizer steps a trained sample's weights may lag behind the student's
    # (with overlap: how many batches are sampled ahead; 1 = one-step off-policy)
    max_staleness: int = 1
    # embedded backend: run the engine in a child process (its own core), so sampling
    # overlaps training; auto = on when `overlap` is
    embedded_subprocess: Literal["auto", "on", "off"] = "auto"

    def validate(self, path: str) -> None:
        _positive(self, "n_samples_per_prompt", path)
        _positive(self, "max_staleness", path)
        _positive(self, "max_new_tokens", path)
        if self.temperature != 1.0:
            # MOPD needs log mu at temperature 1 (SGLang scales output log-probs by it): refuse
            # silently wrong ratios
            raise ConfigError(
                f"{path}.temperature={self.temperature}: MOPD's importance ratio needs the "
                "engine's log-probs at temperature 1; set it to 1.0"
            )
        if self.backend == "sglang" and not self.urls:
            raise ConfigError(f"{path}.urls is empty: the sglang backend needs at least one URL")
        _positive(self, "server_tp_size", path)
        _positive(self, "batch_size", path)
        if not self.weight_sync_bucket_mb > 0:
            raise ConfigError(
                f"{path}.weight_sync_bucket_mb={self.weight_sync_bucket_mb} must be > 0"
            )
        if not 0 < self.weight_sync_port < 65536:
            raise ConfigError(f"{path}.weight_sync_port={self.weight_sync_port} is not a port")


@dataclass
class TeacherConfig:
    """One teacher model and the domains it scores."""

    domains: list[str] = field(default_factory=list)
    backend: Literal["embedded", "sglang"] = "embedded"
    hf_path: str | None = None
    urls: list[str] = field(default_factory=list)
    top_k: int = 0
    timeout_seconds: float = 300.0
    max_retries: int = 3
    max_in_flight: int = 16
    batch_size: int = 32
    # sglang backend: backoff of the first retry (doubles each time), how long to wait
    # for GET /health_generate at start-up
    retry_backoff_seconds: float = 0.5
    startup_timeout_seconds: float = 600.0
    # sglang servers started with --api-key: the environment variable holding the key
    api_key_env: str | None = None
    # embedded backend: score in a child process shared by the embedded teachers, so that
    # scoring overlaps training; auto = on when `rollout.overlap` is
    subprocess: Literal["auto", "on", "off"] = "auto"

    def validate(self, path: str) -> None:
        if self.subprocess == "on" and self.backend != "embedded":
            raise ConfigError(
                f"{path}.subprocess=on is for embedded teachers (backend={self.backend!r} "
                "already scores in its servers' processes)"
            )
        if self.backend == "embedded" and not self.hf_path:
            raise ConfigError(f"{path}.hf_path is required for an embedded teacher")
        if self.backend == "sglang" and not self.urls:
            raise ConfigError(f"{path}.urls is empty: an sglang teacher needs at least one URL")
        if self.top_k < 0:
            raise ConfigError(f"{path}.top_k={self.top_k} must be >= 0")


@dataclass
class LossOverride:
    """Per-domain overrides of the loss settings (unset fields inherit `loss.*`)."""

    alpha: float | None = None
    distill_coef: float | None = None
    eps_low: float | None = None
    eps_high: float | None = None
    correction: Literal["icepop", "tis", "none"] | None = None
    estimator: Literal["sampled", "topk_reverse_kl", "topk_forward_kl"] | None = None

    def validate(self, path: str) -> None:
        pass


@dataclass
class LossConfig:
    """The MOPD surrogate (see loss.py and ../MOPD spec)."""

    alpha: float = 0.0
    # weight of the teacher term of the advantage; 0 = outcome-reward RL only (an ablation)
    distill_coef: float = 1.0
    eps_low: float = 0.5
    eps_high: float = 5.0
    correction: Literal["icepop", "tis", "none"] = "icepop"
    estimator: Literal["sampled", "topk_reverse_kl", "topk_forward_kl"] = "sampled"
    grpo_normalize_std: bool = True
    # top-k estimators: also compare the "rest of the vocabulary" bucket (loss.topk_reverse_kl)
    topk_tail: bool = True
    # MoE routing replay (R3): the student's forward (and recompute) routes every token to
    # the experts the rollout engine routed it to (needs an MoE student and an engine that
    # returns them: embedded, or SGLang with --enable-return-routed-experts)
    routing_replay: bool = False
    per_domain: dict[str, LossOverride] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for name, value in (
            ("", self),
            *((f".per_domain.{d}", o) for d, o in self.per_domain.items()),
        ):
            lo = value.eps_low if value.eps_low is not None else self.eps_low
            hi = value.eps_high if value.eps_high is not None else self.eps_high
            if not 0 <= lo <= 1 <= hi:
                raise ConfigError(
                    f"{path}{name}: need 0 <= eps_low <= 1 <= eps_high, got eps_low={lo} eps_high={hi}"
                )
            coef = value.distill_coef if value.distill_coef is not None else self.distill_coef
            alpha = value.alpha if value.alpha is not None else self.alpha
            if coef < 0:
                raise ConfigError(f"{path}{name}.distill_coef={coef} must be >= 0")
            if coef == 0 and alpha == 0:
                raise ConfigError(
                    f"{path}{name}: distill_coef=0 and alpha=0 leave nothing to learn "
                    "(set alpha > 0 for outcome-reward RL, or distill_coef > 0)"
                )

    def for_domain(self, domain: str) -> LossConfig:
        """The loss settings for one domain, with its overrides applied."""
        over = self.per_domain.get(domain)
        if over is None:
            return self
        values = {k: v for k, v in dataclasses.asdict(over).items() if v is not None}
        return dataclasses.replace(self, per_domain={}, **values)


@dataclass
class TrainConfig:
    """Optimisation and the step schedule."""

    max_steps: int = 100
    seed: int = 1234
    prompts_per_step: int = 8
    micro_batch_size: int = 4
    # > 0: group the step's sequences by length into micro-batches of at most this many
    # (padded) tokens each, instead of micro_batch_size rows padded to the step's longest
    max_tokens_per_microbatch: int = 0
    # Transformer Engine spec only (untested): pack each micro-batch's sequences into one
    # row (THD layout, PackedSeqParams) instead of padding them
    pack_sequences: bool = False
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_steps: int = 10
    lr_decay_style: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 0
    eval_prompts: int = 64
    max_consecutive_nonfinite: int = 3
    # gc.freeze() what set-up left alive, so no full-heap collection pauses a step
    gc_freeze: bool = True

    def validate(self, path: str) -> None:
        for name in ("max_steps", "prompts_per_step", "micro_batch_size"):
            _positive(self, name, path)
        if self.max_tokens_per_microbatch < 0:
            raise ConfigError(
                f"{path}.max_tokens_per_microbatch={self.max_tokens_per_microbatch} must be "
                ">= 0 (0 = fixed micro_batch_size)"
            )
        if self.pack_sequences and self.max_tokens_per_microbatch == 0:
            raise ConfigError(
                f"{path}.pack_sequences=true needs {path}.max_tokens_per_microbatch > 0 "
                "(the packed row's token budget)"
            )
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr={self.lr} must be > 0")


@dataclass
class CheckpointConfig:
    """When and where training checkpoints are written (default `RUN_DIR/checkpoints`)."""

    interval: int = 0
    keep_last: int = 2
    dir: str | None = None
    # at the end, also write the student as a Hugging Face folder (RUN_DIR/hf_final),
    # loadable by transformers and SGLang
    save_hf: bool = True
    # the distributed optimizer's state: "fully_reshardable" resumes at any TP/PP/EP/DP
    # layout but each rank reads its shard's whole fp32 state into new tensors at resume
    # (~7x the bf16 weights); "dp_reshardable" loads in place, resuming at the same TP/PP/EP
    # (any DP size)
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"

    def validate(self, path: str) -> None:
        if self.interval < 0:
            raise ConfigError(f"{path}.interval={self.interval} must be >= 0 (0 = only at the end)")
        _positive(self, "keep_last", path)


@dataclass
class LoggingConfig:
    """Where metrics go: RUN_DIR/metrics.jsonl always; TensorBoard and W&B optionally."""

    tensorboard: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True

    def validate(self, path: str) -> None:
        pass


@dataclass
class Config:
    """The root of the tree."""

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    default_teacher: str | None = None
    # outcome reward per domain: "exact_match", "math" or "module:function" (rewards.py)
    rewards: dict[str, str] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, path: str = "") -> None:
        """Validate every section, then the checks that span sections."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        for name, teacher in self.teachers.items():
            teacher.validate(f"teachers.{name}")
        seen: dict[str, str] = {}
        for name, teacher in self.teachers.items():
            for d in teacher.domains:
                if d in seen:
                    raise ConfigError(
                        f"teachers.{name}.domains: domain {d!r} is already routed to "
                        f"teachers.{seen[d]}; each domain has one teacher"
                    )
                seen[d] = name
        if self.default_teacher is not None and self.default_teacher not in self.teachers:
            raise ConfigError(
                f"default_teacher={self.default_teacher!r} is not a teacher; "
                f"choose one of {sorted(self.teachers)}"
            )
        if self.loss.alpha != 0 or any(o.alpha for o in self.loss.per_domain.values()):
            if not self.rewards:
                raise ConfigError(
                    "loss.alpha != 0 adds an outcome-reward advantage: set rewards.<domain> "
                    "(exact_match, math or module:function) for every domain"
                )
        for name, teacher in self.teachers.items():
            for d in teacher.domains:
                est = self.loss.for_domain(d).estimator
                if est != "sampled" and teacher.top_k < 1:
                    over = self.loss.per_domain.get(d)
                    where = "loss.estimator"
                    if over is not None and over.estimator is not None:
                        where = f"loss.per_domain.{d}.estimator"
                    raise ConfigError(
                        f"{where}={est} needs the teacher's top-k log-probs: set "
                        f"teachers.{name}.top_k (e.g. 8) for domain {d!r}"
                    )
        self._check_truncated_sampling()
        if self.train.pack_sequences and self.model.transformer_impl == "local":
            raise ConfigError(
                "train.pack_sequences=true needs the Transformer Engine layer spec (THD "
                "attention), but model.transformer_impl=local; set pack_sequences=false"
            )
        if not (self.model.hf_path or self.model.mcore_path):
            # with a checkpoint, the architecture is read from it and checked then
            # (student.load.resolve_model_config); the fields here are placeholders
            check_layout(self.model, self.parallel)
            if self.loss.routing_replay and not self.model.is_moe:
                raise ConfigError(
                    "loss.routing_replay=true replays MoE routing, but the student has no "
                    "experts (model.num_moe_experts is unset)"
                )

    def _check_truncated_sampling(self) -> None:
        """Refuse top-p / top-k sampling with importance weights: the engines' log mu
        (SGLang's `output_token_logprobs`, the embedded engine's) is the log-prob before
        truncation, while the tokens come from the truncated distribution, so r = pi / mu
        would be biased. (SGLang can return its sampling mask, `return_sampling_mask`, from
        which the truncated mu could be rebuilt; that is not implemented.)"""
        rc = self.rollout
        if rc.top_p >= 1.0 and rc.top_k in (-1, 0):
            return
        corrections = {self.loss.correction} | {
            o.correction for o in self.loss.per_domain.values() if o.correction is not None
        }
        weighted = sorted(corrections - {"none"})
        if weighted:
            raise ConfigError(
                f"rollout.top_p={rc.top_p} / rollout.top_k={rc.top_k} with "
                f"loss.correction={weighted[0]}: the engine reports log mu before top-p/top-k "
                "truncation, so the importance ratios would be biased; sample with top_p=1 and "
                "top_k=-1, or set loss.correction=none"
            )

    def teacher_for(self, domain: str) -> str:
        """The name of the teacher that scores `domain` (routing by domain)."""
        for name, teacher in self.teachers.items():
            if domain in teacher.domains:
                return name
        if self.default_teacher is not None:
            return self.default_teacher
        raise ConfigError(
            f"domain {domain!r} has no teacher: add it to some teachers.<name>.domains "
            f"or set default_teacher (teachers: {sorted(self.teachers)})"
        )


# --------------------------------------------------------------------------------------
# cross-checks


def check_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Check that the parallel layout divides the model (independent of world size).

    When the model comes from a checkpoint folder, call this again once its architecture
    has been read (see `student.model`), since the fields here are then placeholders.
    """
    tp, pp, ep, etp = parallel.tp, parallel.pp, parallel.ep, parallel.etp
    groups = model.num_query_groups or model.num_attention_heads
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide "
            f"model.num_attention_heads={model.num_attention_heads}"
        )
    if groups % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide "
            f"model.num_query_groups={groups}"
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide "
            f"model.ffn_hidden_size={model.ffn_hidden_size}"
        )
    if model.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} does not divide "
            f"model.num_layers={model.num_layers}"
        )
    per_stage = model.num_layers // pp
    if model.recompute_num_layers is not None and model.recompute_num_layers > per_stage:
        raise ConfigError(
            f"model.recompute_num_layers={model.recompute_num_layers} must be at most the "
            f"layers of one pipeline stage: model.num_layers / "
            f"parallel.pipeline_model_parallel_size = {per_stage}"
        )
    if model.is_moe:
        if model.num_moe_experts % ep:
            raise ConfigError(
                f"parallel.expert_model_parallel_size={ep} does not divide "
                f"model.num_moe_experts={model.num_moe_experts}"
            )
        moe_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
        if moe_ffn % etp:
            raise ConfigError(
                f"parallel.expert_tensor_parallel_size={etp} does not divide "
                f"model.moe_ffn_hidden_size={moe_ffn}"
            )
        if tp > 1 and parallel.sequence_parallel is False:
            raise ConfigError(
                "parallel.sequence_parallel=false: megatron-core needs sequence parallelism "
                "for MoE with tensor_model_parallel_size > 1; set it to true or leave it unset"
            )
    else:
        if ep > 1:
            raise ConfigError(
                f"parallel.expert_model_parallel_size={ep} needs an MoE model "
                "(model.num_moe_experts is unset)"
            )
        if parallel.expert_tensor_parallel_size not in (None, tp):
            raise ConfigError(
                "parallel.expert_tensor_parallel_size is only meaningful for MoE models"
            )


def check_world_size(parallel: ParallelConfig, world_size: int) -> int:
    """Check the layout against the world size; return the data-parallel size.

    Called before any process group is created.
    """
    tp, pp, ep, etp = parallel.tp, parallel.pp, parallel.ep, parallel.etp
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {tp} x {pp}; launch a multiple of {tp * pp} processes"
        )
    dp = world_size // (tp * pp)
    if (tp * dp) % (ep * etp):
        raise ConfigError(
            f"expert_model_parallel_size x expert_tensor_parallel_size = {ep} x {etp} must divide "
            f"tensor_model_parallel_size x data-parallel size = {tp} x {dp} "
            f"(world size {world_size}, pipeline_model_parallel_size {pp})"
        )
    return dp


# --------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides
    of the form `a.b.c=value` (values parsed as YAML), build and validate the tree."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"recipe {path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path}: the top level must be a mapping of sections")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = from_dict(Config, raw, "")
    cfg.validate()
    return cfg


def _positive(obj: Any, name: str, path: str) -> None:
    value = getattr(obj, name)
    if value is None or value < 1:
        raise ConfigError(f"{path}.{name}={value} must be a positive integer")
