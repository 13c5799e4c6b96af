"""Peak memory of the logits: `mopd logprobs` and one MOPD train step, whole vs chunked.

    python tools/bench_logits_memory.py [--tokens 4096] [--vocab 151936] [--chunk 512]

Builds (once, under --work) a ~78 MB Hugging Face model with a Qwen vocabulary (151,936
ids): Qwen2 architecture, 1 layer, hidden 128, 2 heads (1 KV group), FFN 256, tied
embeddings, fp32 -- almost all of it the embedding, so the `[T, V]` logits dominate. Then,
each case in a fresh subprocess (peak RSS = `ru_maxrss` of that process):

- `baseline`: imports, builds the student from the folder, nothing else;
- `logprobs`: `mopd logprobs` of one `--tokens`-token sequence (`--logits-chunk-tokens` 0
  = whole logits, then `--chunk`);
- `train`: one `mopd_train_step` (forward + backward of the MOPD loss, Adam step) on that
  sequence as the response (`loss.correction=none`: the rollout log-probs are made up),
  with the sampled estimator, then the top-k reverse KL with the teacher's top-8 ids
  (whole, then chunked).

Prints each case's peak, the ratios whole / chunked, and whether the chunked results are
identical to the whole ones (the largest |difference| of the log-probs, of the loss and
of the grad norm). Needs about 6 GB of memory for the whole-logits cases.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(folder: str, vocab: int, tokens: int) -> str:
    """The benchmark model (see the module docstring), written once."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    return make_tiny_hf_model(
        "qwen2",
        folder,
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max(tokens, 4096),
        tie_word_embeddings=True,
    )


