"""The installers of the megatron-core CPU patches and the CPU stand-ins they install.

Split from `megatron_core.py`, which holds the table of patches (`PATCHES`), the recorded
upstream signatures and `apply` / `revert`; `apply` calls the installer each patch names
(`Patch.install`) from this module. Every change goes through `megatron_core._setattr`, so
`revert()` undoes it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .megatron_core import _MC, PATCHES, MegatronPatchError, _setattr


def _replace_function(module_name: str, name: str, new: Callable) -> Callable:
    """Replace module-level function `name` in its module and wherever a loaded megatron
    module imported it by name; return the original."""
    module = importlib.import_module(module_name)
    old = getattr(module, name)
    functools.update_wrapper(new, old)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("megatron."):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                _setattr(mod, attr, new)
    return old


def _replace_method(target: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace method `Class.name` (given as "module:Class.name") by `wrap(original)`."""
    module_name, _, qualname = target.partition(":")
    cls_path, _, name = qualname.rpartition(".")
    owner: Any = importlib.import_module(module_name)
    for part in cls_path.split("."):
        owner = getattr(owner, part)
    raw = vars(owner)[name]
    if isinstance(raw, staticmethod | classmethod):
        kind = type(raw)
        new = kind(functools.update_wrapper(wrap(raw.__func__), raw.__func__))
    else:
        new = functools.update_wrapper(wrap(raw), raw)
    _setattr(owner, name, new)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


# --------------------------------------------------------------------------------------
# rng_tracker


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    name_default = "default-rng"

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # As upstream, minus its "CPU RNG state changed" warning: here the CPU default
        # generator *is* the generator whose states the tracker swaps.
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != name_default:
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current rng state {self._current_state_name} is not {name} on exit"
                )
            self.states_[name] = torch.get_rng_state()
            if outer_name != name_default:
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name

    mod = mrandom.__name__
    _replace_function(mod, "_get_cuda_rng_state", get_state)
    _replace_function(mod, "_set_cuda_rng_state", set_state)
    _replace_method(f"{mod}:CudaRNGStatesTracker.add", lambda orig: add)
    _replace_method(f"{mod}:CudaRNGStatesTracker.fork", lambda orig: fork)


# --------------------------------------------------------------------------------------
# cpu_torch_namespace


class _NullEvent:
    """A CUDA event stand-in: recording and waiting are no-ops on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NullStream:
    """A CUDA stream stand-in: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


_NULL_STREAM = _NullStream()


