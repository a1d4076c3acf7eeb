"""Batched greedy generation with an exported model, its ExpertCondenser routing restored.

The model is a stock ``AutoModelForCausalLM`` loaded from the exported directory, fp32 on CPU and
bf16 on CUDA, with ``restore_condenser_routing`` applied (imported here, once, for the whole
evaluation). Prompts are rendered with the chat template the model was trained with
(``megatron_ec_chat_template.json`` written at export; without one, the trainer's default choice)
through the trainer's own ``ChatEncoder``, tokenised without extra special tokens (the template
adds BOS), sorted by length and left-padded per batch. Decoding is greedy (``do_sample=False``,
one beam) and stops at EOS or at the special token the template closes an assistant turn with
(e.g. ``<|im_end|>``); the text is decoded up to that token, special tokens removed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_ec.data.config import DataConfig
from megatron_ec.data.encoding import ChatEncoder, load_tokenizer
from megatron_ec.data.templates import recorded_template, resolve_chat_template
from megatron_ec.eval.hf_routing import restore_condenser_routing


@dataclasses.dataclass
class LoadedModel:
    """An exported model ready to generate."""

    model: Any
    tokenizer: Any
    encoder: ChatEncoder
    """Renders prompts with the training template."""
    template_source: str
    """Where the template came from, for the report."""
    restored_layers: int
    """MoE blocks whose router now routes as in the Megatron checkpoint."""
    stop_ids: list[int]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_exported(hf_dir: str, device: str | None = None) -> LoadedModel:
    """Model, tokenizer and training template of an exported directory.

    Raises:
        ValueError: no tokenizer, an unreadable routing or template record.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    tokenizer = load_tokenizer(hf_dir)
    encoder, source = training_encoder(tokenizer, hf_dir)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, local_files_only=True)
    restored = restore_condenser_routing(model, hf_dir)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, encoder, source, restored, stop_ids(encoder, model))


def training_encoder(tokenizer: Any, hf_dir: str) -> tuple[ChatEncoder, str]:
    """The ``ChatEncoder`` of the training template, and where that template came from."""
    record = recorded_template(hf_dir)
    if record is not None:
        return ChatEncoder(tokenizer, record["template"]), (
            f"recorded at export (data.chat_template={record.get('chat_template')}, "
            f"fallback {record.get('fallback_template')})")
    choice, fallback = DataConfig.chat_template, DataConfig.fallback_template
    template = resolve_chat_template(tokenizer, choice, fallback)
    return ChatEncoder(tokenizer, template), (
        f"no record in the directory: the trainer's default (chat_template={choice}, "
        f"fallback {fallback})")


def stop_ids(encoder: ChatEncoder, model: Any) -> list[int]:
    """EOS ids of tokenizer and model, plus the special token that closes an assistant turn."""
    tokenizer = encoder.tokenizer
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    marker = "\x00ANSWER\x00"
    rendered = encoder.render([{"role": "user", "content": "q"},
                               {"role": "assistant", "content": marker}])
    closing = rendered.split(marker, 1)[1] if marker in rendered else ""
    special = set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "get_added_vocab", dict)())
    first = next((token for token in special if token and closing.startswith(token)), None)
    if first is not None:
        ids.add(tokenizer.convert_tokens_to_ids(first))
    return sorted(i for i in ids if i is not None)


def render_prompts(loaded: LoadedModel, user_turns: Sequence[str]) -> list[str]:
    """Zero-shot prompts: one user turn each, plus the template's generation prompt."""
    return [loaded.encoder.render_prompt([{"role": "user", "content": text}])
            for text in user_turns]


def generate(loaded: LoadedModel, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy completions of rendered prompts, in prompt order.

    Args:
        loaded: from ``load_exported``.
        prompts: fully rendered prompts (``render_prompts``).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per ``generate`` call (longest first, to waste little padding).
        progress: called with the number of prompts finished after each batch.
    """
    tokenizer, model = loaded.tokenizer, loaded.model
    rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else loaded.stop_ids[0]
    device = next(model.parameters()).device
    completions: list[str] = [""] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([rows[i] for i in batch], pad_id)
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad_id, eos_token_id=loaded.stop_ids,
                temperature=None, top_p=None, top_k=None,
            )
            for index, new_tokens in zip(batch, output[:, input_ids.shape[1]:].tolist()):
                completions[index] = decode_until_stop(tokenizer, new_tokens, loaded.stop_ids)
            if progress is not None:
                progress(len(batch))
    return completions


def decode_until_stop(tokenizer: Any, token_ids: list[int], stops: Sequence[int]) -> str:
    """The text of ``token_ids`` before the first stop id, special tokens removed."""
    end = next((i for i, token in enumerate(token_ids) if token in stops), len(token_ids))
    return tokenizer.decode(token_ids[:end], skip_special_tokens=True)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, max len]``, each row right-aligned."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row):] = torch.tensor(row)
            attention_mask[index, width - len(row):] = 1
    return input_ids, attention_mask


class ProgressBar:
    """A tqdm bar on stderr: questions done, rate and ETA (``enabled=False``: silent)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True,
                         disable=not enabled, leave=True)

    def update(self, count: int) -> None:
        self._bar.update(count)

    def close(self) -> None:
        self._bar.close()
