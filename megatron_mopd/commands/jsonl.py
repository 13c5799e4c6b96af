"""The JSONL inputs of `mopd logprobs`, `score` and `mismatch`: one field per record,
read with errors that name the file, or `path:line` and what is wrong there."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from megatron_mopd.errors import UserError


def read_field(
    path: str, key: str, check: Callable[[str, Any], str | None]
) -> list[tuple[int, Any]]:
    """(line number, record[key]) for every non-blank line of `path`. Raises `UserError`
    naming the file (missing, unreadable, not UTF-8) or `path:line` (not JSON, not an
    object, no `key`, or the message `check(key, value)` returns for a bad value)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a file")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{where}: not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(record, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
                if key not in record:
                    raise UserError(f'{where}: missing "{key}" (keys: {sorted(record)})')
                problem = check(key, record[key])
                if problem:
                    raise UserError(f"{where}: {problem}")
                out.append((n, record[key]))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return out


def token_ids_problem(key: str, ids: Any) -> str | None:
    """What is wrong with a list of token ids, or None."""
    if not isinstance(ids, list):
        return f'"{key}" must be a list of token ids, got {type(ids).__name__}'
    if not ids:
        return f'"{key}" is empty; a sequence needs at least one token'
    for j, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            return f'"{key}"[{j}]={t!r} is not an integer token id'
        if t < 0:
            return f'"{key}"[{j}]={t} is a negative token id'
    return None


def logprobs_problem(key: str, values: Any) -> str | None:
    """What is wrong with a list of log-probs, or None."""
    if not isinstance(values, list):
        return f'"{key}" must be a list of numbers, got {type(values).__name__}'
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return f'"{key}"[{j}]={v!r} is not a finite number'
    return None
