"""The student's rollouts sampled by SGLang over HTTP (worker URLs or one sglang-router).

    engine = SGLangRolloutEngine(cfg.rollout)          # waits for /health_generate
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=64, seed=step))
    engine.update_weights_from_disk("/ckpt/hf_step_10", weight_version="10")

Sampling posts `/generate` with `return_logprob: true` and `logprob_start_len: -1`, so
each answer carries `meta_info.output_token_logprobs` = log mu of every sampled token
(stop token included). SGLang scales those log-probs by the temperature unless it runs
with `SGLANG_RETURN_ORIGINAL_LOGPROB=1`: MOPD samples at temperature 1
(`rollout.temperature` refuses anything else), where both agree. SGLang takes log mu
before top-p / top-k truncation, so those are refused with importance weights
(`config.Config.validate`). An aborted generation (HTTP 200 with an abort finish reason)
is asked again (`SGLangClient`).

Seeds: SGLang 0.5.23 honours `sampling_seed` only when the server runs with
`--enable-deterministic-inference` (which needs a CUDA attention backend: on CPU SGLang
refuses it). The engine reads that setting from `GET /get_server_info` once. When seeds
are honoured, each prompt goes as its own request with its own seed (derived from
`SamplingParams.seed` as the embedded engine derives it; sglang-router accepts only one
`sampling_params` object per request) and the servers batch concurrent requests; when
they are ignored, prompts go `rollout.batch_size` per request without seeds, and the
engine says once that rollouts are not reproducible.

Streaming: `generate_stream` yields the rollouts in pieces of at least `rollout.batch_size`
prompts as their requests come back (`SGLangClient.generate_iter`), so the trainer's
producer starts teacher scoring while the servers still sample (`rollout.overlap`).

Weight sync, three ways, each to every worker (behind a router: the workers it lists in
`GET /workers`, since sglang-router 0.3.2 forwards no weight endpoint):
- `update_weights_from_disk(hf_dir, version)`: every worker reloads an HF folder (a shared
  filesystem). Tested against real SGLang on CPU.
- `update_weights_from_tensor(buckets, version, tp_size)`: tensors handed over in memory
  (torch's multiprocessing pickling: CUDA IPC handles on GPU, shared-memory files for CPU
  tensors), one serialised payload per server TP rank, one request per bucket, inside
  `/begin_weight_update` ... `/end_weight_update`. Tested against real SGLang on CPU
  (TP1); the CUDA IPC path is untested here.
- `init_weights_update_group(...)` once, then `update_weights_from_distributed(buckets,
  version)`: the trainer is rank 0 of a process group with every server's TP ranks and
  broadcasts each bucket as one flat tensor (`load_format: flattened_bucket`), inside
  `/begin_weight_update` ... `/end_weight_update`. Tested against real SGLang on CPU with
  the gloo backend; NCCL on GPUs is untested here.

Every update is sent with `flush_cache: false`; the prefix cache is flushed afterwards with
`POST /flush_cache?timeout=T`, which SGLang defers until its queue has drained (an update
sent with `flush_cache: true` while requests run is refused with HTTP 400 after the weights
changed). Servers started with `--api-key` are reached with the key of the environment
variable `rollout.api_key_env`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence

from megatron_mopd.config import RolloutConfig
from megatron_mopd.errors import ConfigError, TeacherError, UserError
from megatron_mopd.rollout.base import RolloutEngine, join_pieces
from megatron_mopd.rollout.sglang_transfer import (
    NamedTensors,
    flatten_bucket,
    join_calls,
    post_each_in_threads,
    serialize_named_tensors,
    succeeded,
    trainer_process_group,
)
from megatron_mopd.sglang.client import SGLangClient, api_key_from_env
from megatron_mopd.types import Rollout, SamplingParams


def _request_seeds(seed: int, n: int) -> list[int]:
    from megatron_mopd.rollout.embedded import request_seeds  # one derivation for both backends

    return request_seeds(seed, n)


class SGLangRolloutEngine(RolloutEngine):
    """`RolloutEngine` over SGLang's HTTP API (see the module docstring)."""

    def __init__(
        self,
        cfg: RolloutConfig,
        *,
        worker_urls: Sequence[str] | None = None,
        wait: bool = True,
        client: SGLangClient | None = None,
        return_routed_experts: bool = False,
    ) -> None:
        """Sample through `cfg.urls`; weight updates go to `worker_urls` (default: the
        URLs themselves, or the workers behind a router, from its `GET /workers`).

        `return_routed_experts` asks every /generate for the experts each token was
        routed to (`Rollout.routed_experts`; servers need
        `--enable-return-routed-experts`). sglang-router drops the field from its
        answers, so these requests go to the workers directly (`workers`, from the
        router's `GET /workers`), spread over them by the client. Untested against a
        real server here (see README)."""
        self.cfg = cfg
        self.return_routed_experts = return_routed_experts
        self._api_key = api_key_from_env(cfg.api_key_env, "rollout.api_key_env")
        self.client = client or self._client(cfg.urls)
        self._workers = self._client(worker_urls) if worker_urls else None
        self._version: str | None = None
        self._group = None
        self._group_name: str | None = None
        self._seeds_honoured: bool | None = None
        self._server_info: dict | None = None
        if wait:
            try:
                self.client.wait_healthy(cfg.startup_timeout_seconds)
            except TeacherError as e:
                raise TeacherError(f"rollout engine: {e}") from None

    def _client(self, urls: Sequence[str]) -> SGLangClient:
        return SGLangClient(
            urls,
            timeout=self.cfg.timeout_seconds,
            max_retries=self.cfg.max_retries,
            backoff_seconds=self.cfg.retry_backoff_seconds,
            max_in_flight=self.cfg.max_in_flight,
            name="rollout",
            api_key=self._api_key,
        )

    @property
    def weight_version(self) -> str:
        """The weight version the servers reported with the latest rollouts (or set last)."""
        if self._version is None:
            info = self.workers.model_info()
            self._version = str(info.get("weight_version"))
        return self._version

    # ---------------------------------------------------------------- sampling

    def server_info(self) -> dict:
        """The first worker's `GET /server_info` (SGLang's server arguments), read once."""
        if self._server_info is None:
            self._server_info = self.workers.server_info()
        return self._server_info

    def check_dtype(self, dtype: str) -> None:
        """`ConfigError` unless the servers' `--dtype` is `rollout.dtype` (`fp32`, `bf16`,
        `fp16`). A server reporting `auto` (the checkpoint's dtype) or no dtype at all
        (`mopd serve`) cannot be checked: that is said once, on stderr."""
        names = {"fp32": {"float32", "float"}, "bf16": {"bfloat16"}, "fp16": {"float16", "half"}}
        reported = self.server_info().get("dtype")
        url = self.workers.urls[0]
        if reported is None or reported == "auto":
            print(
                f"rollout engine: {url} reports dtype {reported!r}; rollout.dtype={dtype} is "
                "taken on trust (start the servers with --dtype to have it checked)",
                file=sys.stderr,
                flush=True,
            )
            return
        if reported not in names[dtype]:
            raise ConfigError(
                f"rollout.dtype={dtype} but the SGLang server {url} runs with --dtype "
                f"{reported}: set rollout.dtype to match, or restart the server"
            )

    def seeds_honoured(self) -> bool:
        """True if the servers apply `sampling_seed` (`enable_deterministic_inference` in
        the first worker's `GET /get_server_info`; a server without that field, such as
        `mopd serve`, is taken at its word that it samples reproducibly)."""
        if self._seeds_honoured is None:
            info = self.server_info()
            self._seeds_honoured = bool(info.get("enable_deterministic_inference", True))
            if not self._seeds_honoured:
                print(
                    "rollout engine: the SGLang servers ignore sampling_seed (they run without "
                    "--enable-deterministic-inference, which needs a CUDA attention backend): "
                    "rollouts are not reproducible, and a resumed run samples other responses; "
                    f"prompts go {self.cfg.batch_size} per request (rollout.batch_size)",
                    file=sys.stderr,
                    flush=True,
                )
        return self._seeds_honoured

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One `Rollout` per prompt, in order, with log mu of every sampled token."""
        return join_pieces(len(prompts), self.generate_stream(prompts, sampling))

    def generate_stream(
        self, prompts: list[list[int]], sampling: SamplingParams
    ) -> Iterator[tuple[list[int], list[Rollout]]]:
        """The rollouts in pieces of at least `rollout.batch_size` prompts (the last may be
        smaller), each yielded as soon as its requests have come back, so that teacher
        scoring starts while the servers still sample. Seeds are those of the whole call:
        the same rollouts as `generate`, whatever the order in which requests finish."""
        if not prompts:
            return
        base = {
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "stop_token_ids": list(sampling.stop_token_ids),
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        piece: list[int] = []
        rolls: list[Rollout] = []
        try:
            if sampling.seed is None or not self.seeds_honoured():
                params: dict | list[dict] = base
            else:
                seeds = _request_seeds(sampling.seed, len(prompts))
                params = [dict(base, sampling_seed=s) for s in seeds]
            if self.return_routed_experts:  # the router would drop the field
                client, extra = self.workers, {"return_routed_experts": True}
            else:
                client, extra = self.client, None
            for lo, hi, gens in client.generate_iter(prompts, params, self.cfg.batch_size, extra):
                piece += range(lo, hi)
                rolls += [self._rollout(prompts[i], g) for i, g in zip(range(lo, hi), gens)]
                if len(piece) >= self.cfg.batch_size:
                    yield piece, rolls
                    piece, rolls = [], []
        except TeacherError as e:
            raise TeacherError(f"rollout engine: {e}") from None
        if piece:
            yield piece, rolls

    def _rollout(self, prompt: list[int], g) -> Rollout:
        version = str(g.weight_version)
        self._version = version
        return Rollout(
            prompt_ids=list(prompt),
            response_ids=g.output_ids,
            rollout_logprobs=g.logprobs,
            finish_reason=g.finish_reason["type"],
            weight_version=version,
            routed_experts=_decode_routed_experts(
                g.routed_experts, len(prompt) + len(g.output_ids) - 1
            ),
        )

    @property
    def workers(self) -> SGLangClient:
        """A client of every worker (the router's workers when a URL is a router)."""
        if self._workers is None:
            urls: list[str] = []
            for url in self.client.urls:
                urls.extend(_router_workers(self.client, url) or [url])
            self._workers = self._client(urls) if urls != self.client.urls else self.client
        return self._workers

    # ---------------------------------------------------------------- weight sync

    def update_weights_from_disk(self, hf_dir: str, weight_version: str) -> None:
        """Every worker reloads its weights from `hf_dir` (an HF folder it can read)."""
        body = {"model_path": hf_dir, "weight_version": weight_version, "flush_cache": False}
        self._post_workers("/update_weights_from_disk", body)
        self.flush_cache()
        self._version = weight_version

    def update_weights_from_tensor(
        self,
        buckets: Iterable[NamedTensors],
        weight_version: str,
        tp_size: int = 1,
    ) -> None:
        """Hand each bucket of `(HF name, tensor)` to every worker in memory (same node).

        Each bucket is serialised once per server TP rank (`tp_size` payloads: every rank
        deserialises only its own, as SGLang requires for CUDA IPC handles) and sent as one
        `/update_weights_from_tensor` request, the tensors kept alive until every worker
        has loaded them. The bucket is first copied into one flat buffer (shared memory for
        CPU tensors; each tensor is released once copied), and the payload holds views of
        it: one storage per bucket, never a model parameter's own. CPU tensors go through
        shared-memory files (tested here against real SGLang); CUDA tensors as CUDA IPC
        handles with device UUIDs (untested here).
        """
        with self._update_session():
            for bucket in buckets:
                flat, named = flatten_bucket(bucket, align=64, shared=True)
                del bucket
                payloads = [serialize_named_tensors(named) for _ in range(tp_size)]
                body = {
                    "serialized_named_tensors": payloads,
                    "flush_cache": False,
                    "weight_version": weight_version,
                }
                self._post_workers("/update_weights_from_tensor", body)
                del payloads, named, flat  # the workers hold copies now
        self.flush_cache()
        self._version = weight_version

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        ranks_per_server: int = 1,
        group_name: str | None = None,
        backend: str = "nccl",
        timeout_seconds: float = 600.0,
    ) -> None:
        """Form the broadcast group: this process is rank 0, server `k`'s TP ranks are
        `1 + k * ranks_per_server ...`. Call once, on the driver. `backend` is `nccl` on
        GPUs (untested here) or `gloo` (CPU tensors; tested against real SGLang).

        SGLang waits for the group inside its scheduler loop: until this process joins
        (or SGLang's own timeout, 30 min), the server answers nothing else, /health
        included. A server that refuses at once (a known group name, a bad backend) is
        reported at once. The group's name is unique to this engine (a server refuses a name it knows, e.g. that
        of a trainer that crashed before `close` destroyed its group)."""
        group_name = group_name or f"mopd_weight_update_{uuid.uuid4().hex[:12]}"
        n_servers = len(self.workers.urls)
        world_size = 1 + n_servers * ranks_per_server
        bodies = [
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": 1 + k * ranks_per_server,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            }
            for k in range(n_servers)
        ]
        # the servers block in the rendezvous until rank 0 joins: post from threads, and
        # join the group from a thread too, so that a server refusing at once (a group of
        # that name exists, a bad backend) is reported at once, not after the timeout
        calls = post_each_in_threads(self.workers, "/init_weights_update_group", bodies)
        box: dict = {}

        def join_group() -> None:
            try:
                box["group"] = trainer_process_group(
                    backend, master_address, master_port, world_size, group_name, timeout_seconds
                )
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box["error"] = e

        joiner = threading.Thread(target=join_group, daemon=True, name="weight-sync-group")
        joiner.start()
        while joiner.is_alive():
            joiner.join(0.2)
            for url, t, answer_box in calls:
                if not t.is_alive() and not succeeded(answer_box):
                    join_calls([(url, t, answer_box)], "/init_weights_update_group")
        join_calls(calls, "/init_weights_update_group")
        if "error" in box:
            raise TeacherError(
                f"rollout engine: joining the weight-update group at {master_address}:"
                f"{master_port} ({backend}) failed: {box['error']}"
            )
        self._group = box["group"]
        self._group_name = group_name
        self._group_backend = backend

    def update_weights_from_distributed(
        self, buckets: Iterable[NamedTensors], weight_version: str
    ) -> None:
        """Broadcast each bucket of `(HF name, tensor)` from rank 0 of the group made by
        `init_weights_update_group`, as one flat byte tensor per bucket, while every
        worker receives it (`load_format: flattened_bucket`)."""
        import torch.distributed as dist

        if self._group is None:
            raise UserError("call init_weights_update_group before update_weights_from_distributed")
        with self._update_session():
            for bucket in buckets:
                body = {
                    "names": [n for n, _ in bucket],
                    "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket],
                    "group_name": self._group_name,
                    "load_format": "flattened_bucket",
                    "flush_cache": False,
                    "weight_version": weight_version,
                }
                # SGLang's receiving bucket lays the tensors out back to back: no padding
                flat, _ = flatten_bucket(bucket, align=0, shared=False)
                del bucket
                if self._group_backend == "nccl" and not flat.is_cuda:
                    flat = flat.cuda()
                calls = post_each_in_threads(
                    self.workers,
                    "/update_weights_from_distributed",
                    [body] * len(self.workers.urls),
                )
                try:
                    dist.broadcast(flat, src=0, group=self._group)
                finally:
                    join_calls(calls, "/update_weights_from_distributed")
                del flat
        self.flush_cache()
        self._version = weight_version

    @contextlib.contextmanager
    def _update_session(self):
        """`/begin_weight_update` on every worker, then `/end_weight_update` (also after a
        failure, so that no worker is left inside a session)."""
        self._post_workers("/begin_weight_update", {})
        try:
            yield
        except BaseException:
            with contextlib.suppress(TeacherError):  # the first error is the one to report
                self._post_workers("/end_weight_update", {})
            raise
        self._post_workers("/end_weight_update", {})

    def flush_cache(self, drain_seconds: float | None = None) -> None:
        """Clear every worker's prefix cache, once its running and queued requests have
        finished (SGLang defers the flush up to `drain_seconds`, default
        `rollout.drain_timeout_seconds`)."""
        wait = self.cfg.drain_timeout_seconds if drain_seconds is None else drain_seconds
        deadline = time.monotonic() + wait
        for url in self.workers.urls:
            while True:
                left = max(0.0, deadline - time.monotonic())
                try:  # 200 once flushed; 400 if requests were still running at the deadline
                    self.workers.request(
                        "POST", f"/flush_cache?timeout={left:.3f}", None, url=url,
                        label="flush_cache",
                    )  # fmt: skip
                    break
                except TeacherError as e:
                    if time.monotonic() >= deadline:
                        raise TeacherError(
                            f"rollout engine: the prefix cache was not flushed within {wait:g} s "
                            f"(rollout.drain_timeout_seconds): {e}"
                        ) from None
                time.sleep(0.2)

    def _post_workers(self, path: str, body: dict | None) -> list:
        """POST to every worker; a refusal (HTTP 4xx, or `success: false`) raises
        `TeacherError` naming the worker and SGLang's message."""
        answers = []
        for url in self.workers.urls:
            try:
                answer, _ = self.workers.request(
                    "POST", path, body, url=url, label=f"POST {path}", refused_ok=True
                )
            except TeacherError as e:
                raise TeacherError(f"rollout engine: {e}") from None
            if not isinstance(answer, dict) or answer.get("success") is False:
                message = answer.get("message") if isinstance(answer, dict) else answer
                raise TeacherError(f"rollout engine: {url}{path} failed: {str(message)[:300]}")
            answers.append(answer)
        return answers

    def close(self) -> None:
        """Close the HTTP connections and the weight-update group."""
        if self._group is not None:
            import torch.distributed as dist

            for url in self.workers.urls:  # best effort: a dead server has no group anyway
                try:
                    self.workers.request(
                        "POST", "/destroy_weights_update_group", {"group_name": self._group_name},
                        url=url, label="destroy_weights_update_group", refused_ok=True,
                    )  # fmt: skip
                except TeacherError:
                    pass
            try:
                dist.destroy_process_group(self._group)
            except (RuntimeError, ValueError):
                pass
            self._group = None
        self.client.close()
        if self._workers is not None and self._workers is not self.client:
            self._workers.close()


def _decode_routed_experts(b64: str | None, num_tokens: int):
    """SGLang's base64 int32 routing of `num_tokens` tokens as an int32 tensor
    [num_tokens, num_layers * top_k] (the trainer splits the last axis by its top_k)."""
    if b64 is None:
        return None
    import base64

    import numpy as np
    import torch

    flat = np.frombuffer(base64.b64decode(b64), dtype=np.int32)
    if num_tokens <= 0 or flat.size % num_tokens:
        raise TeacherError(
            f"rollout engine: routed_experts has {flat.size} ids, not a multiple of the "
            f"{num_tokens} tokens fed to the model"
        )
    return torch.from_numpy(flat.copy()).view(num_tokens, -1)


def _router_workers(client: SGLangClient, url: str) -> list[str]:
    """The worker URLs behind `url` if it is an sglang-router (`GET /workers`), else []."""
    try:
        answer, _ = client.request("GET", "/workers", url=url, label="GET /workers")
    except TeacherError:
        return []  # a plain SGLang server has no /workers
    workers = answer.get("workers") if isinstance(answer, dict) else None
    if not isinstance(workers, list):
        return []
    return [w["url"] for w in workers if isinstance(w, dict) and isinstance(w.get("url"), str)]