class _NullNvtx:
    @staticmethod
    def range_push(msg: str) -> None:
        pass

    @staticmethod
    def range_pop() -> None:
        pass

    @staticmethod
    @contextlib.contextmanager
    def range(msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield


class _CpuCudaNamespace(types.ModuleType):
    """Stands in for `torch.cuda` inside the patched megatron modules."""

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda on a CPU-only machine (megatron patches)")
        self.current_device = lambda: torch.device("cpu")
        self.Stream = _NullStream
        self.Event = _NullEvent
        self.stream = lambda stream=None: contextlib.nullcontext()
        self.current_stream = lambda device=None: _NULL_STREAM
        self.default_stream = lambda device=None: _NULL_STREAM
        self.synchronize = lambda device=None: None
        self.empty_cache = lambda: None
        self.is_current_stream_capturing = lambda: False
        self.nvtx = _NullNvtx

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return factory


class _CpuTorchView(types.ModuleType):
    """`torch` as seen by a patched megatron module: the real objects, except `cuda` and
    the tensor factories that megatron calls with `device="cuda"`."""

    FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange")

    def __init__(self) -> None:
        super().__init__("torch", "torch with a CPU `cuda` namespace (megatron patches)")
        for key, value in vars(torch).items():
            if not key.startswith("__"):
                self.__dict__[key] = value
        self.cuda = _CpuCudaNamespace()
        for name in self.FACTORIES:
            self.__dict__[name] = _cpu_factory(getattr(torch, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _view_modules() -> list[str]:
    patch = next(p for p in PATCHES if p.name == "cpu_torch_namespace")
    return sorted({t.partition(":")[0] for t in patch.targets})


def _install_cpu_torch_namespace() -> None:
    view = _CpuTorchView()
    for name in _view_modules():
        module = importlib.import_module(name)
        if vars(module).get("torch") is not torch:
            raise MegatronPatchError(f"{name} does not bind `torch` at module level")
        _setattr(module, "torch", view)


# --------------------------------------------------------------------------------------
# alltoall_split_sizes


def _install_alltoall_split_sizes() -> None:
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts only CUDA tensors; gloo needs plain sequences as split sizes.
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu()
            if as_numpy:
                return tensor.numpy()
        return tensor

    _replace_function(
        f"{_MC}.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu
    )


# --------------------------------------------------------------------------------------
# uneven_gather_scatter


def _install_uneven_gather_scatter() -> None:
    mod = f"{_MC}.tensor_parallel.mappings"
    mappings = importlib.import_module(mod)
    orig_gather = mappings._gather_along_first_dim
    orig_scatter = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig_gather(input_, group, None, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((width * len(sizes), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        return torch.cat([gathered[i * width : i * width + s] for i, s in enumerate(sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return orig_scatter(input_, group, None, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    _replace_function(mod, "_gather_along_first_dim", gather)
    _replace_function(mod, "_reduce_scatter_along_first_dim", reduce_scatter)


# --------------------------------------------------------------------------------------
# sequence_parallel_norm


def _install_sequence_parallel_norm() -> None:
    def wrap(orig_new: Callable) -> Callable:
        def __new__(
            cls,
            config,
            hidden_size,
            eps=1e-5,
            persist_layer_norm=False,
            zero_centered_gamma=False,
            normalization="LayerNorm",
        ):
            if not config.sequence_parallel:
                return orig_new(
                    cls,
                    config,
                    hidden_size,
                    eps,
                    persist_layer_norm,
                    zero_centered_gamma,
                    normalization,
                )
            # Build the same torch norm with sequence parallelism off, then mark its
            # parameters so their gradients are summed over the TP group.
            config_nosp = _ConfigWithoutSP(config)
            norm = orig_new(
                cls,
                config_nosp,
                hidden_size,
                eps,
                persist_layer_norm,
                zero_centered_gamma,
                normalization,
            )
            for param in norm.parameters():
                param.sequence_parallel = True
            return norm

        return __new__

    _replace_method(f"{_MC}.transformer.torch_norm:WrappedTorchNorm.__new__", wrap)


class _ConfigWithoutSP:
    """A read-only view of a TransformerConfig with `sequence_parallel=False`."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name == "sequence_parallel":
            return False
        return getattr(self._config, name)


# --------------------------------------------------------------------------------------
# checkpoint_without_output_fp8


def _install_checkpoint_without_output_fp8() -> None:
    def wrap(orig: Callable) -> Callable:
        def __init__(self: Any, fp8: Any = False) -> None:
            # upstream: `self.fp8 = fp8 is not None`, True for the default False
            orig(self, fp8=None if fp8 is False else fp8)

        return __init__

    _replace_method(f"{_MC}.tensor_parallel.random:CheckpointWithoutOutput.__init__", wrap)


# --------------------------------------------------------------------------------------
# te_general_gemm


def _install_te_general_gemm() -> None:
    moe_utils = importlib.import_module(f"{_MC}.transformer.moe.moe_utils")
    if "te_general_gemm" not in vars(moe_utils):
        _setattr(moe_utils, "te_general_gemm", None)


# --------------------------------------------------------------------------------------
# cuda_tensor_names

_CUDA_NAMES_DEPTH = 0


@contextlib.contextmanager
def cuda_tensor_names() -> Iterator[None]:
    """Inside: `Tensor.type()` names CPU tensors as CUDA ones (`torch.FloatTensor` ->
    `torch.cuda.FloatTensor`) and `Tensor.cuda()` returns the tensor itself."""
    global _CUDA_NAMES_DEPTH
    if _CUDA_NAMES_DEPTH:
        _CUDA_NAMES_DEPTH += 1
        try:
            yield
        finally:
            _CUDA_NAMES_DEPTH -= 1
        return
    base_type = torch.Tensor.type

    def type_(self, *args: Any, **kwargs: Any) -> Any:
        result = base_type(self, *args, **kwargs)
        if not args and not kwargs and result.startswith("torch.") and ".cuda." not in result:
            return "torch.cuda." + result[len("torch.") :]
        return result

    def cuda_(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    saved = {k: vars(torch.Tensor).get(k) for k in ("type", "cuda")}
    torch.Tensor.type = type_
    torch.Tensor.cuda = cuda_
    _CUDA_NAMES_DEPTH = 1
    try:
        yield
    finally:
        _CUDA_NAMES_DEPTH = 0
        for key, value in saved.items():
            if value is None:
                delattr(torch.Tensor, key)
            else:
                setattr(torch.Tensor, key, value)


def _with_cuda_tensor_names(fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_tensor_names():
            return fn(*args, **kwargs)

    return wrapper


def _install_cuda_tensor_names() -> None:
    patch = next(p for p in PATCHES if p.name == "cuda_tensor_names")
    for target in patch.targets:
        module_name, _, qualname = target.partition(":")
        if "." in qualname:
            _replace_method(target, _with_cuda_tensor_names)
        else:
            module = importlib.import_module(module_name)
            _replace_function(
                module_name, qualname, _with_cuda_tensor_names(getattr(module, qualname))
            )
