"""Logit parity: stock transformers vs our Megatron model, fp32, on the same random tokens.

The HF model gets the checkpoint's routing through `restore_condenser_routing` (a no-op for a
plain import); the Megatron model is loaded at TP1/EP1 whatever layout the checkpoint was saved at.
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_convert.errors import ConversionError
from checkpoint_convert.model import load_megatron, open_checkpoint
from checkpoint_convert.outputs import check_input_dir
from megatron_ec.parallel import ParallelConfig


def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, padded vocab] fp32 logits on the host, gathered over tensor-parallel ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq_len = tokens.shape
    device = next(model.parameters()).device  # a GPU rank's model lives on its GPU
    tokens = tokens.to(device)
    position_ids = torch.arange(seq_len, device=device).expand(batch, seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    model.eval()
    logits = model(tokens, position_ids, causal[None, None].expand(batch, 1, seq_len, seq_len))
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits.float().cpu()  # compared on the host with the HF model's logits


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, vocab] fp32 logits of stock transformers, with the exported routing restored."""
    from transformers import AutoModelForCausalLM

    from megatron_ec.models.hf_restore import restore_condenser_routing

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    restore_condenser_routing(model, hf_dir)
    model.eval()
    return model(input_ids=tokens).logits.float()


def verify(hf_dir: str | Path, ckpt: str | Path, batch: int = 2, seq_len: int = 32,
           seed: int = 0) -> float:
    """Max |HF logits - Megatron logits| over a random batch (vocab padding trimmed).

    Both paths are checked before anything is loaded: a missing `hf_dir` would otherwise reach
    transformers, which takes it for a hub repo id.
    """
    from checkpoint_convert.importer import read_hf_config
    from megatron_ec.parallel import init_parallel

    check_input_dir(Path(hf_dir), "--hf", "the HF model directory to compare with")
    read_hf_config(Path(hf_dir))  # config.json present, JSON, of a supported family
    open_checkpoint(ckpt)
    init_parallel(ParallelConfig(), seed=0)
    model, meta, cfg = load_megatron(ckpt)
    seq_len = min(seq_len, cfg.max_position_embeddings)
    tokens = random_tokens(cfg.vocab_size, batch, seq_len, seed)
    megatron = megatron_logits(model, tokens)[..., : cfg.vocab_size]
    hf = hf_logits(hf_dir, tokens)
    if hf.shape != megatron.shape:
        raise ConversionError(str(hf_dir), f"logits of shape {list(hf.shape)} vs Megatron "
                              f"{list(megatron.shape)}", "verify the HF model the checkpoint "
                              "was imported from or exported to")
    return (hf - megatron).abs().max().item()
