"""Teachers: score the student's responses, one teacher per domain (see base.py)."""
