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
"""

from __future__ import annotations

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
