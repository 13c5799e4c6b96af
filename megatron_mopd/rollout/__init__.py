"""Rollout engines: sample the student's responses with their log mu (see base.py)."""
