"""An in-process CPU inference engine over a Hugging Face causal LM.

It backs `mopd serve` (the SGLang-compatible server, `server/app.py`) and the embedded
teacher and rollout backends (`teachers/embedded.py`, `rollout/embedded.py`).

    engine = HFEngine("/path/to/hf_dir")                     # config + safetensors (+ tokenizer)
    outs = engine.score([[1, 5, 9, 7]], starts=[0], top_k=2)  # prefill only
    outs[0].logprobs        # [None, lp(5|1), lp(9|1,5), lp(7|1,5,9)]  (positions start..L-1)
    gens = engine.generate([[1, 5]], SamplingParams(max_new_tokens=8, seed=0))
    gens[0].output_ids, gens[0].logprobs, gens[0].finish_reason, gens[0].matched
    engine.load_weights_from_disk("/path/to/new_hf_dir", weight_version="step-3")
    engine.load_state_dict([("model.norm.weight", tensor), ...], weight_version="step-4")
    engine.weight_version   # "default" until a load names another one

API (stable; the server and the embedded backends rely on it):

- `score(input_ids, starts=0, top_k=0)` -> `list[ScoreOutput]`. For each sequence `ids`
  and its start `s`, `logprobs[j]` is log p(ids[s + j] | ids[: s + j]) for j = 0..L-1-s,
  a plain `log_softmax` of the logits (temperature 1), with `None` where nothing precedes
  the token (position 0). This is the project's one log-prob convention, laid out the way
  SGLang's `input_token_logprobs` is when `logprob_start_len = s` *except* that SGLang
  also nulls its first entry when s > 0 (see `server/app.py`, which applies that rule).
  With `top_k > 0`, `top_ids` (int64) / `top_logprobs` (float32) are `[m, k]` tensors of
  the k most likely tokens (most likely first) of the distributions that predict the
  positions max(s, 1)..L-1: row j is position max(s, 1) + j (position 0 has no
  predecessor, so no row; m = L - max(s, 1)). Sequences are
  right-padded and run in batches of at most `max_batch_tokens` padded tokens; with a
  causal mask, right padding cannot change the real tokens' results.
- `generate(prompts, sampling, stop_strs=None, ignore_eos=False, *, batch_seed=None)` ->
  `list[GenerateOutput]`. `sampling` is one `SamplingParams` for all prompts or one per
  prompt. Prompts are left-padded and decoded together with a KV cache. Sampling
  (`rollout/sampling.py`, vectorised over the batch; rows may differ in every setting):
  logits / temperature, then top-k, then top-p (nucleus), then the draw. Without
  `batch_seed` each request draws from its own `torch.Generator` seeded by
  `SamplingParams.seed` (so a seeded request gives the same tokens whatever it is
  batched with, as SGLang's per-request seeds do; unseeded requests draw from the
  engine's generator). With `batch_seed` the whole call draws from one generator seeded
  with it, one inverse-CDF draw over all rows per decode step (the same prompts, settings and seed
  give the same tokens; a row's tokens depend on its batch). `temperature < 1e-5` or
  `top_k == 1` is greedy (argmax). Generation stops at `max_new_tokens`, at a token of
  `stop_token_ids`, at EOS (unless `ignore_eos`), or when the decoded output contains one
  of `stop_strs` (needs a tokenizer in the folder); the stop token is kept in
  `output_ids`.
- Returned log-probs of sampled tokens (`GenerateOutput.logprobs`) follow what SGLang
  0.5.23 returns (`srt/layers/sampler.py`): log_softmax(logits / temperature) of the
  sampled token, *before* top-k/top-p truncation; for greedy requests the unscaled
  log_softmax(logits). At temperature 1 (what MOPD samples at) this is log mu exactly.
  `HFEngine(..., return_original_logprob=True)` returns the unscaled log_softmax always
  (SGLang's `SGLANG_RETURN_ORIGINAL_LOGPROB=1`).
- `load_weights_from_disk(hf_dir, weight_version=None)` reloads an HF folder of the same
  architecture; `load_state_dict(named_tensors, weight_version=None)` copies named tensors
  (HF parameter names) into the model. Both bump `weight_version` when one is given.

Every public method takes one lock: the engine is shared by the server's threads.
Bad inputs (token ids out of range, an empty sequence, a start past the end) raise
`ValueError` naming the request index. Left out: prefix caching, paged memory and
continuous batching (a request joins a batch only between batches); they matter for
throughput on GPUs, not for correctness here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from megatron_mopd.rollout.sampling import RowParams, draw, token_logprobs
from megatron_mopd.rollout.sampling import truncate as _truncate  # noqa: F401 (tests, old name)
from megatron_mopd.types import SamplingParams


@dataclass
class ScoreOutput:
    """Log-probs of one scored sequence at positions start..L-1 (None at position 0)."""

    logprobs: list[float | None]
    # with top-k: [L - max(start, 1), k] int64 / float32, row j = position max(start, 1) + j
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


@dataclass
class GenerateOutput:
    """One generated continuation.

    `finish_reason` is "stop" or "length"; `matched` is the stop token id or stop string
    that ended it (None for "length").
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    matched: int | str | None = None
    # with `generate(..., return_routed_experts=True)` on an MoE model: int32
    # [len(prompt) + len(output_ids) - 1, num_moe_layers, top_k] (see `routed_experts_hooks`)
    routed_experts: torch.Tensor | None = None


