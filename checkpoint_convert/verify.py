"""Logit parity: stock transformers vs our Megatron model, fp32, on the same random tokens.

The HF model gets the checkpoint's routing through `restore_condenser_routing` (a no-op for a
plain import); the Megatron model is loaded at TP1/EP1 whatever layout the checkpoint was saved at.
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_convert.errors import ConversionError
from checkpoint_convert.model import build_model, set_routing_state
from megatron_ec.models.ckpt_dir import WEIGHTS, read_model_meta, resolve
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import get_family
from megatron_ec.moe.method_state import MethodState
from megatron_ec.parallel import ParallelConfig


def open_checkpoint(ckpt: str | Path) -> tuple[Path, dict, MoEModelConfig, MethodState]:
    """(iteration dir, model.json, model config, method state) of a megatron_ec checkpoint."""
    try:
        iteration = resolve(ckpt)
        meta = read_model_meta(iteration)
        return iteration, meta, MoEModelConfig.from_dict(meta["model_config"]), \
            MethodState.load(iteration)
    except ValueError as err:
        raise ConversionError.wrap(str(ckpt), err) from None
    except (KeyError, TypeError) as err:
        raise ConversionError(str(ckpt), f"model.json lacks {err}", "re-import the checkpoint"
                              ) from None


def load_megatron(ckpt: str | Path, parallel: ParallelConfig = ParallelConfig(),
                  precision: str = "fp32") -> tuple[torch.nn.Module, dict, MoEModelConfig]:
    """This rank's model of a checkpoint at `parallel` (init_parallel must have run with it)."""
    from megatron_ec.models.dist_ckpt import load_model_weights

    iteration, meta, cfg, method = open_checkpoint(ckpt)
    model = build_model(get_family(meta["family"]), cfg, method, parallel, precision)
    load_model_weights(model, iteration / WEIGHTS)
    set_routing_state(model, method)
    return model, meta, cfg


def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, padded vocab] fp32 logits, gathered over tensor-parallel ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq_len = tokens.shape
    position_ids = torch.arange(seq_len).expand(batch, seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    model.eval()
    logits = model(tokens, position_ids, causal[None, None].expand(batch, 1, seq_len, seq_len))
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits.float()


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, vocab] fp32 logits of stock transformers, with the exported routing restored."""
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import restore_condenser_routing

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    restore_condenser_routing(model, hf_dir)
    model.eval()
    return model(input_ids=tokens).logits.float()


def verify(hf_dir: str | Path, ckpt: str | Path, batch: int = 2, seq_len: int = 32,
           seed: int = 0) -> float:
    """Max |HF logits - Megatron logits| over a random batch (vocab padding trimmed)."""
    from megatron_ec.parallel import init_parallel

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
