"""`mopd serve --hf HF_DIR --port P`: a Hugging Face model on CPU behind SGLang's HTTP API.

Serves the subset of SGLang's API this project uses (see `megatron_mopd/server/app.py`), so
the SGLang teacher and rollout backends, `mopd score` and `sglang-router` can be run
against it on machines where SGLang cannot. Stops cleanly on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mopd serve` (no heavy imports here)."""
    parser.add_argument("--hf", required=True, metavar="HF_DIR", help="Hugging Face model folder")
    parser.add_argument("--port", type=int, default=30000, help="port (default 30000; 0 = any)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    parser.add_argument("--weight-version", default="default", help="initial weight_version")
    parser.add_argument("--seed", type=int, default=None, help="seed of unseeded sampling")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long the batcher waits for concurrent requests to join a batch (default 5)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="padded tokens per forward pass (default 16384)",
    )
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--return-original-logprob",
        action="store_true",
        help="output log-probs without temperature (SGLANG_RETURN_ORIGINAL_LOGPROB=1)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request body accepted; larger ones get 413 (default 64 MiB)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGTERM / SIGINT."""
    import logging
    import os
    import signal
    import sys
    import threading

    from megatron_mopd.errors import UserError
    from megatron_mopd.server.app import SGLangCompatibleServer

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s mopd serve: %(message)s", stream=sys.stderr
    )
    if not os.path.isfile(os.path.join(args.hf, "config.json")):
        raise UserError(f"--hf {args.hf}: not a Hugging Face model folder (no config.json)")
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    try:
        server = SGLangCompatibleServer(
            args.hf,
            host=args.host,
            port=args.port,
            dtype=args.dtype,
            weight_version=args.weight_version,
            seed=args.seed,
            batch_wait_ms=args.batch_wait_ms,
            max_batch_tokens=args.max_batch_tokens,
            return_original_logprob=args.return_original_logprob,
            verbose=args.verbose,
            max_body_bytes=args.max_body_bytes,
        )
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e}") from None

    def stop(signum, frame) -> None:
        # shutdown() waits for serve_forever() to return: call it from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def load() -> None:
        try:
            server.load()
        except BaseException:  # noqa: BLE001 - recorded in server.load_error, reported below
            stop(None, None)

    # the port is bound: answer /health with 503 while the model loads, like SGLang
    threading.Thread(target=load, name="mopd-load", daemon=True).start()
    print(f"mopd serve: listening on {server.url} (loading {args.hf})", file=sys.stderr, flush=True)
    server.serve_forever()
    print("mopd serve: stopped", file=sys.stderr, flush=True)
    if server.load_error is not None:
        raise UserError(f"cannot load {args.hf}: {server.load_error}")
    return 0
