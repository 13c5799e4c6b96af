"""Megatron checkpoints: HF -> mcore -> HF round trips, log-probs from a converted checkpoint
at several layouts, and the bad inputs of `mopd convert` (issue 5).

The commands run for real (`mopd convert ...`, `mopd logprobs --mcore ...`) in worker
launches shared by the session (`tests/workers/mcore_cli_cases.py`):

- `single` (one process, no torchrun): HF -> mcore for a tiny Qwen3-MoE and a tiny Qwen2
  (tied embeddings), and for Qwen3, Llama and Qwen2-MoE (shared expert), mcore -> HF of
  those (also sharded with an index, and in bf16), and log-probs from the checkpoints at TP1;
- `parallel` (torchrun, 2 processes): HF -> mcore at TP2xEP2 (ETP1) / TP2 and PP2, mcore -> HF
  of the one-process checkpoints at those layouts, log-probs at TP2, EP2 and PP2;
- `back` (one process): mcore -> HF of the checkpoints the `parallel` launch saved;
- `wide` (slow; torchrun, 4 processes): TP2xPP2xEP2 and TP2xEP2 with ETP2, and reading a
  checkpoint saved at one 4-process layout at another.

Round trips must give every tensor bitwise equal (names and dtypes too), an equivalent
config and the same tokenizer files; log-probs must match HF transformers within 1e-5.
The bad inputs run in this process (they fail before any process group exists).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from multirank import start_workers
from tiny_models import hf_logprobs, make_models, read_output, write_input

from megatron_mopd import cli
from megatron_mopd.convert.mcore import FORMAT, FORMAT_VERSION, MODEL_FILE, read_mcore_config
from megatron_mopd.errors import UserError

WORKER = os.path.join(os.path.dirname(__file__), "workers", "mcore_cli_cases.py")
ARCHS = ("qwen3_moe", "qwen2")
# also round-tripped in one process (with log-probs at TP1): the other supported families
EXTRA_ARCHS = ("qwen3", "llama", "qwen2_moe")
TOLERANCE = 1e-5
# layouts of the 2-process launch: name -> (arguments, architectures)
PARALLEL_LAYOUTS = {
    "tp2ep2": (["--tp", "2", "--ep", "2", "--etp", "1"], ("qwen3_moe",)),
    "tp2": (["--tp", "2"], ("qwen2",)),
    "pp2": (["--pp", "2"], ARCHS),
}
LOGPROB_LAYOUTS = {
    "tp2": (["--tp", "2"], ARCHS),
    "ep2": (["--ep", "2"], ("qwen3_moe",)),
    "pp2": (["--pp", "2"], ARCHS),
}
WIDE_LAYOUTS = {
    "tp2pp2ep2": ["--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1"],
    "tp2ep2etp2": ["--tp", "2", "--ep", "2", "--etp", "2"],
}
IGNORED_CONFIG_KEYS = {"torch_dtype", "dtype", "transformers_version"}


class ConvertRuns:
    """Session state: tiny models, and the launches (started on first use, in order)."""

    def __init__(self, root: str):
        self.root = root
        self.models = make_models(os.path.join(root, "models"), archs=ARCHS + EXTRA_ARCHS)
        self.input = write_input(os.path.join(root, "input.jsonl"))
        self._done: dict[str, dict] = {}
        self._failed: dict[str, str] = {}
        self._references: dict[str, list] = {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def mcore(self, arch: str, layout: str = "1p") -> str:
        return self.path("mcore", f"{arch}-{layout}")

    def _launch(self, name: str, nproc: int, steps: list[dict]) -> dict:
        if name in self._failed:
            pytest.fail(f"launch {name} failed earlier:\n{self._failed[name]}")
        if name not in self._done:
            launch = start_workers(
                WORKER,
                nproc,
                ["--steps", json.dumps(steps)],
                out_dir=self.path(f"launch-{name}"),
                timeout=900,
                torchrun=nproc > 1,
            )
            try:
                results = launch.wait()[0]
            except AssertionError as e:  # fail every test that needs it, launch once
                self._failed[name] = str(e)
                raise
            print(f"[convert-mcore] launch {name}: {launch.seconds:.1f} s")
            for step, r in results.items():
                print(f"    {step}: {r['seconds']:.1f} s")
            self._done[name] = results
        return self._done[name]

    def single(self) -> dict:
        steps = []
        for arch in ARCHS + EXTRA_ARCHS:
            steps.append(_convert_to_mcore(f"to-mcore-{arch}", self.models[arch], self.mcore(arch)))
        for arch in ARCHS + EXTRA_ARCHS:
            steps.append(_convert_to_hf(f"to-hf-{arch}", self.mcore(arch), self.path("hf", arch)))
            steps.append(self._logprobs("tp1", arch, []))
        steps.append(
            _convert_to_hf(
                "to-hf-sharded",
                self.mcore("qwen2"),
                self.path("hf", "qwen2-sharded"),
                ["--max-shard-size", "40KB"],
            )
        )
        steps.append(
            _convert_to_hf(
                "to-hf-bf16",
                self.mcore("qwen3_moe"),
                self.path("hf", "qwen3_moe-bf16"),
                ["--dtype", "bf16"],
            )
        )
        return self._launch("single", 1, steps)

    def parallel(self) -> dict:
        self.single()
        steps = []
        for layout, (args, archs) in PARALLEL_LAYOUTS.items():
            for arch in archs:
                steps.append(
                    _convert_to_mcore(
                        f"to-mcore-{arch}-{layout}",
                        self.models[arch],
                        self.mcore(arch, layout),
                        args,
                    )
                )
                steps.append(
                    _convert_to_hf(
                        f"to-hf-{arch}-{layout}",
                        self.mcore(arch),
                        self.path("hf", f"{arch}-from1p-{layout}"),
                        args,
                    )
                )
        for layout, (args, archs) in LOGPROB_LAYOUTS.items():
            for arch in archs:
                steps.append(self._logprobs(layout, arch, args))
        return self._launch("parallel", 2, steps)

    def back(self) -> dict:
        self.parallel()
        steps = [
            _convert_to_hf(
                f"to-hf-{arch}-{layout}",
                self.mcore(arch, layout),
                self.path("hf", f"{arch}-{layout}-to1p"),
            )
            for layout, (_, archs) in PARALLEL_LAYOUTS.items()
            for arch in archs
        ]
        return self._launch("back", 1, steps)

    def wide(self) -> dict:
        self.single()
        arch = "qwen3_moe"
        (first, first_args), (second, second_args) = WIDE_LAYOUTS.items()
        steps = [
            _convert_to_mcore(
                "to-mcore-wide", self.models[arch], self.mcore(arch, first), first_args
            ),
            # saved at one 4-process layout, read at another
            _convert_to_hf(
                "to-hf-wide-cross",
                self.mcore(arch, first),
                self.path("hf", f"{arch}-{first}-at-{second}"),
                second_args,
            ),
            _convert_to_hf(
                "to-hf-wide",
                self.mcore(arch),
                self.path("hf", f"{arch}-from1p-{first}"),
                first_args,
            ),
            self._logprobs(first, arch, first_args),
        ]
        return self._launch("wide", 4, steps)

    def _logprobs(self, layout: str, arch: str, args: list[str]) -> dict:
        argv = ["logprobs", "--mcore", self.mcore(arch), "--input", self.input]
        argv += ["--output", self.path("logprobs", f"{layout}-{arch}.jsonl")]
        os.makedirs(self.path("logprobs"), exist_ok=True)
        return {
            "name": f"logprobs-{layout}-{arch}",
            "argv": argv + args + ["--micro-batch-size", "2"],
        }

    def reference(self, arch: str) -> list:
        if arch not in self._references:
            self._references[arch] = hf_logprobs(self.models[arch])
        return self._references[arch]


def _convert_to_mcore(name: str, hf: str, out: str, args: list[str] | None = None) -> dict:
    argv = ["convert", "hf-to-mcore", "--hf", hf, "--out", out, *(args or [])]
    return {"name": name, "argv": argv}


def _convert_to_hf(name: str, mcore: str, out: str, args: list[str] | None = None) -> dict:
    argv = ["convert", "mcore-to-hf", "--mcore", mcore, "--out", out, *(args or [])]
    return {"name": name, "argv": argv}


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> ConvertRuns:
    return ConvertRuns(str(tmp_path_factory.mktemp("convert_mcore")))


# --------------------------------------------------------------------------------------
# comparing HF folders


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for fn in files:
        part = load_file(os.path.join(folder, fn))
        assert not set(part) & set(out), f"{fn}: tensors stored twice"
        out.update(part)
    return out


def assert_same_hf_folder(src: str, out: str, dtype: torch.dtype | None = None) -> None:
    """Every tensor bitwise equal (cast to `dtype` when given), configs equivalent, the
    same tokenizer files."""
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b), f"names differ: {sorted(set(a) ^ set(b))}"
    for name in a:
        want = a[name] if dtype is None else a[name].to(dtype)
        assert b[name].dtype == want.dtype, f"{name}: {b[name].dtype} != {want.dtype}"
        assert torch.equal(b[name], want), f"{name}: values differ"
    with open(os.path.join(src, "config.json")) as f:
        ca = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        cb = json.load(f)
    # equivalent: the same values, plus at most the head dim made explicit
    derived = {"head_dim": ca["hidden_size"] // ca["num_attention_heads"]}
    diff = {
        k: (ca.get(k), cb.get(k))
        for k in set(ca) | set(cb)
        if k not in IGNORED_CONFIG_KEYS
        and ca.get(k) != cb.get(k)
        and not (k not in ca and k in derived and cb[k] == derived[k])
    }
    assert not diff, f"config.json differs: {diff}"
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", None: ca.get("dtype")}[dtype]
    assert cb.get("dtype") == cb.get("torch_dtype") == name
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(src, fn), "rb") as f, open(os.path.join(out, fn), "rb") as g:
            assert f.read() == g.read(), f"{fn} differs"


# --------------------------------------------------------------------------------------
# one process


@pytest.mark.parametrize("arch", ARCHS + EXTRA_ARCHS)
def test_round_trip_one_process(runs: ConvertRuns, arch: str):
    runs.single()
    assert_same_hf_folder(runs.models[arch], runs.path("hf", arch))


def test_checkpoint_folder(runs: ConvertRuns):
    runs.single()
    folder = runs.mcore("qwen3_moe")
    with open(os.path.join(folder, MODEL_FILE)) as f:
        meta = json.load(f)
    assert meta["format"] == FORMAT and meta["version"] == FORMAT_VERSION
    layout = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "world_size": 1, "padded_vocab_size": 128}
    assert meta["saved_layout"] == layout
    assert meta["params_dtype"] == "fp32"
    assert any(n.endswith(".distcp") for n in meta["files"]) and "metadata.json" in meta["files"]
    for fn in ("tokenizer.json", "config.json", "metadata.json"):
        assert os.path.isfile(os.path.join(folder, fn)), fn
    assert not [n for n in os.listdir(os.path.dirname(folder)) if ".tmp" in n]
    cfg = read_mcore_config(folder)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.qk_layernorm) == (4, 2, True)
    assert cfg.mcore_path == folder and cfg.tokenizer_path == folder and cfg.hf_path is None


def test_sharded_export_has_an_index(runs: ConvertRuns):
    runs.single()
    out = runs.path("hf", "qwen2-sharded")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 1
    assert_same_hf_folder(runs.models["qwen2"], out)


def test_bf16_export_loads_in_transformers(runs: ConvertRuns):
    import transformers

    runs.single()
    out = runs.path("hf", "qwen3_moe-bf16")
    assert_same_hf_folder(runs.models["qwen3_moe"], out, dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (
        tok("ab")["input_ids"]
        == transformers.AutoTokenizer.from_pretrained(runs.models["qwen3_moe"])("ab")["input_ids"]
    )


def test_exported_model_computes_the_same_logits(runs: ConvertRuns):
    import transformers

    runs.single()
    ids = torch.tensor([[1, 5, 9, 33, 7, 100]])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(runs.models["qwen2"])(ids).logits
        out = transformers.AutoModelForCausalLM.from_pretrained(runs.path("hf", "qwen2"))(
            ids
        ).logits
    assert torch.equal(ref, out)


# --------------------------------------------------------------------------------------
# log-probs from a converted checkpoint


def _logprob_cases() -> list:
    params = [pytest.param("tp1", arch, id=f"tp1-{arch}") for arch in ARCHS + EXTRA_ARCHS]
    for layout, (_, archs) in LOGPROB_LAYOUTS.items():
        for arch in archs:
            params.append(
                pytest.param(layout, arch, marks=pytest.mark.multirank, id=f"{layout}-{arch}")
            )
    params.append(
        pytest.param(
            "tp2pp2ep2",
            "qwen3_moe",
            marks=[pytest.mark.multirank, pytest.mark.slow],
            id="tp2pp2ep2-qwen3_moe",
        )
    )
    return params


@pytest.mark.parametrize("layout,arch", _logprob_cases())
def test_logprobs_from_mcore_match_hf(runs: ConvertRuns, layout: str, arch: str):
    {"tp1": runs.single, "tp2pp2ep2": runs.wide}.get(layout, runs.parallel)()
    ours = read_output(runs.path("logprobs", f"{layout}-{arch}.jsonl"))
    ref = runs.reference(arch)
    assert len(ours) == len(ref)
    worst = 0.0
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        if a.numel():
            worst = max(worst, (a - b).abs().max().item())
    print(f"[convert-mcore] logprobs {layout} {arch}: max |diff| vs HF = {worst:.2e}")
    assert worst < TOLERANCE


# --------------------------------------------------------------------------------------
# under torchrun, and both ways


def _parallel_cases() -> list:
    return [
        pytest.param(layout, arch, marks=pytest.mark.multirank, id=f"{layout}-{arch}")
        for layout, (_, archs) in PARALLEL_LAYOUTS.items()
        for arch in archs
    ]


@pytest.mark.parametrize("layout,arch", _parallel_cases())
def test_round_trip_torchrun(runs: ConvertRuns, layout: str, arch: str):
    """HF -> mcore in parallel at `layout`, then mcore -> HF in one process; and the
    one-process checkpoint read back to HF in parallel at `layout`: both the source."""
    runs.back()
    with open(os.path.join(runs.mcore(arch, layout), MODEL_FILE)) as f:
        saved = json.load(f)["saved_layout"]
    assert saved["world_size"] == 2
    assert_same_hf_folder(runs.models[arch], runs.path("hf", f"{arch}-{layout}-to1p"))
    assert_same_hf_folder(runs.models[arch], runs.path("hf", f"{arch}-from1p-{layout}"))


@pytest.mark.multirank
@pytest.mark.slow
def test_round_trip_four_processes(runs: ConvertRuns):
    runs.wide()
    (first, _), (second, _) = WIDE_LAYOUTS.items()
    src = runs.models["qwen3_moe"]
    assert_same_hf_folder(src, runs.path("hf", f"qwen3_moe-{first}-at-{second}"))
    assert_same_hf_folder(src, runs.path("hf", f"qwen3_moe-from1p-{first}"))


# --------------------------------------------------------------------------------------
# bad inputs: one clear line naming the path and the problem


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Tiny HF models for the bad-input tests (no launch needed)."""
    return make_models(str(tmp_path_factory.mktemp("bad_inputs")), archs=ARCHS)


