"""Outcome rewards per domain (optional: only used when `loss.alpha != 0` or for eval).

A reward function takes the decoded response text and the record's answer and returns a
float. Built in: `exact_match` (stripped strings equal) and `math` (the last number in the
response, or the content of the last `\\boxed{...}`, equals the answer numerically).
Any other function is named `module:function` in the recipe, e.g.
`rewards: {code: my_project.rewards:unit_tests}`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from megatron_mopd.errors import ConfigError

RewardFn = Callable[[str, str], float]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response equals the answer after stripping whitespace, else 0.0."""
    return float(response.strip() == str(answer).strip())


def _to_number(text: str) -> float | None:
    text = text.strip().replace(",", "").rstrip(".")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def math_answer_match(response: str, answer: str) -> float:
    """1.0 when the response's final answer equals `answer` as a number (or as text)."""
    boxed = _BOXED.findall(response)
    candidate = boxed[-1] if boxed else None
    if candidate is None:
        numbers = _NUMBER.findall(response)
        candidate = numbers[-1] if numbers else response
    a, b = _to_number(candidate), _to_number(str(answer))
    if a is not None and b is not None:
        return float(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))
    return float(candidate.strip() == str(answer).strip())


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "math": math_answer_match}


def load_reward_fn(spec: str, key: str = "rewards") -> RewardFn:
    """A built-in name or `module:function`; errors name the config key."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ConfigError(
            f"{key}={spec!r}: use a built-in reward ({', '.join(BUILTIN)}) or 'module:function'"
        )
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: {module_name} has no function {fn_name}")
    return fn
