r"""Chat templates: the built-in fallbacks and the choice between them and the tokenizer's own.

Built-in templates are Jinja strings rendered by ``tokenizer.apply_chat_template``, so the
tokenizer's own templates and ours go through one code path.

- ``alpaca``:
  ``[bos]<preamble>\n\n### Instruction:\n<user>\n\n### Response:\n<assistant><eos>``,
  repeated for further turns. The preamble is the system message if there is one, else the
  Stanford-Alpaca sentence that the LLM-Adapters math evaluation also uses. The user turn already
  ends with ``### Response:\n``, so the generation prompt adds nothing.
- ``chatml``: ``[bos]<|im_start|>role\n<content><|im_end|>\n`` per message; the generation
  prompt is ``<|im_start|>assistant\n``.

The template a checkpoint was trained with is recorded at export in ``TEMPLATE_RECORD``
(``record_training_template``), and evaluation renders its prompts with it (``recorded_template``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

ALPACA_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}" + ALPACA_PREAMBLE + "{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}"
    "{{ '\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ message['content'] + (eos_token or '') }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "chatml": CHATML_TEMPLATE}
"""Built-in templates by ``DataConfig.chat_template`` / ``fallback_template`` name."""


def resolve_chat_template(tokenizer: Any, choice: str, fallback: str) -> str:
    """Returns the Jinja chat template to render conversations with.

    Args:
        tokenizer: a Hugging Face tokenizer.
        choice: ``DataConfig.chat_template``: ``"auto"``, ``"tokenizer"`` or a built-in name.
        fallback: ``DataConfig.fallback_template``, used by ``"auto"`` when the tokenizer has none.

    Raises:
        ValueError: ``choice == "tokenizer"`` and the tokenizer has no chat template.
    """
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice]
    own = tokenizer_template(tokenizer)
    if own is not None:
        return own
    if choice == "tokenizer":
        raise ValueError(
            "DataConfig.chat_template='tokenizer' but the tokenizer has no chat template; "
            "use 'auto', 'alpaca' or 'chatml'"
        )
    return BUILTIN_TEMPLATES[fallback]


def tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own default chat template, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # Several named templates: the unnamed one is "default".
        template = template.get("default")
    return template or None


TEMPLATE_RECORD = "megatron_ec_chat_template.json"
"""The chat template a model was trained with, next to an exported model's tokenizer files."""

_RECORD_FORMAT = "megatron_ec_chat_template/1"


def training_template(checkpoint_iteration: str | Path) -> dict:
    """The chat template a megatron_ec checkpoint iteration was (or will by default be) trained
    with: ``{"chat_template", "fallback_template", "template"}``.

    The choice comes from the run's ``config.yaml`` beside the iteration (``data.chat_template``,
    ``data.fallback_template``), else, for an imported checkpoint, the ``DataConfig`` defaults;
    it is resolved against the iteration's ``tokenizer/`` exactly as the trainer does.
    """
    import yaml

    from megatron_ec.data.config import DataConfig
    from megatron_ec.data.encoding import load_tokenizer
    from megatron_ec.models.ckpt_dir import TOKENIZER

    iteration = Path(checkpoint_iteration)
    choice = {"chat_template": DataConfig.chat_template,
              "fallback_template": DataConfig.fallback_template}
    run_config = iteration.parent / "config.yaml"
    if run_config.is_file():
        data = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("data") or {}
        choice.update({key: data[key] for key in choice if data.get(key)})
    tokenizer = load_tokenizer(str(iteration / TOKENIZER))
    template = resolve_chat_template(tokenizer, choice["chat_template"],
                                     choice["fallback_template"])
    return {**choice, "template": template}


def record_training_template(checkpoint_iteration: str | Path, out_dir: str | Path) -> Path | None:
    """Write ``training_template(checkpoint_iteration)`` to ``out_dir/TEMPLATE_RECORD``; a
    checkpoint without a tokenizer (nothing to render with) gets no record (returns None)."""
    from megatron_ec.models.ckpt_dir import TOKENIZER

    tokenizer_dir = Path(checkpoint_iteration) / TOKENIZER
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    record = {"format": _RECORD_FORMAT, **training_template(checkpoint_iteration)}
    path = Path(out_dir) / TEMPLATE_RECORD
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def recorded_template(model_dir: str | Path) -> dict | None:
    """The record ``record_training_template`` wrote into an exported model dir, or None.

    Raises:
        ValueError: the record exists but is unreadable.
    """
    from megatron_ec.textfile import read_json

    path = Path(model_dir) / TEMPLATE_RECORD
    if not path.is_file():
        return None
    fix = "re-export the checkpoint with checkpoint_convert export"
    record = read_json(path, fix)
    if not (isinstance(record, dict) and record.get("format") == _RECORD_FORMAT
            and isinstance(record.get("template"), str)):
        raise ValueError(f"{path}: not a {_RECORD_FORMAT} record; {fix}")
    return record
