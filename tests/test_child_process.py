"""How a child's answers carry tensors (`child_process.dumps`).

CPU tensors of numpy's dtypes go as numpy arrays inside the pickle (no shared-memory
segment each); the rest (bfloat16, parameters) with torch's own pickling; either way the
receiver's `Connection.recv` gets equal tensors of the same dtype and shape.
"""

from __future__ import annotations

import multiprocessing
import pickle

import pytest
import torch

from megatron_mopd.child_process import dumps


@pytest.mark.parametrize(
    "t",
    [
        torch.arange(24, dtype=torch.int32).reshape(2, 3, 4),
        torch.randn(5, 7),
        torch.randn(3, dtype=torch.float64),
        torch.tensor([True, False]),
        torch.randint(0, 100, (4, 4), dtype=torch.int64).t(),  # not contiguous
        torch.randn(3, 4, dtype=torch.bfloat16),  # no numpy dtype: torch's pickling
        torch.zeros(0, 3),
        torch.eye(3).to_sparse(),  # not strided: torch's pickling
    ],
)
def test_tensors_come_back_equal(t):
    back = pickle.loads(dumps({"x": [t, "a"]}))
    got = back["x"][0]
    assert type(got) is torch.Tensor and got.dtype == t.dtype and got.shape == t.shape
    if t.layout != torch.strided:
        t, got = t.to_dense(), got.to_dense()
    assert torch.equal(got, t)
    kept = t.clone()
    got.zero_()  # writable, and not the sender's memory
    assert torch.equal(t, kept)


def test_a_view_sends_only_its_elements():
    big = torch.randn(100_000)
    assert len(dumps(big[:10])) < 1_000  # torch's pickling would send the whole storage


def test_parameters_keep_their_type():
    p = torch.nn.Parameter(torch.randn(3))
    back = pickle.loads(dumps(p))
    assert isinstance(back, torch.nn.Parameter) and torch.equal(back, p)


def test_through_a_pipe():
    a, b = multiprocessing.Pipe()
    msg = ("piece", [0, 1], [torch.arange(6, dtype=torch.int32).view(3, 2)])
    a.send_bytes(dumps(msg))
    got = b.recv()
    assert got[:2] == msg[:2] and torch.equal(got[2][0], msg[2][0])
