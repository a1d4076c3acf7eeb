"""Expert-parallel scaling: one recipe phase for a few steps at several EP sizes, both condenser
placements; JSON and a PNG of tokens/s per rank, step time, all-to-all bytes, per-rank load.

    python tools/bench/ep_scaling.py --recipe examples/recipes/demo.yaml --phase condenser \
        --ep 1,2,4 --nproc 4 --steps 6 --out tools/bench/ep_scaling.cpu4 [dotted.key=value ...]

Each (EP, placement) is one `megatron_ec.finetune` launch under `megatron_ec.torchrun` on
`--nproc` ranks with the phase's `parallel.expert_model_parallel_size=EP`,
`method.condenser_placement=...`, `train.max_steps=--steps` and a scratch `output.dir` (no
checkpoint is kept), plus the given overrides. The phase's starting checkpoint must exist (for the demo: run phase 1 first). Numbers
come from the run's own `metrics.jsonl`: the mean over the steps after `--warmup` of
`step_time`, `tokens_per_s` / nproc, and the EP counters of `megatron_ec.moe.ep_counters`
(counted from the dispatcher's split sizes, not timed).

    python tools/bench/ep_scaling.py --project

prints the analytic projection of docs/EP_PLACEMENT.md (Qwen3-30B-A3B on 8 x H100) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACEMENTS = ("routed", "replicated")
KEYS = ("step_time", "tokens_per_s", "ep/a2a_bytes_mean", "ep/a2a_bytes_max",
        "ep/a2a_remote_bytes_mean", "ep/tokens_received_max", "ep/tokens_received_mean",
        "ep/expert_rows_max", "ep/expert_rows_mean", "ep/placeholders_max",
        "ep/placeholders_mean")


def _launch(args, ep: int, placement: str, out_dir: Path) -> Path:
    # Phase-scoped keys: a shared output.dir would also move where the phase starts from (a
    # recipe's later phase starts from the previous phase's output.dir).
    own = f"phases.{args.phase}."
    command = [sys.executable, "-m", "megatron_ec.torchrun", "--standalone",
               "--nproc_per_node", str(args.nproc), "-m", "megatron_ec.finetune",
               "--config", args.recipe, "--phase", args.phase,
               f"{own}parallel.expert_model_parallel_size={ep}",
               f"{own}method.condenser_placement={placement}", f"{own}train.max_steps={args.steps}",
               f"{own}output.dir={out_dir}", f"{own}output.save_interval={10 ** 9}",
               f"{own}output.log_interval=1", *args.overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCH_COMPILE_DISABLE="1", HF_HUB_OFFLINE="1")
    if not args.gpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    print(f"[ep_scaling] EP{ep} {placement}: {' '.join(command[2:])}", file=sys.stderr)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return out_dir / "metrics.jsonl"


def _summary(metrics_file: Path, warmup: int, nproc: int) -> dict:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    kept = records[warmup:] or records
    summary = {"steps": len(kept)}
    for key in KEYS:
        values = [r[key] for r in kept if isinstance(r.get(key), (int, float))]
        if values:
            summary[key] = sum(values) / len(values)
    if "tokens_per_s" in summary:
        summary["tokens_per_s_per_rank"] = summary["tokens_per_s"] / nproc
    if summary.get("ep/expert_rows_mean"):
        summary["expert_rows_max_over_mean"] = (summary["ep/expert_rows_max"]
                                                / summary["ep/expert_rows_mean"])
    return summary


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokens_per_s_per_rank", "tokens/s per rank"), ("step_time", "step time (s)"),
              ("ep/a2a_bytes_mean", "all-to-all bytes sent per rank per step"),
              ("expert_rows_max_over_mean", "expert rows per rank, max / mean")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for placement, marker in zip(PLACEMENTS, "os"):
            rows = [r for r in results if r["placement"] == placement and key in r]
            ax.plot([r["ep"] for r in rows], [r[key] for r in rows], marker=marker,
                    label=placement)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("EP size")
        ax.set_xticks(sorted({r["ep"] for r in results}))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="ep_scaling_") as scratch:
        for ep in [int(x) for x in args.ep.split(",")]:
            for placement in PLACEMENTS:
                metrics = _launch(args, ep, placement, Path(scratch) / f"ep{ep}-{placement}")
                results.append({"ep": ep, "placement": placement,
                                **_summary(metrics, args.warmup, args.nproc)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = Path(f"{out}.json"), Path(f"{out}.png")  # the name may hold dots
    meta = {"recipe": args.recipe, "phase": args.phase, "nproc": args.nproc, "steps": args.steps,
            "warmup": args.warmup, "overrides": args.overrides, "gpu": args.gpu}
    json_path.write_text(json.dumps({"run": meta, "results": results}, indent=1))
    _plot(results, png_path)
    print(json.dumps(results, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="examples/recipes/demo.yaml")
    parser.add_argument("--phase", default="condenser")
    parser.add_argument("--ep", default="1,2,4", help="comma-separated EP sizes")
    parser.add_argument("--nproc", type=int, default=4, help="ranks per launch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out")
    parser.add_argument("--out", default="tools/bench/ep_scaling", help="path without suffix")
    parser.add_argument("--gpu", action="store_true", help="use the GPUs (default: CPU ranks)")
    parser.add_argument("--project", action="store_true",
                        help="print the analytic Qwen3-30B-A3B projection and exit")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_args(argv)
    if args.project:
        sys.path.insert(0, str(Path(__file__).parent))
        from ep_projection import markdown_table

        print(markdown_table())
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
