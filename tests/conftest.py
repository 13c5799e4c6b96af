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
    """Three real SGLang 0.5.23 servers for the session (`toy.sglang_servers`), started
    together on first use: "a" and "b" serve the tiny Qwen3-MoE `model_a` (scoring,
    sampling, the router pair, the teachers of the end-to-end run); "w" serves it too at
    first and takes weight updates (every sync mode, the end-to-end run's rollouts), with
    `--api-key`. Yields {"a", "b", "w": LocalSGLang, "model_a": folder, "servers": all}."""
    from sglang_real import require_sglang

    from megatron_mopd.tiny import make_tiny_hf_model
    from megatron_mopd.toy.sglang_servers import LocalSGLang

    require_sglang()
    root = tmp_path_factory.mktemp("real_sglang")
    model_a = make_tiny_hf_model("qwen3_moe", str(root / "model_a"), seed=0)
    specs = {
        "a": (model_a, []),
        "b": (model_a, []),
        "w": (model_a, ["--api-key", REAL_API_KEY]),
    }
    with LocalSGLang.start_all(specs, str(root), timeout=300) as servers:
        yield {**servers, "model_a": model_a, "servers": servers}
