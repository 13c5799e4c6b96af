"""Rollout engines: sample the student's responses with their log mu (see base.py); the
in-process transformers engine (`hf_engine.py`); the weight sync after each step
(`weight_sync.py`)."""
