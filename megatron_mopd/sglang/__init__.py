"""The HTTP client of SGLang servers, shared by the SGLang rollout engine and teachers.

- `client.py`: `SGLangClient`, the protocol (scoring and sampling requests, batching,
  concurrency, retries, server cooldowns);
- `answers.py`: the checks of every answer, and `fast_answers.py` their flat fast path
  for scoring answers;
- `http_pool.py`: the keep-alive connections and the JSON encoding of requests and
  answers (nothing there knows SGLang).
"""