class HFEngine:
    """A transformers causal LM on CPU with batched scoring and sampling (see module doc)."""

    def __init__(
        self,
        hf_dir: str,
        dtype: str = "float32",
        weight_version: str = "default",
        seed: int | None = None,
        max_batch_tokens: int = 8192,
        return_original_logprob: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        self.model_path = hf_dir
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.max_batch_tokens = max_batch_tokens
        self.return_original_logprob = return_original_logprob
        self.attn_implementation = attn_implementation
        self._lock = threading.RLock()
        self._weight_version = weight_version
        self._rng = torch.Generator()
        if seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(seed)
        self.model = self._load(hf_dir)
        self.tokenizer = _load_tokenizer(hf_dir)
        cfg = self.model.config
        self.vocab_size: int = int(cfg.vocab_size)
        eos = getattr(cfg, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids: set[int] = set(
            eos if isinstance(eos, list) else ([] if eos is None else [eos])
        )
        pad = getattr(cfg, "pad_token_id", None)
        self.pad_token_id: int = int(pad) if pad is not None else 0

    # ---------------------------------------------------------------- loading

    def _load(self, hf_dir: str):
        import transformers

        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            raise ValueError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
        kw = {"dtype": self.dtype}
        if self.attn_implementation:
            kw["attn_implementation"] = self.attn_implementation
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, **kw)
        model.eval()
        model.requires_grad_(False)
        return model

    @property
    def weight_version(self) -> str:
        """The version string of the loaded weights ("default" at start-up)."""
        return self._weight_version

    def load_weights_from_disk(self, hf_dir: str, weight_version: str | None = None) -> None:
        """Replace the weights with those of `hf_dir` (same architecture and vocabulary)."""
        new = self._load(hf_dir)
        old_cfg, new_cfg = self.model.config, new.config
        for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(old_cfg, key, None) != getattr(new_cfg, key, None):
                raise ValueError(
                    f"{hf_dir}: {key}={getattr(new_cfg, key, None)!r} differs from the served "
                    f"model's {getattr(old_cfg, key, None)!r}; weights must fit the architecture"
                )
        with self._lock:
            self.model = new
            self.model_path = hf_dir
            if weight_version is not None:
                self._weight_version = weight_version

    def load_state_dict(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
        weight_version: str | None = None,
    ) -> None:
        """Copy named tensors (HF parameter names, any subset) into the model in place."""
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        with self._lock:
            params = dict(self.model.named_parameters())
            params.update(dict(self.model.named_buffers()))
            staged = []
            for name, tensor in items:
                if name not in params:
                    raise ValueError(f"unknown parameter {name!r} for {type(self.model).__name__}")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"parameter {name!r}: shape {tuple(tensor.shape)} does not match "
                        f"{tuple(params[name].shape)}"
                    )
                staged.append((params[name], tensor))
            with torch.no_grad():
                for param, tensor in staged:
                    param.copy_(tensor.to(param.dtype))
            if weight_version is not None:
                self._weight_version = weight_version

    # ---------------------------------------------------------------- scoring

    def score(
        self,
        input_ids: Sequence[Sequence[int]],
        starts: int | Sequence[int] = 0,
        top_k: int = 0,
    ) -> list[ScoreOutput]:
        """Prefill-only log-probs of given tokens (see the module docstring)."""
        n = len(input_ids)
        starts_list = [starts] * n if isinstance(starts, int) else list(starts)
        if len(starts_list) != n:
            raise ValueError(f"{len(starts_list)} start positions for {n} sequences")
        for i, (ids, s) in enumerate(zip(input_ids, starts_list)):
            self._check_ids(ids, i)
            if not 0 <= s < len(ids):
                raise ValueError(f"request {i}: start {s} is outside [0, {len(ids) - 1}]")
        if top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0")
        top_k = min(top_k, self.vocab_size)
        out: list[ScoreOutput | None] = [None] * n
        with self._lock, torch.inference_mode():
            for batch in self._token_batches([len(x) for x in input_ids]):
                self._score_batch(input_ids, starts_list, top_k, batch, out)
        return out  # type: ignore[return-value]

    def _token_batches(self, lengths: list[int]) -> list[list[int]]:
        """Index batches (sorted by length) of at most `max_batch_tokens` padded tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            if cur and lengths[i] * (len(cur) + 1) > self.max_batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def _score_batch(self, input_ids, starts, top_k, batch, out) -> None:
        seqs = [list(input_ids[i]) for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for r, i in enumerate(batch):
            length, s = len(seqs[r]), starts[i]
            lo = max(s, 1)  # the first position with a predecessor
            lp = torch.log_softmax(logits[r, lo - 1 : length - 1].float(), dim=-1)
            target = ids[r, lo:length]
            vals = lp.gather(-1, target[:, None])[:, 0].tolist()
            head: list = [None] if s == 0 else []
            result = ScoreOutput(logprobs=head + vals)
            if top_k:
                result.top_logprobs, result.top_ids = lp.topk(top_k, dim=-1)
            out[i] = result

    def _check_ids(self, ids: Sequence[int], index: int) -> None:
        if len(ids) == 0:
            raise ValueError(f"request {index}: empty token list")
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"request {index}: token id {t!r} is not an integer in [0, {self.vocab_size})"
                )

    # ---------------------------------------------------------------- sampling

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
        stop_strs: Sequence[Sequence[str]] | None = None,
        ignore_eos: bool | Sequence[bool] = False,
        return_routed_experts: bool = False,
        *,
        batch_seed: int | None = None,
    ) -> list[GenerateOutput]:
        """Sample continuations of `prompts` (see the module docstring).

        `batch_seed`: draw every sampled token of the call from one generator seeded with
        it (one draw over all rows per decode step; `SamplingParams.seed` is ignored), so
        the same prompts, settings and seed give the same outputs; None: each request
        draws from its own generator (`SamplingParams.seed`, else the engine's).
        `return_routed_experts`: also record, per token fed to the model (the prompt and
        every sampled token but the last), the experts each MoE layer's router chose, in
        this engine's dtype (`GenerateOutput.routed_experts`; None for dense models)."""
        n = len(prompts)
        params = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
        stops = [list(x) for x in stop_strs] if stop_strs is not None else [[] for _ in range(n)]
        ignore = [ignore_eos] * n if isinstance(ignore_eos, bool) else list(ignore_eos)
        if not len(params) == len(stops) == len(ignore) == n:
            raise ValueError(f"{n} prompts but {len(params)} sampling params / stop lists")
        for i, (p, sp) in enumerate(zip(prompts, params)):
            self._check_ids(p, i)
            _check_sampling(sp, i)
            if stops[i] and self.tokenizer is None:
                raise ValueError(f"request {i}: stop strings need a tokenizer in the model folder")
        if n == 0:
            return []
        with self._lock, torch.inference_mode():
            if batch_seed is None:
                draws: torch.Generator | list[torch.Generator] = [
                    _make_generator(sp.seed, self._rng) for sp in params
                ]
            else:
                draws = torch.Generator().manual_seed(batch_seed % (2**63))
            if not return_routed_experts:
                return self._generate(prompts, params, stops, ignore, draws)
            with routed_experts_hooks(self.model) as steps:
                outputs = self._generate(prompts, params, stops, ignore, draws)
            if steps.num_layers:
                _attach_routed_experts(outputs, prompts, steps.per_call())
            return outputs

    def _generate(self, prompts, params, stops, ignore, draws) -> list[GenerateOutput]:
        """Left-padded prefill, then one decode step per token for the whole batch. Ids,
        log-probs and finish flags stay tensors until the end; only rows with stop
        strings are checked in Python (they need the decoded text)."""
        from transformers import DynamicCache

        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = RowParams.build(params, ignore, self.eos_token_ids, self.return_original_logprob)
        batch_gen = draws if isinstance(draws, torch.Generator) else None
        gens = None if batch_gen is not None else draws
        str_rows = [r for r in range(n) if stops[r]]
        steps = int(rows.max_new.max())
        out_ids = torch.zeros((n, steps), dtype=torch.long)
        out_lp = torch.zeros((n, steps), dtype=torch.float32)
        lengths = torch.zeros(n, dtype=torch.long)
        active = rows.max_new > 0
        matched_tok = torch.full((n,), -1, dtype=torch.long)
        matched_str: dict[int, str] = {}
        cache = DynamicCache()
        step_ids, step_pos, t = ids, pos, 0
        while bool(active.any()):
            logits = (
                self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_pos,
                    past_key_values=cache,
                    use_cache=True,
                )
                .logits[:, -1, :]
                .float()
            )
            next_ids = draw(logits, rows, batch_gen, gens)
            out_ids[:, t] = next_ids
            out_lp[:, t] = token_logprobs(logits, next_ids, rows)
            lengths += active
            hit = active & (next_ids[:, None] == rows.stop_ids).any(dim=-1)
            matched_tok = torch.where(hit, next_ids, matched_tok)
            active &= ~hit
            for r in str_rows:
                if active[r] and (s := self._stop_str_hit(out_ids[r, : t + 1].tolist(), stops[r])):
                    matched_str[r] = s
                    active[r] = False
            active &= lengths < rows.max_new
            t += 1
            if not bool(active.any()):
                break
            step_ids = next_ids[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], dim=1)
        return _outputs(out_ids, out_lp, lengths, matched_tok, matched_str)

    def _stop_str_hit(self, output_ids: list[int], stops: list[str]) -> str | None:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=False)
        for s in stops:
            if s and s in text:
                return s
        return None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` ("" without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


# -------------------------------------------------------------------- routed experts


def moe_gates(model) -> list[tuple[torch.nn.Module, int]]:
    """`(gate, top_k)` of every sparse MoE block of an HF model, in layer order.

    Qwen2-MoE / Qwen3-MoE (and Mixtral-like) blocks hold a linear router `gate` and
    `top_k`; the block routes each token to top_k(softmax(gate(x)) in fp32), which
    `routed_experts_hooks` recomputes from the gate's output."""
    out = []
    for module in model.modules():
        gate = getattr(module, "gate", None)
        top_k = getattr(module, "top_k", None)
        if (
            isinstance(gate, torch.nn.Linear)
            and isinstance(top_k, int)
            and hasattr(module, "experts")
        ):
            out.append((gate, top_k))
    return out


class _RoutingRecord:
    """Per forward call of the model: the [tokens, num_layers, top_k] expert ids."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.calls: list[list[torch.Tensor | None]] = []

    def add(self, layer: int, ids: torch.Tensor) -> None:
        if layer == 0 or not self.calls:
            self.calls.append([None] * self.num_layers)
        self.calls[-1][layer] = ids

    def per_call(self) -> list[torch.Tensor]:
        return [torch.stack(layers, dim=1) for layers in self.calls]  # [N, L, K] per call


class routed_experts_hooks:  # noqa: N801 (a context manager used like a function)
    """Record the experts each MoE layer's router picks during the model's forwards.

        with routed_experts_hooks(model) as rec:
            model(input_ids=...)
        rec.per_call()  # one int32 [batch * seq, num_layers, top_k] tensor per forward

    The choice is recomputed from the gate's logits exactly as the HF block does it
    (softmax in fp32 of the logits in the model's dtype, then top-k), so a bf16 model
    records its bf16 routing. Token order is the block's: row-major [batch, seq]."""

    def __init__(self, model) -> None:
        self.gates = moe_gates(model)
        self.record = _RoutingRecord(len(self.gates))
        self.handles: list = []

    def __enter__(self) -> _RoutingRecord:
        for layer, (gate, top_k) in enumerate(self.gates):

            def hook(_mod, _inp, logits, layer=layer, top_k=top_k):
                probs = torch.softmax(
                    logits.reshape(-1, logits.shape[-1]), dim=-1, dtype=torch.float
                )
                self.record.add(layer, probs.topk(top_k, dim=-1).indices.to(torch.int32))

            self.handles.append(gate.register_forward_hook(hook))
        return self.record

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _attach_routed_experts(outputs, prompts, calls: list[torch.Tensor]) -> None:
    """Cut `_generate`'s per-call routing into per-request tensors: call 0 is the
    left-padded prefill ([n * width] tokens), call j >= 1 feeds sampled token j - 1."""
    n = len(prompts)
    width = max(len(p) for p in prompts)
    prefill = calls[0].view(n, width, *calls[0].shape[1:])
    decode = [c.view(n, *c.shape[1:]) for c in calls[1:]]
    for r, (out, p) in enumerate(zip(outputs, prompts)):
        fed = max(len(out.output_ids) - 1, 0)
        parts = [prefill[r, width - len(p) :]] + [decode[j][r : r + 1] for j in range(fed)]
        out.routed_experts = torch.cat(parts, dim=0).contiguous()


# -------------------------------------------------------------------- helpers

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_tokenizer(hf_dir: str):
    """The folder's tokenizer, or None when it has none (scoring and sampling work on ids)."""
    if not any(
        os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError):
        return None


def _check_sampling(sp: SamplingParams, index: int) -> None:
    if sp.max_new_tokens < 0:
        raise ValueError(f"request {index}: max_new_tokens={sp.max_new_tokens} must be >= 0")
    if not sp.temperature >= 0 or sp.temperature == float("inf"):
        raise ValueError(f"request {index}: temperature={sp.temperature} must be finite, >= 0")
    if not 0.0 < sp.top_p <= 1.0:
        raise ValueError(f"request {index}: top_p={sp.top_p} must be in (0, 1]")
    if sp.top_k != -1 and sp.top_k < 1:
        raise ValueError(f"request {index}: top_k={sp.top_k} must be -1 (off) or >= 1")


def _make_generator(seed: int | None, rng: torch.Generator) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    g.manual_seed(seed % (2**63))
    return g


def _outputs(out_ids, out_lp, lengths, matched_tok, matched_str) -> list[GenerateOutput]:
    """`_generate`'s tensors as one `GenerateOutput` per row (converted to lists once)."""
    ids, lps, lens, toks = out_ids.tolist(), out_lp.tolist(), lengths.tolist(), matched_tok.tolist()
    outputs = []
    for r, length in enumerate(lens):
        if r in matched_str:
            reason, matched = "stop", matched_str[r]
        elif toks[r] >= 0:
            reason, matched = "stop", toks[r]
        else:
            reason, matched = "length", None
        outputs.append(GenerateOutput(ids[r][:length], lps[r][:length], reason, matched))
    return outputs