def peak_mb() -> float:
    """This process's peak resident set (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------
# the cases (each in its own process)


def child_logprobs(args: argparse.Namespace) -> dict:
    from megatron_mopd import cli

    out = os.path.join(args.work, f"logprobs-{args.chunk}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    argv = ["logprobs", "--hf", args.model, "--input", args.input, "--output", out]
    try:
        cli.main(argv + ["--logits-chunk-tokens", str(args.chunk)])
    except SystemExit as e:
        if e.code:
            raise
    with open(out) as f:
        values = json.loads(f.readline())["logprobs"]
    return {"logprobs": values}


def _student(args: argparse.Namespace):
    import torch

    from megatron_mopd.config import ModelConfig, ParallelConfig
    from megatron_mopd.distributed import init_distributed
    from megatron_mopd.student.load import build_student

    torch.manual_seed(0)
    parallel = ParallelConfig()
    recompute = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},  # core_attn: the [heads, T, T]
        "full": {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
    }[args.recompute]
    cfg = ModelConfig(hf_path=args.model, logits_chunk_tokens=args.chunk, **recompute)
    init_distributed(parallel, cfg, seed=0)
    chunks, cfg = build_student(cfg, parallel)
    return chunks, cfg, parallel


def child_baseline(args: argparse.Namespace) -> dict:
    _student(args)
    return {}


def child_train(args: argparse.Namespace) -> dict:
    import torch

    from megatron_mopd.batch import TrainBatch
    from megatron_mopd.config import LossConfig, TrainConfig
    from megatron_mopd.student.mopd_step import mopd_train_step
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    chunks, cfg, parallel = _student(args)
    chunks = wrap_ddp(chunks, parallel)
    optimizer, _ = build_optimizer(chunks, TrainConfig(lr=1e-4, lr_warmup_steps=0), parallel)
    T, K = args.tokens, 8
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    mask = torch.ones(1, T)
    mask[0, :16] = 0  # a 16-token prompt
    batch = TrainBatch(
        tokens_B_T=tokens,
        mask_B_T=mask,
        rollout_logprobs_B_T=-torch.rand(1, T, generator=g) * 5 * mask,
        teacher_logprobs_B_T=-torch.rand(1, T, generator=g) * 5 * mask,
        orm_advantages_B=torch.zeros(1),
        domain_ids_B=torch.zeros(1, dtype=torch.long),
        domains=["default"],
        lengths_B=torch.tensor([T]),
        teacher_topk_ids_B_T_K=torch.randint(0, cfg.vocab_size, (1, T, K), generator=g),
        teacher_topk_logprobs_B_T_K=torch.log_softmax(torch.randn(1, T, K + 1, generator=g), -1)[
            ..., :K
        ],
    )
    # no importance correction: the made-up rollout log-probs would mask every token
    loss_cfg = LossConfig(estimator=args.estimator, correction="none")
    start = time.perf_counter()
    out = mopd_train_step(chunks, optimizer, batch, loss_cfg, 1)
    return {
        "loss": out["loss"],
        "grad_norm": out["grad_norm"],
        "seconds": time.perf_counter() - start,
    }


CHILDREN = {"baseline": child_baseline, "logprobs": child_logprobs, "train": child_train}


def run_child(args: argparse.Namespace, kind: str, chunk: int, estimator: str = "sampled") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--chunk", str(chunk)]
    cmd += ["--work", args.work, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    cmd += ["--estimator", estimator, "--recompute", args.recompute]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(
            f"{kind} chunk={chunk} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk", type=int, default=512, help="model.logits_chunk_tokens")
    parser.add_argument("--work", default=os.path.join(REPO, "runs", "bench_logits_memory"))
    parser.add_argument("--skip-whole", action="store_true", help="only the chunked train steps")
    parser.add_argument(
        "--recompute",
        choices=("none", "selective", "full"),
        default="none",
        help="model.recompute_*: selective (core_attn) or full (uniform, 1 layer) in the train step",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--estimator", default="sampled", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = os.path.join(args.work, f"qwen2-v{args.vocab}")
    args.input = os.path.join(args.work, f"input-{args.tokens}.jsonl")

    if args.child:
        result = CHILDREN[args.child](args)
        result["peak_mb"] = peak_mb()
        print(json.dumps(result))
        return

    os.makedirs(args.work, exist_ok=True)
    build_model(args.model, args.vocab, args.tokens)
    import random

    rng = random.Random(0)
    with open(args.input, "w") as f:
        f.write(json.dumps({"input_ids": [rng.randrange(args.vocab) for _ in range(args.tokens)]}))
        f.write("\n")
    size = sum(
        os.path.getsize(os.path.join(args.model, n))
        for n in os.listdir(args.model)
        if n.endswith(".safetensors")
    )
    print(
        f"model: {size / 1e6:.1f} MB of fp32 weights (vocabulary {args.vocab}, tied), "
        f"one sequence of {args.tokens} tokens, chunk = {args.chunk} tokens, "
        f"recompute {args.recompute}"
    )
    base = run_child(args, "baseline", args.chunk)
    if args.skip_whole:  # only the chunked cases (e.g. to try another --chunk)
        for estimator in ("sampled", "topk_reverse_kl"):
            tr = run_child(args, "train", args.chunk, estimator)
            print(f"train {estimator} chunk {args.chunk}: peak {tr['peak_mb']:.0f} MB, {tr}")
        return
    print(f"baseline (imports + model built): peak {base['peak_mb']:.0f} MB")
    rows = []
    lp = {c: run_child(args, "logprobs", c) for c in (0, args.chunk)}
    diff = max(abs(a - b) for a, b in zip(lp[0]["logprobs"], lp[args.chunk]["logprobs"]))
    rows.append(("mopd logprobs", lp[0]["peak_mb"], lp[args.chunk]["peak_mb"], f"{diff:.1e}"))
    for estimator in ("sampled", "topk_reverse_kl"):
        tr = {c: run_child(args, "train", c, estimator) for c in (0, args.chunk)}
        dl = abs(tr[0]["loss"] - tr[args.chunk]["loss"])
        dg = abs(tr[0]["grad_norm"] - tr[args.chunk]["grad_norm"]) / max(tr[0]["grad_norm"], 1e-30)
        rows.append(
            (
                f"train step ({estimator})",
                tr[0]["peak_mb"],
                tr[args.chunk]["peak_mb"],
                f"loss {dl:.1e}, grad norm rel {dg:.1e}",
            )
        )
        print(
            f"  train {estimator}: {tr[0]['seconds']:.2f} s whole, "
            f"{tr[args.chunk]['seconds']:.2f} s chunked"
        )
    print(f"\n{'case':<32}{'whole MB':>10}{'chunked MB':>12}{'ratio':>8}  max |whole - chunked|")
    for name, whole, chunked, d in rows:
        print(f"{name:<32}{whole:>10.0f}{chunked:>12.0f}{whole / chunked:>8.2f}  {d}")


if __name__ == "__main__":
    main()
