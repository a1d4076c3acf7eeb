"""Lets ``lm_eval --model megatron_ec`` find our harness adapter, with nothing imported at startup.

lm-evaluation-harness 0.4.x has no plugin discovery for models: its CLI looks ``--model NAME``
up in ``lm_eval.api.registry.model_registry``, which the package ``lm_eval.models`` fills, when
it is imported, with lazy ``"module:Class"`` placeholders. So this package ships the one-line
``megatron_ec_lm_eval.pth`` (``PTH_FILE``; ``pip install`` puts it into site-packages through
``setup.py``, ``tools/install_env.sh`` copies it beside an editable install), which calls
``install()`` when the interpreter starts. ``install()`` only puts a one-shot finder on
``sys.meta_path``: when ``lm_eval.models`` is imported, it runs that module as usual and then
registers ``megatron_ec`` as a placeholder for ``ADAPTER``. Nothing here imports lm_eval, torch or
transformers; the adapter itself is imported when the harness asks for the model.

The hook runs in every interpreter of the environment, so it imports nothing of this package: it
finds ``megatron_ec`` without importing it (``importlib.util.find_spec``) and executes this file
alone, under the name ``megatron_ec_lm_eval_plugin`` (hence standard library imports only, and
no package import at start-up that a later ``sys.path`` change could not undo).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from pathlib import Path

MODEL_NAME = "megatron_ec"
"""The name given to ``lm_eval --model``."""
ADAPTER = "megatron_ec.eval.lm_eval_adapter:MegatronECLM"
HOOKED_MODULE = "lm_eval.models"
"""The module whose import fills the harness's model registry."""
PTH_FILE = Path(__file__).with_name("megatron_ec_lm_eval.pth")
"""The startup hook, copied to the top of site-packages under the same name."""


def register_placeholder() -> None:
    """Register ``MODEL_NAME`` in the harness's model registry as a lazy ``ADAPTER`` path.

    Importing the adapter later upgrades the placeholder to the class (the registry allows a
    placeholder to become the object it names).
    """
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ADAPTER)


def _register_or_warn() -> None:
    # Runs inside the harness's own import: a harness whose registry moved must still start.
    try:
        register_placeholder()
    except Exception as err:  # noqa: BLE001 - any failure here is reported, never raised
        warnings.warn(f"megatron_ec: could not register the lm_eval model {MODEL_NAME!r} ({err}); "
                      "import megatron_ec.eval.lm_eval_adapter before running the harness",
                      stacklevel=2)


class _RegisterAfter(importlib.abc.Loader):
    """Runs the real loader of ``HOOKED_MODULE``, then registers the placeholder."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_or_warn()

    def __getattr__(self, name: str):
        # Resource readers and the like: the wrapped loader answers.
        return getattr(self._loader, name)


class _HarnessFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands ``HOOKED_MODULE``'s real spec back with a wrapped loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != HOOKED_MODULE:
            return None
        sys.meta_path.remove(self)  # one-shot, and the real finders below answer the lookup
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


def install() -> None:
    """Arrange for ``MODEL_NAME`` to be registered whenever the harness loads its models."""
    if HOOKED_MODULE in sys.modules:
        _register_or_warn()
    # By name: the hook's copy of this module and an imported one have distinct classes.
    elif not any(type(finder).__name__ == _HarnessFinder.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, _HarnessFinder())
