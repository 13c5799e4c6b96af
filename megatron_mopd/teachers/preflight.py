"""Tokenizer pre-flight: every teacher must tokenize exactly as the student does.

MOPD's advantage is log pi_teacher(y_t) - log pi_student(y_t) for the *same token id*; a
teacher whose ids mean other strings yields a meaningless ratio without any error. So
before training, each teacher's tokenizer is compared with the student's:

- vocabulary size and the id -> token mapping (when both tokenizers are local),
- the special token ids (bos / eos / pad / unk, where both define them),
- the encodings of probe strings: ASCII, digits, whitespace runs, unicode, code, the
  student's special tokens inside text, and its chat template rendered (when it has one).

A mismatch raises `TokenizerMismatchError` naming the teacher and the first differing
token (probe, position, both ids, both token strings).

Embedded teachers are compared directly (`AutoTokenizer` from their `hf_path`). For an
SGLang server, `server_status(url)` calls `/health_generate` then `/model_info`; when
the `tokenizer_path` it reports can be loaded here, the tokenizers are compared directly,
otherwise through the server: one `POST /generate` per probe with it as `text`,
`max_new_tokens: 0`, `return_logprob: true`, `logprob_start_len: 0` returns the server's
token ids in `meta_info.input_token_logprobs` (SGLang tokenizes `text` with its default
`add_special_tokens`, which the student side reproduces). Over HTTP the vocabulary size
is not exposed, so only the probes and special tokens (as text) are compared.

`run_preflight(cfg)` runs every start-up check of `mopd check` (this one included); it
lives in `commands/check.py` and is re-exported here for the trainer.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from megatron_mopd.errors import TeacherError, UserError

SPECIAL_ATTRS = ("bos", "eos", "pad", "unk")
_POLL_SECONDS = 1.0  # between /health_generate attempts while waiting for a server
_CONNECT_SECONDS = 10.0  # connect timeout of those attempts

BASE_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "0123456789 3.14159 -42 +7 1e-10 12345678901234567890 1,000,000",
    "a  b   c    d\t\te\n\nf \n \n  g   ",
    "    leading spaces and trailing   ",
    "naïve café — Ünïcödé Ω≈ç√∫ 日本語 中文 한국어 🙂👍🏽",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  <tag attr="v">&amp;</tag>',
    "Q: What is 17 + 25?\nA: 42\n",
)


class TokenizerMismatchError(UserError):
    """A teacher's (or rollout server's) tokenizer differs from the student's."""


def load_tokenizer(path: str, what: str = "tokenizer"):
    """`AutoTokenizer` from a local folder or cached hub id (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the {what} from {path}: {first}") from None


def probe_strings(tokenizer: Any) -> list[str]:
    """The probe texts: fixed strings plus the tokenizer's special tokens inside text and,
    when it has a chat template, a rendered conversation (its markers included)."""
    probes = list(BASE_PROBES)
    specials = [s for s in getattr(tokenizer, "all_special_tokens", []) if s]
    if specials:
        probes.append(" ".join(f"x{s}y" for s in specials))
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"},
        ]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that needs other roles or kwargs: probe without it
            text = None
        if isinstance(text, str) and text:
            probes.append(text)
    return probes


def _token_str(tokenizer: Any, token_id: int) -> str:
    try:
        tok = tokenizer.convert_ids_to_tokens(int(token_id))
    except Exception:
        tok = None
    return "?" if tok is None else str(tok)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two id lists differ (including one ending first)."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class _Side:
    """One tokenizer's answer for a probe: ids and a way to name a token id."""

    ids: list[int]
    names: dict[int, str]


def _describe_probe_mismatch(
    probe_index: int, text: str, ref: _Side, other: _Side, ref_label: str, label: str
) -> str | None:
    j = first_difference(ref.ids, other.ids)
    if j is None:
        return None

    def at(side: _Side) -> str:
        if j >= len(side.ids):
            return f"(sequence ends at {len(side.ids)} tokens)"
        tid = side.ids[j]
        return f"id {tid} ({side.names.get(tid, '?')!r})"

    shown = text if len(text) <= 40 else text[:37] + "..."
    return (
        f"probe {probe_index} {shown!r}: first differing token at position {j}: "
        f"{ref_label} {at(ref)} vs {label} {at(other)}"
    )


