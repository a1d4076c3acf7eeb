"""megatron_ec: ExpertCondenser fine-tuning of MoE LLMs on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_ec",
    version="0.1.0",
    description="Megatron-Core fine-tuning backend for MoE LLMs with ExpertCondenser routing",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_ec", "megatron_ec.*", "checkpoint_convert",
                                    "checkpoint_convert.*"]),
    install_requires=[
        "torch>=2.4",
        # Python 3.11 hosts: installed with --ignore-requires-python --no-deps (tools/install_env.sh)
        "megatron-core>=0.19.2,<0.20",
        "numpy>=1.26,<2.5",
        "packaging>=24.2",
        "psutil>=5.9",
        "einops>=0.7",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "protobuf>=4.25",
        "datasets>=3.0",
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
    ],
    extras_require={
        # GPU clusters: Transformer Engine BF16/FP8 GEMMs and grouped experts. Apex is optional
        # (Megatron-Core falls back without it) and is not on PyPI: build it in your container.
        "gpu": ["transformer-engine[pytorch]>=2.0", "triton>=3.0"],
        "test": ["pytest>=8.0", "densemixer==1.0.1"],  # densemixer: the DenseMixer oracle (MIT)
    },
)
