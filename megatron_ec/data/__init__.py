"""SFT data pipeline: readers, formats, chat templates, assistant-only masks, packing, sampling.

See ``README.md`` in this folder for the formats, the API and the batch contract.
"""

from megatron_ec.data.batch import BATCH_KEYS, collate
from megatron_ec.data.config import DataConfig
from megatron_ec.data.dataset import PackedDataset, build_sft_dataset
from megatron_ec.data.encoding import ChatEncoder, load_tokenizer
from megatron_ec.data.errors import DataError
from megatron_ec.data.sampler import BatchSampler, eval_micro_batches
from megatron_ec.data.templates import resolve_chat_template

__all__ = [
    "BATCH_KEYS",
    "BatchSampler",
    "ChatEncoder",
    "DataConfig",
    "DataError",
    "PackedDataset",
    "build_sft_dataset",
    "collate",
    "eval_micro_batches",
    "load_tokenizer",
    "resolve_chat_template",
]
