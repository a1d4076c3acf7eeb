"""Models and data from the command line: exported HF directories, SFT data files, batches.

A model is a directory written by ``checkpoint_convert export`` (or any HF directory of a
supported family; a megatron_ec checkpoint is exported first, ``model_dir``), loaded with
``megatron_ec.eval.generate.load_exported``: fp32 on CPU, bf16 on CUDA, its ExpertCondenser
routing restored, its training chat template. Data is an SFT file in any format the trainer
reads (JSONL, JSON array, Parquet; ``messages``, ``alpaca``, ``prompt_completion``); each
conversation is rendered with the template and tokenised whole (prompt and answer, as training
sees it), cut to ``max_length`` tokens and right-padded in batches.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """`--base`, `--models`, `--labels`: the analyses that compare fine-tuned models with a base."""
    parser.add_argument("--base", required=True,
                        help="the base model (HF directory or megatron_ec checkpoint)")
    parser.add_argument("--models", required=True, nargs="+",
                        help="fine-tuned HF directories or megatron_ec checkpoints")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per model")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and runtime options the model-running analyses share."""
    parser.add_argument("--data", required=True,
                        help="SFT data file (JSONL, JSON array or Parquet; the trainer's formats)")
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per conversation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def model_dir(path: str, flag: str, out: str) -> str:
    """The HF directory to analyse for a ``--base`` / ``--models`` argument.

    An HF directory (``config.json``) is used as it is. A megatron_ec checkpoint (a root with
    ``latest``, or an iteration directory) is exported first with ``checkpoint_convert``'s
    ``export_hf`` into ``OUT/exported/<name>``, reused when a previous run completed it.

    Raises:
        ValueError: neither, naming the flag.
    """
    if Path(path, "config.json").is_file():
        return path
    from megatron_ec.models import ckpt_dir

    try:
        iteration = ckpt_dir.resolve(path)
    except ValueError:
        raise ValueError(f"{flag} {path}: neither an HF model directory (no config.json) nor a "
                         "megatron_ec checkpoint; pass a directory written by checkpoint_convert "
                         "export, or by megatron_ec.finetune") from None
    exported = Path(out) / "exported" / f"{iteration.parent.name}_{iteration.name}"
    if not Path(exported, "config.json").is_file():  # export publishes config.json atomically
        from checkpoint_convert.exporter import export_hf

        export_hf(iteration, exported, overwrite=True)
    return str(exported)


def check_data_arguments(args: argparse.Namespace) -> None:
    if not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file; pass an SFT data file")
    for flag, value in (("--limit", args.limit), ("--max-length", args.max_length),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")


def labels_for(dirs: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """One label per model directory: given, or the directory's name."""
    if labels is None:
        return [Path(d).resolve().name for d in dirs]
    if len(labels) != len(dirs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(dirs)} models; give one each")
    return list(labels)


def load_model(hf_dir: str, device: str | None):
    """``LoadedModel`` (model, tokenizer, training template, restored routing) of a directory."""
    from megatron_ec.eval.generate import load_exported

    return load_exported(hf_dir, device)


def condensers_of(hf_dir: str | Path) -> dict[int, list[int]]:
    """{layer: condenser ids} recorded in an exported directory ({} when none).

    The method's decided condensers J (whether or not they are forced at inference), else
    the experts it forces into every selection.
    """
    from megatron_ec.eval.hf_routing import read_routing_file

    saved = read_routing_file(hf_dir)
    if saved is None:
        return {}
    method, biases = saved
    decided = getattr(method.decisions, "condensers", None) or {}
    layers = sorted(set(biases) | set(decided))
    found = {layer: sorted(decided.get(layer) or method.forced_condensers(layer))
             for layer in layers}
    return {layer: [int(i) for i in ids] for layer, ids in found.items() if ids}


def method_name(hf_dir: str | Path) -> str:
    """The method recorded at export, or "sft" for a directory without a routing record."""
    from megatron_ec.eval.hf_routing import read_routing_file

    saved = read_routing_file(hf_dir)
    return "sft" if saved is None else saved[0].name


def token_rows(encoder, data: str, limit: int | None, max_length: int) -> list[list[int]]:
    """Token ids of each conversation of ``data``, rendered with ``encoder``'s template."""
    from megatron_ec.data.formats import to_conversation
    from megatron_ec.data.readers import read_records

    rows = []
    for record in read_records(data):
        if limit is not None and len(rows) >= limit:
            break
        messages = to_conversation(record, "auto", ())
        ids = encoder.encode(messages, record.location).token_ids[:max_length]
        if len(ids):
            rows.append([int(i) for i in ids])
    if not rows:
        raise ValueError(f"--data {data}: no conversations to run; pass a non-empty SFT file")
    return rows


@dataclass
class Batch:
    """Right-padded token ids and their mask, [B, S] int64 (CPU)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def real_T(self) -> torch.Tensor:
        """bool [B * S]: the real (non-padding) tokens, in the order MoE blocks flatten them."""
        return self.attention_mask.reshape(-1).bool()


def batches(rows: list[list[int]], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """``rows`` in order, ``batch_size`` at a time, right-padded with ``pad_id``."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(row) for row in chunk)
        # Host batches, as the data pipeline's: `capture.forward` moves them to the model.
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device="cpu")
        for index, row in enumerate(chunk):
            input_ids[index, :len(row)] = torch.tensor(row, dtype=torch.long, device="cpu")
            mask[index, :len(row)] = 1
        yield Batch(input_ids, mask)


def pad_id_of(loaded) -> int:
    tokenizer = loaded.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else loaded.stop_ids[0]
