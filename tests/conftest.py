"""Shared pytest fixtures (keep this small: test-specific fixtures live in their modules).

Multi-process tests use `tests/multirank.py` (torchrun + gloo, with timeouts); their
launches are cached in session-scoped fixtures of the modules that need them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # lets test modules `import multirank`
    sys.path.insert(0, str(TESTS))

# Keep in-process torch to one thread: the machines are small and shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root directory."""
    return REPO


REAL_API_KEY = "mopd-test-key"  # server "w" requires it (SGLang's --api-key)


@pytest.fixture(scope="session")
def real_sglang(tmp_path_factory):
    """Three real SGLang 0.5.23 servers for the session (`tests/sglang_real.py`), started
    together on first use: "a" and "b" serve the tiny Qwen3-MoE `model_a` (scoring,
    sampling, the router pair, the teachers of the end-to-end run); "w" serves it too at
    first and takes weight updates (every sync mode, the end-to-end run's rollouts), with
    `--api-key`. Yields {"a", "b", "w": RealServer, "model_a": folder, "logs": folder}."""
    from sglang_real import require_sglang, start_real_servers, stop_all

    from megatron_mopd.tiny import make_tiny_hf_model

    require_sglang()
    root = tmp_path_factory.mktemp("real_sglang")
    model_a = make_tiny_hf_model("qwen3_moe", str(root / "model_a"), seed=0)
    ports = {}
    import socket

    for name in ("a", "b", "w"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    specs = {
        "a": (model_a, []),
        "b": (model_a, []),
        "w": (model_a, ["--api-key", REAL_API_KEY]),
    }
    servers = start_real_servers(specs, str(root), ports)
    try:
        yield {**servers, "model_a": model_a, "logs": str(root), "servers": servers}
    finally:
        stop_all(servers.values())
