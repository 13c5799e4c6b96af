"""Packaging for megatron_mopd.

`patches/` is installed inside the package as `megatron_mopd.patches` (upstream fixes
live beside the package in the source tree, as the project layout asks).
Install torch==2.13.0 (the CPU wheel) *before* this package: see the Makefile.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_mopd",
    version="0.1.0",
    description="Multi-Teacher On-Policy Distillation (MOPD) for Megatron MoE students",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["megatron_mopd", "megatron_mopd.*"])
    + ["megatron_mopd.patches"],
    package_dir={"megatron_mopd.patches": "patches"},
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "numpy==2.4.6",
        "psutil==7.2.2",
        "transformers==4.57.6",
        "tokenizers==0.22.2",
        "safetensors==0.8.0",
        "einops==0.8.2",
        "pyyaml==6.0.3",
        "tqdm==4.70.1",
        "httpx==0.28.1",
        "urllib3==2.8.0",  # the SGLang client's HTTP (megatron_mopd/sglang/http_pool.py)
        "orjson==3.13.0",  # the SGLang client's JSON (stdlib json works, ~2.5x slower)
        "tensorboard==2.21.0",
        "matplotlib==3.11.2",
    ],
    extras_require={
        # Never install the PyPI package named `apex` (an unrelated web toolkit).
        # NVIDIA apex is optional and not on PyPI; build it from source on GPU nodes.
        # SGLang is not an extra: it pins its own torch and transformers, so it runs from an
        # environment of its own, as a separate server (examples/qwen3_30b_a3b/README.md;
        # on CPU, `make sglang`). The trainer only speaks HTTP to it.
        "gpu": ["transformer-engine[pytorch]"],
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "ruff==0.17.6", "sglang-router==0.3.2"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["mopd=megatron_mopd.cli:main"]},
)
