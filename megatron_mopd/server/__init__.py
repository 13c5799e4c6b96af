"""Our SGLang-compatible CPU server (`mopd serve`): `app.py` (the HTTP server and the
batcher) over `protocol.py` (parsing requests, building answers) and an in-process
`rollout.hf_engine.HFEngine`. Kept for fault-injection tests; not the reference."""
