"""The paper's analyses (``python -m megatron_ec.analyze SUBCOMMAND``), one module per subcommand.

Contract of a subcommand module ``megatron_ec.analysis.<name>`` (``<name>`` listed in
``megatron_ec.analyze.SUBCOMMANDS``):

- ``add_arguments(parser)``: adds its options to an ``argparse.ArgumentParser`` that already has
  ``--out DIR`` (the output folder, created before ``run``);
- ``run(args) -> dict``: computes the analysis, writes its PNGs into ``args.out`` and returns the
  JSON-serialisable report, which the CLI writes to ``DIR/<name>.json``. The report's
  ``"figures"`` key, when present, lists the PNG paths written. Bad input raises ``ValueError``
  (or ``megatron_ec.analyze.UserError``) with a one-line message naming the file or flag and
  the fix.

Shared pieces: ``stats`` (the formulas, pure tensor math), ``plots`` (matplotlib, Agg),
``capture`` (running an exported HF model over data and recording its MoE blocks), ``inputs``
(models and data from the command line).
"""