def test_missing_checkpoint_folder(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    line = _fails(
        capsys, ["convert", "mcore-to-hf", "--mcore", missing, "--out", str(tmp_path / "o")]
    )
    assert (
        line.startswith("mopd convert: error:") and missing in line and "no such directory" in line
    )
    inp = write_input(str(tmp_path / "in.jsonl"))
    out = str(tmp_path / "out.jsonl")
    line = _fails(capsys, ["logprobs", "--mcore", missing, "--input", inp, "--output", out])
    assert line.startswith("mopd logprobs: error:") and missing in line
    assert "no such directory" in line


def _fake_checkpoint(
    folder: str, files: dict[str, int] | None = None, tokenizer: bool = True
) -> str:
    """A folder that looks like a complete checkpoint (files of the given sizes)."""
    os.makedirs(folder)
    files = files or {"metadata.json": 40, ".metadata": 100, "common.pt": 50, "__0_0.distcp": 300}
    for name, size in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x" * size)
    if tokenizer:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{}")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
        "params_dtype": "fp32",
        "files": files,
    }
    with open(os.path.join(folder, MODEL_FILE), "w") as f:
        json.dump(meta, f)
    return folder


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("none", None),
        ("no_model_file", "no mopd_model.json"),
        ("no_metadata", "no metadata.json"),
        ("missing_shard", "__0_0.distcp is missing"),
        ("truncated_shard", "__0_0.distcp has 100 bytes, expected 300"),
        ("not_a_dir", "not a directory"),
    ],
)
def test_partial_checkpoint_folder(tmp_path, damage: str, expected: str | None):
    folder = _fake_checkpoint(str(tmp_path / "ckpt"))
    if damage == "no_model_file":
        os.remove(os.path.join(folder, MODEL_FILE))
    elif damage == "no_metadata":
        os.remove(os.path.join(folder, "metadata.json"))
    elif damage == "missing_shard":
        os.remove(os.path.join(folder, "__0_0.distcp"))
    elif damage == "truncated_shard":
        with open(os.path.join(folder, "__0_0.distcp"), "wb") as f:
            f.write(b"x" * 100)
    elif damage == "not_a_dir":
        shutil.rmtree(folder)
        with open(folder, "w") as f:
            f.write("")
    if expected is None:
        assert read_mcore_config(folder).num_layers == 2
        return
    with pytest.raises(UserError) as exc:
        read_mcore_config(folder)
    assert folder in str(exc.value) and expected in str(exc.value)


