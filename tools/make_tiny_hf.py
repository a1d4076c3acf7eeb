"""Tiny random HF MoE models per family, for the converter tests and for trying the CLI offline.

The shapes are deliberately awkward: a vocabulary of 250 (a multiple of nothing useful), grouped
query attention, 6 experts (not a power of two), a shared expert and a dense first layer where the
family has them, and a head_dim that differs from hidden/heads for Qwen3-MoE. Every tensor is
redrawn from a seeded generator (HF's init leaves norms at 1 and routers near 0, which would hide
mapping mistakes and make top-k choices ties). A word-level tokenizer with one token per id is
saved next to the weights. Nothing comes from the hub.

    python tools/make_tiny_hf.py --family qwen2_moe --out /tmp/tiny_qwen2 [--fused] [--dtype bf16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

VOCAB = 250
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-6)

CONFIGS = {
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=6, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, intermediate_size=96,
                      mlp_only_layers=[0], qkv_bias=True, norm_topk_prob=False),
    "qwen3_moe": dict(num_hidden_layers=3, num_experts=6, moe_intermediate_size=32, head_dim=24,
                      intermediate_size=96, mlp_only_layers=[0], norm_topk_prob=True),
    "mixtral": dict(num_hidden_layers=2, num_local_experts=6, intermediate_size=32,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # sliding + full layers, sinks, biases everywhere; YaRN as the hub configures it (factor
    # smaller, so positions past original_max_position_embeddings=8 stay well conditioned)
    "gpt_oss": dict(num_hidden_layers=2, num_local_experts=6, intermediate_size=32, head_dim=24,
                    max_position_embeddings=32,
                    sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    swiglu_limit=1.5, rope_parameters={
                        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                        "original_max_position_embeddings": 8}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tiny_config(family: str, **overrides):
    """The transformers config of the tiny model of `family` (HF `model_type`)."""
    from transformers import AutoConfig

    if family not in CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(sorted(CONFIGS))}")
    return AutoConfig.for_model(family, **{**COMMON, **CONFIGS[family], **overrides})


def _std(name: str, tensor: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the redrawn values: norms near 1, decisive routers, unit-scale activations."""
    if tensor.dim() == 1:
        return (1.0, 0.1) if "norm" in name else (0.0, 0.1)
    fan_in = tensor.shape[-1]
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    scale = 3.0 if ".gate.weight" in name or ".router.weight" in name else 1.0
    if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        fan_in = tensor.shape[-2]  # GPT-OSS stores experts [E, in, out]
    return 0.0, scale / fan_in**0.5


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a generator seeded by `seed` (independent of HF's init)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        mean, std = _std(name, param)
        param.copy_(torch.randn(param.shape, generator=gen) * std + mean)


def save_tokenizer(out_dir: Path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer with tokens "t0" ... so that every id has a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(
        out_dir)


def make_tiny_hf(family: str, out_dir: str | Path, *, seed: int = 0, dtype: str = "fp32",
                 fused: bool = False, max_shard_size: str | None = None, **overrides) -> Path:
    """Write a tiny random HF model of `family` to `out_dir` (config, weights, tokenizer).

    Args:
        family: HF model_type ("qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss").
        out_dir: output directory (created).
        seed: seeds the weights.
        dtype: "fp32", "bf16" or "fp16" on disk.
        fused: write transformers v5's fused expert tensors instead of the hub's per-expert layout.
        max_shard_size: e.g. "100KB" to write several shards and an index.
        **overrides: config fields to change.

    Returns:
        The output directory.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    randomize(model, seed)
    model = model.to(DTYPES[dtype])
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, save_original_format=not fused, **kwargs)
    save_tokenizer(out_dir, model.config.vocab_size)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--fused", action="store_true", help="fused [E, ...] expert tensors")
    parser.add_argument("--max-shard-size", default=None, help='e.g. "100KB"')
    args = parser.parse_args()
    path = make_tiny_hf(args.family, args.out, seed=args.seed, dtype=args.dtype,
                        fused=args.fused, max_shard_size=args.max_shard_size)
    print(path)


if __name__ == "__main__":
    main()
