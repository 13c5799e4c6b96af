"""The CPU demo's toy kit: synthetic tasks, tiny teacher/student SFT, a plain MOPD prototype,
tiny HF models and character tokenizers (`tiny.py`, also for tests and benchmarks)."""