def test_partial_real_checkpoint_is_refused(runs: ConvertRuns, capsys, tmp_path):
    """A truncated shard of a real checkpoint: refused before anything is loaded."""
    runs.single()
    copy = str(tmp_path / "copy")
    shutil.copytree(runs.mcore("qwen2"), copy)
    shard = sorted(n for n in os.listdir(copy) if n.endswith(".distcp"))[0]
    with open(os.path.join(copy, shard), "r+b") as f:
        f.truncate(10)
    line = _fails(capsys, ["convert", "mcore-to-hf", "--mcore", copy, "--out", str(tmp_path / "o")])
    assert copy in line and shard in line and "expected" in line
    assert not os.path.exists(tmp_path / "o")


def test_hf_folder_given_as_checkpoint(tiny, capsys, tmp_path):
    line = _fails(
        capsys, ["convert", "mcore-to-hf", "--mcore", tiny["qwen2"], "--out", str(tmp_path / "o")]
    )
    assert tiny["qwen2"] in line and "Hugging Face folder" in line


def test_unsupported_architecture(tiny, capsys, tmp_path):
    bad = str(tmp_path / "gpt2")
    shutil.copytree(tiny["qwen2"], bad)
    with open(os.path.join(bad, "config.json")) as f:
        config = json.load(f)
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    line = _fails(capsys, ["convert", "hf-to-mcore", "--hf", bad, "--out", str(tmp_path / "o")])
    assert bad in line and "gpt2" in line and "not supported" in line
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize(
    "arch,args,expected",
    [
        ("qwen2", ["--tp", "3"], "tensor_model_parallel_size=3 does not divide"),
        ("qwen3_moe", ["--ep", "3"], "expert_model_parallel_size=3 does not divide"),
        ("qwen2", ["--pp", "3"], "pipeline_model_parallel_size=3 does not divide"),
    ],
)
def test_layout_that_does_not_divide_the_model(tiny, capsys, tmp_path, arch, args, expected):
    out = str(tmp_path / "o")
    line = _fails(capsys, ["convert", "hf-to-mcore", "--hf", tiny[arch], "--out", out, *args])
    assert tiny[arch] in line and expected in line
    assert not os.path.exists(out)


