"""megatron_ec: ExpertCondenser fine-tuning of MoE LLMs on Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# `lm_eval --model megatron_ec`: the harness has no plugin discovery, so a one-line startup hook
# (megatron_ec/eval/lm_eval_plugin.py) goes to the top of site-packages. An editable install does
# not ship it; tools/install_env.sh copies it there.
HOOK = Path("megatron_ec/eval/megatron_ec_lm_eval.pth")


class BuildWithHarnessHook(build_py):
    """build_py plus the .pth startup hook at the root of the wheel."""

    def run(self):
        super().run()
        self.copy_file(str(HOOK), str(Path(self.build_lib) / HOOK.name))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / HOOK.name)]


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
        # lm-evaluation-harness model `megatron_ec` (megatron_ec/eval/lm_eval_adapter.py); its
        # HF model class needs accelerate, which lm-eval lists only under its own `hf` extra.
        "eval": ["lm-eval>=0.4.13,<0.5", "accelerate>=0.26"],
    },
    cmdclass={"build_py": BuildWithHarnessHook},
)
