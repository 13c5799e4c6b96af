"""The student's rollouts sampled by SGLang over HTTP (worker URLs or one sglang-router).

    engine = SGLangRolloutEngine(cfg.rollout)          # waits for /health_generate
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=64, seed=step))
    engine.update_weights_from_disk("/ckpt/hf_step_10", weight_version="10")

Sampling posts `/generate` with `return_logprob: true` and `logprob_start_len: -1`, so
each answer carries `meta_info.output_token_logprobs` = log mu of every sampled token
(stop token included). SGLang scales those log-probs by the temperature unless it runs
with `SGLANG_RETURN_ORIGINAL_LOGPROB=1` (SGLANG_API.md): MOPD samples at temperature 1
(`rollout.temperature` refuses anything else), where both agree. A seeded call sends
per-prompt `sampling_seed`s derived from `SamplingParams.seed` (the same derivation as
the embedded engine), so repeated prompts get different samples.

Weight sync, three ways:
- `update_weights_from_disk(hf_dir, version)`: every URL reloads an HF folder (shared
  filesystem). Works, and is tested here against `mopd serve`.
- `update_weights_from_tensor(named_tensors, version)`: same-node CUDA IPC handles
  (`/update_weights_from_tensor`). **Written for GPU clusters; untested here.**
- `init_weights_update_group(...)` then `update_weights_from_distributed(named_tensors,
  version)`: the trainer joins an NCCL group with the servers' ranks as rank 0 and
  broadcasts each tensor while the servers receive it (`/init_weights_update_group`,
  `/update_weights_from_distributed`). **Written for GPU clusters; untested here**
  (needs SGLang on GPUs; its tests are marked `gpu`).

With one sglang-router URL, sampling goes through the router, while weight updates and
`/model_info` go to every worker: sglang-router 0.3.2 does not forward those endpoints,
so the workers are read from the router's `GET /workers` (or given as `worker_urls`).
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterable, Sequence

from megatron_mopd.config import RolloutConfig
from megatron_mopd.errors import TeacherError, UserError
from megatron_mopd.rollout.base import RolloutEngine
from megatron_mopd.sglang_client import SGLangClient
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
    ) -> None:
        """Sample through `cfg.urls`; weight updates go to `worker_urls` (default: the
        URLs themselves, or the workers behind a router, from its `GET /workers`)."""
        self.cfg = cfg
        self.client = client or self._client(cfg.urls)
        self._workers = self._client(worker_urls) if worker_urls else None
        self._version: str | None = None
        self._group = None
        self._group_name: str | None = None
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
        )

    @property
    def weight_version(self) -> str:
        """The weight version the servers reported with the latest rollouts (or set last)."""
        if self._version is None:
            info = self.workers.model_info()
            self._version = str(info.get("weight_version"))
        return self._version

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One `Rollout` per prompt, in order, with log mu of every sampled token."""
        if not prompts:
            return []
        base = {
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "stop_token_ids": list(sampling.stop_token_ids),
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        if sampling.seed is None:
            params: dict | list[dict] = base
        else:
            params = [
                dict(base, sampling_seed=s) for s in _request_seeds(sampling.seed, len(prompts))
            ]
        try:
            gens = self.client.generate(prompts, params, batch_size=self.cfg.batch_size)
        except TeacherError as e:
            raise TeacherError(f"rollout engine: {e}") from None
        rollouts = []
        for prompt, g in zip(prompts, gens):
            version = str(g.weight_version)
            rollouts.append(
                Rollout(
                    prompt_ids=list(prompt),
                    response_ids=g.output_ids,
                    rollout_logprobs=g.logprobs,
                    finish_reason=g.finish_reason["type"],
                    weight_version=version,
                )
            )
            self._version = version
        return rollouts

    @property
    def workers(self) -> SGLangClient:
        """A client of every worker (the router's workers when a URL is a router)."""
        if self._workers is None:
            urls: list[str] = []
            for url in self.client.urls:
                urls.extend(_router_workers(self.client, url) or [url])
            self._workers = self._client(urls) if urls != self.client.urls else self.client
        return self._workers

    def update_weights_from_disk(self, hf_dir: str, weight_version: str) -> None:
        """Every worker reloads its weights from `hf_dir` (an HF folder it can read)."""
        body = {"model_path": hf_dir, "weight_version": weight_version, "flush_cache": True}
        self._post_workers("/update_weights_from_disk", body)
        self._version = weight_version

    def flush_cache(self) -> None:
        """Clear every worker's prefix cache."""
        self._post_workers("/flush_cache", None)

    def _post_workers(self, path: str, body: dict | None) -> list:
        try:
            answers = self.workers.post_all(path, body)
        except TeacherError as e:
            raise TeacherError(f"rollout engine: {e}") from None
        for url, answer in zip(self.workers.urls, answers):
            if isinstance(answer, dict) and answer.get("success") is False:
                raise TeacherError(f"rollout engine: {url}{path} failed: {answer.get('message')}")
        return answers

    # ------------------------------------------------------------------------------
    # GPU-cluster paths: written against sglang 0.5.23's API, untested on this machine.

    def update_weights_from_tensor(
        self,
        named_tensors: Iterable[tuple[str, object]],
        weight_version: str,
        tp_size: int = 1,
        load_format: str | None = None,
    ) -> None:
        """UNTESTED HERE (GPU only). Send CUDA tensors to servers on the same node.

        The tensors are pickled with torch's multiprocessing reductions (CUDA IPC handles,
        no copy) and base64-encoded, one entry per server TP rank, as
        `/update_weights_from_tensor` expects. When sglang is installed its own
        serializer is used, so sender and receiver agree on the encoding.
        """
        payload = _serialize_for_ipc(list(named_tensors))
        body = {
            "serialized_named_tensors": [payload] * tp_size,
            "load_format": load_format,
            "flush_cache": True,
            "weight_version": weight_version,
        }
        self._post_workers("/update_weights_from_tensor", body)
        self._version = weight_version

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        ranks_per_server: int = 1,
        group_name: str = "mopd_weight_update",
        backend: str = "nccl",
        timeout_seconds: float = 600.0,
    ) -> None:
        """UNTESTED HERE (GPU only). Form the broadcast group: the trainer is rank 0, server
        `k`'s TP ranks are `1 + k * ranks_per_server ...`. Call on one trainer rank."""
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
        # the servers block in the rendezvous until rank 0 joins: post from threads
        calls = _post_each_in_threads(self.workers, "/init_weights_update_group", bodies)
        self._group = _trainer_process_group(
            backend, master_address, master_port, world_size, group_name, timeout_seconds
        )
        self._group_name = group_name
        _join_calls(calls, "/init_weights_update_group")

    def update_weights_from_distributed(
        self, named_tensors: Sequence[tuple[str, object]], weight_version: str
    ) -> None:
        """UNTESTED HERE (GPU only). Broadcast named tensors (on the trainer's GPU) from
        rank 0 of the group made by `init_weights_update_group`."""
        import torch.distributed as dist

        if self._group is None:
            raise UserError("call init_weights_update_group before update_weights_from_distributed")
        body = {
            "names": [n for n, _ in named_tensors],
            "dtypes": [str(t.dtype).replace("torch.", "") for _, t in named_tensors],
            "shapes": [list(t.shape) for _, t in named_tensors],
            "group_name": self._group_name,
            "flush_cache": True,
            "weight_version": weight_version,
        }
        calls = _post_each_in_threads(
            self.workers, "/update_weights_from_distributed", [body] * len(self.workers.urls)
        )
        handles = [
            dist.broadcast(t, src=0, group=self._group, async_op=True) for _, t in named_tensors
        ]
        for h in handles:
            h.wait()
        _join_calls(calls, "/update_weights_from_distributed")
        self._version = weight_version

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()
        if self._workers is not None and self._workers is not self.client:
            self._workers.close()


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


