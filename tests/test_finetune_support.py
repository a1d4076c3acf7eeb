"""Shared helpers for the trainer tests (no tests here): a start checkpoint, data, CLI runs.

The start checkpoint has the layout `checkpoint_convert import` writes (iteration 0: weights,
model.json, method_state.json, tokenizer/) but is made directly from a random tiny model, so the
trainer tests do not depend on the converter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.data_testing import alpaca_records, char_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SEQ = 96


def tiny_model_dict(vocab_size: int) -> dict:
    from tests.tiny import tiny_config

    return tiny_config(vocab_size=vocab_size, max_position_embeddings=SEQ * 2).to_dict()


def _write_checkpoint_rank(root: str, model_dict: dict, tokenizer_dir: str) -> None:
    from megatron_ec.models import ckpt_dir
    from megatron_ec.models.assembly import assemble_model
    from megatron_ec.models.builder import RuntimeOptions
    from megatron_ec.models.config import MoEModelConfig
    from megatron_ec.models.dist_ckpt import save_model_weights
    from megatron_ec.moe.methods import make_method
    from megatron_ec.moe.methods.saved import save_method
    from megatron_ec.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(), seed=7)
    model_cfg = MoEModelConfig.from_dict(model_dict)
    method = make_method("sft")
    model, _ = assemble_model(model_cfg, method, ParallelConfig(), RuntimeOptions(seq_length=SEQ))
    stage = ckpt_dir.staging_dir(root, 0)
    save_model_weights(model, stage / ckpt_dir.WEIGHTS)
    ckpt_dir.write_model_meta(stage, {"family": "", "model_config": model_dict, "hf_config": {},
                                      "padded_vocab_size": model_cfg.padded_vocab_size})
    save_method(stage, method)
    shutil.copytree(tokenizer_dir, stage / ckpt_dir.TOKENIZER)
    ckpt_dir.publish(root, 0)


def make_start_checkpoint(root: Path) -> Path:
    """A tiny random model in the import layout at `root` (a world of one process)."""
    from tests.harness import run_on_ranks

    tokenizer_dir = root.parent / f"{root.name}_tokenizer"
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(str(tokenizer_dir))
    run_on_ranks(_write_checkpoint_rank, world_size=1,
                 args=(str(root), tiny_model_dict(len(tokenizer)), str(tokenizer_dir)),
                 timeout=300)
    return root


def make_data(folder: Path, count: int = 96) -> Path:
    """Alpaca records with short, learnable answers."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(write_jsonl(str(folder / "train.jsonl"), alpaca_records(count, answer_words=3)))


def write_config(path: Path, checkpoint: Path, train_file: Path, out_dir: Path, **sections) -> Path:
    """A small fine-tuning config; `sections` override whole keys, e.g. train={...}."""
    config = {
        "model": {"checkpoint": str(checkpoint)},
        "data": {"train": str(train_file), "seq_length": SEQ, "chat_template": "chatml",
                 "packing": True},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "max_steps": 6,
                  "warmup_ratio": 0.2},
        "method": {"name": "bias", "gamma": 1e-2},
        "output": {"dir": str(out_dir), "tensorboard": False},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict:
    """The CLI's environment: offline, CPU, `tests.harness.worker_threads()` threads per process,
    known third-party warnings silenced (`tests/quiet_site/sitecustomize.py`)."""
    from tests.harness import worker_threads

    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "quiet_site")]),
               TORCH_COMPILE_DISABLE="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    threads = worker_threads()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("MEGATRON_EC_FAULT", None)
    env.update(extra)
    return env


def run_cli(module: str, args: list[str], nproc: int = 1, timeout: float = 300,
            **env: str) -> subprocess.CompletedProcess:
    """`python -m module args` (nproc == 1) or the same under torchrun, in its own session.

    The result's `survivors` lists the processes of the launch's process group still alive (not
    zombies) a few seconds after the main process ended, e.g. an orphaned helper of a SIGKILLed
    trainer; they are then killed, and output goes to files so that none can hold a pipe open.
    """
    if nproc == 1:
        cmd = [PYTHON, "-m", module, *args]
    else:
        torchrun = str(Path(PYTHON).parent / "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(**env), stdout=out, stderr=err,
                                text=True, start_new_session=True)
        survivors = []
        try:
            proc.wait(timeout=timeout)
            survivors = group_survivors(proc.pid)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
        result.survivors = survivors
        return result


def group_survivors(pgid: int, grace: float = 3.0) -> list[int]:
    """Live (non-zombie) processes of process group `pgid` after up to `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
            if int(pgrp) == pgid and state != "Z":
                alive.append(int(entry))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def selection_biases(iteration: Path) -> dict:
    """{layer: selection bias} read from a torch_dist weights directory without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_ec.models import ckpt_dir

    flat = iteration.parent / f"{iteration.name}_weights.pt"
    dcp_to_torch_save(str(iteration / ckpt_dir.WEIGHTS), str(flat))
    return {int(name.split(".")[2]): tensor for name, tensor in torch.load(flat).items()
            if name.endswith("router.selection_bias")}


DEMO_RECIPE = REPO / "examples" / "recipes" / "demo.yaml"


def make_demo_start(root: Path, num_train: int = 240) -> tuple[Path, Path]:
    """The demo's inputs, small: generated problems, the tiny Qwen2-MoE, and its import.

    Returns:
        (imported checkpoint, train.jsonl)
    """
    from tools.make_demo_data import write_demo_data
    from tools.make_tiny_model import make_tiny_qwen2_moe

    train, _ = write_demo_data(str(root / "data"), num_train=num_train, num_heldout=20)
    make_tiny_qwen2_moe(str(root / "hf_base"), [train])
    imported = run_cli("checkpoint_convert", ["import", "--hf", str(root / "hf_base"),
                                              "--out", str(root / "ckpt")])
    assert imported.returncode == 0, imported.stderr
    return root / "ckpt", Path(train)


def demo_overrides(checkpoint: Path, train: Path, root: Path, **extra) -> list[str]:
    """Overrides that point the demo recipe at `root` (and any `key=value` in `extra`)."""
    args = [f"model.checkpoint={checkpoint}", f"data.train={train}",
            f"data.cache_dir={root / 'data_cache'}",
            f"phases.bias.output.dir={root / 'phase1'}",
            f"phases.condenser.output.dir={root / 'phase2'}", "output.tensorboard=false",
            # the demo's SFT baseline phase: one step, out of the way of the chain under test
            f"phases.sft.output.dir={root / 'sft'}", "phases.sft.train.max_steps=1"]
    return args + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


@pytest.fixture(scope="session")
def demo_start(tmp_path_factory):
    """(imported tiny Qwen2-MoE checkpoint, demo train.jsonl), made once per test session."""
    return make_demo_start(tmp_path_factory.mktemp("demo_start"))
