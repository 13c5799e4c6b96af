"""Real SGLang 0.5.23 servers for the tests (`megatron_mopd.toy.sglang_servers`, the
environment `make sglang` builds).

Without `.venv-sglang` the tests that need a server skip, naming `make sglang`; under
`make test` (`MOPD_REQUIRE_SGLANG=1`) they fail instead, so CI cannot pass without them.
`get`/`post` reach a server with its API key.
"""

from __future__ import annotations

import os

import httpx
import pytest

from megatron_mopd.toy.sglang_servers import SERVER_SCRIPT, sglang_missing, sglang_venv

__all__ = ["SERVER_SCRIPT", "get", "post", "require_sglang", "sglang_venv"]


def require_sglang() -> None:
    """Skip (or, under `make test`, fail) when real SGLang is missing."""
    why = sglang_missing()
    if why is None:
        return
    if os.environ.get("MOPD_REQUIRE_SGLANG") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _headers(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}


def get(server, path: str) -> httpx.Response:
    """GET `path` of a `LocalSGLang` (with its API key)."""
    return httpx.get(server.url + path, headers=_headers(server), timeout=60)


def post(server, path: str, body: dict | None = None) -> httpx.Response:
    """POST JSON `body` to `path` of a `LocalSGLang` (with its API key)."""
    return httpx.post(server.url + path, json=body, headers=_headers(server), timeout=120)
