"""megatron_mopd: Multi-Teacher On-Policy Distillation for Megatron MoE students.

The package is laid out as the data flows (see README, "Architecture"):
rollout/ -> teachers/ -> loss.py -> student/ -> rollout/weight_sync.py -> checkpoint.py
(rollouts and teachers over SGLang share the client in sglang/),
driven by trainer.py and configured by one typed tree in config.py.
"""

__version__ = "0.1.0"
