"""Imports every family adapter so that it registers itself (one line per family)."""

import megatron_ec.models.mixtral  # noqa: F401
import megatron_ec.models.qwen2_moe  # noqa: F401
import megatron_ec.models.qwen3_moe  # noqa: F401
