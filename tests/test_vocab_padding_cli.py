"""A vocabulary that TP does not divide (211): `mopd logprobs` and `mopd convert` at TP2.

The student pads the vocabulary (Megatron's `make_vocab_size_divisible_by`, default 128:
211 -> 256 rows at TP1 and TP2). The commands run for real in worker launches
(`tests/workers/mcore_cli_cases.py`), as in tests/test_convert_mcore.py:

- one process: HF -> mcore at TP1, log-probs from the HF folder at TP1;
- torchrun, 2 processes: log-probs from the HF folder at TP2 (Qwen3-MoE with sequence
  parallelism, and Qwen2 with tied embeddings); HF -> mcore at TP2; the TP1 checkpoint read
  at TP2 with another padding (divisible by 1: 212 rows, fewer than the 256 stored; by 256:
  512 rows, more), and exported back to HF at TP2;
- one process: the TP2 checkpoint exported to HF, and read at TP1 with 211 rows.

Log-probs must match HF transformers within 1e-5 (and TP2 the TP1 run within 1e-5); every
HF round trip is bitwise (the padded rows are dropped on export). Dist checkpoints store
the vocabulary padded as at save time; a load at another padding reads the rows it needs
(megatron-core's `allow_shape_mismatch` on the embedding and output layer; missing padded
rows are zero).
"""

from __future__ import annotations

import json
import os

import pytest
from multirank import start_workers
from test_convert_mcore import assert_same_hf_folder
from tiny_models import hf_logprobs, read_output, write_input

WORKER = os.path.join(os.path.dirname(__file__), "workers", "mcore_cli_cases.py")
VOCAB = 211
SEQUENCES = [[1, 5, 7, 9, 210, 3], [2, 200, 100, 4, 4, 4, 150, 0], [3, 4]]


def _launch(root: str, name: str, nproc: int, steps: list[dict]) -> dict:
    launch = start_workers(
        WORKER,
        nproc,
        ["--steps", json.dumps(steps)],
        out_dir=os.path.join(root, f"launch-{name}"),
        timeout=900,
        torchrun=nproc > 1,
    )
    return launch.wait()[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    root = str(tmp_path_factory.mktemp("vocab211"))
    for arch in ("qwen3_moe", "qwen2"):
        make_tiny_hf_model(arch, os.path.join(root, arch), vocab_size=VOCAB)
    inp = write_input(os.path.join(root, "in.jsonl"), SEQUENCES)
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    moe = p("qwen3_moe")

    def lp(name: str, src: list[str], *extra: str) -> dict:
        argv = ["logprobs", *src, "--input", inp, "--output", p(f"{name}.jsonl"), *extra]
        return {"name": name, "argv": argv + ["--micro-batch-size", "2"]}

    _launch(root, "one", 1, [
        {"name": "to-mcore", "argv": ["convert", "hf-to-mcore", "--hf", moe, "--out", p("mc1")]},
        lp("hf-tp1", ["--hf", moe]),
        lp("hf-tp1-whole", ["--hf", moe], "--logits-chunk-tokens", "0"),
    ])  # fmt: skip
    _launch(root, "two", 2, [
        lp("hf-tp2", ["--hf", moe], "--tp", "2"),
        lp("hf-tp2-tied", ["--hf", p("qwen2")], "--tp", "2", "--logits-chunk-tokens", "3"),
        {"name": "to-mcore-tp2",
         "argv": ["convert", "hf-to-mcore", "--hf", moe, "--out", p("mc2"), "--tp", "2"]},
        lp("mc1-tp2-by1", ["--mcore", p("mc1")], "--tp", "2", "--make-vocab-size-divisible-by", "1"),
        lp("mc1-tp2-by256", ["--mcore", p("mc1")], "--tp", "2",
           "--make-vocab-size-divisible-by", "256"),
        {"name": "to-hf-tp2",
         "argv": ["convert", "mcore-to-hf", "--mcore", p("mc1"), "--out", p("hf-a"), "--tp", "2"]},
    ])  # fmt: skip
    _launch(root, "back", 1, [
        {"name": "to-hf", "argv": ["convert", "mcore-to-hf", "--mcore", p("mc2"), "--out", p("hf-b")]},
        lp("mc2-tp1-by1", ["--mcore", p("mc2")], "--make-vocab-size-divisible-by", "1"),
    ])  # fmt: skip
    return root


def _worst(a: list, b: list) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b) if x.numel())


@pytest.mark.multirank
def test_vocab_211_at_tp2(runs: str):
    ref = {
        arch: hf_logprobs(os.path.join(runs, arch), SEQUENCES) for arch in ("qwen3_moe", "qwen2")
    }
    tp1 = read_output(os.path.join(runs, "hf-tp1.jsonl"))
    for name in ("hf-tp1", "hf-tp1-whole", "hf-tp2", "mc1-tp2-by1", "mc1-tp2-by256", "mc2-tp1-by1"):
        ours = read_output(os.path.join(runs, f"{name}.jsonl"))
        worst = _worst(ours, ref["qwen3_moe"])
        print(f"[vocab211] {name}: max |diff| vs HF = {worst:.2e}, vs TP1 {_worst(ours, tp1):.2e}")
        assert worst < 1e-5, name
        assert _worst(ours, tp1) < 1e-5, name
    tied = read_output(os.path.join(runs, "hf-tp2-tied.jsonl"))
    assert _worst(tied, ref["qwen2"]) < 1e-5
    # the padded rows are added on load and dropped on export: HF round trips are bitwise
    src = os.path.join(runs, "qwen3_moe")
    assert_same_hf_folder(src, os.path.join(runs, "hf-a"))
    assert_same_hf_folder(src, os.path.join(runs, "hf-b"))
    with open(os.path.join(runs, "mc2", "mopd_model.json")) as f:
        assert json.load(f)["model"]["vocab_size"] == VOCAB  # the real vocabulary is recorded
