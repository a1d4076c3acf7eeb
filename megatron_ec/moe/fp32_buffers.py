"""Routing state that stays fp32 when the model around it is cast (`model.to(torch.bfloat16)`)."""

from __future__ import annotations


class KeepsFp32Buffers:
    """Mixin for a `torch.nn.Module`: the buffers named in `fp32_buffers` follow device moves but
    never dtype casts (bf16 models, Megatron's `Float16Module`), since a bias step of 5e-5 is lost
    in bf16. List it before the module class: `class ECRouter(KeepsFp32Buffers, TopKRouter)`.
    """

    fp32_buffers: tuple[str, ...] = ()
    """Names of the buffers kept in their own dtype; absent or None buffers are skipped."""

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.pop(name) for name in self.fp32_buffers
                if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, buffer in kept.items():
            self._buffers[name] = buffer.to(device=fn(buffer).device)
        return result
