"""`mopd logprobs` on bad input: one clear line on stderr, a non-zero exit, no traceback.

Each class of user error gets a case. The input-file cases run as the user would
(`python -m megatron_mopd logprobs ...`, world size 1, no torchrun; ~0.3 s each, as the
command checks the file before importing anything heavy). The cases that need the
model's config (vocabulary, layout) run `cli.main` in this process, which is the same code
path up to the point where a process group would be created, without paying ~5 s of
imports per case; one of them also runs as a subprocess. Layouts that need more
processes set torchrun's WORLD_SIZE/RANK, which the command checks before creating any
process group. One happy-path run (TP1, no torchrun) checks the output format: one line
per input line, `len(input_ids) - 1` values each, `[]` for a 1-token sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny_models import hf_logprobs, make_models, read_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return make_models(str(tmp_path_factory.mktemp("cli_models")), archs=("qwen2", "qwen3_moe"))


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "megatron_mopd", "logprobs", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )


class InProcess:
    """`cli.main` in this process, with the result shaped like `subprocess.run`'s."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_here(monkeypatch, capsys):
    from megatron_mopd import cli

    def run(args: list[str], env: dict[str, str] | None = None) -> InProcess:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        try:
            cli.main(["logprobs", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return InProcess(code, out.out, out.err)

    return run


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


GOOD = json.dumps({"input_ids": [1, 5, 7]})

# (case id, input lines, expected fragments of the error line)
BAD_INPUTS = [
    ("not-json", [GOOD, '{"input_ids": [1, 2'], [":2:", "not valid JSON"]),
    ("not-an-object", [GOOD, GOOD, "[1, 2, 3]"], [":3:", "JSON object"]),
    ("missing-input-ids", [GOOD, json.dumps({"ids": [1, 2]})], [":2:", 'missing "input_ids"']),
    ("input-ids-not-list", [json.dumps({"input_ids": "1 2 3"})], [":1:", "list of token ids"]),
    ("empty-sequence", [GOOD, GOOD, json.dumps({"input_ids": []})], [":3:", "empty"]),
    ("negative-id", [GOOD, json.dumps({"input_ids": [1, -4, 2]})], [":2:", "-4", "negative"]),
    ("float-id", [json.dumps({"input_ids": [1, 2.5]})], [":1:", "2.5", "not an integer"]),
    ("bool-id", [json.dumps({"input_ids": [1, True]})], [":1:", "not an integer"]),
]


@pytest.mark.parametrize(
    "lines,needles", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_line(tmp_path, models, lines, needles):
    path = write_lines(tmp_path / "in.jsonl", lines)
    proc = run_cli(["--hf", models["qwen2"], "--input", path, "--output", str(tmp_path / "o")])
    assert_one_line_error(proc, "in.jsonl", *needles)
    assert not (tmp_path / "o").exists()


def test_missing_input_file(tmp_path, models):
    missing = str(tmp_path / "nope.jsonl")
    proc = run_cli(["--hf", models["qwen2"], "--input", missing, "--output", str(tmp_path / "o")])
    assert_one_line_error(proc, missing, "no such file")


def test_output_directory_missing(tmp_path, models):
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    out = str(tmp_path / "no" / "such" / "out.jsonl")
    proc = run_cli(["--hf", models["qwen2"], "--input", path, "--output", out])
    assert_one_line_error(proc, "--output", "does not exist")


def test_token_id_out_of_vocabulary(tmp_path, models):
    """As a subprocess: a check that needs the model's config.json."""
    path = write_lines(tmp_path / "in.jsonl", [GOOD, GOOD, json.dumps({"input_ids": [3, 128]})])
    proc = run_cli(["--hf", models["qwen2"], "--input", path, "--output", str(tmp_path / "o")])
    assert_one_line_error(proc, "in.jsonl:3:", "128", "vocabulary [0, 128)")


def test_sequence_longer_than_model(tmp_path, models, run_here):
    long = json.dumps({"input_ids": [1] * 513})  # tiny models: max_position_embeddings=512
    path = write_lines(tmp_path / "in.jsonl", [GOOD, long])
    proc = run_here(["--hf", models["qwen2"], "--input", path, "--output", str(tmp_path / "o")])
    assert_one_line_error(proc, "in.jsonl:2:", "max_position_embeddings=512")


def test_hf_folder_missing_or_not_a_model(tmp_path, run_here):
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    missing = str(tmp_path / "no_model")
    proc = run_here(["--hf", missing, "--input", path, "--output", str(tmp_path / "o")])
    assert_one_line_error(proc, missing, "no such directory")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc = run_here(["--hf", str(tmp_path / "folder"), "--input", path, "--output", "o"])
    assert_one_line_error(proc, "config.json", "'gpt2'", "not supported")


@pytest.mark.parametrize(
    "args,world_size,needles",
    [
        (["--tp", "2"], 1, ["world size 1", "tensor_model_parallel_size"]),
        (["--tp", "2", "--pp", "2"], 2, ["world size 2"]),
        (["--tp", "3"], 3, ["tensor_model_parallel_size=3", "num_attention_heads=4"]),
        (["--ep", "2"], 2, ["expert_model_parallel_size=2", "MoE"]),
        (["--pp", "3"], 3, ["pipeline_model_parallel_size=3", "num_layers=2"]),
        (["--tp", "0"], 1, ["tensor_model_parallel_size=0"]),
    ],
    ids=["tp-vs-world", "tp-pp-vs-world", "tp-vs-heads", "ep-on-dense", "pp-vs-layers", "tp0"],
)
def test_layout_does_not_fit(tmp_path, models, run_here, args, world_size, needles):
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    env = {"WORLD_SIZE": str(world_size), "RANK": "0"}
    proc = run_here(
        ["--hf", models["qwen2"], "--input", path, "--output", str(tmp_path / "o"), *args], env
    )
    assert_one_line_error(proc, *needles)


def test_experts_do_not_divide(tmp_path, models, run_here):
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    env = {"WORLD_SIZE": "3", "RANK": "0"}
    proc = run_here(
        ["--hf", models["qwen3_moe"], "--input", path, "--output", "o", "--ep", "3"], env
    )
    assert_one_line_error(proc, "expert_model_parallel_size=3", "num_moe_experts=4")


def test_scores_without_torchrun(tmp_path, models):
    """The happy path at world size 1: format, order, a 1-token sequence, HF parity."""
    sequences = [[1, 5, 7, 9], [42], [3, 3, 3, 3, 3, 3, 100, 127, 0], [9, 8]]
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"input_ids": s}) for s in sequences])
    out = tmp_path / "out.jsonl"
    proc = run_cli(["--hf", models["qwen2"], "--input", path, "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert [len(json.loads(x)["logprobs"]) for x in lines] == [3, 0, 8, 1]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    for ours, ref in zip(read_output(str(out)), hf_logprobs(models["qwen2"], sequences)):
        assert (ours - ref).abs().max().item() < 1e-5 if ref.numel() else ours.numel() == 0


def test_vocabulary_not_divisible_by_tp(tmp_path, run_here):
    """The student does not pad its vocabulary, so TP must divide it (said before any
    process group exists, not by build_model on every rank)."""
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    folder = make_tiny_hf_model("qwen2", str(tmp_path / "m"), vocab_size=129)
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    proc = run_here(["--hf", folder, "--input", path, "--output", "o", "--tp", "2"], env)
    assert_one_line_error(proc, "tensor_model_parallel_size=2", "vocab_size=129")
