"""Seconds and peak trainer memory of one weight sync into real SGLang, per mode.

    python tools/bench_weight_sync.py                 # ~100M-parameter Qwen3-MoE, fp32
    python tools/bench_weight_sync.py --bucket-mb 64 --rounds 3

Builds a Qwen3-MoE (hidden 512, 8 layers, 8 experts of 640, vocabulary 32,000: ~102M
parameters, 410 MB in fp32), serves it with real SGLang on CPU
(`tools/sglang_cpu_server.sh`, needs `make sglang`), builds the Megatron student from the
same folder on one gloo rank, and syncs it `--rounds` times per mode (`disk`, `tensor`,
`distributed` over gloo), interleaved, through `weight_sync.sync_weights` as the trainer
does. Each sync's weights are the student's plus a new shift, and after the last round of
each mode the server's log-probs are checked against transformers' forward of the
expected weights. A thread samples the trainer's RSS every 5 ms. Printed per mode: the
median seconds per sync, and the peak RSS above the steady state before the sync, in MB
and as a multiple of the bucket size (or, for `disk`, of the model), with the lowest
round's peak (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

MODES = ("disk", "tensor", "distributed")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest RSS seen while the `with` block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def build_model(root: str, args: argparse.Namespace) -> str:
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    return make_tiny_hf_model(
        "qwen3_moe",
        os.path.join(root, "model"),
        seed=0,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        moe_intermediate_size=args.expert_size,
        init_std=0.02,
    )


def start_server(model: str, log: str) -> tuple[subprocess.Popen, str]:
    from sglang_helpers import free_port

    port = free_port()
    out = open(log, "wb")
    proc = subprocess.Popen(
        ["bash", os.path.join(REPO, "tools", "sglang_cpu_server.sh")]
        + ["--model-path", model, "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if "sglang: ready at" in open(log, errors="replace").read():
            return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            break
        time.sleep(1)
    sys.exit(f"SGLang did not start:\n{open(log, errors='replace').read()[-3000:]}")


def expected_logprobs_diff(url: str, model: str, shift: float, root: str) -> float:
    """Max |served - transformers(model + shift)| over a few sequences."""
    from safetensors.torch import load_file, save_file
    from sglang_helpers import random_seqs, reference_logprobs

    from megatron_mopd.sglang.client import SGLangClient

    ref = os.path.join(root, "expected")
    shutil.rmtree(ref, ignore_errors=True)
    shutil.copytree(model, ref)
    weights = load_file(os.path.join(model, "model.safetensors"))
    save_file({k: v + shift for k, v in weights.items()}, os.path.join(ref, "model.safetensors"))
    seqs = random_seqs(4, 8, 40, vocab=128, seed=1)
    with SGLangClient([url]) as client:
        scored = client.score(seqs)
    reference = reference_logprobs(ref, seqs)
    return max(abs(a - b) for s, r in zip(scored, reference) for a, b in zip(s.logprobs, r))


def measure(args: argparse.Namespace, root: str, model: str, url: str) -> dict:
    import torch

    from megatron_mopd import distributed
    from megatron_mopd.config import load_config
    from megatron_mopd.rollout.factory import build_rollout_engine
    from megatron_mopd.rollout.weight_sync import sync_weights
    from megatron_mopd.sglang.client import SGLangClient
    from megatron_mopd.student.load import build_student

    base = [f"model.hf_path={model}", f"run_dir={os.path.join(root, 'run')}"]
    cfg = load_config(None, base)
    distributed.init_distributed(cfg.parallel, seed=0)
    chunks, arch = build_student(cfg.model, cfg.parallel)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    engines, cfgs = {}, {}
    for mode in MODES:
        cfgs[mode] = load_config(
            None,
            [*base, "rollout.backend=sglang", f"rollout.urls=[{url}]"]
            + [f"rollout.weight_sync={mode}", f"rollout.weight_sync_bucket_mb={args.bucket_mb}"]
            + ["rollout.weight_sync_address=127.0.0.1", f"rollout.weight_sync_port={_port()}"],
        )
        engines[mode] = build_rollout_engine(cfgs[mode])
    results = {m: {"seconds": [], "peak": []} for m in MODES}
    shift, step = 0.0, 0
    for _ in range(args.rounds):
        for mode in MODES:
            step += 1
            with torch.no_grad():
                for c in chunks:
                    for p in c.parameters():
                        p.add_(1e-3)
            shift += 1e-3
            import gc

            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                sync_weights(chunks, engines[mode], cfgs[mode], step, model_cfg=arch)
                seconds = time.perf_counter() - t0
            results[mode]["seconds"].append(seconds)
            results[mode]["peak"].append(mem.peak - mem.before)
            if _ == args.rounds - 1:
                results[mode]["diff"] = expected_logprobs_diff(url, model, shift, root)
            print(
                f"  {mode}: {seconds:.2f} s, +{(mem.peak - mem.before) / 2**20:.0f} MiB", flush=True
            )
    for e in engines.values():
        e.close()
    with SGLangClient([url]) as client:
        results["server_version"] = client.model_info()["weight_version"]
    results["params"] = n_params
    distributed.destroy()
    return results


def _port() -> int:
    from sglang_helpers import free_port

    return free_port()


def report(results: dict, args: argparse.Namespace) -> None:
    n = results["params"]
    model_mb = n * 4 / 2**20
    print(
        f"\nmodel: {n / 1e6:.1f}M parameters, {model_mb:.0f} MiB in fp32; bucket {args.bucket_mb} MiB"
    )
    print(
        "| mode | s per sync (median) | peak RSS above steady (min over rounds) | log-prob max diff |"
    )
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        r = results[mode]
        peak = min(r["peak"]) / 2**20
        unit = model_mb if mode == "disk" else min(args.bucket_mb, model_mb)
        what = "model" if mode == "disk" else "bucket"
        print(
            f"| {mode} | {statistics.median(r['seconds']):.2f} | {peak:.0f} MiB "
            f"({peak / unit:.2f}x the {what}) | {r['diff']:.1e} |"
        )


def main() -> None:
    """Parse flags, build the model, start SGLang, measure, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-size", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=float, default=512.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for k, v in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_port()))
    root = tempfile.mkdtemp(prefix="bench_sync_")
    server = None
    try:
        model = build_model(root, args)
        server, url = start_server(model, os.path.join(root, "sglang.log"))
        results = measure(args, root, model, url)
        report(results, args)
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
