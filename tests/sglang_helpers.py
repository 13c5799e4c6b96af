"""Helpers of the SGLang tests: servers on loopback, a fault-injecting proxy, references.

Every server a test starts stops by itself: in-process servers are daemon threads shut
down by the fixture; subprocesses (`mopd serve`, `sglang-router`) run under coreutils
`timeout`, so they die even if pytest is killed, and fixtures terminate them by pid.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import httpx
import torch

from megatron_mopd.toy.fault_servers import (  # noqa: F401 - re-exported to the tests
    HARD_TIMEOUT_S,
    FlakyProxy,
    Proc,
    free_port,
    raw_exchange,
    start_serve_subprocess,
    wait_http,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def start_router(worker_urls: list[str], log_path: str) -> tuple[Proc | None, str]:
    """The real sglang-router in front of `worker_urls`; (None, reason) if it cannot start."""
    port = free_port()
    try:
        import sglang_router  # noqa: F401
    except ImportError as e:
        return None, f"sglang-router is not installed ({e})"
    if shutil.which("timeout") is None:
        return None, "coreutils `timeout` is missing"
    proc = Proc(
        [PY, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls]
        + ["--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port)]
        # its metrics exporter binds 0.0.0.0:29000 by default: loopback, and a port of its
        # own so that two routers (or another user's) can run at once
        + ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        + ["--log-level", "warn"],
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 60, proc.p)
        wait_routable(url, 90)
    except (RuntimeError, TimeoutError) as e:
        out = proc.output()[-500:]
        proc.stop()
        return None, f"sglang-router did not start: {e}; output: {out}"
    return proc, url


def wait_routable(url: str, deadline_s: float) -> None:
    """Until a router passes a one-token scoring request to a worker: it answers 503
    ("no available workers") until its health checks of the workers have passed, which
    against real SGLang (whose GET /health runs a generation) takes a few seconds."""
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}}
    end = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < end:
        try:
            r = httpx.post(url + "/generate", json=body, timeout=30)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} routed no request within {deadline_s} s ({last})")


class InProcessServer:
    """`SGLangCompatibleServer` on a free loopback port in this process."""

    def __init__(self, hf_dir: str, engine=None, **kw: Any):
        from megatron_mopd.server.app import SGLangCompatibleServer

        self.server = SGLangCompatibleServer(hf_dir, port=0, engine=engine, **kw)
        self.server.start(background_load=False)
        self.url = self.server.url

    def stop(self) -> None:
        """Shut the server down (idempotent)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None


# --------------------------------------------------------------------------------------
# references


def reference_logprobs(hf_dir: str, seqs: list[list[int]]) -> list[list[float]]:
    """log p(ids[i] | ids[:i]) for i >= 1 with a plain transformers forward, one sequence
    at a time (no padding, no batching)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), dim=-1)
            out.append([lp[i - 1, s[i]].item() for i in range(1, len(s))])
    return out


def random_seqs(n: int, lo: int, hi: int, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    """`n` random token sequences with lengths in [lo, hi] (ids 4..vocab-1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lengths]


def scoring_item(ids: list[int], sent_start: int, top_k: int = 0, seed: int = 0) -> dict:
    """A well-formed answer item for `ids` sent with `logprob_start_len = sent_start`, as
    SGLang builds it: a leading null entry, then `[logprob, id, null]` per token, and with
    `top_k`, `input_top_logprobs` = null then k `[logprob, id, null]` per position."""
    import random

    rng = random.Random(seed)
    entries = [[-0.01 * (k + 1), t, None] for k, t in enumerate(ids[sent_start:])]
    entries[0][0] = None
    meta: dict = {"input_token_logprobs": entries}
    if top_k:
        rows = [
            sorted(
                ([-rng.random() * 9, rng.randrange(150_000), None] for _ in range(top_k)),
                reverse=True,
            )  # fmt: skip
            for _ in entries[1:]
        ]
        meta["output_token_logprobs"] = []
        meta["input_top_logprobs"] = [None, *rows]
        meta["output_top_logprobs"] = []
    return {"meta_info": meta}