def compare_tokenizers(
    reference: Any, other: Any, name: str, ref_label: str = "student", label: str = "teacher"
) -> None:
    """Raise `TokenizerMismatchError` unless `other` tokenizes exactly as `reference`.

    Compares vocabulary size, the id -> token mapping, the special token ids and the
    encodings of `probe_strings(reference)`; the message lists every kind of difference,
    each with its first differing token.
    """
    issues: list[str] = []
    n_ref, n_other = len(reference), len(other)
    if n_ref != n_other:
        issues.append(f"vocabulary size {ref_label} {n_ref} vs {label} {n_other}")
    for attr in SPECIAL_ATTRS:
        a = getattr(reference, f"{attr}_token_id", None)
        b = getattr(other, f"{attr}_token_id", None)
        if a is not None and b is not None and a != b:
            issues.append(
                f"{attr}_token_id {ref_label} {a} ({_token_str(reference, a)!r}) vs "
                f"{label} {b} ({_token_str(other, b)!r})"
            )
    vocab_ref, vocab_other = reference.get_vocab(), other.get_vocab()
    if vocab_ref != vocab_other:
        inv_ref = {i: t for t, i in vocab_ref.items()}
        inv_other = {i: t for t, i in vocab_other.items()}
        for i in sorted(set(inv_ref) | set(inv_other)):
            if inv_ref.get(i) != inv_other.get(i):
                issues.append(
                    f"id {i} is {inv_ref.get(i)!r} for the {ref_label} but "
                    f"{inv_other.get(i)!r} for the {label}"
                )
                break
    for k, text in enumerate(probe_strings(reference)):
        a = reference(text)["input_ids"]
        b = other(text)["input_ids"]
        msg = _describe_probe_mismatch(
            k,
            text,
            _Side(a, {t: _token_str(reference, t) for t in a}),
            _Side(b, {t: _token_str(other, t) for t in b}),
            ref_label,
            label,
        )
        if msg:
            issues.append(msg)
            break
    if issues:
        raise TokenizerMismatchError(
            f"{label} {name!r}: tokenizer differs from the {ref_label}'s: " + "; ".join(issues)
        )


# ------------------------------------------------------------------------- over HTTP


def _http_error(url: str, what: str, e: Exception) -> TeacherError:
    return TeacherError(f"{url}{what}: {type(e).__name__}: {e}")


