"""HF <-> megatron_ec (torch_dist) checkpoints: `python -m checkpoint_convert import|export|verify`.

See README.md in this directory. The library entry points are `importer.import_hf`,
`exporter.export_hf` and `verify.verify`; the HF-side routing restore is
`megatron_ec.models.hf_restore.restore_condenser_routing` (also exported by
`megatron_ec.eval.hf_routing`).
"""
