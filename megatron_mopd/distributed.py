"""Process groups and the parallel layout, from the torchrun environment.

    layout = init_distributed(cfg.parallel, cfg.model, seed=cfg.train.seed)
    ...  # build the model, train; pass layout.dp_group etc. to our own code
    destroy()

`init_distributed` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); without them it runs as a single process (world size 1, an
in-process store, no port). The backend is gloo on CPU and NCCL on GPU
(`parallel.backend="auto"`). It checks the layout against the world size *before* any
process group exists (`config.check_world_size`), applies the megatron-core CPU patches
when CUDA is absent, creates megatron's model-parallel groups (TP/PP/EP/ETP, DP is what
is left) and seeds every RNG. It returns a `ParallelLayout`: ranks, sizes and groups,
which our own code receives explicitly instead of reading megatron's globals. Under
torchrun each rank also watches its launcher and exits when it is gone
(`exit_with_launcher`), so a killed torchrun leaves no rank behind.

Left out: virtual pipeline stages, context parallelism and multiple distributed-optimizer
instances (megatron supports them; nothing here needs them yet, and each changes the
schedule or the groups in ways the tests do not cover).
"""

from __future__ import annotations

import datetime
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_mopd.config import ModelConfig, ParallelConfig, check_layout, check_world_size
from megatron_mopd.errors import ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the parallel layout, and the groups it belongs to.

    Sizes: `tp`, `pp`, `ep`, `etp`, `dp` (data-parallel size for dense layers) and
    `edp` (expert-data-parallel size: DP for expert layers, `tp * dp / (ep * etp)`).
    Groups are `torch.distributed` process groups; `pg_collection` is megatron's
    `ProcessGroupCollection` of the same groups, for megatron APIs that take one.
    """

    world_size: int
    rank: int
    local_rank: int
    backend: str
    device: torch.device
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    edp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    etp_rank: int
    edp_rank: int
    sequence_parallel: bool
    tp_group: Any = field(repr=False)
    pp_group: Any = field(repr=False)
    dp_group: Any = field(repr=False)
    ep_group: Any = field(repr=False)
    etp_group: Any = field(repr=False)
    edp_group: Any = field(repr=False)
    mp_group: Any = field(repr=False)  # TP x PP: the ranks holding one model replica
    pg_collection: Any = field(repr=False)

    @property
    def is_first_stage(self) -> bool:
        """True on the first pipeline stage (it holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (it holds the output layer and the loss)."""
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (logging, files written once)."""
        return self.rank == 0

    @property
    def last_stage_rank(self) -> int:
        """The global rank of the last pipeline stage in this process's PP group."""
        return dist.get_global_rank(self.pp_group, self.pp - 1)


_CREATED_PROCESS_GROUP = False
_LAUNCHER_WATCH: threading.Thread | None = None  # exit_with_launcher, started once


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    return rank, world_size, local_rank


def exit_with_launcher(poll_seconds: float = 2.0) -> threading.Thread | None:
    """Under torchrun (`TORCHELASTIC_RUN_ID` set): a daemon thread that ends this rank
    when its launcher is gone, so no rank outlives torchrun.

    torchrun takes the other ranks down when one dies (SIGTERM, then SIGKILL after its
    grace period), but a launcher killed itself first (SIGKILL, out of memory) leaves its
    ranks behind, asleep in a collective with the dead rank until the process group's
    timeout (`parallel.timeout_minutes`), holding their memory (on GPU clusters: the
    GPUs). The thread polls the parent pid every `poll_seconds` (collectives release the
    interpreter lock while they wait) and, once this rank has been re-parented, says so
    on stderr and exits with status 1 at once (`os._exit`: the main thread is blocked, and
    a checkpoint half written stays an unpublished `tmp.` folder). Not started outside
    torchrun: a plain `python -m megatron_mopd train` may outlive its shell (nohup).
    Returns the thread, or None when not started.
    """
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    launcher = os.getppid()
    rank = os.environ.get("RANK", "?")

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        sys.stderr.write(
            f"mopd rank {rank} (pid {os.getpid()}): its torchrun launcher (pid {launcher}) "
            "is gone; exiting\n"
        )
        sys.stderr.flush()
        os._exit(1)

    thread = threading.Thread(target=watch, name="mopd-launcher-watch", daemon=True)
    thread.start()
    return thread


def resolve_backend(parallel: ParallelConfig) -> str:
    """`parallel.backend`, with "auto" meaning NCCL when CUDA is available, else gloo."""
    if parallel.backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if parallel.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    return parallel.backend


def init_distributed(
    parallel: ParallelConfig,
    model: ModelConfig | None = None,
    seed: int = 1234,
) -> ParallelLayout:
    """Create the process groups of `parallel` and seed every RNG; return the layout.

    Works under torchrun and, with world size 1, without it. An existing default process
    group (e.g. kept by `destroy(keep_process_group=True)`) is reused. When `model` is
    given its layout constraints are checked too. Raises `ConfigError` (before any group
    is created) when the layout does not fit the world size or the model.
    """
    from megatron.core import parallel_state

    rank, world_size, local_rank = torchrun_env()
    global _LAUNCHER_WATCH
    if _LAUNCHER_WATCH is None:
        _LAUNCHER_WATCH = exit_with_launcher()
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    check_world_size(parallel, world_size)
    if model is not None:
        check_layout(model, parallel)
    backend = resolve_backend(parallel)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not torch.cuda.is_available():
        from megatron_mopd.patches import megatron_core

        megatron_core.apply()

    timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
    global _CREATED_PROCESS_GROUP
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ or world_size > 1:
            dist.init_process_group(
                backend=backend, rank=rank, world_size=world_size, timeout=timeout
            )
        else:  # a lone process: an in-process store, no port needed
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        _CREATED_PROCESS_GROUP = True
    elif dist.get_backend() != backend:
        raise ConfigError(
            f"a {dist.get_backend()} process group already exists but parallel.backend "
            f"resolves to {backend}"
        )

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron's model-parallel groups already exist: call "
            "megatron_mopd.distributed.destroy() before init_distributed() again"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        distributed_timeout_minutes=max(1, int(parallel.timeout_minutes)),
    )
    seed_everything(seed)
    return current_layout(parallel, model)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch identically on every rank, and megatron's RNG tracker
    (model-parallel, expert-parallel and data-parallel states; CPU generators on CPU)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def current_layout(parallel: ParallelConfig, model: ModelConfig | None = None) -> ParallelLayout:
    """The `ParallelLayout` of megatron's current groups (after `init_distributed`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    rank, _, local_rank = torchrun_env()
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=local_rank,
        backend=backend,
        device=device,
        tp=tp,
        pp=pp,
        ep=ep,
        etp=etp,
        dp=ps.get_data_parallel_world_size(),
        edp=ps.get_expert_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        sequence_parallel=sequence_parallel_enabled(parallel, model),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        edp_group=ps.get_expert_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def sequence_parallel_enabled(parallel: ParallelConfig, model: ModelConfig | None) -> bool:
    """Sequence parallelism: `parallel.sequence_parallel`, or when unset, on for MoE
    models with TP > 1 (megatron-core requires it there) and off otherwise."""
    if parallel.tp == 1:
        return False
    if parallel.sequence_parallel is not None:
        return parallel.sequence_parallel
    return bool(model is not None and model.is_moe)


def destroy(keep_process_group: bool = False) -> None:
    """Tear down megatron's model-parallel groups and (unless `keep_process_group`, or it
    was not created by `init_distributed`) the default process group."""
    from megatron.core import parallel_state

    global _CREATED_PROCESS_GROUP
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _CREATED_PROCESS_GROUP and not keep_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _CREATED_PROCESS_GROUP = False
