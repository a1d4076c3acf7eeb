"""ExpertCondenser routing in a stock transformers model: the evaluation-side entry point.

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    restore_condenser_routing(model, hf_dir)   # reads megatron_ec_routing.json

The routing file's format lives with the method code (`megatron_ec.moe.methods.saved`), the
restore with the family registry (`megatron_ec.models.hf_restore`, each family's `hf_gate`);
this module gathers them for evaluation code.
"""

from megatron_ec.models.hf_restore import restore_condenser_routing, restore_routing
from megatron_ec.moe.methods.saved import ROUTING_FILE, read_routing_file, write_routing_file

__all__ = ["ROUTING_FILE", "read_routing_file", "restore_condenser_routing", "restore_routing",
           "write_routing_file"]
