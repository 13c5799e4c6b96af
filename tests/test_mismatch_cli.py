"""`mopd mismatch`: the figures against a plain-Python reference, the checks that two
files line up, and the intended use: `mopd logprobs` (Megatron) against `mopd score` (an
SGLang-compatible server) on the same tokens of the same model."""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_mopd import cli


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(["mismatch", *map(str, args)])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def write(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps({"logprobs": r})) + "\n")
    return str(path)


def test_figures_match_a_plain_reference(tmp_path, capsys):
    rng = random.Random(0)
    lengths = [rng.randint(0, 40) for _ in range(30)]
    train = [[-rng.random() * 6 for _ in range(n)] for n in lengths]
    # mostly small noise; a few tokens far off in both directions
    inference = [[v + rng.gauss(0, 0.05) for v in seq] for seq in train]
    inference[3][2] = train[3][2] + 1.5  # r = e^-1.5 < 0.5
    inference[7][5] = train[7][5] - 2.0  # r = e^2 > 5
    a, b = write(tmp_path / "a.jsonl", train), write(tmp_path / "b.jsonl", inference + [""])
    code, out, _ = run(capsys, a, b, "--json")
    assert code == 0
    got = json.loads(out)
    d = [x - y for s, t in zip(train, inference) for x, y in zip(s, t)]
    r = [math.exp(v) for v in d]
    ranked = sorted(abs(v) for v in d)
    n = len(d)
    want = {
        "sequences": 30,
        "tokens": n,
        "mean_diff": sum(d) / n,
        "mean_abs_diff": sum(map(abs, d)) / n,
        "p50_abs_diff": ranked[(n - 1) // 2],
        "p99_abs_diff": ranked[int(0.99 * (n - 1))],
        "max_abs_diff": ranked[-1],
        "mean_abs_r_minus_1": sum(abs(x - 1) for x in r) / n,
        "discard_low": sum(x < 0.5 for x in r) / n,
        "discard_high": sum(x > 5.0 for x in r) / n,
        "worst_sequence": 7,
        "worst_token": 6,
    }
    assert want["discard_low"] > 0 and want["discard_high"] > 0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # the text form says the same, with the bounds asked for
    code, out, _ = run(capsys, a, b, "--eps-low", "0.2", "--eps-high", "10")
    assert code == 0
    assert f"{n} tokens" in out and "IcePop [0.2, 10] discards 0.000%" in out
    assert "largest |d|: record 8, token 6" in out


def test_identical_files_do_not_differ(tmp_path, capsys):
    rows = [[-0.5, -1.25, -3.0], [], [-0.125]]
    a = write(tmp_path / "a.jsonl", rows)
    code, out, _ = run(capsys, a, a, "--json")
    got = json.loads(out)
    assert code == 0 and got["max_abs_diff"] == 0 and got["discard_low"] == 0 == got["discard_high"]


@pytest.mark.parametrize(
    "a_rows, b_rows, needle",
    [
        ([[-1.0], [-2.0]], [[-1.0]], "has 2 records"),
        ([[-1.0, -2.0]], [[-1.0]], "record 1: 2 log-probs"),
        (["{not json"], [[-1.0]], "a.jsonl:1: not valid JSON"),
        (['{"ids": [1]}'], [[-1.0]], 'a.jsonl:1: missing "logprobs"'),
        ([[-1.0]], ['{"logprobs": [null]}'], 'b.jsonl:1: "logprobs"[0]=None is not a finite'),
        ([[-1.0]], ['{"logprobs": [-1.0, Infinity]}'], 'b.jsonl:1: "logprobs"[1]=inf is not'),
        ([[-1.0]], ['{"logprobs": {"a": 1}}'], 'b.jsonl:1: "logprobs" must be a list'),
    ],
)
def test_files_that_do_not_line_up_are_one_error(tmp_path, capsys, a_rows, b_rows, needle):
    a, b = write(tmp_path / "a.jsonl", a_rows), write(tmp_path / "b.jsonl", b_rows)
    code, out, err = run(capsys, a, b)
    assert code == 2 and not out
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_bad_bounds_and_missing_file(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", [[-1.0]])
    code, _, err = run(capsys, a, a, "--eps-low", "1.5")
    assert code == 2 and "--eps-low" in err
    code, _, err = run(capsys, a, tmp_path / "nope.jsonl")
    assert code == 2 and "nope.jsonl: no such file" in err
