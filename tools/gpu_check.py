"""The whole job once on one GPU, as one JSON: `bash tools/gpu_check.sh` (issue 14).

Stages, each a subprocess with its own time limit, so that one failure is recorded and the rest
still run (a device lease is too short to rerun for every bug):
  env         torch / CUDA / NCCL / Megatron-Core / Transformer Engine as found;
  discipline  the device-discipline and meta-device tests, with the GPU visible;
  demo        the demo recipe (tiny Qwen2-MoE, generated arithmetic) through the launcher on one
              rank: import, phase 1 (bias), phase 2 (condensers), export, held-out evaluation;
              bf16 on a GPU, so Float16Module + Megatron's DistributedOptimizer over NCCL;
  resume      the same recipe again in a second folder, the trainer killed after a phase-1 step
              (MEGATRON_EC_FAULT), then relaunched: it must resume, finish both phases and log
              the same losses as `demo` (bf16 with atomics in the token combine: compared with a
              tolerance, the max relative difference recorded);
  logits      the exported HF model (routing restored) against the Megatron checkpoint it came
              from, fp32 on the same random tokens (`checkpoint_convert verify`);
  bench       `tools/bench/train_bench.py` on the mid-size model, ours against stock HF, same
              GPU and dtype: tokens/s and peak memory.
`--cpu` runs the same stages on this CPU (fp32, gloo, fewer steps): the check of the check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "discipline", "demo", "resume", "logits", "bench")
DISCIPLINE_TESTS = ("tests/test_device_discipline.py", "tests/test_meta_routing.py",
                    "tests/test_routing.py", "tests/test_router.py")
LOSS_RTOL = {"cpu": 1e-5, "gpu": 2e-2}  # bf16 + nondeterministic scatter-add on the GPU


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run `cmd` from the repo root, output to `log`; rc 124 when it ran past `timeout` s."""
    began = time.monotonic()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"rc": rc, "seconds": round(time.monotonic() - began, 1), "log": log.name, "tail": tail}


def demo_overrides(root: Path, cpu: bool, steps: int) -> list[str]:
    """Recipe overrides that put every output of the demo under `root`, on one rank."""
    return [f"model.checkpoint={root}/ckpt", f"data.train={root}/data/train.jsonl",
            f"data.cache_dir={root}/data_cache", f"phases.bias.output.dir={root}/p1",
            f"phases.condenser.output.dir={root}/p2", f"phases.sft.model.checkpoint={root}/ckpt",
            f"phases.sft.output.dir={root}/sft", f"pipeline.analysis_dir={root}/analysis",
            f"pipeline.hf_model={root}/hf_base",
            f"pipeline.export_dir={root}/hf", f"pipeline.eval.heldout={root}/data/heldout.jsonl",
            f"pipeline.demo_num_train=2000", f"pipeline.eval.max_samples={20 if cpu else 100}",
            f"train.max_steps={steps}", f"output.save_interval={max(steps // 4, 1)}",
            f"output.log_interval=1", "parallel.expert_model_parallel_size=1",
            f"train.precision={'fp32' if cpu else 'bf16'}"]


def launcher(root: Path, cpu: bool, steps: int, log: Path, timeout: float, env=None) -> dict:
    env = {"NPROC_PER_NODE": "1", "MASTER_PORT": "29517", **(env or {})}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = ["bash", "examples/finetune_condenser.sh", *demo_overrides(root, cpu, steps)]
    return run_logged(cmd, log, timeout, env)


def losses(root: Path) -> dict[str, list[float]]:
    """Per phase, the logged loss of every step (metrics.jsonl)."""
    found = {}
    for phase in ("p1", "p2"):
        path = root / phase / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            found[phase] = [row["loss"] for row in rows if "loss" in row]
    return found


def stage_env(args, out: Path) -> dict:
    code = ("import json, torch; r = {'python': __import__('sys').version.split()[0], "
            "'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'cuda_available': torch.cuda.is_available()}\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0); r['gpu'] = p.name\n"
            "    r['gpu_memory_gb'] = round(p.total_memory / 2**30, 1)\n"
            "    r['nccl'] = '.'.join(map(str, torch.cuda.nccl.version()))\n"
            "import megatron.core; r['megatron_core'] = megatron.core.__version__\n"
            "try:\n    import transformer_engine; r['transformer_engine'] = transformer_engine.__version__\n"
            "except Exception as e:\n    r['transformer_engine'] = None\n"
            "import transformers; r['transformers'] = transformers.__version__\n"
            "print('ENV ' + json.dumps(r))")
    result = run_logged([sys.executable, "-c", code], out / "env.log", 120)
    for line in (out / "env.log").read_text().splitlines():
        if line.startswith("ENV "):
            result["found"] = json.loads(line[4:])
    return result


