"""In-memory HF <-> Megatron parity for family adapters (no files, no hub).

A tiny random HF model (config only) is the reference. Its checkpoint tensors (hub names, as
`save_pretrained` writes them) go through the family's `Rule` table into TP1/EP1 Megatron tensors,
which `load_full_tensors` slices into a model at any layout. Checks:
- `hf_to_megatron` maps every HF tensor exactly once (or it matches `ignored_hf_keys`) and every
  Megatron parameter is produced; `megatron_to_hf` gives every HF tensor back bitwise;
- Megatron logits (fp32, vocabulary padding trimmed) match HF's, and so do the gradients of a
  cross-entropy loss, mapped back to HF names through the same rules.

Usage in a test module (one 4-rank launch covers every case and layout):

    refs = {case: hf_reference(hf_config) for case, hf_config in CASES.items()}
    configs = {case: (ref.model_cfg, ref.full) for case, ref in refs.items()}
    results = run_on_ranks(parity_worker, 4, args=(model_type, configs, tokens))[0]
    assert_close_scaled(results[(case, layout)].logits, refs[case].logits, FP32_HF_PARITY, case)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family, get_family

SEQ = 16
BATCH = 2
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))
"""(tensor_model_parallel_size, expert_model_parallel_size) checked in one 4-rank launch."""


# ---------------------------------------------------------------------------------------------
# Rule tables, applied in memory with the converter's semantics (`checkpoint_convert.mapping`).
# ---------------------------------------------------------------------------------------------


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def hf_to_megatron(family: Family, cfg: MoEModelConfig,
                   hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF checkpoint tensors -> TP1/EP1 Megatron tensors; every HF tensor mapped or ignored."""
    from checkpoint_convert.mapping import expand

    full = {}
    entries = expand(family, cfg)  # raises if a name appears in two rules
    for entry in entries:
        missing = [n for n in entry.hf if n not in hf]
        if missing:
            raise KeyError(f"{entry.megatron}: HF tensors {missing} not in the checkpoint")
        tensors = [hf[n] for n in entry.hf]
        if entry.rule.pads_vocab:
            tensors = [_pad_rows(t, cfg.padded_vocab_size) for t in tensors]
        full[entry.megatron] = entry.to_megatron(tensors, cfg)
    used = {name for entry in entries for name in entry.hf}
    ignored = [re.compile(p) for p in family.ignored_hf_keys]
    unmapped = [n for n in hf if n not in used and not any(p.fullmatch(n) for p in ignored)]
    if unmapped:
        raise ValueError(f"HF tensors neither mapped nor ignored: {unmapped}")
    return full


