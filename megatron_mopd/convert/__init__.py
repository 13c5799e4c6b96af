"""Hugging Face <-> Megatron conversion (see `hf.py` for why it is written by hand).

- `hf_config.py`: `config.json` <-> `ModelConfig`.
- `mapping.py`: which HF tensors make each Megatron parameter, at any parallel layout.
- `hf.py`: streaming load into model chunks, gathering export, writing HF folders.

Importing this package does not import megatron-core.
"""

from megatron_mopd.convert.hf import (
    HFCheckpoint,
    export_hf_checkpoint,
    export_hf_state_dict,
    load_hf_weights,
    save_hf_checkpoint,
)
from megatron_mopd.convert.hf_config import (
    SUPPORTED_MODEL_TYPES,
    hf_config_dict,
    model_config_from_hf,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HFCheckpoint",
    "export_hf_checkpoint",
    "export_hf_state_dict",
    "hf_config_dict",
    "load_hf_weights",
    "model_config_from_hf",
    "save_hf_checkpoint",
]