def _auth(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def server_status(
    url: str, timeout: float = 60.0, wait_seconds: float = 0.0, api_key: str | None = None
) -> dict[str, Any]:
    """`GET /health_generate` (must answer 200) then `GET /model_info` (`/get_model_info`
    when that is missing, as behind sglang-router); returns the latter. Like the SGLang
    client, this goes straight to the URL: `HTTP(S)_PROXY` is not used (`trust_env=False`).

    With `wait_seconds > 0`, a server that is down or starting (503) is polled until it
    is healthy or the time is up. Raises `TeacherError` naming the URL when the server is
    down, starting or unhealthy, or answers something other than a JSON object.
    """
    import httpx

    base = url.rstrip("/")
    deadline = time.monotonic() + wait_seconds
    # an unroutable host must not hold a short wait for the whole request timeout
    http_timeout = httpx.Timeout(timeout, connect=min(timeout, _CONNECT_SECONDS))
    said = False
    while True:
        try:
            r = httpx.get(
                f"{base}/health_generate",
                timeout=http_timeout,
                headers=_auth(api_key),
                trust_env=False,
            )
            if r.status_code == 200:
                break
            hint = " (the server is starting or unhealthy)" if r.status_code == 503 else ""
            error = TeacherError(f"{base}/health_generate answered HTTP {r.status_code}{hint}")
        except httpx.HTTPError as e:
            error = _http_error(base, "/health_generate", e)
        if time.monotonic() >= deadline:
            waited = f" (waited {wait_seconds:.3g} s)" if wait_seconds > 0 else ""
            raise TeacherError(f"{error}{waited}")
        if not said:  # a silent wait of minutes looks like a hang
            print(
                f"waiting up to {wait_seconds:.3g} s for {base} to become healthy ({error})",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    try:
        r = httpx.get(
            f"{base}/model_info", timeout=timeout, headers=_auth(api_key), trust_env=False
        )
        if r.status_code == 404:
            # sglang-router (0.3.2) forwards only the deprecated name of this endpoint
            r = httpx.get(
                f"{base}/get_model_info", timeout=timeout, headers=_auth(api_key), trust_env=False
            )
        r.raise_for_status()
        info = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise _http_error(base, "/model_info", e) from None
    if not isinstance(info, dict):
        raise TeacherError(f"{base}/model_info: expected a JSON object, got {info!r:.80}")
    return info


def server_probe_ids(
    url: str, probes: list[str], timeout: float = 60.0, api_key: str | None = None
) -> list[_Side]:
    """The server's token ids (and token texts) for each probe text: one prefill-only
    `POST /generate` per probe (`text` a string: sglang-router 0.3.2 refuses a list of
    texts with HTTP 422)."""
    import httpx

    base = url.rstrip("/")
    sides = []
    with httpx.Client(timeout=timeout, headers=_auth(api_key), trust_env=False) as http:
        for k, text in enumerate(probes):
            body = {
                "text": text,
                "sampling_params": {
                    "max_new_tokens": 0,
                    "temperature": 1.0,
                    "skip_special_tokens": False,
                },
                "return_logprob": True,
                "logprob_start_len": 0,
                "return_text_in_logprobs": True,
            }
            try:
                r = http.post(f"{base}/generate", json=body)
            except httpx.HTTPError as e:
                raise _http_error(base, "/generate", e) from None
            if r.status_code != 200:
                raise TeacherError(
                    f"{base}/generate with text probe {k} answered HTTP {r.status_code}: "
                    f"{r.text.strip()[:200]} (the server must tokenize `text` with its tokenizer)"
                )
            try:
                item = r.json()
                if isinstance(item, list) and len(item) == 1:
                    item = item[0]
                entries = item["meta_info"]["input_token_logprobs"]
                ids = [int(e[1]) for e in entries]
                names = {int(e[1]): e[2] for e in entries if len(e) > 2 and e[2] is not None}
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise TeacherError(
                    f"{base}/generate: malformed answer to text probe {k} "
                    f"({type(e).__name__}: {e}); expected meta_info.input_token_logprobs of "
                    "[logprob, token_id, text]"
                ) from None
            sides.append(_Side(ids, names))
    return sides


def compare_with_server(
    reference: Any,
    url: str,
    name: str,
    label: str = "teacher",
    timeout: float = 60.0,
    api_key: str | None = None,
) -> None:
    """Compare the student's tokenizer with a server's, through its `/generate` endpoint."""
    probes = probe_strings(reference)
    server = server_probe_ids(url, probes, timeout, api_key)
    for k, (text, other) in enumerate(zip(probes, server)):
        ids = reference(text)["input_ids"]
        ref = _Side(ids, {t: _token_str(reference, t) for t in ids})
        msg = _describe_probe_mismatch(k, text, ref, other, "student", f"{label} at {url}")
        if msg:
            raise TokenizerMismatchError(
                f"{label} {name!r}: tokenizer differs from the student's: {msg}"
            )


def check_server_tokenizer(
    reference: Any,
    url: str,
    name: str,
    info: dict[str, Any],
    label: str = "teacher",
    timeout: float = 60.0,
    api_key: str | None = None,
) -> str:
    """Compare a server's tokenizer with the student's: directly when `/model_info`'s
    `tokenizer_path` loads here, else over HTTP. Returns how it was compared."""
    path = info.get("tokenizer_path") or info.get("model_path")
    if path and (os.path.isdir(path) or not os.path.isabs(path)):
        try:
            other = load_tokenizer(path)
        except UserError:
            other = None
        if other is not None:
            compare_tokenizers(reference, other, name, label=label)
            return f"tokenizer {path} read locally, matches"
    compare_with_server(reference, url, name, label=label, timeout=timeout, api_key=api_key)
    return f"{len(probe_strings(reference))} probes tokenized by the server match"


def run_preflight(cfg: Any, offline: bool = False, **kwargs: Any):
    """Every start-up check of `mopd check` (see `commands.check.run_preflight`); raises a
    `UserError` on the first failure unless `strict=False`."""
    from megatron_mopd.commands.check import run_preflight as run

    return run(cfg, offline=offline, **kwargs)
