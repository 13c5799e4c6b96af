"""Weight sync from a TP2 Megatron student into the embedded engine and an SGLang server."""

from __future__ import annotations

import os

import pytest
from multirank import start_workers

from megatron_mopd.tiny import make_tiny_hf_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "weight_sync_cases.py")


@pytest.mark.multirank
def test_sync_weights_embedded_and_disk(tmp_path):
    from megatron_mopd.server import SGLangCompatibleServer

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
