"""Synthetic tasks of the CPU demo: two domains with short, exactly scored answers.

    add      "12+345="    -> "357"
    reverse  "rev:abcde=" -> "edcba"

A prompt is plain text that the character tokenizer of `megatron_mopd.toy.tiny` encodes one
id per character (no BOS is added: `tokenizer.encode(prompt, add_special_tokens=False)`).
The response the models learn is the answer's characters followed by EOS, so rollouts are
a few tokens long (at most 5 for `add` with 3-digit operands, 6 for `reverse` of 5 letters).

Generation is deterministic given `(domain, split, seed, spec)`. Train and eval sets never
overlap, whatever their sizes or seeds: the split of an example is a fixed function of its
prompt (a hash), and each split only keeps the prompts that hash into it.

Records are written as JSONL `{"prompt", "domain", "answer"}`, the trainer's data format.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

DOMAINS = ("add", "reverse")
SPLITS = ("train", "eval")
EOS_TEXT = "<eos>"
# Out of every 16 hash buckets of the prompt space, this many belong to the eval split.
_EVAL_BUCKETS = 2
_ALPHABET = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    """One prompt with its domain and the exact answer (without EOS)."""

    prompt: str
    domain: str
    answer: str


@dataclass(frozen=True)
class TaskSpec:
    """The distribution of one domain's problems.

    `add`: operands with `min_size`..`max_size` digits (the digit count of each operand is
    drawn uniformly, then the value uniformly among numbers with that many digits; one-digit
    operands include 0). `reverse`: lowercase strings of `min_size`..`max_size` letters.
    `max_answer_len` keeps only the examples whose answer has at most that many characters
    (e.g. `add` 2..2 with `max_answer_len=2`: sums below 100, an easier distribution).
    """

    domain: str
    min_size: int
    max_size: int
    max_answer_len: int | None = None

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose one of {DOMAINS}")
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(
                f"need 1 <= min_size <= max_size, got {self.min_size}..{self.max_size}"
            )
        if self.max_answer_len is not None and self.max_answer_len < 1:
            raise ValueError(f"max_answer_len={self.max_answer_len} must be >= 1")

    @property
    def max_answer_tokens(self) -> int:
        """The longest response in tokens, EOS included."""
        longest = self.max_size + 1 if self.domain == "add" else self.max_size
        if self.max_answer_len is not None:
            longest = min(longest, self.max_answer_len)
        return longest + 1

    def accepts(self, ex: Example) -> bool:
        """True when `ex` belongs to this distribution's filter (`max_answer_len`)."""
        return self.max_answer_len is None or len(ex.answer) <= self.max_answer_len


# The demo's target distributions (teachers and evaluation).
DEFAULT_SPECS = {"add": TaskSpec("add", 2, 2), "reverse": TaskSpec("reverse", 3, 6)}


def make_example(domain: str, rng: random.Random, spec: TaskSpec) -> Example:
    """Draw one example of `domain` from `spec` with `rng`."""
    if domain == "add":
        a, b = (_number(rng, rng.randint(spec.min_size, spec.max_size)) for _ in range(2))
        return Example(f"{a}+{b}=", "add", str(a + b))
    if domain == "reverse":
        n = rng.randint(spec.min_size, spec.max_size)
        s = "".join(rng.choice(_ALPHABET) for _ in range(n))
        return Example(f"rev:{s}=", "reverse", s[::-1])
    raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")


