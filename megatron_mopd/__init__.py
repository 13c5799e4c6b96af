"""megatron_mopd: Multi-Teacher On-Policy Distillation for Megatron MoE students.

The package is laid out as the data flows (see README, "Architecture"):
rollout/ -> teachers/ -> loss.py -> student/ -> rollout/weight_sync.py -> checkpoint.py
(rollouts and teachers over SGLang share the client in sglang/),
driven by trainer.py and configured by one typed tree in config.py.

Importing the package silences, once, the dependency warnings listed in
`KNOWN_DEPENDENCY_WARNINGS`: each is matched by its message and the module that warns, so
every other warning, from these modules too, still shows.
"""

import warnings

__version__ = "0.1.0"

# (message regex, module regex, category, why the user cannot act on it)
KNOWN_DEPENDENCY_WARNINGS: tuple[tuple[str, str, type[Warning], str], ...] = (
    (
        r"Transformer Engine and Apex are not installed",
        r"megatron\.core(\..*)?$",
        UserWarning,
        "megatron-core at import (optimizer, clip_grads, FSDP mixed precision): on CPU "
        "neither exists; on GPU the Transformer Engine extra (`.[gpu]`) is what to install, "
        "and its absence shows where it matters (model.transformer_impl)",
    ),
    (
        r"Apex is not installed\. Falling back to Torch Norm",
        r"megatron\.core(\..*)?$",
        UserWarning,
        "megatron-core's local layer spec (models.backends, gpt_layer_specs) on a machine "
        "without NVIDIA apex, which is optional (not on PyPI): torch's norm is exact",
    ),
    (
        r"full scope is deprecated",
        r"megatron\.core\.transformer\.transformer_config$",
        UserWarning,
        "megatron-core's own default `cuda_graph_scope='full'` (TransformerConfig), which our "
        "model section does not expose: every TransformerConfig built here warns",
    ),
    (
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger$",
        FutureWarning,
        "torch 2.13 deprecates the collectives megatron-core 0.16.1 gathers and scatters with (sequence- "
        "and vocabulary-parallel gathers, the distributed optimizer); this project's code "
        "does not call it, so `mopd logprobs --tp 2` and TP/DP training would warn once",
    ),
)


def quiet_known_dependency_warnings() -> None:
    """Ignore the `KNOWN_DEPENDENCY_WARNINGS` (idempotent; done at package import, so
    before megatron-core is first imported by any entry point: `mopd`, torchrun workers,
    tools and tests)."""
    for message, module, category, _why in KNOWN_DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


quiet_known_dependency_warnings()
