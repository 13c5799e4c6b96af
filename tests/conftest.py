"""Shared pytest fixtures (keep this small: test-specific fixtures live in their modules).

Multi-process tests use `tests/multirank.py` (torchrun + gloo, with timeouts); their
launches are cached in session-scoped fixtures of the modules that need them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # lets test modules `import multirank`
    sys.path.insert(0, str(TESTS))

# Keep in-process torch to one thread: the machines are small and shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root directory."""
    return REPO