def megatron_to_hf(family: Family, cfg: MoEModelConfig,
                   full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TP1/EP1 Megatron tensors (or their gradients) -> HF tensors, vocabulary padding trimmed."""
    from checkpoint_convert.mapping import expand, group_to_hf, hf_groups

    hf = {}
    for group in hf_groups(expand(family, cfg)):
        entry = group[0]
        for name, tensor in zip(entry.hf, group_to_hf(group, cfg, full), strict=True):
            hf[name] = tensor[: cfg.vocab_size] if entry.rule.pads_vocab else tensor
    return hf


# ---------------------------------------------------------------------------------------------
# The HF reference (runs in the test process).
# ---------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """A tiny HF model's checkpoint, a batch, and its logits and loss gradients."""

    model_type: str
    model_cfg: MoEModelConfig
    hf_tensors: dict[str, torch.Tensor]
    """Checkpoint tensors under hub names."""
    full: dict[str, torch.Tensor]
    """The same weights as TP1/EP1 Megatron tensors (through the family's rules)."""
    tokens: torch.Tensor
    logits: torch.Tensor
    hf_grads: dict[str, torch.Tensor]
    """d(loss)/d(tensor) under hub names, loss = mean next-token cross-entropy."""


def _hub_names(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory (fused-expert) names -> the names `save_pretrained` writes (original format)."""
    from transformers.core_model_loading import revert_weight_conversion

    hub = revert_weight_conversion(model, dict(tensors))
    return {name: t.detach().clone().contiguous() for name, t in hub.items()}


def _perturb_ones(model, generator: torch.Generator) -> None:
    """Norm weights start at 1 and biases at 0 (GPT-OSS's stacked expert biases `*_bias` too);
    randomise them so a swapped or dropped norm or bias cannot hide."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("_bias"):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def next_token_loss(logits_BSV: torch.Tensor, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t."""
    vocab = logits_BSV.shape[-1]
    return F.cross_entropy(logits_BSV[:, :-1].reshape(-1, vocab).float(),
                           tokens_BS[:, 1:].reshape(-1))


def reference_model(hf_config, seed: int = 0):
    """The tiny HF model of `hf_config`: fp32, eager attention, norm weights perturbed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    _perturb_ones(model, torch.Generator().manual_seed(seed + 1))
    return model


def hf_reference(hf_config, seed: int = 0) -> Reference:
    """Record `reference_model`'s checkpoint, logits and loss gradients on a fixed batch."""
    model = reference_model(hf_config, seed)
    tokens = torch.randint(0, hf_config.vocab_size, (BATCH, SEQ),
                           generator=torch.Generator().manual_seed(seed + 2))
    logits = model(tokens).logits.float()
    next_token_loss(logits, tokens).backward()
    family = get_family(hf_config.model_type)
    model_cfg = family.to_model_config(hf_config)
    hf_tensors = _hub_names(model, model.state_dict())
    grads = _hub_names(model, {n: torch.zeros_like(p) if p.grad is None else p.grad
                               for n, p in model.named_parameters()})
    return Reference(hf_config.model_type, model_cfg, hf_tensors,
                     hf_to_megatron(family, model_cfg, hf_tensors), tokens, logits.detach(), grads)


def save_reference(hf_config, out_dir, seed: int = 0, fused: bool = False) -> Path:
    """Write `reference_model` as an HF directory (hub per-expert layout, or v5's fused one)."""
    model = reference_model(hf_config, seed)
    model.save_pretrained(out_dir, save_original_format=not fused)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# The Megatron side (runs on every rank of a `run_on_ranks` launch).
# ---------------------------------------------------------------------------------------------


def build_megatron(model_type: str, model_cfg: MoEModelConfig, parallel):
    """This rank's GPTModel with the family's attention hook and the SFT `ECRouter`."""
    from megatron_ec.models.assembly import assemble_model
    from megatron_ec.models.builder import RuntimeOptions
    from megatron_ec.moe.methods import make_method

    return assemble_model(model_cfg, make_method("sft"), parallel, RuntimeOptions(seq_length=SEQ),
                          family=get_family(model_type))


def _gathered_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b, s, vocab] fp32 logits, TP vocabulary shards gathered (differentiably), padding cut."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
    logits = model(tokens, positions, causal[None, None])
    return gather_from_tensor_model_parallel_region(logits.float())[..., :vocab_size]


def _layout_result(model_type: str, model_cfg: MoEModelConfig, full, tokens, layout):
    from megatron_ec.models.layout import full_tensors, load_full_tensors
    from megatron_ec.parallel import init_parallel
    from megatron_ec.training.distributed import finalize_grads, wrap_ddp

    parallel = _parallel(layout)
    init_parallel(parallel, seed=1234)
    model, tcfg = build_megatron(model_type, model_cfg, parallel)
    load_full_tensors(model, full)
    ddp = wrap_ddp(model, tcfg)
    ddp.eval()  # no dropout anyway; eval keeps the routers' training-only accumulation off
    ddp.zero_grad_buffer()
    logits = _gathered_logits(ddp, tokens, model_cfg.vocab_size)
    next_token_loss(logits, tokens).backward()
    finalize_grads(ddp)
    grads = full_tensors(model, lambda p: p.main_grad)
    return LayoutResult(logits.detach(), grads, sorted(set(full) ^ set(grads)))


@dataclass
class LayoutResult:
    """What one layout of a `parity_worker` launch produced (gathered to TP1/EP1 on rank 0)."""

    logits: torch.Tensor
    grads: dict[str, torch.Tensor]
    """d(loss)/d(parameter) under TP1/EP1 Megatron names."""
    unmatched: list[str]
    """Names in the mapped tensors but not in the model, or the other way round."""


def _parallel(layout):
    from megatron_ec.parallel import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=layout[0],
                          expert_model_parallel_size=layout[1])


def _resharded_logits(model_type: str, model_cfg: MoEModelConfig, full, tokens, ckpt_dir: str,
                      save_layout=(2, 2), load_layout=(1, 1)) -> torch.Tensor:
    """Logits at `load_layout` of a torch_dist checkpoint saved at `save_layout`."""
    from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
    from megatron_ec.models.layout import load_full_tensors
    from megatron_ec.parallel import init_parallel

    init_parallel(_parallel(save_layout), seed=1)
    model, _ = build_megatron(model_type, model_cfg, _parallel(save_layout))
    load_full_tensors(model, full)
    save_model_weights(model, ckpt_dir)
    init_parallel(_parallel(load_layout), seed=2)
    model, _ = build_megatron(model_type, model_cfg, _parallel(load_layout))
    load_model_weights(model, ckpt_dir)
    with torch.no_grad():
        return _gathered_logits(model.eval(), tokens, model_cfg.vocab_size)


def _imported_logits(hf_dir: str, ckpt_dir: str, layout, tokens) -> torch.Tensor:
    """Logits after `checkpoint_convert` imports `hf_dir` at `layout` (each rank reads slices)."""
    from checkpoint_convert.importer import import_hf
    from checkpoint_convert.verify import load_megatron, megatron_logits

    import_hf(hf_dir, ckpt_dir, _parallel(layout))
    model, _, cfg = load_megatron(ckpt_dir, _parallel(layout))
    return megatron_logits(model, tokens)[..., : cfg.vocab_size]


RESHARDED = "torch_dist TP2/EP2 -> TP1/EP1"
IMPORTED = "checkpoint_convert import"


def parity_worker(model_type: str, configs: dict, tokens: torch.Tensor, layouts=LAYOUTS,
                  ckpt_dir: str | None = None, hf_dirs: dict | None = None):
    """Rank 0 returns {(case, layout): LayoutResult}; `configs` = {case: (model_cfg, full)}.

    With `ckpt_dir`, also {(case, RESHARDED): logits} of a checkpoint saved at TP2/EP2 and loaded
    at TP1/EP1 (so the family's custom modules survive distributed checkpointing), and for the
    cases in `hf_dirs` ({case: HF directory}) {(case, layout, IMPORTED): logits} of the converter's
    import at every layout.
    """
    import torch.distributed as dist

    results = {}
    for case, (model_cfg, full) in configs.items():
        for layout in layouts:
            results[(case, layout)] = _layout_result(model_type, model_cfg, full, tokens, layout)
            if hf_dirs and case in hf_dirs:
                ckpt = f"{ckpt_dir}/{case}_import_tp{layout[0]}ep{layout[1]}"
                results[(case, layout, IMPORTED)] = _imported_logits(hf_dirs[case], ckpt, layout,
                                                                     tokens)
        if ckpt_dir is not None:
            results[(case, RESHARDED)] = _resharded_logits(model_type, model_cfg, full, tokens,
                                                           f"{ckpt_dir}/{case}")
    return results if dist.get_rank() == 0 else None


# ---------------------------------------------------------------------------------------------
# Comparisons.
# ---------------------------------------------------------------------------------------------


def roundtrip_mismatches(reference: Reference) -> list[str]:
    """HF names whose tensor does not survive HF -> Megatron -> HF bitwise."""
    family = get_family(reference.model_type)
    back = megatron_to_hf(family, reference.model_cfg, reference.full)
    names = set(back) | set(reference.hf_tensors)
    ignored = [re.compile(p) for p in family.ignored_hf_keys]
    return sorted(n for n in names if not any(p.fullmatch(n) for p in ignored)
                  and (n not in back or n not in reference.hf_tensors
                       or back[n].dtype != reference.hf_tensors[n].dtype
                       or not torch.equal(back[n], reference.hf_tensors[n])))


def hf_named_grads(reference: Reference,
                   megatron_grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron gradients under the HF names of `reference.hf_grads` (through the same rules)."""
    family = get_family(reference.model_type)
    grads = megatron_to_hf(family, reference.model_cfg, megatron_grads)
    return {name: grads[name] for name in reference.hf_grads}


# ---------------------------------------------------------------------------------------------
# The converter CLI's single-process path (runs in the test process, a world of one).
# ---------------------------------------------------------------------------------------------


@dataclass
class RoundTrip:
    """HF dir -> `checkpoint_convert` import -> verify -> export -> HF dir."""

    verify_diff: float
    exported: Path


def converter_round_trip(hf_dir: Path, work_dir: Path) -> RoundTrip:
    """Import at TP1/EP1, verify against stock transformers, export back to HF."""
    from checkpoint_convert.exporter import export_hf
    from checkpoint_convert.importer import import_hf
    from checkpoint_convert.verify import verify

    ckpt, exported = work_dir / "ckpt", work_dir / "exported"
    import_hf(hf_dir, ckpt)
    diff = verify(hf_dir, ckpt, seq_len=SEQ)
    export_hf(ckpt, exported)
    return RoundTrip(diff, exported)
