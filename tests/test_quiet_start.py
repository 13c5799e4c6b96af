"""A quiet start: the dependency warnings the user cannot act on are silenced by importing
megatron_mopd (`KNOWN_DEPENDENCY_WARNINGS`), matched by message and module, and every
other warning still shows, from the same modules too. Run in fresh interpreters: pytest's
own warning filters (pyproject.toml) do not apply there."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# megatron-core's optimizer, clip_grads and FSDP modules each warn once at import, the
# local layer spec twice, and every TransformerConfig once (its own default scope)
IMPORT_MCORE = (
    "import megatron.core.optimizer, megatron.core.distributed\n"
    "import megatron.core.models.gpt.gpt_layer_specs\n"
    "from megatron.core.transformer import TransformerConfig\n"
    "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)\n"
)
KNOWN = {  # message -> how many warnings carry it
    "Transformer Engine and Apex are not installed": 4,
    "Apex is not installed. Falling back to Torch Norm": 2,
    "full scope is deprecated": 1,
}
REAL = (
    "import warnings\n"
    "warnings.warn_explicit('a real megatron warning', UserWarning, 'x.py', 1,"
    " module='megatron.core.optimizer')\n"
    "warnings.warn('a real warning of ours', UserWarning)\n"
)


def _stderr(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": ""}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_megatron_core_warns_without_the_package():
    """The control: megatron-core alone prints the known warnings (else the test below
    would prove nothing)."""
    err = _stderr(IMPORT_MCORE + REAL)
    for message, count in KNOWN.items():
        warned = [line for line in err.splitlines() if f"UserWarning: {message}" in line]
        assert len(warned) == count, (message, err)
    assert "a real megatron warning" in err


def test_known_warnings_are_silenced_and_real_ones_show():
    err = _stderr("import megatron_mopd\n" + IMPORT_MCORE + REAL)
    for message in KNOWN:
        assert message not in err, err
    assert "a real megatron warning" in err and "a real warning of ours" in err, err


GATHER = (  # the deprecated collective megatron-core calls, in a one-process gloo group
    "import os, torch, torch.distributed as dist\n"
    "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='0')\n"
    "dist.init_process_group('gloo', rank=0, world_size=1, init_method='tcp://127.0.0.1:0')\n"
    "out = torch.empty(2)\n"
    "dist.all_gather_into_tensor(out, torch.ones(2))\n"
    "dist.reduce_scatter_tensor(torch.empty(2), torch.ones(2))\n"
    "dist.destroy_process_group()\n"
)


def test_torch_collective_deprecations_silenced():
    messages = [
        f"`torch.distributed.{n}` is deprecated"
        for n in ("all_gather_into_tensor", "reduce_scatter_tensor")
    ]
    err = _stderr(GATHER)  # the control
    assert all(m in err for m in messages), err
    quiet = _stderr("import megatron_mopd\n" + GATHER)
    assert not any(m in quiet for m in messages), quiet
