"""Converter benchmark: a synthetic ~2 GB Qwen2-MoE checkpoint through import (EP1 and EP2) and
export; seconds, GB/s and per-rank peak RSS as JSON.

The HF checkpoint is written straight to safetensors shards in the hub's Qwen2-MoE layout (bf16,
random values, one layer at a time), never as a transformers model. Each conversion runs as its
own process group (`torchrun`), and every rank reports `resource.getrusage(RUSAGE_SELF).ru_maxrss`.

    python tools/bench/convert_bench.py --work /tmp/convert_bench [--out bench.json]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# ~1.0 B parameters: 9 layers x (60 experts of 1024 -> 512, a 2048-wide gated shared expert,
# GQA attention) + 32000 x 1024 embeddings and output layer.
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=9,
              num_attention_heads=16, num_key_value_heads=8, num_experts=60,
              num_experts_per_tok=4, moe_intermediate_size=512,
              shared_expert_intermediate_size=2048, max_position_embeddings=4096)
SHARD_BYTES = 500 * 10**6


def _layer_shapes(cfg: dict, layer: int) -> dict[str, tuple[int, ...]]:
    h, head_dim = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    i, s, p = cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], \
        f"model.layers.{layer}."
    shapes = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
              p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
              p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate.weight": (cfg["num_experts"], h),
              p + "mlp.shared_expert_gate.weight": (1, h),
              p + "mlp.shared_expert.gate_proj.weight": (s, h),
              p + "mlp.shared_expert.up_proj.weight": (s, h),
              p + "mlp.shared_expert.down_proj.weight": (h, s)}
    for e in range(cfg["num_experts"]):
        expert = f"{p}mlp.experts.{e}."
        shapes.update({expert + "gate_proj.weight": (i, h), expert + "up_proj.weight": (i, h),
                       expert + "down_proj.weight": (h, i)})
    return shapes


def _groups(cfg: dict):
    """Tensor shapes in write order: embeddings, one group per layer, head."""
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    yield {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        yield _layer_shapes(cfg, layer)
    yield {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def write_synthetic(out: Path) -> int:
    """Write the synthetic HF directory (config + sharded bf16 safetensors); returns its bytes."""
    import torch
    from transformers import Qwen2MoeConfig

    from checkpoint_convert.shards import Planned, plan_shards, write_shards

    out.mkdir(parents=True)
    Qwen2MoeConfig(**CONFIG, dtype="bfloat16").save_pretrained(out)
    plan = [Planned(name, shape, torch.bfloat16)
            for group in _groups(CONFIG) for name, shape in group.items()]
    gen = torch.Generator().manual_seed(0)
    values = ((p.name, (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16))
              for p in plan)
    write_shards(out, plan_shards(plan, SHARD_BYTES), values)
    return sum(p.nbytes for p in plan)


def worker(args) -> None:
    """One rank of one conversion; writes {seconds, cpu_seconds, max_rss_gb} to
    REPORT.rank<r>.json (CPU time: the rest of the wall time is I/O wait)."""
    from checkpoint_convert.__main__ import main

    start = time.perf_counter()
    code = main(args.argv)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"exit": code, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "max_rss_gb": usage.ru_maxrss * 1024 / 1e9}  # ru_maxrss is in KiB on Linux
    rank = os.environ.get("RANK", "0")
    Path(f"{args.report}.rank{rank}.json").write_text(json.dumps(report))
    sys.exit(code)


def run_step(name: str, nproc: int, argv: list[str], work: Path, nbytes: int) -> dict:
    """Launch one conversion on `nproc` ranks and collect the ranks' reports."""
    report = work / f"report_{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--report", str(report), "--", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_COMPILE_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - start
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(nproc)]
    return {"ranks": nproc, "wall_seconds": round(wall, 2),
            "convert_seconds": round(max(r["seconds"] for r in ranks), 2),
            "gb_per_s": round(nbytes / 1e9 / max(r["seconds"] for r in ranks), 3),
            "cpu_seconds_per_rank": [round(r["cpu_seconds"], 2) for r in ranks],
            "max_rss_gb_per_rank": [round(r["max_rss_gb"], 2) for r in ranks]}


def bench(work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    nbytes = write_synthetic(work / "hf")
    results = {"hf_gb": round(nbytes / 1e9, 3), "config": CONFIG, "machine_cpus": os.cpu_count(),
               "write_synthetic_seconds": round(time.perf_counter() - start, 2)}
    hf, ep1, ep2 = str(work / "hf"), str(work / "ckpt_ep1"), str(work / "ckpt_ep2")
    results["import_ep1"] = run_step("import_ep1", 1, ["import", "--hf", hf, "--out", ep1],
                                     work, nbytes)
    results["import_ep2"] = run_step("import_ep2", 2, ["import", "--hf", hf, "--out", ep2,
                                                       "--ep", "2"], work, nbytes)
    results["export_from_ep2"] = run_step("export", 1, ["export", "--ckpt", ep2, "--out",
                                                        str(work / "exported")], work, nbytes)
    results["export_bitwise_equal"] = _same_tensors(work / "hf", work / "exported")
    return results


def _same_tensors(a: Path, b: Path) -> bool:
    """The exported shards hold bitwise the synthetic tensors (streamed comparison)."""
    from safetensors import safe_open

    def index(path: Path) -> dict[str, Path]:
        names = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                names.update(dict.fromkeys(handle.keys(), file))
        return names

    left, right = index(a), index(b)
    if left.keys() != right.keys():
        return False
    for name, file in left.items():
        with safe_open(str(file), "pt") as x, safe_open(str(right[name]), "pt") as y:
            if not x.get_tensor(name).equal(y.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/convert_bench", help="scratch directory")
    parser.add_argument("--out", default=None, help="JSON file (default: stdout only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = bench(Path(args.work))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
