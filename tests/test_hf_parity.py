"""The Megatron student's log-probs equal HF transformers' own, at every parallel layout.

The user-facing contract is tested end to end: tiny random HF models are scored by the
real `mopd logprobs` command under torchrun (HF weights loaded by the bridge, log-probs
vocabulary-parallel through Megatron's forward-only schedule), and every value is
compared with HF's fp32 forward (tolerance 1e-5). Several layouts share one launch
(`tests/workers/logprobs_cli_cases.py`): one launch per world size, started the first
time a test needs it and cached for the session.

Default run, one launch of 2 processes: TP1 (as two data-parallel replicas, each scoring
half the sequences), TP2, EP2, PP2, TP2xEP2 with ETP1. Slow: TP1 in a single process, and
TP2xPP2, TP2xEP2 with ETP2, TP2xPP2xEP2 (4 processes). The world-size-1 path without
torchrun is checked against HF in `test_logprobs_cli.py`. Models: Qwen3-MoE, Qwen2
(tied embeddings), Qwen3, Llama, Qwen2-MoE (shared expert); see `tiny_models.py`.
"""

from __future__ import annotations

import json
import os

import pytest
from multirank import Launch, start_workers
from tiny_models import ALL_ARCHS, hf_logprobs, make_models, read_output
from tiny_models import write_input as write_sequences

WORKER = os.path.join(os.path.dirname(__file__), "workers", "logprobs_cli_cases.py")
TOLERANCE = 1e-5
MICRO_BATCH_SIZE = 2

# launch group -> (processes, slow, {layout: (command-line arguments, architectures)})
DENSE = ("qwen2", "qwen3", "llama")
GROUPS: dict[str, tuple[int, bool, dict[str, tuple[list[str], tuple[str, ...]]]]] = {
    "1proc": (1, True, {"tp1": ([], ALL_ARCHS)}),
    "2proc": (
        2,
        False,
        {
            "tp1-dp2": ([], ALL_ARCHS),
            "tp2": (["--tp", "2"], ALL_ARCHS),
            "ep2": (["--ep", "2"], ("qwen3_moe",)),
            "pp2": (["--pp", "2"], ("qwen3_moe", "qwen2")),
            "tp2-ep2-etp1": (["--tp", "2", "--ep", "2", "--etp", "1"], ("qwen3_moe", "qwen2_moe")),
        },
    ),
    "4proc": (
        4,
        True,
        {
            "tp2-pp2": (["--tp", "2", "--pp", "2"], ("qwen3_moe", *DENSE)),
            "tp2-ep2-etp2": (["--tp", "2", "--ep", "2", "--etp", "2"], ("qwen3_moe", "qwen2_moe")),
            "tp2-pp2-ep2": (["--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1"], ("qwen3_moe",)),
        },
    ),
}


def _cases() -> list:
    params = []
    for group, (_, slow, layouts) in GROUPS.items():
        marks = [pytest.mark.multirank] + ([pytest.mark.slow] if slow else [])
        for layout, (_, archs) in layouts.items():
            for arch in archs:
                params.append(pytest.param(group, layout, arch, marks=marks, id=f"{layout}-{arch}"))
    return params


class ParityRuns:
    """Session state: the models, their HF references, one launch per group."""

    def __init__(self, root: str):
        self.root = root
        self.models = make_models(os.path.join(root, "models"))
        self.input = write_sequences(os.path.join(root, "input.jsonl"))
        self._references: dict[str, list] = {}
        self._launches: dict[str, tuple[Launch, int | None]] = {}

    def reference(self, arch: str) -> list:
        if arch not in self._references:
            self._references[arch] = hf_logprobs(self.models[arch])
        return self._references[arch]

    def output(self, group: str, layout: str, arch: str) -> str:
        """The output file of (layout, arch), launching its group on first use."""
        if group not in self._launches:
            nproc, _, layouts = GROUPS[group]
            cases = [
                {
                    "name": f"{lay}-{a}",
                    "hf": self.models[a],
                    "args": args + ["--micro-batch-size", str(MICRO_BATCH_SIZE)],
                }
                for lay, (args, archs) in layouts.items()
                for a in archs
            ]
            out = os.path.join(self.root, group)
            launch = start_workers(
                WORKER,
                nproc,
                ["--input", self.input, "--cases", json.dumps(cases)],
                out_dir=out,
                timeout=900,
            )
            try:
                launch.wait()
                code = 0
            except AssertionError as e:  # keep the outputs of the cases that finished
                code = str(e)
            self._launches[group] = (launch, code)
        launch, code = self._launches[group]
        path = os.path.join(launch.out_dir, f"{layout}-{arch}.jsonl")
        if not os.path.isfile(path):
            pytest.fail(f"no output for {layout}-{arch}; the launch failed:\n{code}")
        return path


@pytest.fixture(scope="session")
def parity_runs(tmp_path_factory) -> ParityRuns:
    return ParityRuns(str(tmp_path_factory.mktemp("hf_parity")))


@pytest.mark.parametrize("group,layout,arch", _cases())
def test_logprobs_match_hf(parity_runs: ParityRuns, group: str, layout: str, arch: str):
    ours = read_output(parity_runs.output(group, layout, arch))
    ref = parity_runs.reference(arch)
    assert len(ours) == len(ref)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"sequence {i}: {a.shape} log-probs, HF gives {b.shape}"
        if a.numel():
            worst = max(worst, (a - b).abs().max().item())
    print(f"[hf-parity] {layout} {arch}: max |diff| = {worst:.2e}")
    assert worst < TOLERANCE, f"{layout} {arch}: max |log-prob diff| vs HF = {worst:.3e}"
