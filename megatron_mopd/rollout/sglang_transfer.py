"""The in-memory weight paths of `rollout.sglang.SGLangRolloutEngine`: buckets flattened
into one buffer, torch's multiprocessing pickling for `/update_weights_from_tensor`, the
process group with the servers for `/update_weights_from_distributed`, and the HTTP calls
that must run while this process takes part in a collective (posted from threads).
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
from typing import Any

from megatron_mopd.errors import TeacherError
from megatron_mopd.sglang.client import SGLangClient

NamedTensors = list[tuple[str, Any]]


def flatten_bucket(bucket: NamedTensors, align: int, shared: bool):
    """Copy a bucket's tensors into one flat byte buffer, each at an offset that is a
    multiple of `align` bytes (and of its element size; `align=0`: back to back, as SGLang's
    `flattened_bucket` receiver expects, which must then fall on element boundaries);
    return (buffer, [(name, view of
    the buffer)]). Each entry of `bucket` is set to None once copied, so a tensor made for
    the bucket (a gathered shard) is freed at once: the peak is about one bucket plus one
    tensor. With `shared`, a CPU buffer is allocated in shared memory (for the tensor path,
    so pickling it does not copy it again)."""
    import torch

    if not bucket:
        raise ValueError("an empty bucket")
    layout, size = [], 0
    for name, t in bucket:
        if align:
            step = max(align, t.element_size())
            size = -(-size // step) * step
        elif size % t.element_size():
            raise ValueError(
                f"weight sync bucket: {name} ({t.dtype}) would start at byte {size}, not a "
                "multiple of its element size; do not mix dtypes of other sizes in one bucket"
            )
        layout.append((name, size, t.dtype, t.shape))
        size += t.numel() * t.element_size()
    device = bucket[0][1].device
    flat = torch.empty(size, dtype=torch.uint8, device=device)
    if shared and device.type == "cpu":
        with _file_system_sharing():  # as `serialize_named_tensors` pickles it: no move
            flat.share_memory_()
    views = []
    for i, (name, offset, dtype, shape) in enumerate(layout):
        t = bucket[i][1].detach()
        n = t.numel() * t.element_size()
        flat[offset : offset + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        bucket[i] = None  # type: ignore[call-overload]
        del t
        views.append((name, flat[offset : offset + n].view(dtype).view(shape)))
    return flat, views


def serialize_named_tensors(named: NamedTensors) -> str:
    """`named` pickled the way SGLang's `MultiprocessingSerializer.deserialize` reads it
    (torch's multiprocessing reductions: no tensor data in the payload), base64-encoded.

    CPU tensors are moved into shared-memory files named in the payload (torch's
    `file_system` sharing strategy: the receiver is not our child, so file descriptors
    cannot be passed). CUDA tensors become CUDA IPC handles whose device is written as the
    GPU's UUID, which SGLang maps back to its own device index (UNTESTED HERE).
    """
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    with _file_system_sharing():
        pickler = ForkingPickler(buf)
        if any(getattr(t, "is_cuda", False) for _, t in named):  # pragma: no cover - GPU only
            pickler.dispatch_table = _cuda_uuid_dispatch(pickler.dispatch_table)
        pickler.dump(named)
    return base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def _file_system_sharing():
    """torch's `file_system` sharing strategy for CPU storages, for the `with` block (a
    storage shared under another strategy would be copied again when pickled)."""
    import torch.multiprocessing as tmp

    previous = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        tmp.set_sharing_strategy(previous)


def _cuda_uuid_dispatch(table: dict) -> dict:  # pragma: no cover - GPU only, untested here
    """A copy of ForkingPickler's dispatch table whose tensor reduction writes the CUDA
    device as its UUID (argument 6 of `rebuild_cuda_tensor`), as SGLang's receiver expects
    when trainer and server see the GPUs under other indices."""
    import torch
    from torch.multiprocessing import reductions

    def reduce_tensor(t):
        fn, args = reductions.reduce_tensor(t)
        if fn is reductions.rebuild_cuda_tensor:
            device = args[6]
            args = (*args[:6], str(torch.cuda.get_device_properties(device).uuid), *args[7:])
        return fn, args

    table = dict(table)
    for cls in (torch.Tensor, torch.nn.Parameter):
        table[cls] = reduce_tensor
    return table


def trainer_process_group(
    backend: str, address: str, port: int, world_size: int, group_name: str, timeout: float
):
    """A process group of rank 0 (this trainer process) with the servers' ranks, made
    outside the trainer's default group. This process hosts the group's TCP store at
    `address:port`, which the servers join (SGLang's `init_custom_process_group` does a
    `tcp://` rendezvous). The store is made here rather than by torch's `tcp://`
    rendezvous: under torchrun (`TORCHELASTIC_USE_AGENT_STORE`) that rendezvous makes
    rank 0 a client of the agent's store, and no one would serve this port."""
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    wait = timedelta(seconds=timeout)
    store = dist.TCPStore(address, port, world_size, is_master=True, timeout=wait)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size,
        0,
        [],
        c10d.Backend(backend),
        store,
        group_name=group_name,
        timeout=wait,
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def post_each_in_threads(client: SGLangClient, path: str, bodies: list[dict]) -> list:
    calls = []
    for url, body in zip(client.urls, bodies):
        box: dict = {}

        def call(url=url, body=body, box=box) -> None:
            try:
                box["answer"] = client.request(
                    "POST", path, body, label=path, url=url, refused_ok=True
                )[0]
            except BaseException as e:  # noqa: BLE001 - re-raised by _join_calls
                box["error"] = e

        t = threading.Thread(target=call, daemon=True)
        t.start()
        calls.append((url, t, box))
    return calls


def succeeded(box: dict) -> bool:
    answer = box.get("answer")
    return "error" not in box and isinstance(answer, dict) and answer.get("success") is not False


def join_calls(calls: list, path: str) -> None:
    for url, t, box in calls:
        t.join()
        if "error" in box:
            raise TeacherError(f"rollout engine: {url}{path}: {box['error']}")
        answer = box.get("answer")
        if not isinstance(answer, dict) or answer.get("success") is False:
            message = answer.get("message") if isinstance(answer, dict) else answer
            raise TeacherError(f"rollout engine: {url}{path} failed: {str(message)[:300]}")
