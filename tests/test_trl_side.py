"""tools/trl/distill.py's `DomainTeachers`: the one model TRL distils from equals, row by
row, the teacher of each sequence's domain (checked against each teacher's own forward)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_mopd.toy.tiny import make_tiny_hf_model

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "trl" / "distill.py"


def load_script():
    spec = importlib.util.spec_from_file_location("trl_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_domain_teachers_give_each_row_its_own_teachers_logits(tmp_path):
    distill = load_script()
    paths = {
        "add": make_tiny_hf_model("qwen3_moe", str(tmp_path / "add"), seed=1),
        "reverse": make_tiny_hf_model("qwen3", str(tmp_path / "rev"), seed=2),
    }
    tok = AutoTokenizer.from_pretrained(paths["add"])
    teachers = {d: AutoModelForCausalLM.from_pretrained(p).eval() for d, p in paths.items()}
    both = distill.DomainTeachers(teachers, {tok.convert_tokens_to_ids("r"): "reverse"})
    prompts = ["12+7=", "rev:abc=", "rev:q=", "3+4="]
    domains = ["add", "reverse", "reverse", "add"]
    enc = [tok(p, add_special_tokens=False)["input_ids"] + [40, 41] for p in prompts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):  # left-padded, as TRL pads
        ids[i, width - len(e) :], mask[i, width - len(e) :] = torch.tensor(e), 1
    with torch.no_grad():
        hidden = both.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = both.get_output_embeddings()(hidden)
        assert both.domain_of(ids, mask).tolist() == [0, 1, 1, 0]
        for i, d in enumerate(domains):
            want = teachers[d](input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
            real = mask[i].bool()
            err = (logits[i, real] - want[0, real]).abs().max().item()
            assert err < 1e-4, (i, d, err)
