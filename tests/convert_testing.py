"""Shared helpers of the converter tests: tiny HF models, HF logits, tensor comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from tools.make_tiny_hf import make_tiny_hf

FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")
TOL = 1e-4
"""`checkpoint_convert verify`'s absolute limit on max |dlogit| (the CLI's contract); tests that
compare logits themselves use `tests.tolerance.FP32_HF_PARITY`."""

# One awkward on-disk variant per family, so every reader path runs in every launch:
# qwen2_moe sharded with an index, qwen3_moe transformers v5's fused experts, mixtral bf16.
VARIANTS = {
    "qwen2_moe": dict(max_shard_size="60KB"),
    "qwen3_moe": dict(fused=True),
    "mixtral": dict(dtype="bf16"),
}


def make_variant(family: str, root: Path, seed: int = 0) -> Path:
    """The tiny model of `family` in its test variant, under `root/family`."""
    return make_tiny_hf(family, root / family, seed=seed, **VARIANTS[family])


def random_tokens(seed: int = 11, batch: int = 2, seq_len: int = 24, vocab: int = 250):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=gen)


@torch.no_grad()
def hf_logits(hf_dir: Path, tokens: torch.Tensor, restore: bool = False) -> torch.Tensor:
    """fp32 logits of stock transformers (with the exported routing restored if asked)."""
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import restore_condenser_routing

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if restore:
        restore_condenser_routing(model, hf_dir)
    return model(input_ids=tokens).logits.float()


def hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict transformers builds from a directory, in the dtype stored on disk."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def disk_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of a directory, by on-disk name."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, f"{name}: {got[name].dtype} vs {tensor.dtype}"
        assert torch.equal(got[name], tensor), f"{name} differs"