# ----------------------------------------------------------------------------------
# helpers of the GPU paths (untested here)


def _serialize_for_ipc(named_tensors: list) -> str:
    try:  # the receiver decodes with sglang's serializer: use the same one when present
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
        return MultiprocessingSerializer.serialize(named_tensors, output_str=True)
    except ImportError:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401 - registers the tensor reductions

        buf = io.BytesIO()
        ForkingPickler(buf).dump(named_tensors)
        return base64.b64encode(buf.getvalue()).decode()


def _trainer_process_group(
    backend: str, address: str, port: int, world_size: int, group_name: str, timeout: float
):
    """A process group of rank 0 (this trainer process) with the servers' ranks, made
    outside the trainer's default group (a TCP rendezvous of its own)."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    store, rank, size = next(
        c10d.rendezvous(
            f"tcp://{address}:{port}", 0, world_size, timeout=timedelta(seconds=timeout)
        )
    )
    store.set_timeout(timedelta(seconds=timeout))
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        size,
        rank,
        [],
        c10d.Backend(backend),
        store,
        group_name=group_name,
        timeout=timedelta(seconds=timeout),
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(size)}
    return pg


def _post_each_in_threads(client: SGLangClient, path: str, bodies: list[dict]) -> list:
    calls = []
    for url, body in zip(client.urls, bodies):
        box: dict = {}

        def call(url=url, body=body, box=box) -> None:
            try:
                box["answer"] = client.request("POST", path, body, label=path, url=url)[0]
            except BaseException as e:  # noqa: BLE001 - re-raised by _join_calls
                box["error"] = e

        t = threading.Thread(target=call, daemon=True)
        t.start()
        calls.append((url, t, box))
    return calls


def _join_calls(calls: list, path: str) -> None:
    for url, t, box in calls:
        t.join()
        if "error" in box:
            raise TeacherError(f"rollout engine: {url}{path}: {box['error']}")
        answer = box.get("answer")
        if isinstance(answer, dict) and answer.get("success") is False:
            raise TeacherError(f"rollout engine: {url}{path} failed: {answer.get('message')}")