def stage_discipline(args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DISCIPLINE_TESTS]
    return run_logged(cmd, out / "discipline.log", 300)


def stage_demo(args, out: Path) -> dict:
    root = out / "demo_run"
    result = launcher(root, args.cpu, args.steps, out / "demo.log", 420)
    result["losses"] = losses(root)
    eval_json = root / "eval.json"
    if eval_json.is_file():
        result["eval"] = json.loads(eval_json.read_text())
    return result


def stage_resume(args, out: Path) -> dict:
    root, kill_at = out / "resume_run", max(args.steps // 2, 2)
    killed = launcher(root, args.cpu, args.steps, out / "resume_killed.log", 300,
                      {"MEGATRON_EC_FAULT": f"kill_after_step:{kill_at}"})
    resumed = launcher(root, args.cpu, args.steps, out / "resume.log", 420)
    result = {"killed": killed, "resumed": resumed, "kill_after_step": kill_at,
              "rc": resumed["rc"] if killed["rc"] != 0 else 1}
    resumed_text = (out / "resume.log").read_text(errors="replace")
    result["resumed_from_checkpoint"] = "resuming" in resumed_text
    reference, got = losses(out / "demo_run"), losses(root)
    worst = 0.0
    for phase, ref in reference.items():
        mine = got.get(phase, [])
        if len(mine) != len(ref):
            result["rc"] = result["rc"] or 1
            result[f"{phase}_steps"] = [len(ref), len(mine)]
            continue
        worst = max([worst] + [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, mine)])
    result["max_loss_rel_diff_vs_demo"] = worst
    tolerance = LOSS_RTOL["cpu" if args.cpu else "gpu"]
    if not reference or worst > tolerance or not result["resumed_from_checkpoint"]:
        result["rc"] = result["rc"] or 1
    result["loss_rtol"] = tolerance
    return result


def stage_logits(args, out: Path) -> dict:
    root = out / "demo_run"
    cmd = [sys.executable, "-m", "checkpoint_convert", "verify", "--hf", f"{root}/hf",
           "--ckpt", f"{root}/p2", "--tol", "1e-3", "--seq-len", "64"]
    result = run_logged(cmd, out / "logits.log", 300)
    for line in (out / "logits.log").read_text().splitlines():
        if "max_abs_logit_diff=" in line:
            result["max_abs_logit_diff"] = float(line.split("=")[-1])
    return result


def stage_bench(args, out: Path) -> dict:
    script = REPO / "tools" / "bench" / "train_bench.py"
    if not script.is_file():
        return {"rc": 1, "error": f"{script} is missing"}
    bench_json = out / "train_bench.json"
    cmd = [sys.executable, str(script), "--out", str(bench_json),
           *(["--quick"] if args.cpu else ["--device", "cuda", "--precision", "bf16"])]
    result = run_logged(cmd, out / "bench.log", 360)
    if bench_json.is_file():
        result["figures"] = json.loads(bench_json.read_text())
    return result


def copy_results(out: Path, dest: Path) -> None:
    """The JSON and every stage's log (one tarball): what a device call brings back."""
    import shutil
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "gpu_check.json", dest / "gpu_check.json")
    with tarfile.open(dest / "gpu_check_logs.tar.gz", "w:gz") as tar:
        for log in sorted(out.glob("*.log")):
            tar.add(log, arcname=log.name)


RUNNERS = {"env": stage_env, "discipline": stage_discipline, "demo": stage_demo,
           "resume": stage_resume, "logits": stage_logits, "bench": stage_bench}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder for logs, runs and JSON")
    parser.add_argument("--cpu", action="store_true", help="fp32 on this CPU: checks the check")
    parser.add_argument("--steps", type=int, default=None, help="steps per phase (8 CPU, 40 GPU)")
    parser.add_argument("--copy-to", default=None,
                        help="also copy the JSON and a tarball of the logs here (the device's $OUT)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    args = parser.parse_args(argv)
    args.steps = args.steps or (8 if args.cpu else 40)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "cpu" if args.cpu else "gpu", "steps_per_phase": args.steps,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
    for name in stages:
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        report["stages"][name] = result = RUNNERS[name](args, out)
        print(f"[gpu_check] {name}: rc={result['rc']}", file=sys.stderr, flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    failed = [name for name, result in report["stages"].items() if result["rc"] != 0]
    report["failed"] = failed
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.copy_to:
        copy_results(out, Path(args.copy_to))
    print(f"[gpu_check] {len(stages) - len(failed)}/{len(stages)} stages passed; "
          f"{out / 'gpu_check.json'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
