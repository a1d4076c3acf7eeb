"""Fine-tuning methods: one file per method, one contract, one registry (see `README.md` here).

    base.py       the contract: MethodConfig, Decisions, MoEFacts, PhaseStart, Method
    registry.py   name -> Method class; `BUILTIN_METHODS` lists the files below
    sft.py        SFT, with or without the family's aux loss          (METHODS.md s.1)
    bias.py       aux-loss-free bias routing                           (s.2)
    condenser.py  ExpertCondenser, paper and reference modes           (s.3)
    esft.py       ESFT: score experts on task data, train the selected  (s.4)
    saved.py      method_state.json and megatron_ec_routing.json (and their older formats)
"""

from megatron_ec.moe.methods.base import Decisions, Method, MethodConfig, MoEFacts, PhaseStart
from megatron_ec.moe.methods.registry import (
    build_method,
    make_method,
    method_class,
    method_names,
    register,
)

__all__ = ["Decisions", "Method", "MethodConfig", "MoEFacts", "PhaseStart", "build_method",
           "make_method", "method_class", "method_names", "register"]
