"""SFT data pipeline: readers, formats, chat templates, assistant-only masks, packing, sampling.

See ``README.md`` in this folder for the formats, the API and the batch contract.
"""

from megatron_ec.data.config import DataConfig
from megatron_ec.data.errors import DataError

__all__ = [
    "DataConfig",
    "DataError",
]
