"""megatron_mopd: Multi-Teacher On-Policy Distillation for Megatron MoE students.

The package is laid out as the data flows (see README, "Architecture"):
rollout/ -> teachers/ -> loss.py -> student/ -> weight_sync.py -> checkpoint.py,
driven by trainer.py and configured by one typed tree in config.py.
"""

__version__ = "0.1.0"
