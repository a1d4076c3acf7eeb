"""HF <-> megatron_ec checkpoints.

    python -m checkpoint_convert import --hf DIR --out CKPT [--tp N --ep M] [--overwrite]
    torchrun --nproc-per-node 4 -m checkpoint_convert import --hf DIR --out CKPT --tp 2 --ep 2
    python -m checkpoint_convert export --ckpt CKPT --out DIR [--dtype fp32|bf16|fp16]
                                        [--max-shard-size 5GB] [--overwrite]
    python -m checkpoint_convert verify --hf DIR --ckpt CKPT [--tol 1e-4]

User errors print one line, `checkpoint_convert: error: <file/key>: <what>; <how to fix>`, exit
with status 2 and leave no output behind. `verify` ends with the line `max_abs_logit_diff=<x>` and
exits with status 1 above the tolerance.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

EXIT_USER_ERROR = 2
EXIT_ABOVE_TOLERANCE = 1


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(message: str, to_stderr: bool = False) -> None:
    if _is_rank0():
        print(message, file=sys.stderr if to_stderr else sys.stdout, flush=True)


def _quiet() -> None:
    """Library chatter (MCore deprecation notices, missing-TE warnings, progress bars) off."""
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run_import(args) -> int:
    from checkpoint_convert.importer import import_hf
    from megatron_ec.parallel import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp,
                              expert_model_parallel_size=args.ep)
    report = import_hf(args.hf, args.out, parallel, overwrite=args.overwrite)
    _say(f"checkpoint_convert: imported {args.hf} -> {report.iteration} (TP{args.tp}/EP{args.ep}; "
         f"rank 0 read {report.bytes_read / 1e6:.1f} of {report.bytes_total / 1e6:.1f} MB)")
    return 0


def _run_export(args) -> int:
    from checkpoint_convert.exporter import export_hf
    from checkpoint_convert.shards import parse_size

    out = export_hf(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite,
                    max_shard_bytes=parse_size(args.max_shard_size))
    _say(f"checkpoint_convert: exported {args.ckpt} -> {out}")
    return 0


def _run_verify(args) -> int:
    from checkpoint_convert.verify import verify

    diff = verify(args.hf, args.ckpt, batch=args.batch, seq_len=args.seq_len, seed=args.seed)
    ok = diff <= args.tol
    _say(f"checkpoint_convert: verify {'passed' if ok else 'FAILED'}: HF vs Megatron fp32 logits, "
         f"tolerance {args.tol:g}")
    _say(f"max_abs_logit_diff={diff:.6g}")
    return 0 if ok else EXIT_ABOVE_TOLERANCE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m checkpoint_convert",
                                     description="HF <-> megatron_ec (torch_dist) checkpoints")
    parser.add_argument("--verbose", action="store_true", help="show library warnings")
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> megatron_ec checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (save_pretrained layout)")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    imp.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    imp.set_defaults(run=_run_import)
    exp = commands.add_parser("export", help="megatron_ec checkpoint -> HF directory")
    exp.add_argument("--ckpt", required=True, help="checkpoint root or iteration directory")
    exp.add_argument("--out", required=True, help="HF directory to create")
    exp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                     help="weights dtype (default: that of the imported HF weights)")
    exp.add_argument("--max-shard-size", default="5GB", help="shard the weights beyond this size")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    exp.set_defaults(run=_run_export)
    ver = commands.add_parser("verify", help="HF vs Megatron logits on random tokens")
    ver.add_argument("--hf", required=True)
    ver.add_argument("--ckpt", required=True)
    ver.add_argument("--tol", type=float, default=1e-4)
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seq-len", type=int, default=32)
    ver.add_argument("--seed", type=int, default=0)
    ver.set_defaults(run=_run_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors become one line on stderr and exit status 2."""
    from checkpoint_convert.errors import ConversionError

    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet()
    try:
        return args.run(args)
    except (ConversionError, ValueError) as err:
        _say(f"checkpoint_convert: error: {err}", to_stderr=True)
        return EXIT_USER_ERROR
    finally:
        if "megatron.core" in sys.modules:  # never import Megatron-Core just to tear it down
            from megatron_ec.parallel import shutdown_parallel

            shutdown_parallel()


if __name__ == "__main__":
    sys.exit(main())
