"""The demo's toy kit: deterministic tasks, disjoint splits, scoring, tokenization, SFT."""

import torch

from megatron_mopd.toy.sft import ModelShape, new_model, sft_batch, sft_loss
from megatron_mopd.toy.tasks import (
    DEFAULT_SPECS,
    TaskSpec,
    exact_match,
    generate,
    read_jsonl,
    split_of,
    write_jsonl,
)
from megatron_mopd.toy.tiny import make_char_tokenizer


def test_generation_is_deterministic_and_correct():
    for spec in DEFAULT_SPECS.values():
        a = generate(spec, 50, "train", seed=3)
        assert a == generate(spec, 50, "train", seed=3)
        assert a != generate(spec, 50, "train", seed=4)
        assert len({e.prompt for e in a}) == 50
    for ex in generate(DEFAULT_SPECS["add"], 30, "eval"):
        x, y = ex.prompt.rstrip("=").split("+")
        assert int(ex.answer) == int(x) + int(y)
    for ex in generate(DEFAULT_SPECS["reverse"], 30, "eval"):
        assert ex.answer == ex.prompt.removeprefix("rev:").rstrip("=")[::-1]


def test_splits_never_overlap():
    for spec in DEFAULT_SPECS.values():
        train = {e.prompt for e in generate(spec, 300, "train", seed=0)}
        evals = {e.prompt for e in generate(spec, 100, "eval", seed=1)}
        assert not train & evals
        assert all(split_of(p) == "eval" for p in evals)


def test_easier_distribution_filter():
    easy = generate(TaskSpec("add", 2, 2, max_answer_len=2), 40, "train")
    assert all(int(e.answer) < 100 for e in easy)


def test_exact_match():
    assert exact_match("357<eos>junk", "357")
    assert exact_match(" 357 ", "357")
    assert not exact_match("3570", "357")
    assert not exact_match("", "357")


def test_tokenizer_round_trips_every_task_string(tmp_path):
    tok = make_char_tokenizer(str(tmp_path / "tok"), vocab_size=128)
    for spec in DEFAULT_SPECS.values():
        for ex in generate(spec, 40, "train"):
            for text in (ex.prompt, ex.answer):
                ids = tok.encode(text, add_special_tokens=False)
                assert len(ids) == len(text) and tok.unk_token_id not in ids
                assert tok.decode(ids) == text


def test_jsonl_round_trip(tmp_path):
    exs = generate(DEFAULT_SPECS["add"], 5, "train")
    path = write_jsonl(str(tmp_path / "d" / "x.jsonl"), exs)
    assert read_jsonl(path) == exs


def test_small_sft_reduces_the_loss(tmp_path):
    torch.manual_seed(0)
    tok = make_char_tokenizer(str(tmp_path / "tok"), vocab_size=128)
    exs = generate(DEFAULT_SPECS["reverse"], 16, "train")
    ids, labels = sft_batch(tok, exs)
    assert (labels != -100).sum() == sum(len(e.answer) + 1 for e in exs)  # answer + EOS
    model = new_model(ModelShape(), vocab_size=128, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = sft_loss(model, ids, labels).item()
    for _ in range(30):
        opt.zero_grad()
        loss = sft_loss(model, ids, labels)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
