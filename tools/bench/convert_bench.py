"""Converter benchmark: synthetic Qwen2-MoE checkpoints (~2 GB and ~8 GB of bf16) through import
(EP1, EP2, TP2) and export, against the disk bandwidth measured in the same run; seconds, GB/s,
bytes read and per-rank peak RSS against the memory bound, as JSON.

The HF checkpoint is written straight to safetensors shards in the hub's Qwen2-MoE layout (bf16,
random values, one layer at a time), never as a transformers model. Each conversion runs as its
own process group (`torchrun`) and every rank reports its wall time (module imports excluded and
reported apart), `resource.getrusage(RUSAGE_SELF).ru_maxrss` and `/proc/self/io`.

Cold reads without root: before the disk measurement and before every conversion, the input
files are fsync'ed and dropped from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)`
(the kernel drops clean, unmapped pages of those files); `read_bytes` of `/proc/self/io` (bytes
the rank's reads fetched from the block device) shows whether that held.

    python tools/bench/convert_bench.py --work /tmp/convert_bench [--layers 9,38] [--out bench.json]

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


def write_synthetic(out: Path, cfg: dict) -> list:
    """Write the synthetic HF directory (config + sharded bf16 safetensors); returns its plan."""
    import torch
    from transformers import Qwen2MoeConfig

    from checkpoint_convert.shards import Planned, plan_shards, write_shards

    out.mkdir(parents=True)
    Qwen2MoeConfig(**cfg, dtype="bfloat16").save_pretrained(out)
    plan = [Planned(name, shape, torch.bfloat16)
            for group in _groups(cfg) for name, shape in group.items()]
    gen = torch.Generator().manual_seed(0)
    values = ((p.name, (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16))
              for p in plan)
    write_shards(out, plan_shards(plan, SHARD_BYTES), values)
    return plan


def drop_cache(root: Path) -> int:
    """fsync every file under `root` and drop its pages from the page cache; returns bytes."""
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def read_bandwidth(root: Path, cold: bool) -> float:
    """GB/s of reading every safetensors file under `root` in 16 MiB `readinto` calls."""
    if cold:
        drop_cache(root)
    buffer, total = bytearray(16 * 2**20), 0
    start = time.perf_counter()
    for path in sorted(root.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return round(total / 1e9 / (time.perf_counter() - start), 3)


def write_bandwidth(work: Path, nbytes: int = 2**30) -> float:
    """GB/s of writing `nbytes` in 16 MiB writes and fsync'ing them (what a durable save does)."""
    path, block = work / "write_probe.bin", os.urandom(16 * 2**20)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for _ in range(nbytes // len(block)):
            handle.write(block)
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return round(nbytes / 1e9 / seconds, 3)


def _proc_io() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().split("\n")
    return {k: int(v) for k, v in (line.split(": ") for line in lines if line)}


def worker(args) -> None:
    """One rank of one conversion; writes REPORT.rank<r>.json: wall seconds of the conversion
    (after the converter's modules are imported, reported as import_seconds), CPU seconds (the
    rest of the wall time is I/O wait), peak RSS and the bytes read and written."""
    start = time.perf_counter()
    import megatron.core.dist_checkpointing  # noqa: F401 - the imports every conversion pays
    import transformers  # noqa: F401

    import checkpoint_convert.exporter  # noqa: F401
    import megatron_ec.models.assembly  # noqa: F401
    from checkpoint_convert.__main__ import main

    from checkpoint_convert import tensor_io

    hf_read = [0]
    pread_into = tensor_io.pread_into

    def counted(fd, out, offset):  # the HF bytes this rank reads, as the reader issues them
        hf_read[0] += out.numel() * out.element_size()
        pread_into(fd, out, offset)

    tensor_io.pread_into = counted
    rss_imported = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    imported, io_before = time.perf_counter(), _proc_io()
    code = main(args.argv)
    seconds, io = time.perf_counter() - imported, _proc_io()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"exit": code, "seconds": seconds, "import_seconds": imported - start,
              "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "max_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
              "rss_after_imports_gb": rss_imported / 1e9, "hf_bytes_read": hf_read[0],
              **{key: io[key] - io_before[key] for key in ("rchar", "wchar", "read_bytes")}}
    rank = os.environ.get("RANK", "0")
    Path(f"{args.report}.rank{rank}.json").write_text(json.dumps(report))
    sys.exit(code)


def shard_bytes(plan: list, tp: int, ep: int) -> int:
    """Bytes of one rank's share of the HF tensors at TP `tp` / EP `ep` (ETP1): experts split
    over EP, matrices over TP; vectors and the routers' gates counted whole (replicated)."""
    total = 0
    for item in plan:
        if ".mlp.experts." in item.name:
            total += item.nbytes // ep
        elif len(item.shape) == 1 or item.name.endswith(("mlp.gate.weight", "expert_gate.weight")):
            total += item.nbytes
        else:
            total += item.nbytes // tp
    return total


