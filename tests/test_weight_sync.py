"""Weight sync from a TP2 Megatron student into the embedded engine and an SGLang server."""

from __future__ import annotations

import os

import pytest
from multirank import start_workers

from megatron_mopd.toy.tiny import make_tiny_hf_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "weight_sync_cases.py")


@pytest.mark.multirank
def test_sync_weights_embedded_and_disk(tmp_path):
    from megatron_mopd.server.app import SGLangCompatibleServer

    hf = make_tiny_hf_model("qwen3_moe", str(tmp_path / "student"), seed=0)
    server = SGLangCompatibleServer(hf, port=0)
    server.start(background_load=False)
    try:
        run_dir = tmp_path / "run"
        launch = start_workers(
            WORKER,
            nproc=2,
            args=["--hf", hf, "--run-dir", str(run_dir), "--server-url", server.url],
            timeout=240,
        )
        rank0, _ = launch.wait()
    finally:
        server.shutdown()

    assert rank0["embedded_version"] == ("step_1", "step_1")
    assert rank0["embedded_max_diff"] < 1e-6  # the engine holds exactly the student's weights

    assert rank0["disk_version"] == ("step_3", "step_3", "step_3")
    assert rank0["disk_model_path"] == str(run_dir / "weights" / "step_3")
    assert rank0["disk_folders"] == ["step_3"]  # step_2 rotated out, no temp folder left
    assert rank0["disk_max_diff"] < 1e-6
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(rank0["disk_files"])


def test_distributed_sync_forms_its_group_at_start_up(monkeypatch):
    """`rollout.weight_sync=distributed`: building the SGLang engine forms the broadcast
    group once, with the configured address, port, server TP size and backend (gloo
    without CUDA; the broadcast itself runs against real SGLang in
    test_real_weight_sync.py)."""
    import megatron_mopd.rollout.sglang as sglang_rollout
    from megatron_mopd.config import load_config
    from megatron_mopd.rollout.factory import build_rollout_engine

    calls = []

    class FakeEngine:
        def __init__(self, rc, **kwargs):
            self.urls = rc.urls

        def init_weights_update_group(self, address, port, ranks_per_server=1, backend=None):
            calls.append((address, port, ranks_per_server, backend))

        def check_dtype(self, dtype):
            assert dtype == "fp32"

        def close(self):
            pass

    monkeypatch.setattr(sglang_rollout, "SGLangRolloutEngine", FakeEngine)
    rollout = ["rollout.backend=sglang", "rollout.urls=[http://a:1,http://b:1]"]
    dist_keys = ["rollout.weight_sync_address=10.0.0.1", "rollout.server_tp_size=2"]
    for sync, extra, want in (
        ("disk", [], []),
        ("distributed", dist_keys, [("10.0.0.1", 29650, 2, "gloo")]),  # auto: no CUDA here
    ):
        calls.clear()
        cfg = load_config(None, [*rollout, f"rollout.weight_sync={sync}", *extra])
        assert isinstance(build_rollout_engine(cfg), FakeEngine)
        assert calls == want
