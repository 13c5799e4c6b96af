"""Vocabulary padding and chunked logits, against dense single-process references.

- `padded_vocab_size` follows Megatron's rule (a multiple of divisible_by * TP).
- Padded logits take no probability: log-probs over a padded shard equal the log-softmax
  over the real columns, and the padded columns get exactly zero gradient.
- `OutputHead` with chunks: log-probs at the sampled token and at K ids, and the gradients
  of the hidden states and of the output weight, equal the whole-logits computation, at one
  process and at TP2 over gloo (with a shard that holds padding only).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mopd.config import ModelConfig
from megatron_mopd.loss import vocab_parallel_gather_logprobs
from megatron_mopd.student.logprobs import OutputHead, vocab_parallel_token_logprobs
from megatron_mopd.student.model import padded_vocab_size

F64 = torch.float64


def test_padded_vocab_size_is_megatrons_rule():
    def padded(v, tp, by=128):
        return padded_vocab_size(ModelConfig(vocab_size=v, make_vocab_size_divisible_by=by), tp)

    assert [padded(211, tp) for tp in (1, 2, 4)] == [256, 256, 512]
    assert padded(151_936, 1) == 151_936 and padded(151_936, 2) == 152_064
    assert padded(211, 2, by=1) == 212 and padded(211, 1, by=1) == 211


def _dense(hidden, weight, vocab, ids):
    """log_softmax over the real vocabulary of hidden @ weight.T, at `ids`."""
    return torch.log_softmax(hidden @ weight[:vocab].t(), -1).gather(-1, ids)


def test_padded_columns_get_no_mass():
    g = torch.Generator().manual_seed(0)
    V, Vp = 5, 8
    logits = torch.randn(3, 4, Vp, generator=g, dtype=F64) * 3
    logits[..., V:] = 10.0  # large padded logits would dominate if they were counted
    ids = torch.randint(0, V, (3, 4, 3), generator=g)
    ref_x = logits[..., :V].clone().requires_grad_(True)
    ref = torch.log_softmax(ref_x, -1).gather(-1, ids)
    w = torch.randn(ref.shape, generator=g, dtype=F64)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), ref_x)
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        out = vocab_parallel_gather_logprobs(x * 1, ids, None, inplace, 7, vocab_size=V)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad((out * w).sum(), x)
        torch.testing.assert_close(grad[..., :V], ref_grad, rtol=0, atol=1e-12)
        assert torch.all(grad[..., V:] == 0)
    x = logits.clone().requires_grad_(True)
    tok = vocab_parallel_token_logprobs(x, ids[..., 0], None, vocab_size=V)
    torch.testing.assert_close(tok.double(), ref[..., 0], rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(tok.sum(), x)
    assert torch.all(grad[..., V:] == 0)
    # every real id together holds all the probability
    all_ids = torch.arange(V).expand(3, 4, V)
    total = vocab_parallel_gather_logprobs(logits, all_ids, vocab_size=V).exp().sum(-1)
    torch.testing.assert_close(total, torch.ones(3, 4, dtype=F64))


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_head_matches_whole_logits(chunk):
    g = torch.Generator().manual_seed(1)
    B, T, H, V, Vp, K = 2, 7, 6, 11, 16, 4
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(Vp, H, generator=g, dtype=F64)
    weight[V:] = 0  # padded rows, as loaded
    tokens = torch.randint(0, V, (B, T), generator=g)
    ids = torch.randint(0, V, (B, T - 1, K), generator=g)
    ids[..., 1] = ids[..., 0]  # duplicate ids accumulate
    w_tok = torch.randn(B, T, generator=g, dtype=F64)
    w_ids = torch.randn(B, T - 1, K, generator=g, dtype=F64)

    def run(head_hidden, head_weight, chunked):
        head = OutputHead(None, V, chunk if chunked else 0, head_weight if chunked else None)
        if chunked:
            out = head_hidden
        else:
            out = head_hidden @ head_weight.t()  # megatron's logits
        tok = head.token_logprobs_B_T(out, tokens)
        top = head.gather_logprobs(out[:, :-1], ids)
        return tok, top

    h_ref = hidden.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    ref_top = _dense(h_ref[:, :-1], w_ref, V, ids)
    ref_tok = torch.nn.functional.pad(
        _dense(h_ref[:, :-1], w_ref, V, tokens[:, 1:, None])[..., 0], (1, 0)
    )
    ref_grads = torch.autograd.grad(
        (ref_tok * w_tok).sum() + (ref_top * w_ids).sum(), (h_ref, w_ref)
    )
    for chunked in (False, True):
        h = hidden.clone().requires_grad_(True)
        wt = weight.clone().requires_grad_(True)
        tok, top = run(h, wt, chunked)
        torch.testing.assert_close(
            tok.double(), ref_tok, rtol=0, atol=1e-6 if not chunked else 1e-12
        )
        torch.testing.assert_close(top, ref_top, rtol=0, atol=1e-12)
        grads = torch.autograd.grad((tok * w_tok).sum() + (top * w_ids).sum(), (h, wt))
        for got, ref in zip(grads, ref_grads):
            torch.testing.assert_close(
                got.double(), ref, rtol=0, atol=1e-5 if not chunked else 1e-12
            )
        assert torch.all(grads[1][V:] == 0)  # padded rows: no gradient
    # forward only (no grad), as `forward_logprobs` runs it
    with torch.no_grad():
        tok, _ = run(hidden, weight, True)
    torch.testing.assert_close(tok.double(), ref_tok.detach(), rtol=0, atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp2_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        group = dist.new_group([0, 1])
        # V=5 in 8 rows: rank 1 holds one real column; V=3: rank 1 holds padding only
        for V in (5, 3):
            g = torch.Generator().manual_seed(V)
            N, H, Vp, K = 9, 4, 8, 3
            hidden = torch.randn(N, H, generator=g, dtype=F64)
            weight = torch.randn(Vp, H, generator=g, dtype=F64)
            weight[V:] = 0
            ids = torch.randint(0, V, (N, K), generator=g)
            grad_out = torch.randn(N, K, generator=g, dtype=F64)
            h_ref = hidden.clone().requires_grad_(True)
            w_ref = weight.clone().requires_grad_(True)
            ref = _dense(h_ref, w_ref, V, ids)
            ref_h, ref_w = torch.autograd.grad(ref, (h_ref, w_ref), grad_out)
            part = Vp // world
            rows = slice(rank * part, (rank + 1) * part)
            for chunk in (0, 2, 64):
                h = hidden.clone().requires_grad_(True)
                w = weight[rows].clone().requires_grad_(True)
                head = OutputHead(group, V, chunk, w if chunk else None)
                out = head.gather_logprobs(h if chunk else h @ w.t(), ids)
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
                gh, gw = torch.autograd.grad(out, (h, w), grad_out)
                dist.all_reduce(gh, group=group)  # the output layer's copy-to-TP backward
                torch.testing.assert_close(gh, ref_h, rtol=0, atol=1e-12)
                torch.testing.assert_close(gw, ref_w[rows], rtol=0, atol=1e-12)
            # the sampled-token path of whole logits (fp32 result)
            x = (hidden @ weight[rows].t()).requires_grad_(True)
            tok = vocab_parallel_token_logprobs(x, ids[:, 0], group, V)
            torch.testing.assert_close(tok.double(), ref[:, 0].detach(), rtol=0, atol=1e-6)
            (gx,) = torch.autograd.grad(tok, x, grad_out[:, 0].float())
            assert torch.all(torch.isfinite(gx)) and torch.all(
                gx[:, max(0, V - rank * part) :] == 0
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_chunked_head_two_process_gloo():
    """TP2 over a real gloo group: chunked and whole log-probs and gradients equal the
    single-process ones, also when one rank's shard is all padding."""
    port = _free_port()
    ctx = mp.start_processes(
        _tp2_worker, args=(2, port), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process gloo test hung for 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, 9)
