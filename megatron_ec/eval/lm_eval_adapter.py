"""lm-evaluation-harness model ``megatron_ec``: an exported directory with its routing restored.

    lm_eval --model megatron_ec --model_args pretrained=EXPORTED_DIR --tasks TASKS
            [--apply_chat_template] [--include_path TASK_DIR] ...

or from Python (importing this module registers the model; so does the startup hook of
``megatron_ec.eval.lm_eval_plugin`` when lm_eval loads its models)::

    import lm_eval
    from megatron_ec.eval.lm_eval_adapter import MegatronECLM
    lm_eval.simple_evaluate(model=MegatronECLM(pretrained=EXPORTED_DIR), tasks=[...])

``MegatronECLM`` is the harness's own ``HFLM`` (batching, loglikelihoods, generation, chat
templates are the harness's) with three changes: the model is loaded from the directory
``checkpoint_convert export`` wrote and gets its trained routing back with
``restore_condenser_routing`` (bias selection, forced condensers) before the harness moves it to
its device; the tokenizer's chat template is the one the model was trained with (recorded at
export, as ``megatron_ec.evaluate`` uses it), so ``--apply_chat_template`` prompts like our
evaluation; and the default dtype is ours (fp32 on CPU, bf16 on CUDA). Without
``--apply_chat_template`` the harness prompts with raw task text, as for any base model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # the optional `eval` extra
    raise ImportError(
        "megatron_ec.eval.lm_eval_adapter needs lm-evaluation-harness 0.4.x and accelerate: "
        "pip install 'megatron_ec[eval]'") from err

from megatron_ec.eval.generate import default_device, training_encoder
from megatron_ec.eval.hf_routing import restore_condenser_routing
from megatron_ec.eval.lm_eval_plugin import MODEL_NAME

# A child of the harness's logger, so its CLI shows our lines with its own.
log = logging.getLogger("lm_eval.megatron_ec")

UNSUPPORTED_ARGS = ("peft", "delta", "autogptq", "gptqmodel", "gguf_file", "parallelize",
                    "tp_plan")
"""HFLM options that load other weights or split the model: the restore needs the exported
model whole on one device (data-parallel ``accelerate launch`` is fine: one copy per process)."""


def check_model_args(pretrained: Any, options: dict[str, Any]) -> None:
    """Raise ValueError, one line naming the argument and the fix, for what cannot be evaluated."""
    if not isinstance(pretrained, (str, Path)) or not Path(pretrained, "config.json").is_file():
        # Checked here: transformers would take a missing directory for a hub repo id.
        raise ValueError(f"--model_args pretrained={pretrained}: not an HF model directory (no "
                         "config.json); pass the directory checkpoint_convert export wrote")
    for name in UNSUPPORTED_ARGS:
        if options.get(name) not in (None, False, "", "False", "false"):
            raise ValueError(f"--model_args {name}={options[name]}: not supported by --model "
                             f"{MODEL_NAME} (the routing is restored on the exported model "
                             "loaded whole); drop it")


@register_model(MODEL_NAME)
class MegatronECLM(HFLM):
    """``HFLM`` over an exported directory, its ExpertCondenser routing restored.

    Args:
        pretrained: the directory ``checkpoint_convert export`` wrote.
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: cuda if available).
        dtype: the harness's dtype names (default: ``float32`` on CPU, ``bfloat16`` on CUDA).
        **kwargs: every other ``HFLM`` argument (``batch_size``, ``max_length``, ...), except
            ``UNSUPPORTED_ARGS``.
    """

    def __init__(self, pretrained: str, device: str | None = None, dtype: Any = None,
                 **kwargs: Any) -> None:
        check_model_args(pretrained, kwargs)
        device = device or default_device()
        if dtype is None:
            # The harness CLI passes cuda:0 unless told otherwise and falls back to the CPU.
            on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
            dtype = "bfloat16" if on_cuda else "float32"
        self.restored_layers = 0
        super().__init__(pretrained=str(pretrained), device=device, dtype=dtype, **kwargs)
        encoder, self.template_source = training_encoder(self.tokenizer, str(pretrained))
        self.tokenizer.chat_template = encoder.template
        log.info("%s: %s: %d MoE layers with restored routing; chat template %s", MODEL_NAME,
                 pretrained, self.restored_layers, self.template_source)

    def _create_model(self, pretrained: str, **kwargs: Any) -> None:
        """The harness's loading, then the trained routing (before the move to the device)."""
        super()._create_model(pretrained, **kwargs)
        self.restored_layers = restore_condenser_routing(self._model, pretrained)

    def get_model_info(self) -> dict:
        """The harness's record, without its hub lookup (a local directory has no hub sha)."""
        model = self._model
        return {"model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": model.dtype, "model_revision": self.revision, "model_sha": "",
                "megatron_ec_restored_layers": self.restored_layers,
                "megatron_ec_chat_template": self.template_source}