def run_step(name: str, nproc: int, argv: list[str], work: Path, plan: list,
             bound_layout: tuple[int, int]) -> dict:
    """Launch one conversion on `nproc` ranks and collect the ranks' reports."""
    report = work / f"report_{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--report", str(report), "--", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_COMPILE_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    load, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - start
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(nproc)]
    nbytes, seconds = sum(p.nbytes for p in plan), max(r["seconds"] for r in ranks)
    bound = shard_bytes(plan, *bound_layout) + max(p.nbytes for p in plan) + 0.5e9
    return {"ranks": nproc, "load_avg_1min_before": round(load, 2),
            "wall_seconds": round(wall, 2), "convert_seconds": round(seconds, 2),
            "gb_per_s": round(nbytes / 1e9 / seconds, 3),
            "import_seconds_per_rank": [round(r["import_seconds"], 2) for r in ranks],
            "cpu_seconds_per_rank": [round(r["cpu_seconds"], 2) for r in ranks],
            "hf_read_gb_per_rank": [round(r["hf_bytes_read"] / 1e9, 3) for r in ranks],
            "rchar_gb_per_rank": [round(r["rchar"] / 1e9, 3) for r in ranks],
            "disk_read_gb_per_rank": [round(r["read_bytes"] / 1e9, 3) for r in ranks],
            "written_gb_per_rank": [round(r["wchar"] / 1e9, 3) for r in ranks],
            "max_rss_gb_per_rank": [round(r["max_rss_gb"], 3) for r in ranks],
            "rss_after_imports_gb_per_rank": [round(r["rss_after_imports_gb"], 3) for r in ranks],
            "rss_bound_gb": round(bound / 1e9, 3),
            "within_rss_bound": all(r["max_rss_gb"] * 1e9 <= bound for r in ranks)}


def bench_size(work: Path, layers: int) -> dict:
    """Every conversion of one synthetic checkpoint, the disk measured on its files first."""
    shutil.rmtree(work, ignore_errors=True)
    cfg = {**CONFIG, "num_hidden_layers": layers}
    start = time.perf_counter()
    plan = write_synthetic(work / "hf", cfg)
    nbytes = sum(p.nbytes for p in plan)
    results = {"hf_gb": round(nbytes / 1e9, 3), "num_hidden_layers": layers,
               "largest_tensor_gb": round(max(p.nbytes for p in plan) / 1e9, 4),
               "write_synthetic_seconds": round(time.perf_counter() - start, 2),
               "disk": {"cold_read_gb_per_s": read_bandwidth(work / "hf", cold=True),
                        "warm_read_gb_per_s": read_bandwidth(work / "hf", cold=False),
                        "fsync_write_gb_per_s": write_bandwidth(work)}}
    hf = str(work / "hf")
    for name, nproc, flags, layout in (("import_ep1", 1, [], (1, 1)),
                                       ("import_tp2", 2, ["--tp", "2"], (2, 1)),
                                       ("import_ep2", 2, ["--ep", "2"], (1, 2))):
        drop_cache(work / "hf")
        out = work / f"ckpt_{name}"
        results[name] = run_step(name, nproc, ["import", "--hf", hf, "--out", str(out), *flags],
                                 work, plan, layout)
        if name != "import_ep2":
            shutil.rmtree(out)
    drop_cache(work / "ckpt_import_ep2")
    results["export_from_ep2"] = run_step("export", 1, [
        "export", "--ckpt", str(work / "ckpt_import_ep2"), "--out", str(work / "exported")],
        work, plan, (1, 1))
    results["export_bitwise_equal"] = _same_tensors(work / "hf", work / "exported")
    _summarise(results)
    return results


def _summarise(results: dict) -> None:
    """Each conversion's GB/s as a fraction of the cold read and the fsync'ed write."""
    disk = results["disk"]
    for step in ("import_ep1", "import_tp2", "import_ep2", "export_from_ep2"):
        rate = results[step]["gb_per_s"]
        results[step]["fraction_of_cold_read"] = round(rate / disk["cold_read_gb_per_s"], 3)
        results[step]["fraction_of_fsync_write"] = round(rate / disk["fsync_write_gb_per_s"], 3)
    for step in ("import_ep1", "import_tp2", "import_ep2"):
        results[step]["hf_read_gb_all_ranks"] = round(sum(results[step]["hf_read_gb_per_rank"]), 3)
    results["ep2_not_slower_than_ep1"] = (results["import_ep2"]["convert_seconds"]
                                          <= results["import_ep1"]["convert_seconds"])


def bench(work: Path, layers: list[int]) -> dict:
    results = {"config": CONFIG, "machine_cpus": os.cpu_count(),
               "load_avg_start": [round(x, 2) for x in os.getloadavg()], "sizes": []}
    for count in layers:
        results["sizes"].append(bench_size(work, count))
        shutil.rmtree(work, ignore_errors=True)  # the synthetic checkpoints are not kept
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
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
    parser.add_argument("--layers", default="9,38",
                        help="decoder layers of each synthetic size (9: 2.0 GB, 38: 8.1 GB)")
    parser.add_argument("--out", default=None, help="JSON file (default: stdout only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = bench(Path(args.work), [int(n) for n in args.layers.split(",")])
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
