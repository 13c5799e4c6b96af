"""Wall time and peak memory of `mopd convert` in both directions, on a ~100M-parameter model.

    python tools/bench_convert.py                   # Qwen3-MoE-like, ~100M params, fp32
    python tools/bench_convert.py --layers 2 --vocab 8000 --keep DIR

The model is built locally (`tiny.make_tiny_hf_model` with bigger sizes: hidden 512, 8
experts of 1024, vocabulary 32,000, untied). Each direction runs as its own process (the
real command, `python -m megatron_mopd convert ...`, one process); while it runs, the
whole process tree is sampled (psutil) for the sum of RSS and of PSS (proportional set
size: pages shared between processes, such as dist_checkpointing's forked writers,
counted once), and the kernel's high-water mark of the largest process (`ru_maxrss` of the
children) is read when it ends. Reported per direction: wall time, peak RSS / PSS as
multiples of the model's size in bytes, and the same above a baseline process that only
imports what the command imports (torch, megatron-core, transformers). `mcore-to-hf` runs
twice: with the default 2 GB shards and with `--small-shard-mb` shards; tensors are streamed
to the safetensors files one at a time, so the shard size should not change the peak.
The target: peak memory under 2.5x the model size.

Left out: timing under torchrun (on these 2-core machines several processes only share
the same cores; the point of the parallel path is memory per process on big models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# runs a command and reports the kernel's high-water mark of its largest process
WRAP = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)
BASELINE = (
    "import torch, megatron.core, transformers, safetensors\n"
    "import megatron_mopd.convert.mcore, megatron_mopd.student.model\n"
)


def model_overrides(args: argparse.Namespace) -> dict:
    """The HF config overrides of the benchmark model."""
    return dict(
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=2,
        moe_intermediate_size=args.expert_size,
        max_position_embeddings=4096,
    )


class TreeSampler:
    """Samples the summed RSS and PSS of a process and its descendants in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(cmd: list[str]) -> dict:
    """Run `cmd` (a fresh process) and return its wall time and peak memory (bytes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as hwm:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAP, hwm.name, *cmd],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        sampler = TreeSampler(proc.pid)
        out, _ = proc.communicate()
        seconds = time.perf_counter() - start
        sampler.stop()
        if proc.returncode:
            sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out.decode()[-3000:]}")
        maxrss = int(hwm.read() or 0) * 1024
    return {
        "seconds": seconds,
        "peak_rss_tree": sampler.peak_rss,  # sampled every 50 ms, all processes summed
        "peak_pss_tree": sampler.peak_pss,
        "hwm_largest": maxrss,  # exact: the largest single process's peak RSS
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:6.0f} MiB"


def folder_bytes(folder: str) -> int:
    """Bytes of the files in `folder`."""
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-size", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--small-shard-mb", type=int, default=100, help="also export with shards of this size"
    )
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    from megatron_mopd.toy.tiny import make_tiny_hf_model

    work = args.keep or tempfile.mkdtemp(prefix="bench-convert-")
    hf, mcore, back = (os.path.join(work, n) for n in ("hf", "mcore", "hf_back"))
    for folder in (mcore, back):
        shutil.rmtree(folder, ignore_errors=True)
    if not os.path.isfile(os.path.join(hf, "config.json")):
        t = time.perf_counter()
        make_tiny_hf_model("qwen3_moe", hf, seed=0, vocab_size=args.vocab, **model_overrides(args))
        print(f"built the model in {time.perf_counter() - t:.1f} s: {hf}", flush=True)
    numel, model_bytes = model_size(hf)
    print(f"model: {numel / 1e6:.1f}M parameters, {model_bytes / 2**20:.0f} MiB (fp32)", flush=True)

    py = sys.executable
    base = measure([py, "-c", BASELINE])
    to_hf = [py, "-m", "megatron_mopd", "convert", "mcore-to-hf", "--mcore", mcore, "--out"]
    runs = {
        "hf-to-mcore": measure(
            [py, "-m", "megatron_mopd", "convert", "hf-to-mcore", "--hf", hf, "--out", mcore]
        ),
        "mcore-to-hf": measure([*to_hf, back]),
    }
    shutil.rmtree(back)
    shard = f"{args.small_shard_mb}MB"
    runs[f"  shards {shard}"] = measure([*to_hf, back, "--max-shard-size", shard])

    figures = {"parameters": numel, "model_bytes": model_bytes, **report(base, runs, model_bytes)}
    print(
        f"\non disk: HF {folder_bytes(hf) / 2**20:.0f} MiB, Megatron {folder_bytes(mcore) / 2**20:.0f} MiB,"
        f" HF again {folder_bytes(back) / 2**20:.0f} MiB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def model_size(hf: str) -> tuple[int, int]:
    """(parameters, fp32 bytes) of the HF folder's model.safetensors."""
    from safetensors import safe_open

    numel = 0
    with safe_open(os.path.join(hf, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            numel += n
    return numel, 4 * numel


def report(base: dict, runs: dict, model_bytes: int) -> dict:
    """Print the table of runs against the imports-only baseline; returns the figures."""

    def x(v: float | None) -> str:
        return "   n/a" if v is None else f"{v / model_bytes:5.2f}x"

    print(
        f"\nbaseline (imports only): peak RSS {base['hwm_largest'] / 2**20:.0f} MiB "
        f"({x(base['hwm_largest'])}), {base['seconds']:.1f} s"
    )
    print(
        "direction      wall s   peak RSS (x model)  peak PSS (x model)  largest-process HWM"
        "   above baseline: HWM   PSS"
    )
    figures = {"baseline": base}
    for name, r in runs.items():
        above_hwm = r["hwm_largest"] - base["hwm_largest"]
        above_pss = r["peak_pss_tree"] - base["peak_pss_tree"]
        r.update(above_baseline_hwm=above_hwm, above_baseline_pss=above_pss)
        print(
            f"{name:13s} {r['seconds']:7.1f} {_mib(r['peak_rss_tree'])} {x(r['peak_rss_tree'])}"
            f" {_mib(r['peak_pss_tree'])} {x(r['peak_pss_tree'])}"
            f"  {_mib(r['hwm_largest'])} {x(r['hwm_largest'])}"
            f"      {x(above_hwm)} {x(above_pss)}"
        )
        figures[name] = r
    return figures


if __name__ == "__main__":
    main()
