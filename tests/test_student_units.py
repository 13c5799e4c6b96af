"""Single-process unit tests of the student's helpers (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from megatron_mopd.config import ModelConfig, ParallelConfig
from megatron_mopd.errors import ConfigError
from megatron_mopd.student.logprobs import (
    make_micro_batches,
    pad_to_common_shape,
    token_logprobs_B_T,
    vocab_parallel_token_logprobs,
)
from megatron_mopd.student.model import global_param_name, is_expert_param, shard_full_tensor
from megatron_mopd.student.train_step import next_token_loss


def test_token_logprobs_match_log_softmax_with_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (3, 5))
    ours = vocab_parallel_token_logprobs(logits, target)
    ref = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ours, ref.float(), atol=1e-6)
    weights = torch.randn(3, 5)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_token_logprobs_B_T_convention():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    tokens = torch.randint(0, 7, (2, 4))
    out = token_logprobs_B_T(logits, tokens)
    assert out.shape == (2, 4) and torch.all(out[:, 0] == 0)
    expected = torch.log_softmax(logits[1, 1], -1)[tokens[1, 2]]  # logits at t predict t + 1
    assert out[1, 2] == pytest.approx(float(expected), abs=1e-6)


def test_make_micro_batches_pads_and_masks():
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    batches = make_micro_batches(seqs, 2, pad_to_multiple_of=4, data={"adv": [0.5, 1.0, 2.0]})
    assert [b.tokens_B_T.shape for b in batches] == [(2, 8), (1, 4)]
    first = batches[0]
    assert first.tokens_B_T[0].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert first.loss_mask_B_T[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert first.lengths_B.tolist() == [3, 5] and first.index_B == [0, 1]
    assert first.data["adv"].tolist() == [0.5, 1.0]
    by_length = make_micro_batches(seqs, 2, sort_by_length=True)
    assert by_length[0].index_B == [1, 0] and by_length[1].index_B == [2]


def test_pad_to_common_shape_adds_masked_rows():
    batches = make_micro_batches([[1, 2, 3, 4], [5, 6], [7, 8, 9]], 2)
    padded = pad_to_common_shape(batches)
    assert all(b.tokens_B_T.shape == (2, 4) for b in padded)
    assert padded[1].loss_mask_B_T[1].sum() == 0 and padded[1].index_B == [2]


def test_next_token_loss_is_token_mean_over_the_global_batch():
    batches = make_micro_batches([[1, 2, 3], [4, 5]], 1)
    logprobs = [torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -4.0]])]
    loss_fn = next_token_loss(global_num_tokens=3)
    total = sum(loss_fn(lp, mb)[0] for lp, mb in zip(logprobs, batches))
    assert float(total) == pytest.approx((1 + 2 + 4) / 3)
    with pytest.raises(ValueError):
        next_token_loss(0)


def test_shard_full_tensor_matches_megatron_strided_split():
    full = torch.arange(8).repeat_interleave(2).view(8, 2)  # rows: g0 g1 g2 g3 | u0 u1 u2 u3
    # fc1 of a SwiGLU at TP2 (stride 2): rank 0 holds [gate half 0; up half 0]
    shard = shard_full_tensor(full, dim=0, stride=2, world=2, rank=0)
    assert shard[:, 0].tolist() == [0, 1, 4, 5]
    assert shard_full_tensor(full, dim=1, stride=1, world=2, rank=1)[:, 0].tolist() == list(
        range(8)
    )


def test_global_param_names():
    class Layer:
        layer_number = 3  # megatron numbers layers globally from 1

    class Model:
        share_embeddings_and_output_weights = True

        class decoder:
            layers = [Layer()]

    cfg = ModelConfig()
    assert global_param_name("decoder.layers.0.mlp.linear_fc1.weight", Model, cfg) == (
        "decoder.layers.2.mlp.linear_fc1.weight"
    )
    assert (
        global_param_name("output_layer.weight", Model, cfg) == "embedding.word_embeddings.weight"
    )
    assert is_expert_param("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight")
    assert not is_expert_param("decoder.layers.0.mlp.shared_experts.linear_fc1.weight")


def test_bad_layout_fails_before_any_process_group():
    import torch.distributed as dist

    from megatron_mopd.distributed import init_distributed

    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="world size 1"):
        init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    assert not dist.is_initialized()
