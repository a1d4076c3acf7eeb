"""Imports every family adapter so that it registers itself (one line per family)."""

import megatron_ec.models.deepseek_v2  # noqa: F401
import megatron_ec.models.gpt_oss  # noqa: F401
import megatron_ec.models.mixtral  # noqa: F401
import megatron_ec.models.olmoe  # noqa: F401
import megatron_ec.models.qwen2_moe  # noqa: F401
import megatron_ec.models.qwen3_moe  # noqa: F401