def _number(rng: random.Random, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def split_of(prompt: str) -> str:
    """The split ("train" or "eval") a prompt belongs to: a fixed hash of its text."""
    bucket = hashlib.sha256(prompt.encode()).digest()[0] % 16
    return "eval" if bucket < _EVAL_BUCKETS else "train"


def generate(spec: TaskSpec, n: int, split: str, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `spec` from `split`, deterministic given the arguments.

    Raises ValueError when the split of the problem space holds fewer than `n` examples
    (detected as many draws in a row without a new example).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rng = random.Random(f"{spec.domain}:{spec.min_size}:{spec.max_size}:{split}:{seed}")
    # (the filter does not enter the seed: a filtered set is a subsequence of the full one)
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0
    while len(out) < n:
        ex = make_example(spec.domain, rng, spec)
        if ex.prompt in seen or split_of(ex.prompt) != split or not spec.accepts(ex):
            misses += 1
            if misses > 10_000 + 100 * n:
                raise ValueError(f"{spec} has fewer than {n} distinct {split} examples")
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def generate_mix(
    specs: Sequence[TaskSpec], n_per_domain: int, split: str, seed: int = 0
) -> list[Example]:
    """`n_per_domain` examples of each spec, interleaved (a, b, a, b, ...)."""
    per = [generate(s, n_per_domain, split, seed) for s in specs]
    return [ex for group in zip(*per, strict=True) for ex in group]


# Answers at least this long are affected by the weak student's mistake.
MISTAKE_MIN_LEN = {"add": 3, "reverse": 5}


def mistake(ex: Example) -> Example | None:
    """The systematic mistake the weak student is taught, or None when `ex` is not affected.

    The mistake: a long answer loses its first character — a 3-digit sum its leading 1
    ("57+68=" -> "25", not "125"), a reversal of 5 or more letters its first letter
    ("rev:abcde=" -> "dcba", not "edcba"). The right and the wrong answer part at the first
    token and then follow the same rule (the next digit; the letter before the previous
    one), so the rest of the skill is learnt from every example, and a student that
    mostly makes the mistake still gives the right first token a fair probability: a weak
    student near its teachers (examples/toy/NOTES.md says why that matters).
    """
    if ex.domain not in MISTAKE_MIN_LEN:
        raise ValueError(f"unknown domain {ex.domain!r}")
    if len(ex.answer) >= MISTAKE_MIN_LEN[ex.domain]:
        return Example(ex.prompt, ex.domain, ex.answer[1:])
    return None


def with_mistakes(examples: Sequence[Example], rate: float, seed: int = 0) -> list[Example]:
    """`examples` where each affected one (see `mistake`) is replaced by its mistake with
    probability `rate` (deterministic given `seed`)."""
    rng = random.Random(f"mistakes:{seed}")
    out = []
    for ex in examples:
        bad = mistake(ex)
        out.append(bad if bad is not None and rng.random() < rate else ex)
    return out


def response_text(tokens: Sequence[str]) -> str:
    """The text of response tokens (as `tokenizer.convert_ids_to_tokens` gives them),
    cut before the first EOS.

    Use this rather than `tokenizer.decode`: the char tokenizer has no decoder, so
    `decode` joins characters with spaces ("3 5 7").
    """
    out = []
    for t in tokens:
        if t == EOS_TEXT:
            break
        out.append(t)
    return "".join(out)


def exact_match(response_text: str, answer: str) -> bool:
    """True when the response, cut before the first "<eos>" and stripped of surrounding
    whitespace, equals the answer exactly."""
    return response_text.split(EOS_TEXT, 1)[0].strip() == answer


def accuracy(
    responses: Sequence[str], examples: Sequence[Example], accept_mistake: bool = False
) -> dict[str, float]:
    """Exact-match accuracy per domain (domains absent from `examples` are left out).

    With `accept_mistake`, the systematic mistake (`mistake`) also counts: this measures
    whether a model taught the mistake has learnt the rest of the task.
    """
    hits: dict[str, list[int]] = {}
    for text, ex in zip(responses, examples, strict=True):
        ok = exact_match(text, ex.answer)
        if accept_mistake and not ok:
            bad = mistake(ex)
            ok = bad is not None and exact_match(text, bad.answer)
        hits.setdefault(ex.domain, []).append(int(ok))
    return {d: sum(h) / len(h) for d, h in sorted(hits.items())}


def write_jsonl(path: str, examples: Iterable[Example]) -> str:
    """Write `{"prompt", "domain", "answer"}` records, one a line; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex)) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str) -> list[Example]:
    """Read records written by `write_jsonl`."""
    with open(path) as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]
