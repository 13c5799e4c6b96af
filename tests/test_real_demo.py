"""`mopd demo --sglang` (`make demo-sglang`): the demo's MOPD run with the rollout engine and
both teachers on real SGLang 0.5.23 servers, from the toy build to the table. Slow: about
10 minutes on 2 cores (the toy build, when not cached, adds ~2)."""

from __future__ import annotations

import json

import pytest
from sglang_real import require_sglang

pytestmark = pytest.mark.slow


def test_demo_on_real_sglang_reaches_its_teachers(tmp_path, capsys):
    from megatron_mopd import cli

    require_sglang()
    run_dir = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--sglang", "--run-dir", str(run_dir), "logging.progress_bar=false"])
    assert e.value.code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    print(json.dumps(summary, indent=1))
    assert summary["backends"] == "sglang"
    assert summary["reached_teachers"], summary
    rows = [json.loads(x) for x in (run_dir / "mopd" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == summary["steps"]
    assert max(r["ratio_abs_dev"] for r in rows) < 1e-3  # fp32 SGLang vs Megatron