def test_layout_that_does_not_divide_a_checkpoint(capsys, tmp_path):
    folder = _fake_checkpoint(str(tmp_path / "ckpt"))
    line = _fails(
        capsys,
        ["convert", "mcore-to-hf", "--mcore", folder, "--out", str(tmp_path / "o"), "--tp", "3"],
    )
    assert folder in line and "does not divide" in line


def test_tokenizer_missing(tiny, capsys, tmp_path):
    bare = str(tmp_path / "bare")
    os.makedirs(bare)
    for fn in ("config.json", "model.safetensors"):
        shutil.copyfile(os.path.join(tiny["qwen2"], fn), os.path.join(bare, fn))
    line = _fails(capsys, ["convert", "hf-to-mcore", "--hf", bare, "--out", str(tmp_path / "o")])
    assert bare in line and "no tokenizer" in line
    folder = _fake_checkpoint(str(tmp_path / "ckpt"), tokenizer=False)
    line = _fails(
        capsys, ["convert", "mcore-to-hf", "--mcore", folder, "--out", str(tmp_path / "p")]
    )
    assert folder in line and "no tokenizer" in line


def test_output_folder_not_empty(tiny, capsys, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    line = _fails(capsys, ["convert", "hf-to-mcore", "--hf", tiny["qwen2"], "--out", str(out)])
    assert str(out) in line and "not empty" in line


def test_parse_size():
    from megatron_mopd.commands.convert import parse_size

    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert parse_size("40KB") == 40_000
    assert parse_size("123") == 123
    with pytest.raises(UserError):
        parse_size("lots")


def test_factory_merge_reuses_the_parameter():
    """`merge_in_place`: pieces loaded into views of the parameter merge to the parameter
    itself (no copy); pieces elsewhere (e.g. a strategy that loaded into new tensors) go
    through the factory's own merge."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from megatron_mopd.convert.dist_ckpt import merge_in_place

    param = torch.arange(12.0).reshape(4, 3)
    calls = []

    def merge(parts):
        calls.append(len(parts))
        return torch.cat(parts)

    factory = ShardedTensorFactory("w", param, lambda *a: None, merge, replica_id=0)
    merge_in_place({"model": {"w": factory}})
    assert factory.merge_fn(list(torch.chunk(param, 2))) is param and calls == []
    copies = [t.clone() for t in torch.chunk(param, 2)]
    out = factory.merge_fn(copies)
    assert calls == [2] and torch.equal(out, param) and out.data_ptr() != param.data_ptr()
