"""Adapts Megatron-Core to the machine. The only package allowed to patch Megatron-Core."""

from megatron_ec.compat.cpu_gloo import CompatError, apply_cpu_compat
from megatron_ec.compat.sync_save import patch_sync_save_queue
from megatron_ec.compat.torch_norm import SequenceParallelTorchNorm

__all__ = ["CompatError", "SequenceParallelTorchNorm", "apply_cpu_compat", "patch_sync_save_queue"]
