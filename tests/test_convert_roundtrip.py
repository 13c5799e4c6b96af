"""HF -> Megatron (any layout) -> HF is bitwise exact; bad checkpoints fail on every rank.

One torchrun launch per world size (`tests/workers/convert_cases.py`) runs several cases:
each builds the student from an HF folder at a layout (weights loaded by the bridge),
exports it back with `export_hf_checkpoint` and the test compares every tensor with the
source. Covered: TP (QKV interleaving, gate/up per shard, vocab rows), EP x TP with ETP1
and ETP2 (global expert index), PP (layer offsets, the tied output layer on the last
stage), tied embeddings, sharded output with an index (re-read at another layout: a
chained round trip), a bf16 checkpoint held in fp32 parameters and exported as bf16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from multirank import start_workers
from safetensors.torch import load_file, save_file
from tiny_models import make_models

from megatron_mopd.convert import HFCheckpoint, model_config_from_hf

WORKER = os.path.join(os.path.dirname(__file__), "workers", "convert_cases.py")
SHARD_BYTES = 96 * 1024  # small shards: exercise the index

pytestmark = pytest.mark.multirank


def _read_all(folder: str) -> dict[str, torch.Tensor]:
    ckpt = HFCheckpoint(folder)
    try:
        return {name: ckpt.read(name) for name in sorted(ckpt.names())}
    finally:
        ckpt.close()


def _bf16_copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, f"{dst}/model.safetensors")
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["torch_dtype"] = "bfloat16"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def _doctored(src: str, dst: str, change) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    change(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


BAD = {
    "extra": lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)),
    "missing": lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
    "shape": lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)),
}
BAD_MESSAGES = {
    "extra": "model.layers.0.mlp.extra.weight",
    "missing": "model.layers.1.mlp.experts.3.up_proj.weight",
    "shape": "k_proj",
}

# group -> (processes, slow, [(case name, source key, layout kwargs)])
GROUPS = {
    "2proc": (
        2,
        False,
        [
            ("tp2-ep2-etp1-qwen3_moe", "qwen3_moe", dict(tp=2, ep=2, etp=1, sharded=True)),
            ("tp2-qwen2", "qwen2", dict(tp=2)),
            ("pp2-qwen2", "qwen2", dict(pp=2)),
            ("chain-pp2-qwen3_moe", "@tp2-ep2-etp1-qwen3_moe", dict(pp=2)),
            ("ep2-qwen3_moe_bf16", "qwen3_moe_bf16", dict(ep=2, dtype="bf16")),
        ],
    ),
    "4proc": (
        4,
        True,
        [
            ("tp2-pp2-ep2-qwen3_moe", "qwen3_moe", dict(tp=2, pp=2, ep=2, etp=1)),
            ("tp2-ep2-etp2-qwen3_moe", "qwen3_moe", dict(tp=2, ep=2, etp=2)),
            ("tp2-pp2-qwen3", "qwen3", dict(tp=2, pp=2)),
            ("tp2-pp2-llama", "llama", dict(tp=2, pp=2)),
        ],
    ),
}


class Roundtrips:
    """Session state: source folders and one launch per group."""

    def __init__(self, root: str):
        self.root = root
        self.sources = make_models(os.path.join(root, "models"))
        self.sources["qwen3_moe_bf16"] = _bf16_copy(
            self.sources["qwen3_moe"], os.path.join(root, "models", "qwen3_moe_bf16")
        )
        self.bad = {
            kind: _doctored(self.sources["qwen3_moe"], os.path.join(root, "bad", kind), fn)
            for kind, fn in BAD.items()
        }
        self.results: dict[str, list[dict]] = {}

    def source(self, case: str) -> str:
        for _, _, cases in GROUPS.values():
            for name, src, _ in cases:
                if name == case:
                    return self.source(src[1:]) if src.startswith("@") else self.sources[src]
        raise KeyError(case)

    def export_dir(self, case: str) -> str:
        return os.path.join(self.root, "export", case)

    def run(self, group: str) -> list[dict]:
        if group not in self.results:
            nproc, _, cases = GROUPS[group]
            specs = []
            for i, (name, src, kw) in enumerate(cases):
                kw = dict(kw)
                spec = {
                    "name": name,
                    "hf": self.export_dir(src[1:]) if src.startswith("@") else self.sources[src],
                    "export": self.export_dir(name),
                }
                if kw.pop("sharded", False):
                    spec["max_shard_bytes"] = SHARD_BYTES
                if i == 0:
                    spec["bad"] = [self.bad[k] for k in BAD]
                    spec["derive"] = True
                spec.update(kw)
                specs.append(spec)
            launch = start_workers(
                WORKER,
                nproc,
                ["--cases", json.dumps(specs)],
                out_dir=os.path.join(self.root, f"run-{group}"),
                timeout=900,
            )
            self.results[group] = launch.wait()
        return self.results[group]


@pytest.fixture(scope="session")
def roundtrips(tmp_path_factory) -> Roundtrips:
    return Roundtrips(str(tmp_path_factory.mktemp("roundtrip")))


def _cases():
    out = []
    for group, (_, slow, cases) in GROUPS.items():
        marks = [pytest.mark.slow] if slow else []
        out += [pytest.param(group, name, marks=marks, id=name) for name, _, _ in cases]
    return out


@pytest.mark.parametrize("group,case", _cases())
def test_roundtrip_is_bitwise(roundtrips: Roundtrips, group: str, case: str):
    roundtrips.run(group)
    src, out = roundtrips.source(case), roundtrips.export_dir(case)
    original, exported = _read_all(src), _read_all(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), f"{case}: {name} differs"
    # the config describes the same architecture; the tokenizer came along
    assert model_config_from_hf(out) == dataclasses.replace(model_config_from_hf(src), hf_path=out)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_sharded_export_has_a_consistent_index(roundtrips: Roundtrips):
    roundtrips.run("2proc")
    out = roundtrips.export_dir("tp2-ep2-etp1-qwen3_moe")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(
        p for p in os.listdir(out) if p.endswith(".safetensors")
    )
    total = sum(t.numel() * t.element_size() for t in _read_all(out).values())
    assert index["metadata"]["total_size"] == total
    assert not [p for p in os.listdir(out) if "tmp" in p]


def test_exported_folder_loads_in_transformers(roundtrips: Roundtrips):
    import transformers

    roundtrips.run("2proc")
    ids = torch.tensor([[1, 7, 3, 99, 42, 5]])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(roundtrips.source("pp2-qwen2"))
        out = transformers.AutoModelForCausalLM.from_pretrained(roundtrips.export_dir("pp2-qwen2"))
        assert out.config.tie_word_embeddings
        assert torch.equal(ref(ids).logits, out(ids).logits)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_fails_on_every_rank(roundtrips: Roundtrips, kind: str):
    results = roundtrips.run("2proc")
    i = list(BAD).index(kind)
    messages = [r["tp2-ep2-etp1-qwen3_moe"]["errors"][i] for r in results]
    assert all(m is not None for m in messages), messages
    assert len(set(messages)) == 1, messages  # the same error on every rank
    assert BAD_MESSAGES[kind] in messages[0], messages[0]


def test_export_without_model_config_reads_the_chunks(roundtrips: Roundtrips):
    results = roundtrips.run("2proc")
    assert results[0]["tp2-ep2-etp1-qwen3_moe"]["derived_equal"] is True
