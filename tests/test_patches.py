"""The megatron-core CPU patches: idempotent, CUDA-gated, loud on upstream changes.

These run in the pytest process (importing megatron-core once, ~3 s). Every test leaves
the patches applied or not as it found them.
"""

from __future__ import annotations

import importlib

import pytest
import torch

megatron_core = pytest.importorskip("megatron_mopd.patches.megatron_core")


@pytest.fixture
def restore_patches():
    """Leave the patches as they were before the test."""
    was_applied = megatron_core.is_applied()
    yield
    megatron_core.revert()
    if was_applied:
        megatron_core.apply()


def _utils_module():
    return importlib.import_module("megatron.core.transformer.utils")


def test_apply_is_idempotent(restore_patches):
    megatron_core.revert()
    assert megatron_core.apply() is True
    view = _utils_module().torch
    undo_count = len(megatron_core._UNDO)
    assert view is not torch
    assert megatron_core.apply() is True
    assert _utils_module().torch is view
    assert len(megatron_core._UNDO) == undo_count


def test_table_covers_every_target():
    names = [p.name for p in megatron_core.PATCHES]
    assert len(names) == len(set(names))
    for patch in megatron_core.PATCHES:
        assert patch.version == megatron_core.MEGATRON_CORE_VERSION
        assert patch.why and patch.targets
        assert callable(getattr(megatron_core._installers(), patch.install))
        for target in patch.targets:
            assert target in megatron_core._RECORDED_SIGNATURES, target


def test_not_applied_when_cuda_is_available(restore_patches, monkeypatch):
    megatron_core.revert()
    original = importlib.import_module("megatron.core.tensor_parallel.random")._get_cuda_rng_state
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert megatron_core.apply() is False
    assert not megatron_core.is_applied()
    assert _utils_module().torch is torch
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    assert random_mod._get_cuda_rng_state is original


def test_revert_restores_upstream(restore_patches):
    megatron_core.revert()
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    before = (random_mod._get_cuda_rng_state, random_mod.CudaRNGStatesTracker.__dict__["fork"])
    megatron_core.apply()
    assert random_mod._get_cuda_rng_state is not before[0]
    megatron_core.revert()
    after = (random_mod._get_cuda_rng_state, random_mod.CudaRNGStatesTracker.__dict__["fork"])
    assert after == before
    assert _utils_module().torch is torch


def test_signature_change_is_detected(restore_patches, monkeypatch):
    megatron_core.revert()
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")

    def changed(tensor, as_numpy=False, record_stream=False, new_argument=None):
        return tensor

    monkeypatch.setattr(moe_utils, "maybe_move_tensor_to_cpu", changed)
    with pytest.raises(megatron_core.MegatronPatchError, match="maybe_move_tensor_to_cpu"):
        megatron_core.apply()
    assert not megatron_core.is_applied()
    assert _utils_module().torch is torch  # checked before anything was changed


def test_version_mismatch_is_detected(restore_patches, monkeypatch):
    megatron_core.revert()
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(megatron_core.MegatronPatchError, match="0.99.0"):
        megatron_core.apply()


def test_patched_functions_work_on_cpu(restore_patches):
    megatron_core.apply()
    mask = _utils_module().get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool and mask[0, 1] and not mask[1, 0]

    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker = random_mod.CudaRNGStatesTracker()
    tracker.add("a", 11)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
    with tracker.fork("a"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the tracked stream advanced
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), first)

    param = torch.nn.Parameter(torch.zeros(2))
    with megatron_core.cuda_tensor_names():
        assert param.type() == "torch.cuda.FloatTensor"
        assert param.cuda() is param
        assert param.type(torch.float64).dtype == torch.float64
    assert param.type() == "torch.FloatTensor"

    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert splits.tolist() == [1, 2] and not torch.is_tensor(splits)
    assert moe_utils.te_general_gemm is None
